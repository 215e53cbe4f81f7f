"""Is SGLang's scheduler slower through HTTP because it shares the host's cores (issue #16)?
One engine; its engine thread pinned to a core of its own against left free, alternated.

    python lab/pin_scheduler.py run --config /tmp/synth7b/adapters.yaml --out /tmp/results/pin \
        --set max_loras_per_batch=128 --set mem_fraction_static=0.7 \
        --set 'extra={"quantization": "fp8"}' --streams 256 --arms base adapters --rounds 3
    python lab/pin_scheduler.py summarize /tmp/results/pin --out /tmp/results/pin
    python lab/pin_scheduler.py run --config /tmp/synth-tiny/adapters.yaml --backend hf \
        --streams 2 --adapters 2 --warmup 1 --seconds 2 --rounds 1 --out /tmp/pin   # CPU dry run

With FP8 base weights SGLang's scheduler thread is CPU-bound and its decode step reads 20–22 ms
through HTTP against 15 ms engine-direct, its work per step in the same shares
(``results/serving/h200-7b-http-profile``). ``run`` starts the engine as ``loadtest.bench`` does
and serves the API over it in this process (as ``python -m engine.api`` does). For each of
``--rounds`` × ``--arms`` × the two placements (their order alternates by round) × ``--paths``
(``direct``: bench's engine-direct clients; ``http``: one Locust run against the API), it places
every thread of this process tree, then counts ``--seconds`` s after ``--warmup`` s:

- ``free``: every thread on the cores this process started with;
- ``pinned``: the engine thread (SGLang's scheduler process's main thread; on the CPU backend its
  worker thread) alone on one core and its SMT siblings, every other thread (the API,
  SGLang's other processes and threads, Locust) on the rest.

Per point: output tok/s, TPOT; the engine thread's CPU share, its share waiting for a core
(``/proc/.../schedstat``), its involuntary switches and migrations a second, and where the kernel
lets this process count them (``perf_event_open``), its cycles and instructions: GHz (cycles ÷ CPU
time) and instructions per cycle; the cores busy host-wide and per process. ``summarize`` writes
``pin-scheduler.md``, ``.json`` and ``.png`` into ``--out``: each point, and pinned ÷ free per
round, arm and path (median and range over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_http import TARGET_NAMES, during_locust, is_locust
from profile_scheduler import metas, pct, write_reports

PLACEMENTS = ("free", "pinned")

# ---------------------------------------------------------------- cores and threads (Linux /proc)


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8"`` → {0, 1, 2, 3, 8} (the kernel's CPU list format)."""
    cpus = set()
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        if low:
            cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


def siblings(cpu: int) -> set[int]:
    """The CPUs sharing ``cpu``'s physical core (itself alone where the kernel does not say)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return parse_cpu_list(path.read_text()) or {cpu}
    except OSError:
        return {cpu}


def split_cores(allowed: set[int]) -> tuple[set[int], set[int]]:
    """(the engine thread's cores, everyone else's): the last physical core of ``allowed`` with
    its SMT siblings, the rest; one CPU against the rest where siblings would leave none."""
    if len(allowed) < 2:
        raise SystemExit(f"pinning needs two CPUs; this process may use {sorted(allowed)}")
    last = max(allowed)
    isolated = siblings(last) & allowed
    if not allowed - isolated:
        isolated = {last}
    return isolated, allowed - isolated


def tasks(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if t.name.isdigit()]
    except OSError:
        return []


def comm(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/comm" if tid else f"/proc/{pid}/comm"
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def engine_thread(root: int, engine) -> tuple[int, int] | None:
    """(pid, tid) of the engine's busy thread: SGLang's scheduler process's main thread, else the
    CPU backend's worker thread in ``root``; None when neither is found."""
    from loadtest.procs import process_tree

    for pid in sorted(process_tree(root) - {root}):
        if comm(pid).startswith(TARGET_NAMES["scheduler"]):
            return pid, pid
    worker = getattr(getattr(engine, "worker", None), "native_id", None)
    return (root, worker) if worker in tasks(root) else None


