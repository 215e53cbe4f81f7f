"""Where SGLang's scheduler loop spends its time (issue #16, item 4): py-spy samples of the
scheduler process during steady decode.

    python lab/profile_scheduler.py run --config /tmp/synth7b/adapters.yaml \
        --out /tmp/results/scheduler --set max_loras_per_batch=128 --set mem_fraction_static=0.7 \
        --streams 64 256 --arms adapters
    python lab/profile_scheduler.py summarize /tmp/results/scheduler --out /tmp/results/scheduler
    python lab/profile_scheduler.py run --config adapters.yaml --backend hf --streams 2 \
        --adapters 2 --warmup 2 --seconds 3 --out /tmp/sched   # CPU dry run: samples this process

The decode profile (``lab/profile_decode.py``) found the GPU idle a quarter of each step, and
SGLang's busiest thread is its scheduler's main thread at one core at 64 streams as at 256 (its
loop does not block), so the core count cannot say whether the loop's work bounds the step. This
samples it: ``run`` starts the engine as ``loadtest.bench`` does and, for each of ``--streams`` ×
``--arms``, keeps N requests running (``lab/profile_decode.py``'s clients), and after
``--warmup`` s runs ``py-spy record`` on the scheduler process (the SGLang child whose name starts
``sglang::schedul``; this process on the CPU backend) for ``--seconds`` s at ``--rate`` samples a
second, without pausing it (``--nonblocking``), while it counts output tok/s.

``summarize`` reads each point's collapsed stacks (``<label>.txt`` or ``.txt.gz``, py-spy's
``raw`` format, one line per distinct stack with its thread) and reports for the busiest thread:
its samples as a share of the window's nominal samplings, ``--rate`` × ``--seconds`` (the rest:
waiting in a system call, or samplings py-spy missed: a lower bound), the share of its
samples in each phase of the loop (the innermost frame that names one: waiting for the GPU,
streaming out, processing results, launching the forward, launching a prefill (its forward,
eager or SGLang's breakable prefill graph, whose attention runs eagerly: each prefill pass's
launches on this thread), the LoRA batch's indices, scheduling the next batch, the prefix tree,
taking in requests; else other), the top lines by samples spent there
(self) and the top functions by samples under them (inclusive; ties in the order met);
py-spy's own count ("Samples: N") counts only samplings that found a busy thread (the API
process's 2,527 of 3,750 matched its 0.72 core in ``/proc``:
``results/serving/h200-7b-http-profile``), so it is not the window: a busy share against it
reads 100 % whatever the thread did.
Writes ``scheduler.md``, ``scheduler.json`` and ``scheduler.png`` into ``--out``.

py-spy is not a dependency of the product: ``pip install py-spy`` (or ``--py-spy PATH``); it needs
ptrace rights over the engine's processes (the same user, or root).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_decode's clients and build

PHASES = {  # SGLang 0.5.17's method names → the loop's phases (the innermost match wins; py-spy
    # names a frame ``Class.method``, matched here by the method's name alone);
    # synchronize: torch.cuda.Event's, on the forward's copy_done before results are read
    "synchronize": "waiting for the GPU",
    "stream_output": "streaming out",
    "process_batch_result": "processing results",
    "process_batch_result_decode": "processing results",
    "process_batch_result_prefill": "processing results",
    "run_batch": "launching the forward",
    # a prefill's forward: eager (ModelRunner.forward_extend, the attention backend's) or
    # SGLang's breakable prefill graph, whose attention runs eagerly between the captured parts
    "forward_extend": "launching a prefill",
    "_execute_body_capture": "launching a prefill",
    "prepare_lora_batch": "the LoRA batch's indices",
    "get_next_batch_to_run": "scheduling the next batch",
    "get_new_batch_prefill": "scheduling the next batch",
    "update_running_batch": "scheduling the next batch",
    "match_prefix": "the prefix tree",
    "evict": "the prefix tree",
    "cache_finished_req": "the prefix tree",
    "cache_unfinished_req": "the prefix tree",
    "recv_requests": "taking in requests",
    "process_input_requests": "taking in requests",
}
PHASE_NAMES = ["waiting for the GPU", "streaming out", "processing results",
               "launching the forward", "launching a prefill", "the LoRA batch's indices",
               "scheduling the next batch", "the prefix tree", "taking in requests",
               "other"]  # fmt: skip
SCHEDULER_NAME = "sglang::schedul"  # the kernel keeps 15 characters of setproctitle's name
TOP = 15
FRAME = re.compile(r"^(?P<function>.*?) \((?P<where>[^()]*)\)$")
THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\)(?:: (?P<name>.*))?$")


# ---------------------------------------------------------------- the summariser (no GPU needed)


def parse_raw(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy ``raw`` lines (``frame;frame;… count``, outermost first, with ``--threads`` the
    first frame names the thread) → (thread, frames, samples)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if THREAD.match(frames[0]) else "thread (?)"
        stacks.append((thread, frames[1:] if thread == frames[0] else frames, int(count)))
    return stacks


def function_of(frame: str) -> str:
    match = FRAME.match(frame)
    return match["function"] if match else frame


def phase_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        if (phase := PHASES.get(function_of(frame).rsplit(".", 1)[-1])) is not None:
            return phase
    return "other"


def thread_summary(stacks: list[tuple[list[str], int]], window_samples: float) -> dict:
    total = sum(n for _, n in stacks)
    phases, lines, inclusive = Counter(), Counter(), Counter()
    for frames, n in stacks:
        phases[phase_of(frames)] += n
        if frames:
            lines[frames[-1]] += n
        for frame in dict.fromkeys(frames):
            inclusive[function_of(frame)] += n
    return {
        "samples": total,
        "busy_share": round(total / window_samples, 3) if window_samples else None,
        "phases": {p: round(phases[p] / total, 3) for p in PHASE_NAMES} if total else {},
        "top_self": [{"line": k, "share": round(v / total, 3)} for k, v in lines.most_common(TOP)],
        "top_inclusive": [
            {"function": k, "share": round(v / total, 3)} for k, v in inclusive.most_common(TOP)
        ],
    }


def stacks_file(folder: Path, stem: str) -> Path | None:
    """``<stem>.txt`` or ``<stem>.txt.gz`` in ``folder``, whichever is there."""
    return next(
        (r for r in (folder / f"{stem}.txt", folder / f"{stem}.txt.gz") if r.exists()), None
    )


def summarize_stacks(raw: Path, window: float) -> dict:
    """One process's py-spy stacks: each thread's samples, its busiest thread and that thread's
    summary over ``window`` nominal samplings (rate × seconds)."""
    by_thread: dict[str, list] = defaultdict(list)
    text = gzip.decompress(raw.read_bytes()).decode() if raw.suffix == ".gz" else raw.read_text()
    for thread, frames, n in parse_raw(text):
        by_thread[thread].append((frames, n))
    threads = {t: thread_summary(s, window) for t, s in by_thread.items()}
    busiest = max(threads, key=lambda t: threads[t]["samples"], default=None)
    return {
        "threads": {t: s["samples"] for t, s in threads.items()},
        "busiest_thread": busiest,
        "busiest": threads.get(busiest, {}),
    }


def metas(folder: Path) -> list[tuple[str, dict]]:
    """Each point's label and meta (``<label>.meta.json``), by label."""
    found = sorted(folder.glob("*.meta.json"))
    return [(f.name.removesuffix(".meta.json"), json.loads(f.read_text())) for f in found]


