"""Which process holds HTTP below the engine (issue #16): py-spy samples of SGLang's scheduler,
its detokenizer and the API process during steady decode, engine-direct against through HTTP.

    python lab/profile_http.py run --config /tmp/synth7b/adapters.yaml --out /tmp/results/http \
        --set max_loras_per_batch=128 --set mem_fraction_static=0.7 \
        --set 'extra={"quantization": "fp8"}' --streams 256 --arms base adapters \
        --py-spy /tmp/extra/bin/py-spy
    python lab/profile_http.py summarize /tmp/results/http --out /tmp/results/http
    python lab/profile_http.py run --config /tmp/synth-tiny/adapters.yaml --backend hf \
        --streams 2 --adapters 2 --warmup 2 --seconds 3 --out /tmp/http-profile   # CPU dry run

With FP8 base weights the engine gives 17k tok/s engine-direct and HTTP stays near 13k
(``results/serving/h200-7b-fp8-weights``); the API process reads 0.6–0.7 of a core and SGLang's
scheduler thread one core either way, so core counts cannot say which side holds it. ``run``
starts the engine as ``loadtest.bench`` does and serves the API over it in this process (as
``python -m engine.api`` does: SGLang's tokenizer manager, uvicorn and our API on one event loop).
For each of ``--streams`` × ``--arms`` × ``--paths`` (``direct``: bench's engine-direct clients in
this process; ``http``: one Locust run against that API, as ``loadtest.bench --plan pairs``), it
waits ``--warmup`` s (Locust: plus its start-up) and runs ``py-spy record`` on each process of
``--targets`` at once for ``--seconds`` s (``scheduler``: the SGLang child named
``sglang::schedul``; ``detokenizer``: ``sglang::detoken``; ``api``: this process; ``locust``: the
client, HTTP points only), every thread, without pausing them (``--nonblocking``), while it
counts output tok/s.

``summarize`` reports per point and process: cores busy (its CPU seconds in ``/proc`` over the
window; where not measured, all its threads' samples ÷ ``--rate`` × ``--seconds``, a lower bound:
py-spy may miss samplings, and its own "Samples" count counts only those that found a busy
thread), the busiest thread's share, the scheduler loop's phases (``lab/profile_scheduler.py``'s),
and the top functions (inclusive, below the frames every sample holds) and lines (self) of the
busiest thread. Writes ``http-profile.md``, ``.json`` and ``.png`` into ``--out``.
py-spy is not a dependency of the product (``--py-spy PATH``); it needs ptrace rights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_scheduler import (
    PHASE_NAMES,
    metas,
    pct,
    phase_bars,
    py_spy_parser,
    record,
    stacks_file,
    summarize_stacks,
    write_reports,
)

TARGET_NAMES = {"scheduler": "sglang::schedul", "detokenizer": "sglang::detoken"}
"""SGLang's children by the 15 characters of setproctitle's name the kernel keeps."""
TARGETS = ["api", "scheduler", "detokenizer", "locust"]
LOCUST_START = 5.0
"""Seconds Locust takes to import and spawn its users, before the warm-up counts."""
TOP = 12


# ---------------------------------------------------------------- the summariser (no GPU needed)


def summarize_target(raw: Path, window: float) -> dict:
    """One process's samples over ``window`` nominal samplings (rate × seconds): cores busy by
    py-spy (a lower bound: it may miss samplings), each thread's samples, the busiest thread."""
    summary = summarize_stacks(raw, window)
    spy_cores = round(sum(summary["threads"].values()) / window, 2) if window else None
    return {"spy_cores": spy_cores} | summary


def summarize(folder: str | Path, out: str | Path) -> dict:
    folder, out = Path(folder), Path(out)
    points = []
    for label, meta in metas(folder):
        for target, got in meta.get("targets", {}).items():
            raw = stacks_file(folder, f"{label}.{target}")
            if raw and not got.get("error"):
                got |= summarize_target(raw, meta.get("rate", 0) * meta.get("seconds", 0))
        points.append(meta)
    points.sort(key=lambda p: (p.get("streams", 0), p.get("arm", ""), p.get("path") != "direct"))
    results = {"points": points}
    write_reports(out, "http-profile", results, markdown, plot)
    return results