def place(root: int, engine: tuple[int, int] | None, placement: str, cores: dict) -> int:
    """Every thread of ``root``'s process tree on its placement's cores; returns how many."""
    from loadtest.procs import process_tree

    placed = 0
    for pid in process_tree(root):
        for tid in tasks(pid):
            if placement == "free":
                cpus = cores["allowed"]
            else:
                cpus = cores["isolated"] if (pid, tid) == engine else cores["rest"]
            try:
                os.sched_setaffinity(tid, cpus)
                placed += 1
            except OSError:  # the thread ended meanwhile
                continue
    return placed


def thread_sched(pid: int, tid: int) -> dict:
    """The thread's scheduler counters: CPU and run-queue nanoseconds, switches, migrations."""
    base = Path(f"/proc/{pid}/task/{tid}")
    cpu_ns, wait_ns, _ = (int(x) for x in (base / "schedstat").read_text().split()[:3])
    status = dict(
        line.split(":", 1) for line in (base / "status").read_text().splitlines() if ":" in line
    )
    migrations = None
    try:
        for line in (base / "sched").read_text().splitlines():
            if line.startswith("se.nr_migrations"):
                migrations = int(line.split(":")[1])
    except OSError:
        pass
    return {"cpu_ns": cpu_ns, "wait_ns": wait_ns, "migrations": migrations,
            "involuntary": int(status["nonvoluntary_ctxt_switches"]),
            "voluntary": int(status["voluntary_ctxt_switches"])}  # fmt: skip


def busy_cpus() -> dict[int, tuple[int, int, int]]:
    """Each CPU's (busy, stolen, total) clock ticks from ``/proc/stat``; stolen: the time the
    hypervisor ran something else while this virtual CPU had work (busy includes it)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(t) for t in ticks]
            idle = values[3] + values[4]  # idle + iowait
            out[int(name[3:])] = (sum(values[:8]) - idle, values[7], sum(values[:8]))
    return out


# ---------------------------------------------------------------- hardware counters (perf)

PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(platform.machine())
"""The system call's number on this machine's architecture (None: not known here)."""
PERF_TYPE_HARDWARE, CYCLES, INSTRUCTIONS = 0, 0, 1
EXCLUDE_KERNEL, EXCLUDE_HV = 1 << 5, 1 << 6
TIMES = 1 | 2  # read_format: time enabled, time running (the count scaled where multiplexed)


class PerfAttr(ctypes.Structure):
    """``struct perf_event_attr`` as of its first version (64 bytes), enough for counting."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64)]  # fmt: skip