def summarize(folder: str | Path, out: str | Path) -> dict:
    folder, out = Path(folder), Path(out)
    points = []
    for label, meta in metas(folder):
        raw = stacks_file(folder, label)
        window = meta.get("rate", 0) * meta.get("seconds", 0)
        points.append(meta | summarize_stacks(raw, window) if raw else meta)
    results = {"points": points}
    write_reports(out, "scheduler", results, markdown, plot)
    return results


def write_reports(out: Path, stem: str, results: dict, markdown, plot) -> None:
    """``<stem>.json``, ``.md`` (``markdown(results)``) and ``.png`` (``plot(points, path)``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    plot(results["points"], out / f"{stem}.png")


def pct(share) -> str:
    return "—" if share is None else f"{100 * share:.0f}"


def markdown(results: dict) -> str:
    points = [p for p in results["points"] if p.get("busiest")]
    out = ["# Where SGLang's scheduler loop spends its time", ""]
    if cmd := next((p.get("command") for p in results["points"] if p.get("command")), None):
        out += [f"`{cmd}`", ""]
    out += ["py-spy samples of the scheduler process's busiest thread during steady decode. "
            "busy % = its samples ÷ (rate × seconds): the rest it waited in a system call or "
            "py-spy missed the sampling (a lower bound; the thread's CPU in /proc is the measure); "
            "phase columns: shares of its samples by the innermost frame that names a phase of "
            "the loop.", "",
            "| point | tok/s | samples | busy % | " + " | ".join(f"{p} %" for p in PHASE_NAMES)
            + " |", "|---" * (4 + len(PHASE_NAMES)) + "|"]  # fmt: skip
    for p in points:
        b = p["busiest"]
        phases = " | ".join(pct(b["phases"].get(name)) for name in PHASE_NAMES)
        tok_s = f"{p['tok_s']:.0f}" if p.get("tok_s") else "—"
        out.append(
            f"| {p['label']} | {tok_s} | {b['samples']} | {pct(b['busy_share'])} | {phases} |"
        )
    for p in results["points"]:
        if p.get("error"):
            out += ["", f"{p['label']}: {p['error']}"]
    for p in points:
        out += ["", f"## {p['label']}: busiest thread `{p['busiest_thread']}`", "",
                "| line (self) | % |", "|---|---|"]  # fmt: skip
        out += [f"| `{t['line']}` | {pct(t['share'])} |" for t in p["busiest"]["top_self"]]
        out += ["", "| function (inclusive) | % |", "|---|---|"]
        out += [f"| `{t['function']}` | {pct(t['share'])} |" for t in p["busiest"]["top_inclusive"]]
    return "\n".join(out) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p.get("busiest")]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.6 * len(shown)))
    phase_bars(ax, [p["label"] for p in shown], [p["busiest"]["phases"] for p in shown])
    ax.set_title("SGLang's scheduler loop by phase (py-spy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def phase_bars(ax, labels: list[str], phases: list[dict]) -> None:
    """A stacked bar per label: its phase shares (``PHASE_NAMES``), % of the thread's samples."""
    left = [0.0] * len(labels)
    for name in PHASE_NAMES:
        widths = [100 * shares.get(name, 0) for shares in phases]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("% of the scheduler thread's samples")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


