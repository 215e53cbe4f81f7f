"""What bounds the decode step (issue #16, item 4): torch-profiler traces of steady decode.

    python lab/profile_decode.py run --config /tmp/synth7b/adapters.yaml \
        --out /tmp/results/profile --set max_loras_per_batch=128 --set mem_fraction_static=0.7 \
        --streams 128 256 --arms base adapters
    python lab/profile_decode.py summarize /tmp/results/profile/traces --out /tmp/results/profile
    python lab/profile_decode.py run --config /tmp/synth-tiny/adapters.yaml --backend hf \
        --no-profile --streams 2 --adapters 2 --warmup 2 --measure 3 --out /tmp/prof   # CPU dry run

``run`` starts the engine as ``loadtest.bench`` does (registry, ``--set`` overrides, shipped
defaults otherwise: CUDA graphs on) and, for each of ``--streams`` × ``--arms`` (``base``: every
request on the base model; ``adapters``: spread over the first ``--adapters`` adapters), keeps N
requests running (~100 random words in as a chat message, ~100 tokens out with ``ignore_eos``,
refilled as they end, as bench's engine-direct arm). After ``--warmup`` s it counts output tok/s
for ``--measure`` s without the profiler, then asks SGLang's scheduler for a torch-profiler trace
of ``--num-steps`` forward steps (GPU activities only, no stacks or shapes: small traces and little
profiler overhead) and waits for the trace file while the traffic goes on.

``summarize`` reads each trace (Chrome-trace JSON, gzipped or not, one per TP rank) and reports per
point: forward steps, how many of them were prefill steps (by their attention kernels, one call
per layer), CUDA-graph replays, the window per step, GPU kernel time per step by
category (attention, LoRA, base GEMM, sampling, norm/activation/elementwise, communication,
other), the top kernels, and the GPU idle share (no kernel or copy running: a CPU-bound scheduler
shows here). Writes ``profile.md``, ``profile.json`` and ``profile.png`` into ``--out``. ``run``
calls it at the end and then deletes the raw traces unless ``--keep-traces``.

SGLang 0.5.17's API: ``Engine.start_profile`` runs ``loop.run_until_complete`` and cannot be called
from the running event loop that drives the engine, so this awaits
``tokenizer_manager.start_profile(ProfileReq(...))``. With ``num_steps`` set the scheduler stops
the profiler by itself after that many forward steps and writes
``<output_dir>/<profile_id>-TP-<rank>.trace.json.gz`` (a later ``stop_profile`` would fail:
"Profiling is not in progress").
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CATEGORIES = [  # first match wins: LoRA before GEMM (its kernels are GEMMs too)
    ("LoRA", ("lora", "sgmv", "bgmv", "punica", "segment_gemm")),
    ("communication", ("nccl", "allreduce", "all_reduce", "all_gather", "cross_device",
                       "custom_ar")),
    ("sampling", ("sampling", "softmax", "argmax", "topk", "top_k", "top_p", "multinomial",
                  "sort")),
    ("norm/act/elementwise", ("norm", "silu", "gelu", "act_and_mul", "rotary", "rope",
                              "elementwise", "copy", "index", "fill", "embedding", "reduce",
                              "scatter", "gather")),
    ("attention", ("attn", "attention", "fmha", "mha_", "flash_fwd", "decodewithkvcache",
                   "prefillwithkvcache", "_fwd_kernel", "_fwd_grouped_kernel")),
    ("base GEMM", ("gemm", "gemv", "cutlass", "nvjet", "cublas", "xmma", "matmul", "splitk")),
]  # fmt: skip
CATEGORY_NAMES = ["attention", "LoRA", "base GEMM", "sampling", "norm/act/elementwise",
                  "communication", "other"]  # fmt: skip
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
TOP = 15
ATTENTION_KINDS = {  # one call per layer per step: (triton kernel names, FlashInfer's name part)
    "decode": (("_fwd_grouped_kernel_stage1", "_fwd_kernel_stage1"), "decodewithkvcache"),
    "prefill": (("_fwd_kernel",), "prefillwithkvcache"),
}
ARMS = {"base": 0, "adapters": 1}


# ---------------------------------------------------------------- the summariser (no GPU needed)


def categorize(name: str, cat: str = "kernel") -> str:
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "norm/act/elementwise"
    low = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def load_events(path: Path) -> list[dict]:
    """A Chrome trace's events: ``{"traceEvents": [...]}`` or a bare list, gzipped or not."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)]