class Counters:
    """Cycles and instructions of one thread, counted from construction to ``read``; kernel
    mode included where allowed. ``error`` says why not where the kernel refuses."""

    def __init__(self, tid: int):
        self.fds, self.error, self.kernel = {}, None, True
        if PERF_EVENT_OPEN is None:
            self.error = f"perf_event_open: no system call number for {platform.machine()}"
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        for name, config in (("cycles", CYCLES), ("instructions", INSTRUCTIONS)):
            for flags in (EXCLUDE_HV, EXCLUDE_HV | EXCLUDE_KERNEL):
                attr = PerfAttr(type=PERF_TYPE_HARDWARE, size=ctypes.sizeof(PerfAttr),
                                config=config, read_format=TIMES, flags=flags)  # fmt: skip
                args = (ctypes.c_long(PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_long(tid),
                        ctypes.c_long(-1), ctypes.c_long(-1), ctypes.c_ulong(0))  # fmt: skip
                fd = libc.syscall(*args)
                if fd >= 0:
                    self.fds[name] = fd
                    self.kernel &= not flags & EXCLUDE_KERNEL
                    break
                self.error = f"perf_event_open: {os.strerror(ctypes.get_errno())}"
            if name not in self.fds:
                self.close()
                return
        self.error = None

    def read(self) -> dict:
        out = {}
        try:
            for name, fd in self.fds.items():
                value, enabled, running = struct.unpack("QQQ", os.read(fd, 24))
                out[name] = round(value * enabled / running) if running else None
        finally:
            self.close()
        return out | {"kernel_counted": self.kernel}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


# ---------------------------------------------------------------- one window's measures


class Window:
    """What the engine thread, each process and the host did from construction to ``finish``."""

    def __init__(self, root: int, engine: tuple[int, int] | None):
        from loadtest.procs import process_cpu_seconds

        self.root, self.engine = root, engine
        self.processes = self.named_processes()
        self.cpu = {name: process_cpu_seconds(pid) for name, pid in self.processes.items()}
        self.host = busy_cpus()
        self.sched = thread_sched(*engine) if engine else None
        self.counters = Counters(engine[1]) if engine else None
        self.t0 = time.perf_counter()

    def named_processes(self) -> dict[str, int]:
        from loadtest.procs import process_tree

        found = {"api": self.root}
        for pid in sorted(process_tree(self.root) - {self.root}):
            name = comm(pid)
            if name.startswith(TARGET_NAMES["scheduler"]):
                found.setdefault("scheduler", pid)
            elif name.startswith(TARGET_NAMES["detokenizer"]):
                found.setdefault("detokenizer", pid)
            elif is_locust(pid):
                found[f"locust-{pid}"] = pid  # each of --locust-processes: summed in finish
        return found

    def finish(self, cores: dict) -> dict:
        from loadtest.procs import process_cpu_seconds

        wall = time.perf_counter() - self.t0
        out = {"seconds": round(wall, 2), "process_cores": {}}
        for name, pid in self.processes.items():
            before, after = self.cpu[name], process_cpu_seconds(pid)
            if None not in (before, after):
                kind = "locust" if name.startswith("locust") else name
                cores_now = out["process_cores"].get(kind, 0) + (after - before) / wall
                out["process_cores"][kind] = round(cores_now, 2)
        host = busy_cpus()
        grew = {c: [now - then for now, then in zip(host[c], self.host[c])]
                for c in host if c in self.host}  # fmt: skip
        busy = {c: ticks / max(1, total) for c, (ticks, _, total) in grew.items()}
        out["host_busy_cores"] = round(sum(busy.values()), 2)
        out["host_stolen_cores"] = round(sum(s / max(1, t) for _, s, t in grew.values()), 2)
        out["isolated_busy"] = round(sum(busy.get(c, 0) for c in cores["isolated"]), 2)
        if self.engine:
            out["engine"] = self.engine_figures(wall)
        return out

    def engine_figures(self, wall: float) -> dict:
        try:
            after = thread_sched(*self.engine)
        except (OSError, KeyError) as err:
            self.counters.close()
            return {"error": f"{type(err).__name__}: {err}"}
        grew = {k: after[k] - self.sched[k] for k in after if None not in (after[k], self.sched[k])}
        cpu_s = grew["cpu_ns"] / 1e9
        got = {"cpu_share": round(cpu_s / wall, 3),
               "waiting_share": round(grew["wait_ns"] / 1e9 / wall, 3),
               "involuntary_per_s": round(grew["involuntary"] / wall),
               "voluntary_per_s": round(grew["voluntary"] / wall)}  # fmt: skip
        if "migrations" in grew:
            got["migrations_per_s"] = round(grew["migrations"] / wall, 1)
        if self.counters.error:
            return got | {"counters": self.counters.error}
        counted = self.counters.read()
        cycles, instructions = counted.get("cycles"), counted.get("instructions")
        if cycles and instructions is not None and cpu_s > 0:
            got |= {"ghz": round(cycles / cpu_s / 1e9, 2), "ipc": round(instructions / cycles, 2),
                    "kernel_counted": counted["kernel_counted"]}  # fmt: skip
        return got


# ---------------------------------------------------------------- the summariser (no GPU needed)


def key_of(p: dict) -> tuple:
    return p.get("streams"), p.get("arm"), p.get("path")


def ratios(points: list[dict]) -> list[dict]:
    """pinned ÷ free tok/s (and TPOT) per round, arm and path; median and range over rounds."""
    by = {}
    for p in points:
        if p.get("tok_s") and not p.get("error"):
            by.setdefault(key_of(p), {}).setdefault(p["round"], {})[p["placement"]] = p
    rows = []
    for (streams, arm, path), rounds in sorted(by.items(), key=lambda kv: str(kv[0])):
        pairs = [r for r in rounds.values() if set(r) == set(PLACEMENTS)]
        tok = [r["pinned"]["tok_s"] / r["free"]["tok_s"] for r in pairs]
        timed = [r for r in pairs if r["pinned"].get("tpot_p50") and r["free"].get("tpot_p50")]
        tpot = [r["pinned"]["tpot_p50"] / r["free"]["tpot_p50"] for r in timed]
        if tok:
            rows.append({"streams": streams, "arm": arm, "path": path, "pairs": len(tok),
                         "tok_s_ratio": spread(tok),
                         "tpot_ratio": spread(tpot) if tpot else None})  # fmt: skip
    return rows


def http_over_direct(points: list[dict]) -> list[dict]:
    """HTTP ÷ direct tok/s and TPOT per round, arm and placement (adjacent points)."""
    by = {}
    for p in points:
        if p.get("tok_s") and not p.get("error"):
            key = (p.get("streams"), p.get("arm"), p.get("placement"))
            by.setdefault(key, {}).setdefault(p["round"], {})[p["path"]] = p
    rows = []
    for (streams, arm, placement), rounds in sorted(by.items(), key=lambda kv: str(kv[0])):
        pairs = [r for r in rounds.values() if {"direct", "http"} <= set(r)]
        if pairs:
            tok = [r["http"]["tok_s"] / r["direct"]["tok_s"] for r in pairs]
            tpot = [r["http"]["tpot_p50"] / r["direct"]["tpot_p50"] for r in pairs
                    if r["http"].get("tpot_p50") and r["direct"].get("tpot_p50")]  # fmt: skip
            rows.append({"streams": streams, "arm": arm, "placement": placement,
                         "pairs": len(pairs), "tok_s_ratio": spread(tok),
                         "tpot_ratio": spread(tpot) if tpot else None})  # fmt: skip
    return rows


def spread(values: list[float]) -> dict:
    """Median and range, unrounded (the report rounds once, for display)."""
    return {"median": statistics.median(values), "low": min(values), "high": max(values)}


def summarize(folder: str | Path, out: str | Path) -> dict:
    points = [meta for _, meta in metas(Path(folder))]
    points.sort(key=lambda p: (p.get("order", 0), p.get("label", "")))
    results = {"points": points, "ratios": ratios(points),
               "http_over_direct": http_over_direct(points)}  # fmt: skip
    write_reports(Path(out), "pin-scheduler", results, markdown, plot)
    return results


def cell(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def points_table(points: list[dict]) -> list[str]:
    head = ["point", "tok/s", "TPOT p50 ms", "failed", "engine thread CPU %",
            "waiting for a core %",
            "involuntary /s", "migrations /s", "GHz", "IPC", "host cores busy", "stolen",
            "isolated core busy", "API cores", "Locust cores"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in points:
        e, procs = p.get("engine", {}), p.get("process_cores", {})
        tpot = p.get("tpot_p50")
        rows.append("| " + " | ".join([
            p["label"], cell(p.get("tok_s"), ".0f"), cell(tpot and 1000 * tpot, ".1f"),
            cell(p.get("failures"), "d"), pct(e.get("cpu_share")), pct(e.get("waiting_share")),
            cell(e.get("involuntary_per_s"), "d"), cell(e.get("migrations_per_s"), ".1f"),
            cell(e.get("ghz"), ".2f"), cell(e.get("ipc"), ".2f"),
            cell(p.get("host_busy_cores"), ".2f"), cell(p.get("host_stolen_cores"), ".2f"),
            cell(p.get("isolated_busy"), ".2f"),
            cell(procs.get("api"), ".2f"), cell(procs.get("locust"), ".2f")]) + " |")  # fmt: skip
    return rows


def ratio_cell(got: dict | None) -> str:
    return "—" if not got else f"{got['median']:.2f} [{got['low']:.2f}–{got['high']:.2f}]"


def markdown(results: dict) -> str:
    points = results["points"]
    out = ["# SGLang's scheduler on a core of its own against free", ""]
    if cmd := next((p.get("command") for p in points if p.get("command")), None):
        out += [f"`{cmd}`", ""]
    if setup := next((p.get("cores") for p in points if p.get("cores")), None):
        out += [f"Cores: {setup['cpus']} allowed ({setup.get('model', '?')}); pinned: the "
                f"engine thread on {setup['isolated']}, every other thread on {setup['rest']}.",
                ""]  # fmt: skip
    out += ["## pinned ÷ free, median [range] over rounds (alternated, one engine)", "",
            "| streams | arm | path | pairs | tok/s | TPOT p50 |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["ratios"]:
        out.append(f"| {r['streams']} | {r['arm']} | {r['path']} | {r['pairs']} | "
                   f"{ratio_cell(r['tok_s_ratio'])} | {ratio_cell(r['tpot_ratio'])} |")  # fmt: skip
    out += ["", "## HTTP ÷ direct, median [range] over rounds (adjacent points)", "",
            "| streams | arm | placement | pairs | tok/s | TPOT p50 |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results.get("http_over_direct", []):
        out.append(f"| {r['streams']} | {r['arm']} | {r['placement']} | {r['pairs']} | "
                   f"{ratio_cell(r['tok_s_ratio'])} | {ratio_cell(r['tpot_ratio'])} |")  # fmt: skip
    out += ["", "## Each point, in the order run", "",
            "Engine thread: SGLang's scheduler main thread (`/proc` schedstat: CPU, waiting for a "
            "core; GHz = cycles ÷ its CPU time, IPC = instructions ÷ cycles, from "
            "perf_event_open where the kernel allows); host cores busy and stolen (the "
            "hypervisor's, `/proc/stat`).", "", *points_table(points)]  # fmt: skip
    for p in points:
        if p.get("error"):
            out += ["", f"{p['label']}: {p['error']}"]
        if isinstance(p.get("engine", {}).get("counters"), str):
            out += ["", f"{p['label']}: no hardware counters ({p['engine']['counters']})"]
            break
    return "\n".join(out) + "\n"


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p.get("tok_s")]
    if not shown:
        return
    groups = sorted({(p["arm"], p["path"]) for p in shown})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, placement in enumerate(PLACEMENTS):
        for g, group in enumerate(groups):
            mine = [p for p in shown if (p["arm"], p["path"]) == group
                    and p["placement"] == placement]  # fmt: skip
            xs = [g + (k - 0.5) * 0.35] * len(mine)
            axes[0].scatter(xs, [p["tok_s"] for p in mine], color=f"C{k}",
                            label=placement if g == 0 else None)  # fmt: skip
            axes[1].scatter(xs, [1000 * (p.get("tpot_p50") or 0) for p in mine], color=f"C{k}")
    for ax, label in zip(axes, ("output tok/s (one dot a round)", "TPOT p50, ms")):
        ax.set_xticks(range(len(groups)), [f"{a}\n{p}" for a, p in groups])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle("SGLang's scheduler pinned to a core of its own against free, one engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run (the engine's machine)


async def direct_load(engine, args, adapters: list, streams: int, measure) -> dict:
    from profile_decode import Clients

    from loadtest.bench import Traffic
    from loadtest.stats import summarize as window_stats

    clients = Clients(engine, Traffic(adapters, args.prompt_words, args.output_tokens, chat=True),
                      streams)  # fmt: skip
    try:
        await asyncio.sleep(args.warmup)
        low = time.time()
        got = await measure()
        stats = window_stats(clients.records, (low, time.time()))
    finally:
        await clients.stop()
    return got | {"tok_s": stats.get("output_throughput"), "failures": stats.get("failures", 0),
                  "tpot_p50": stats.get("tpot_p50")}  # fmt: skip


async def http_load(args, port: int, adapters: int, streams: int, label: str, measure) -> dict:
    got, point = await during_locust(args, port, adapters, streams, label, measure)
    return got | {"tok_s": point.get("output_throughput"), "failures": point.get("failures", 0),
                  "tpot_p50": point.get("tpot_p50")}  # fmt: skip


async def one_point(engine, args, names, cores: dict, meta: dict, port: int) -> dict:
    root = os.getpid()

    async def measure() -> dict:
        found = engine_thread(root, engine)
        place(root, found, meta["placement"], cores)  # Locust's processes have started by now
        window = Window(root, found)
        try:
            await asyncio.sleep(args.seconds)
            got = window.finish(cores)
        finally:
            if window.counters:
                window.counters.close()  # read already, or the point failed
        return got if found else got | {"error": "no engine thread found"}

    place(root, engine_thread(root, engine), meta["placement"], cores)
    arm, streams = meta["arm"], meta["streams"]
    if meta["path"] == "direct":
        chosen = names[: args.adapters] if arm == "adapters" else [None]
        return await direct_load(engine, args, chosen, streams, measure)
    count = args.adapters if arm == "adapters" else 0
    return await http_load(args, port, count, streams, meta["label"], measure)


def plan(args) -> list[dict]:
    points = []
    for r in range(1, args.rounds + 1):
        for streams in args.streams:
            for arm in args.arms:
                for placement in PLACEMENTS if r % 2 else PLACEMENTS[::-1]:
                    for path in args.paths:
                        label = f"{streams}-{arm}-{path}-{placement}-r{r}"
                        points.append({"label": label, "round": r, "streams": streams,
                                       "arm": arm, "path": path,
                                       "placement": placement})  # fmt: skip
    return points


def core_setup() -> dict:
    allowed = os.sched_getaffinity(0)
    isolated, rest = split_cores(allowed)
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None)  # fmt: skip
    return {"allowed": allowed, "isolated": isolated, "rest": rest, "model": model,
            "cpus": len(allowed)}  # fmt: skip


def shown(cores: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cores.items()}


async def run(args) -> None:
    from profile_decode import build

    from engine.api import create_api
    from loadtest.bench import serve_app, settle, warm_up

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = core_setup()
    print(f"[pin] cores: {shown(cores)}", flush=True)
    built = argparse.Namespace(**vars(args) | {"no_profile": True})
    engine, names = build(built)
    server = serving = None
    try:
        if "adapters" in args.arms and len(names) < args.adapters:
            raise SystemExit(f"--adapters {args.adapters}: the registry has {len(names)}")
        await warm_up(engine, names)
        server, serving, url = await serve_app(create_api(engine, built.registry))
        port = int(url.rsplit(":", 1)[1])
        command = "python lab/pin_scheduler.py " + " ".join(sys.argv[1:])
        for order, meta in enumerate(plan(args)):
            meta |= {"order": order, "command": command, "cores": shown(cores)}
            print(f"[pin] {meta['label']}", flush=True)
            try:
                meta |= await one_point(engine, args, names, cores, meta, port)
            except Exception as err:  # one point's failure is a result; the next still runs
                meta["error"] = f"{type(err).__name__}: {err}"
            Path(out, f"{meta['label']}.meta.json").write_text(json.dumps(meta, indent=1))
            print(f"    {json.dumps({k: meta.get(k) for k in ('tok_s', 'tpot_p50', 'engine')})}",
                  flush=True)  # fmt: skip
            place(os.getpid(), None, "free", cores)
            await settle(engine, 30)
            await asyncio.sleep(args.pause)
    finally:
        place(os.getpid(), None, "free", cores)
        if server:
            server.should_exit = True
            await serving
        await engine.shutdown()
    summarize(out, out)
    print((out / "pin-scheduler.md").read_text(), flush=True)


def parse_args(argv=None):
    from profile_decode import add_load_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("summarize", help="summarise a run's folder again")
    s.add_argument("folder")
    s.add_argument("--out", required=True)
    r = sub.add_parser("run", help="start the engine, alternate the placements, count")
    add_load_arguments(r, streams=[256], arms=["base", "adapters"], warmup=8)
    r.add_argument("--rounds", type=int, default=3, help="alternated pairs of placements")
    r.add_argument("--paths", nargs="+", choices=["direct", "http"], default=["direct", "http"])
    r.add_argument("--seconds", type=float, default=12, help="seconds counted a point")
    r.add_argument("--locust-processes", type=int, default=1, help="as loadtest.bench's")
    r.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "summarize":
        results = summarize(args.folder, args.out)
        print(json.dumps(results["ratios"], indent=1))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