# ---------------------------------------------------------------- the run (the engine's machine)


def scheduler_pid(root: int) -> int:
    """The SGLang scheduler among ``root``'s descendants; ``root`` itself when there is none (the
    CPU backend runs in this process)."""
    from loadtest.procs import process_tree, stat_cpu

    for pid in sorted(process_tree(root) - {root}):
        found = stat_cpu(Path(f"/proc/{pid}/stat"))
        if found and found[0].startswith(SCHEDULER_NAME):
            return pid
    return root


def record(py_spy: str, pid: int, seconds: float, rate: int, raw: Path) -> int | None:
    """``py-spy record`` of ``pid``: every thread, waiting ones left out, the process not paused.
    Returns py-spy's own count of samples (those that found a busy thread)."""
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
           "--rate", str(rate), "--format", "raw", "--threads", "--nonblocking",
           "--output", str(raw)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy exited {done.returncode}: {done.stderr.strip()[-400:]}")
    taken = re.search(r"Samples: (\d+)", done.stdout + done.stderr)
    return int(taken[1]) if taken else None


async def profile_point(engine, args, names: list[str], streams: int, arm: str) -> dict:
    from profile_decode import Clients

    from loadtest.bench import Traffic

    label = f"{streams}-{arm}"
    out = Path(args.out)
    adapters = names[: args.adapters] if arm == "adapters" else [None]
    traffic = Traffic(adapters, args.prompt_words, args.output_tokens, chat=True)
    meta = {"label": label, "streams": streams, "arm": arm, "rate": args.rate,
            "seconds": args.seconds, "command": "python lab/profile_scheduler.py "
            + " ".join(sys.argv[1:])}  # fmt: skip
    print(f"[scheduler] {label}: warm-up {args.warmup}s, py-spy {args.seconds}s", flush=True)
    clients = Clients(engine, traffic, streams)
    try:
        await asyncio.sleep(args.warmup)
        meta["pid"] = scheduler_pid(os.getpid())
        low = time.time()
        meta["sampled"] = await asyncio.to_thread(
            record, args.py_spy, meta["pid"], args.seconds, args.rate, out / f"{label}.txt"
        )
        meta["tok_s"], meta["failures"] = clients.tok_s(low, time.time())
    except Exception as err:  # one point's failure is a result; the next point still runs
        meta["error"] = f"{type(err).__name__}: {err}"
    finally:
        await clients.stop()
    (out / f"{label}.meta.json").write_text(json.dumps(meta, indent=1))
    print(f"    {json.dumps({k: meta.get(k) for k in ('pid', 'tok_s', 'sampled', 'error')})}",
          flush=True)  # fmt: skip
    return meta


async def run(args) -> None:
    from profile_decode import each_point

    args.no_profile = True  # profile_decode's build: any backend
    Path(args.out).mkdir(parents=True, exist_ok=True)
    await each_point(args, profile_point)
    summarize(args.out, args.out)
    print(Path(args.out, "scheduler.md").read_text(), flush=True)


def py_spy_parser(doc: str, run_help: str, **load) -> tuple[argparse.ArgumentParser, Any]:
    """A py-spy profiler's command line: ``summarize FOLDER --out DIR``, and ``run`` with the
    engine's load (``profile_decode.add_load_arguments(**load)``), the samples' length and rate,
    py-spy's binary and ``--out``. Returns the parser and ``run``'s, for more arguments."""
    from profile_decode import add_load_arguments

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("summarize", help="summarise a run's folder again")
    s.add_argument("folder")
    s.add_argument("--out", required=True)
    r = sub.add_parser("run", help=run_help)
    add_load_arguments(r, **load)
    r.add_argument("--seconds", type=float, default=15, help="seconds of py-spy samples")
    r.add_argument("--rate", type=int, default=250, help="samples a second")
    r.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="its binary")
    r.add_argument("--out", required=True)
    return parser, r


def parse_args(argv=None):
    run_help = "start the engine, keep streams running, sample the scheduler"
    parser, _ = py_spy_parser(__doc__, run_help, streams=[64, 256], arms=["adapters"], warmup=15)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "summarize":
        print(json.dumps(summarize(args.folder, args.out)["points"], indent=1)[:2000])
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