def gpu_ops(events: list[dict]) -> list[dict]:
    """Kernels and copies (complete events on the GPU), with their category."""
    ops = []
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if cat in GPU_CATS and e.get("ph", "X") == "X" and "dur" in e:
            name = str(e.get("name", "?"))
            ops.append({
                "name": name, "ts": float(e["ts"]), "dur": float(e["dur"]),
                "category": categorize(name, cat),
                "correlation": (e.get("args") or {}).get("correlation"),
            })  # fmt: skip
    return ops


def graph_launches(events: list[dict]) -> set:
    """Correlation ids of CUDA-graph launches (decode steps replayed from a graph; SGLang 0.5.17
    also replays graphs within prefill steps, about 33 per step on the 7B shape)."""
    return {
        (e.get("args") or {}).get("correlation")
        for e in events
        if str(e.get("cat", "")).lower() in LAUNCH_CATS
        and str(e.get("name", "")).startswith(("cudaGraphLaunch", "cuGraphLaunch"))
    } - {None}


def busy_time(ops: list[dict]) -> float:
    """Microseconds with at least one op running (the union of their intervals)."""
    total, end = 0.0, None
    for start, stop in sorted((o["ts"], o["ts"] + o["dur"]) for o in ops):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def replay_stats(ops: list[dict], launches: set) -> dict:
    """Kernel time per graph replay and the gap between replays' first kernels."""
    by_launch: dict = defaultdict(list)
    for o in ops:
        if o["correlation"] in launches:
            by_launch[o["correlation"]].append(o)
    if not by_launch:
        return {"graph_replays": 0}
    firsts = sorted(min(o["ts"] for o in group) for group in by_launch.values())
    periods = [b - a for a, b in itertools.pairwise(firsts)]
    kernel = sum(o["dur"] for group in by_launch.values() for o in group)
    return {
        "graph_replays": len(by_launch),
        "graph_kernel_ms_per_replay": kernel / len(by_launch) / 1000,
        "replay_period_ms_p50": statistics.median(periods) / 1000 if periods else None,
    }


def top_kernels(ops: list[dict], total: float, n: int = TOP) -> list[dict]:
    time_of, count = Counter(), Counter()
    for o in ops:
        time_of[o["name"]] += o["dur"]
        count[o["name"]] += 1
    return [
        {"name": name, "category": categorize(name), "ms": us / 1000, "count": count[name],
         "share": us / total if total else 0.0}
        for name, us in time_of.most_common(n)
    ]  # fmt: skip


def step_kinds(ops: list[dict], layers: int | None) -> dict:
    """Decode and prefill steps in a trace, from their attention kernels (one call per layer per
    step): a profile of N forward steps mixes both, in another proportion at each point."""
    calls = Counter(attention_kind(o["name"]) for o in ops)
    kinds = {"decode_attention_calls": calls["decode"], "prefill_attention_calls": calls["prefill"]}
    if layers:
        kinds |= {
            "decode_steps": calls["decode"] / layers,
            "prefill_steps": calls["prefill"] / layers,
        }
    return kinds


def attention_kind(name: str) -> str | None:
    """``decode`` or ``prefill`` for an attention kernel (triton: its whole name), else None."""
    lower = name.lower()
    for kind, (triton, flashinfer) in ATTENTION_KINDS.items():
        if lower in triton or flashinfer in lower:
            return kind
    return None