def cell(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def cores_table(points: list[dict]) -> list[str]:
    head = ["point", "tok/s", "failed"]
    head += [f"{t} {what}" for t in TARGETS for what in ("cores", "busiest %")]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in points:
        cells = [p["label"], cell(p.get("tok_s"), ".0f"), cell(p.get("failures"), "d")]
        for t in TARGETS:
            got = p.get("targets", {}).get(t, {})
            cells += [cores_cell(got), pct(got.get("busiest", {}).get("busy_share"))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cores_cell(got: dict) -> str:
    """/proc's CPU over the window where measured, else py-spy's lower bound (≥)."""
    if got.get("proc_cores") is not None:
        return f"{got['proc_cores']:.2f}"
    return "—" if got.get("spy_cores") is None else f"≥ {got['spy_cores']:.2f}"


def whole_run_cores(points: list[dict]) -> list[str]:
    """The HTTP points' cores from /proc over the whole Locust run (its start-up included)."""
    measured = [p for p in points if p.get("api_cores_from_proc") is not None]
    lines = [f"- {p['label']}: the API process {p['api_cores_from_proc']:.2f}, "
             f"Locust {cell(p.get('locust_cores'), '.2f')}" for p in measured]  # fmt: skip
    head = "Cores from /proc over the whole Locust run (start-up included):"
    return ["", head, "", *lines] if lines else []


def phases_table(points: list[dict]) -> list[str]:
    rows = ["| point | " + " | ".join(f"{n} %" for n in PHASE_NAMES) + " |",
            "|---" * (1 + len(PHASE_NAMES)) + "|"]  # fmt: skip
    for p in points:
        phases = p.get("targets", {}).get("scheduler", {}).get("busiest", {}).get("phases")
        if phases:
            rows.append(f"| {p['label']} | " + " | ".join(pct(phases.get(n)) for n in PHASE_NAMES)
                        + " |")  # fmt: skip
    return rows


def top_tables(p: dict, target: str, got: dict) -> list[str]:
    busiest = got["busiest"]
    out = ["", f"### {p['label']}, {target}: busiest thread `{got['busiest_thread']}`", "",
           "| function (inclusive) | % |", "|---|---|"]  # fmt: skip
    below_root = [
        t for t in busiest["top_inclusive"] if t["share"] < busiest["top_inclusive"][0]["share"]
    ]
    out += [f"| `{t['function']}` | {pct(t['share'])} |" for t in below_root[:TOP]]
    out += ["", "| line (self) | % |", "|---|---|"]
    out += [f"| `{t['line']}` | {pct(t['share'])} |" for t in busiest["top_self"][:TOP]]
    return out


def markdown(results: dict) -> str:
    points = results["points"]
    out = ["# Which process holds HTTP below the engine", ""]
    if cmd := next((p.get("command") for p in points if p.get("command")), None):
        out += [f"`{cmd}`", ""]
    out += ["py-spy samples of each process during steady decode, engine-direct and through "
            "HTTP (Locust). cores = its CPU seconds in /proc ÷ the window (≥: all its threads' "
            "py-spy samples ÷ rate × seconds, a lower bound); busiest % = its busiest thread's "
            "samples ÷ rate × seconds.",
            "", *cores_table(points), *whole_run_cores(points), "",
            "## SGLang's scheduler loop by phase", "", *phases_table(points)]  # fmt: skip
    for p in points:
        for target, got in p.get("targets", {}).items():
            if got.get("error"):
                out += ["", f"{p['label']}, {target}: {got['error']}"]
        if p.get("error"):
            out += ["", f"{p['label']}: {p['error']}"]
    out += ["", "## The busiest thread's top functions and lines"]
    for p in points:
        for target, got in p.get("targets", {}).items():
            if got.get("busiest"):
                out += top_tables(p, target, got)
    return "\n".join(out) + "\n"


def cores_of(got: dict) -> float:
    return got.get("proc_cores") if got.get("proc_cores") is not None else got.get("spy_cores") or 0


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if any(cores_of(t) for t in p.get("targets", {}).values())]
    if not shown:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.8 + 0.6 * len(shown)))
    labels = [p["label"] for p in shown]
    height = 0.8 / len(TARGETS)
    for i, target in enumerate(TARGETS):
        cores = [cores_of(p.get("targets", {}).get(target, {})) for p in shown]
        left.barh([k + i * height for k in range(len(shown))], cores, height=height, label=target)
    left.set_yticks([k + height for k in range(len(shown))], labels)
    left.set_xlabel("cores busy (/proc; else py-spy's samples ÷ rate × seconds)")
    left.legend(fontsize=8)
    phases = [p.get("targets", {}).get("scheduler", {}).get("busiest", {}).get("phases", {})
              for p in shown]  # fmt: skip
    phase_bars(right, labels, phases)
    fig.suptitle("Engine-direct against HTTP: where each process's time goes (py-spy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run (the engine's machine)


def is_locust(pid: int) -> bool:
    try:
        return b"\0locust\0" in Path(f"/proc/{pid}/cmdline").read_bytes()  # python -m locust
    except OSError:
        return False


def target_pids(root: int, wanted: list[str]) -> dict[str, int]:
    """``wanted`` targets found: ``api`` is ``root``; SGLang's children by name (none on the CPU
    backend, which runs in this process); Locust's process (the HTTP points')."""
    from loadtest.procs import process_tree, stat_cpu

    found = {"api": root} if "api" in wanted else {}
    for pid in sorted(process_tree(root) - {root}):
        name = (stat_cpu(Path(f"/proc/{pid}/stat")) or ("",))[0]
        for target, prefix in TARGET_NAMES.items():
            if target in wanted and target not in found and name.startswith(prefix):
                found[target] = pid
        if "locust" in wanted and "locust" not in found and is_locust(pid):
            found["locust"] = pid
    return found


async def record_targets(args, pids: dict[str, int], label: str) -> dict:
    """py-spy on every target at once; per target its pid and samplings, or the error."""
    out = Path(args.out)

    async def one(target: str, pid: int) -> dict:
        from loadtest.procs import process_cpu_seconds

        raw = out / f"{label}.{target}.txt"
        before, t0 = process_cpu_seconds(pid), time.perf_counter()
        try:
            spy = (args.py_spy, pid, args.seconds, args.rate, raw)
            sampled = await asyncio.to_thread(record, *spy)
        except Exception as err:  # one process's failure is a result; the others still count
            return {"pid": pid, "error": f"{type(err).__name__}: {err}"}
        after, wall = process_cpu_seconds(pid), time.perf_counter() - t0
        cores = None if None in (before, after) else round((after - before) / wall, 2)
        return {"pid": pid, "sampled": sampled, "proc_cores": cores}

    got = await asyncio.gather(*(one(t, pid) for t, pid in pids.items()))
    return dict(zip(pids, got))


async def direct_point(engine, args, adapters: list, streams: int, label: str) -> dict:
    from profile_decode import Clients

    from loadtest.bench import Traffic

    traffic = Traffic(adapters, args.prompt_words, args.output_tokens, chat=True)
    clients = Clients(engine, traffic, streams)
    try:
        await asyncio.sleep(args.warmup)
        low = time.time()
        targets = await record_targets(args, target_pids(os.getpid(), args.targets), label)
        tok_s, failures = clients.tok_s(low, time.time())
    finally:
        await clients.stop()
    return {"targets": targets, "tok_s": tok_s, "failures": failures}


async def during_locust(args, port: int, adapters: int, streams: int, label: str, measure):
    """One Locust run against the API on ``port`` (records in ``--out``/locust/LABEL.jsonl);
    ``measure()`` is awaited once Locust has started and warmed up. Returns what it gave and
    Locust's point (``loadtest.sweep.measured``); Locust ends before this returns, also when
    ``measure`` fails."""
    from loadtest.bench import locust_options
    from loadtest.sweep import measured

    timed = {"duration": LOCUST_START + args.warmup + args.seconds + 3,
             "warmup": LOCUST_START + args.warmup}  # fmt: skip
    options = locust_options(argparse.Namespace(**vars(args) | timed), port)
    raw = Path(args.out) / "locust" / f"{label}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    load = asyncio.create_task(asyncio.to_thread(measured, options, streams, adapters, raw))
    try:
        await asyncio.sleep(LOCUST_START + args.warmup)
        got = await measure()
    finally:
        point, _ = await load
    return got, point


async def http_point(args, port: int, adapters: int, streams: int, label: str) -> dict:
    def sample():
        return record_targets(args, target_pids(os.getpid(), args.targets), label)

    targets, point = await during_locust(args, port, adapters, streams, label, sample)
    return {"targets": targets, "tok_s": point.get("output_throughput"),
            "failures": point.get("failures", 0), "locust_cores": point.get("client_cpu_cores"),
            "api_cores_from_proc": point.get("server_cpu_cores")}  # fmt: skip


async def profile_point(engine, args, names, streams: int, arm: str, port: int) -> None:
    from loadtest.bench import settle

    for path in args.paths:
        label = f"{streams}-{arm}-{path}"
        meta = {"label": label, "streams": streams, "arm": arm, "path": path, "rate": args.rate,
                "seconds": args.seconds, "command": "python lab/profile_http.py "
                + " ".join(sys.argv[1:])}  # fmt: skip
        print(f"[http-profile] {label}: warm-up {args.warmup}s, py-spy {args.seconds}s", flush=True)
        try:
            if path == "direct":
                chosen = names[: args.adapters] if arm == "adapters" else [None]
                meta |= await direct_point(engine, args, chosen, streams, label)
            else:
                count = args.adapters if arm == "adapters" else 0
                meta |= await http_point(args, port, count, streams, label)
        except Exception as err:  # one point's failure is a result; the next point still runs
            meta["error"] = f"{type(err).__name__}: {err}"
        Path(args.out, f"{label}.meta.json").write_text(json.dumps(meta, indent=1))
        print(f"    {json.dumps({k: meta.get(k) for k in ('tok_s', 'failures', 'error')})}",
              flush=True)  # fmt: skip
        await settle(engine, 30)
        await asyncio.sleep(args.pause)


async def run(args) -> None:
    from profile_decode import each_point

    from engine.api import create_api
    from loadtest.bench import serve_app

    args.no_profile = True  # profile_decode's build: any backend
    Path(args.out).mkdir(parents=True, exist_ok=True)
    served = {}

    async def point(engine, args, names, streams, arm):
        if not served:  # the API over the engine each_point built, once
            server, serving, url = await serve_app(create_api(engine, args.registry))
            served.update(server=server, serving=serving, port=int(url.rsplit(":", 1)[1]))
        await profile_point(engine, args, names, streams, arm, served["port"])

    try:
        await each_point(args, point)
    finally:
        if served:
            served["server"].should_exit = True
            await served["serving"]
    summarize(args.out, args.out)
    print(Path(args.out, "http-profile.md").read_text(), flush=True)


def parse_args(argv=None):
    run_help = "start the engine, load it each way, sample its processes"
    parser, r = py_spy_parser(
        __doc__, run_help, streams=[256], arms=["base", "adapters"], warmup=15
    )
    r.add_argument("--paths", nargs="+", choices=["direct", "http"], default=["direct", "http"])
    r.add_argument("--targets", nargs="+", choices=TARGETS, default=TARGETS)
    r.add_argument("--locust-processes", type=int, default=1, help="as loadtest.bench's")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "summarize":
        results = summarize(args.folder, args.out)
        print(json.dumps([{k: p.get(k) for k in ("label", "tok_s", "error")}
                          for p in results["points"]], indent=1))  # fmt: skip
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