def summarize_trace(path: Path, steps: int | None = None, layers: int | None = None) -> dict:
    """One trace's GPU picture; ``steps`` = forward steps it holds (else: graph replays);
    ``layers`` = the model's layers, to tell decode steps from prefill ones."""
    events = load_events(path)
    ops = gpu_ops(events)
    if not ops:
        raise ValueError(f"{path}: no GPU kernels in the trace (was CUDA activity recorded?)")
    window = max(o["ts"] + o["dur"] for o in ops) - min(o["ts"] for o in ops)
    busy, total = busy_time(ops), sum(o["dur"] for o in ops)
    replays = replay_stats(ops, graph_launches(events))
    steps = steps or replays["graph_replays"] or None
    per_cat = {c: 0.0 for c in CATEGORY_NAMES}
    for o in ops:
        per_cat[o["category"]] += o["dur"]
    per_step = {c: v / steps / 1000 for c, v in per_cat.items()} if steps else None
    return {
        "file": path.name, "kernels": len(ops), "steps": steps, **replays,
        **step_kinds(ops, layers),
        "window_ms": window / 1000, "busy_ms": busy / 1000, "kernel_ms": total / 1000,
        "gpu_busy_share": busy / window if window else None,
        "gpu_idle_share": 1 - busy / window if window else None,
        "ms_per_step": window / steps / 1000 if steps else None,
        "kernel_ms_per_step": total / steps / 1000 if steps else None,
        "category_ms_per_step": per_step,
        "category_shares": {c: v / total for c, v in per_cat.items()},
        "top_kernels": top_kernels(ops, total),
    }  # fmt: skip


def trace_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz"))
                  and p.name != "meta.json")  # fmt: skip


def point_folders(trace_dir: Path) -> list[Path]:
    """Folders holding a point: those with a meta.json or trace files; the folder itself else."""
    found = [d for d in sorted(trace_dir.iterdir()) if d.is_dir()
             and ((d / "meta.json").exists() or trace_files(d))]  # fmt: skip
    return found or [trace_dir]


def summarize_point(folder: Path) -> list[dict]:
    """One row per trace file (per TP rank) of a point, with its meta (tok/s, streams, arm)."""
    meta_file = folder / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"label": folder.name}
    files = trace_files(folder)
    if not files:
        missing = "no trace file" if meta.get("profiled", True) else None
        return [meta | ({"error": meta.get("error") or missing} if missing else {})]
    rows = []
    for path in files:
        try:
            trace = summarize_trace(path, meta.get("num_steps"), meta.get("layers"))
            rows.append(meta | {"trace": trace})
        except (OSError, ValueError, EOFError) as err:  # a truncated gzip, bad JSON
            rows.append(meta | {"error": f"{path.name}: {type(err).__name__}: {err}"})
    return rows


def summarize(trace_dir: str | Path, out: str | Path, settings: dict | None = None) -> dict:
    trace_dir, out = Path(trace_dir), Path(out)
    if not trace_dir.is_dir():
        raise SystemExit(f"summarize: {trace_dir} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    points = [row for folder in point_folders(trace_dir) for row in summarize_point(folder)]
    points.sort(key=lambda p: (p.get("streams") or 0, ARMS.get(p.get("arm"), 2), label_of(p)))
    results = {"settings": settings or {}, "points": points}
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    (out / "profile.md").write_text(markdown(results))
    plot(points, out / "profile.png")
    return results


# ---------------------------------------------------------------- reports


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def label_of(point: dict) -> str:
    """The point's label, with the TP rank of its trace where that is not 0."""
    rank = re.search(r"TP-(\d+)", (point.get("trace") or {}).get("file", ""))
    suffix = f" (TP {rank.group(1)})" if rank and rank.group(1) != "0" else ""
    return point.get("label", "?") + suffix


def point_row(p: dict) -> str:
    t = p.get("trace") or {}
    shares = t.get("category_shares") or {}
    per_token = 1000 * p["streams"] / p["tok_s"] if p.get("tok_s") and p.get("streams") else None
    cells = [
        label_of(p), fmt(p.get("failures"), "d"), fmt(p.get("tok_s"), ".0f"),
        fmt(p.get("profiled_tok_s"), ".0f"), fmt(per_token, ".1f"), fmt(t.get("steps"), "d"),
        fmt(t.get("prefill_steps"), ".0f"),
        fmt(t.get("graph_replays"), "d"),
        fmt(t.get("ms_per_step"), ".1f"), fmt(t.get("replay_period_ms_p50"), ".1f"),
        fmt(t.get("kernel_ms_per_step"), ".1f"), fmt(pct(t.get("gpu_busy_share")), ".0f"),
        *(fmt(pct(shares.get(c)), ".0f") for c in CATEGORY_NAMES),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def pct(share):
    return None if share is None else 100 * share


def points_table(points: list[dict]) -> list[str]:
    head = ["point", "failed", "tok/s", "tok/s profiling", "ms/token/stream", "steps",
            "of them prefill",
            "graph replays", "ms/step", "ms between replays p50", "kernel ms/step", "GPU busy %",
            *(f"{c} %" for c in CATEGORY_NAMES)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + [point_row(p) for p in points]


def kernels_table(point: dict) -> list[str]:
    lines = [f"### {label_of(point)}", "", "| kernel | category | ms | calls | share % |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in (point.get("trace") or {}).get("top_kernels", []):
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        name = name.replace("|", "\\|")
        lines.append(f"| `{name}` | {k['category']} | {k['ms']:.2f} | {k['count']} | "
                     f"{100 * k['share']:.1f} |")  # fmt: skip
    return [*lines, ""]


def markdown(results: dict) -> str:
    points, settings = results["points"], results.get("settings") or {}
    lines = ["# What bounds the decode step", ""]
    if settings.get("command"):
        lines += [f"`{settings['command']}`", ""]
    lines += [
        "tok/s: output tokens a second without the profiler (and while it recorded); "
        "ms/token/stream = streams ÷ tok/s. From the trace: steps = forward steps recorded "
        "(prefill steps included), ms/step = GPU window ÷ steps, kernel ms/step = summed kernel "
        "time ÷ steps, GPU busy = share of the window with a kernel or copy running; category "
        "columns = shares of kernel time.", "", *points_table(points), "",
    ]  # fmt: skip
    errors = [f"- {label_of(p)}: {p['error']}" for p in points if p.get("error")]
    if errors:
        lines += ["## Points without a summary", "", *errors, ""]
    lines += ["## Top kernels by GPU time", ""]
    for p in points:
        if p.get("trace"):
            lines += kernels_table(p)
    return "\n".join(lines)


def plot(points: list[dict], path: Path) -> None:
    """Stacked bars: kernel ms per step by category, with the window per step as a marker."""
    rows = [p for p in points if (p.get("trace") or {}).get("category_ms_per_step")]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4.5))
    x, bottom = range(len(rows)), [0.0] * len(rows)
    for cat in CATEGORY_NAMES:
        heights = [p["trace"]["category_ms_per_step"][cat] for p in rows]
        ax.bar(x, heights, bottom=bottom, label=cat)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.scatter(x, [p["trace"]["ms_per_step"] for p in rows], color="black", marker="_", s=900,
               label="window per step (gap = GPU idle)", zorder=3)  # fmt: skip
    ax.set_xticks(list(x), [label_of(p) for p in rows])
    ax.set_ylabel("ms per forward step")
    ax.set_title("GPU kernel time per step by category")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the run (GPU machine)


def profile_request(output_dir: Path, num_steps: int, profile_id: str):
    """SGLang 0.5.17's request: GPU activity only, no stacks/shapes; stops after num_steps."""
    from sglang.srt.managers.io_struct import ProfileReq

    return ProfileReq(output_dir=str(output_dir), num_steps=num_steps, activities=["GPU"],
                      with_stack=False, record_shapes=False, profile_id=profile_id)  # fmt: skip


async def wait_for_trace(folder: Path, timeout: float, poll: float = 1.0) -> list[Path]:
    """The trace files once they exist and their sizes held still for one poll."""
    deadline, sizes = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        files = trace_files(folder)
        now = {f.name: f.stat().st_size for f in files}
        if files and now == sizes and all(now.values()):
            return files
        sizes = now
        await asyncio.sleep(poll)
    raise TimeoutError(f"no complete trace in {folder} after {timeout:.0f} s (seen: {sizes})")


class Clients:
    """N clients streaming back to back (bench's engine-direct arm), until ``stop``."""

    def __init__(self, engine, traffic, users: int):
        from loadtest.bench import timed_stream

        self.records: list[dict] = []
        self.stopping = False

        async def client(i: int) -> None:
            import random

            rng = random.Random(traffic.seed * 100_003 + i)
            while not self.stopping:
                await timed_stream(engine, traffic.request(rng), sink=self.records)

        self.tasks = [asyncio.create_task(client(i)) for i in range(users)]

    def tok_s(self, low: float, high: float) -> tuple[float | None, int]:
        from loadtest.stats import summarize as window_stats

        stats = window_stats(self.records, (low, high)) if high > low else {}
        return stats.get("output_throughput"), stats.get("failures", 0)

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def trace_window(path: Path, steps: int, tries: int = 3) -> float:
    """Seconds the trace spans; a file still being written (truncated gzip/JSON) is read again."""
    for attempt in range(tries):
        try:
            return summarize_trace(path, steps)["window_ms"] / 1000
        except (EOFError, json.JSONDecodeError, gzip.BadGzipFile):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(3)
    raise AssertionError("unreachable")


async def record_profile(engine, folder: Path, args, label: str) -> dict:
    """Ask SGLang for a trace of ``num_steps`` steps; wait for the file. Returns meta fields."""
    manager = getattr(getattr(engine, "engine", None), "tokenizer_manager", None)
    if manager is None or not hasattr(manager, "start_profile"):
        raise RuntimeError("profiling needs the SGLang backend (its tokenizer_manager)")
    began = time.time()
    await manager.start_profile(profile_request(folder.resolve(), args.num_steps, label))
    started = time.time()
    try:
        files = await wait_for_trace(folder, args.trace_timeout)
    except TimeoutError:
        try:  # leave no profile running for the next point
            await manager.stop_profile()
        except Exception as err:
            print(f"    stop_profile after the timeout: {err}", flush=True)
        raise
    span = await trace_window(files[0], args.num_steps)
    return {"profile_requested_at": began, "profile_started_at": started,
            "trace_seen_after_s": time.time() - started, "trace_window_s": span}  # fmt: skip


async def profile_point(engine, args, names: list[str], streams: int, arm: str) -> dict:
    from loadtest.bench import Traffic

    label = f"{streams}-{arm}"
    folder = Path(args.out) / "traces" / label
    folder.mkdir(parents=True, exist_ok=True)
    adapters = names[: args.adapters] if arm == "adapters" else [None]
    traffic = Traffic(adapters, args.prompt_words, args.output_tokens, chat=True)
    meta = {"label": label, "streams": streams, "arm": arm, "adapters": len(adapters) if
            arm == "adapters" else 0, "num_steps": args.num_steps,
            "layers": getattr(args, "layers", None), "profiled": not args.no_profile}  # fmt: skip
    print(f"[profile] {label}: warm-up {args.warmup}s, measure {args.measure}s", flush=True)
    clients = Clients(engine, traffic, streams)
    try:
        await asyncio.sleep(args.warmup)
        low = time.time()
        await asyncio.sleep(args.measure)
        meta["tok_s"], meta["failures"] = clients.tok_s(low, time.time())
        if not args.no_profile:
            meta |= await record_profile(engine, folder, args, label)
            start = meta["profile_started_at"]
            meta["profiled_tok_s"] = clients.tok_s(start, start + meta["trace_window_s"])[0]
    except Exception as err:  # one point's failure is a result; the next point still runs
        meta["error"] = f"{type(err).__name__}: {err}"
    finally:
        await clients.stop()
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"    {json.dumps({k: v for k, v in meta.items() if 'tok_s' in k or k == 'error'})}",
          flush=True)  # fmt: skip
    return meta


def build(args):
    """The engine as loadtest.bench builds it: registry, ``--set`` overrides, shipped defaults."""
    from engine import build_engine
    from engine.registry import load_registry, with_overrides

    registry = load_registry(args.config)
    if args.backend == "hf":
        registry.engine.hf = with_overrides(registry.engine.hf, args.set)
    else:
        registry.engine.sglang = with_overrides(registry.engine.sglang, args.set)
    t0 = time.perf_counter()
    engine = build_engine(registry, backend=args.backend)
    print(f"{engine.backend} engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    if engine.backend != "sglang" and not args.no_profile:
        raise SystemExit(f"the {engine.backend} backend has no profiler: use --no-profile")
    args.layers = layers_of(registry.base.model)
    args.registry = registry  # for a caller that serves the API over the engine
    return engine, [a.name for a in registry.adapters]


def layers_of(model: str) -> int | None:
    """The model's layer count from its config.json (a local model folder), else None."""
    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get("num_hidden_layers") if config.exists() else None


def settings_of(args, engine) -> dict:
    out = {"command": "python lab/profile_decode.py " + " ".join(sys.argv[1:]),
           "backend": engine.backend, "engine": engine.settings.model_dump()}  # fmt: skip
    try:
        import sglang

        out["sglang"] = sglang.__version__
    except Exception:
        pass
    return out


def drop_traces(trace_dir: Path) -> None:
    """Keep only each point's meta.json (its numbers are in profile.json too)."""
    for folder in point_folders(trace_dir):
        for path in trace_files(folder):
            path.unlink()


async def each_point(args, point) -> dict:
    """Build the engine, warm it, await ``point(engine, args, names, streams, arm)`` for each of
    ``--streams`` × ``--arms`` (the cut requests settling in between), shut it down; returns the
    run's settings (``settings_of``)."""
    from loadtest.bench import settle, warm_up

    engine, names = build(args)
    try:
        if "adapters" in args.arms and len(names) < args.adapters:
            raise SystemExit(f"--adapters {args.adapters}: the registry has {len(names)}")
        await warm_up(engine, names)
        for streams in args.streams:
            for arm in args.arms:
                await point(engine, args, names, streams, arm)
                await settle(engine, 30)  # the cut requests leave the batch
                await asyncio.sleep(args.pause)
        return settings_of(args, engine)
    finally:
        await engine.shutdown()


async def run(args) -> None:
    out = Path(args.out)
    settings = await each_point(args, profile_point)
    summarize(out / "traces", out, settings)
    if not args.keep_traces:
        drop_traces(out / "traces")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB" + (" (over 20: drop traces)" if size > 20 else ""), flush=True)
    print((out / "profile.md").read_text(), flush=True)


def add_load_arguments(run, streams: list[int], arms: list[str], warmup: float) -> None:
    """The engine and the load of a ``run``: the registry, overrides, the points, the requests."""
    from loadtest.stats import parse_range

    run.add_argument("--config", required=True, help="adapters.yaml to serve")
    run.add_argument("--backend", choices=["auto", "sglang", "hf"], default="auto")
    run.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                     help="backend setting, e.g. max_loras_per_batch=128")  # fmt: skip
    run.add_argument("--streams", type=int, nargs="+", default=streams)
    run.add_argument("--arms", nargs="+", choices=["base", "adapters"], default=arms)
    run.add_argument("--adapters", type=int, default=128, help="adapters arm: the first N")
    run.add_argument("--warmup", type=float, default=warmup, help="seconds before measuring")
    run.add_argument("--pause", type=float, default=3, help="seconds between points")
    run.add_argument("--prompt-words", type=parse_range, default=(90, 110))
    run.add_argument("--output-tokens", type=parse_range, default=(90, 110))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("summarize", help="summarise a folder of traces")
    s.add_argument("trace_dir")
    s.add_argument("--out", required=True)
    r = sub.add_parser("run", help="start the engine, load it, record traces, summarise")
    add_load_arguments(r, streams=[128, 256], arms=["base", "adapters"], warmup=10)
    r.add_argument("--measure", type=float, default=10, help="seconds of tok/s, no profiler")
    r.add_argument("--num-steps", type=int, default=50, help="forward steps in each trace")
    r.add_argument("--trace-timeout", type=float, default=180, help="seconds to wait for a trace")
    r.add_argument("--no-profile", action="store_true", help="tok/s only (any backend)")
    r.add_argument("--keep-traces", action="store_true", help="keep the raw traces under --out")
    r.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "summarize":
        results = summarize(args.trace_dir, args.out)
        print((Path(args.out) / "profile.md").read_text())
        if not any(p.get("trace") for p in results["points"]):
            raise SystemExit("summarize: no trace could be summarised")
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
