"""Processes: start a server and wait for it, the registry it serves; the cores a process keeps
busy; GPU memory."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import yaml

from engine.cluster import wait_until_up
from engine.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu(path: Path) -> tuple[str, float] | None:
    """A ``/proc`` stat file's (name, user + system CPU seconds); None where unreadable."""
    try:
        text = path.read_text()
        fields = text.rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    name = text[text.find("(") + 1 : text.rfind(")")]
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used (Linux ``/proc``); None where unreadable."""
    found = stat_cpu(Path(f"/proc/{pid}/stat"))
    return found[1] if found else None


class CpuMeter:
    """Cores busy during one point: the Locust run (a finished child) and the server process.

    One Python event loop near 1.0 is that side's limit; HTTP numbers then measure it, not the
    engine.
    """

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.wall = time.perf_counter()
        self.client = self.children_cpu()
        self.server = process_cpu_seconds(server_pid) if server_pid else None

    @staticmethod
    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def cores(self) -> dict:
        wall = time.perf_counter() - self.wall
        server = process_cpu_seconds(self.server_pid) if self.server is not None else None
        return {
            "client_cpu_cores": round((self.children_cpu() - self.client) / wall, 2),
            "server_cpu_cores": None if server is None else round((server - self.server) / wall, 2),
        }


def start_server(cmd: list[str], url: str, timeout_s: float, env=None) -> subprocess.Popen:
    """Start ``cmd`` and return it once ``url`` answers; an error if it exits or never does."""
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        wait_until_up(url, server, timeout_s)
    except (RuntimeError, TimeoutError) as err:
        server.kill()
        raise RuntimeError(f"{err}: {' '.join(cmd)}") from None
    return server


def process_tree(root: int) -> set[int]:
    """``root`` and its descendants (SGLang's scheduler and detokenizer are child processes)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, thread id) → (the thread's name, its user + system CPU seconds), from ``/proc``."""
    tasks = {int(t.name): stat_cpu(t / "stat") for t in Path(f"/proc/{pid}/task").glob("[0-9]*")}
    return {(pid, tid): found for tid, found in tasks.items() if found}


class ChildrenMeter:
    """Cores busy in a process's descendants that live through the whole measurement: SGLang's
    scheduler and detokenizer (a Locust run, started and ended inside, is not counted); and the
    busiest single thread among them. SGLang's scheduler loop (one Python thread) never blocks:
    it reads 1.0 core at 64 streams as at 256 (``results/serving/h200-7b-prefill-delayer``), so
    a full core does not show that its work bounds the step (``lab/profile_scheduler.py``)."""

    def __init__(self, root: int):
        self.root = root
        self.wall = time.perf_counter()
        self.before = self.seconds()
        self.threads_before = self.threads()

    def descendants(self) -> set[int]:
        return process_tree(self.root) - {self.root}

    def seconds(self) -> dict[int, float]:
        times = {pid: process_cpu_seconds(pid) for pid in self.descendants()}
        return {pid: t for pid, t in times.items() if t is not None}

    def threads(self) -> dict[tuple[int, int], tuple[str, float]]:
        return {key: v for pid in self.descendants() for key, v in thread_cpu_seconds(pid).items()}

    def cores(self) -> float | None:
        wall = time.perf_counter() - self.wall
        after = self.seconds()
        both = set(self.before) & set(after)
        if not both:
            return None
        return round(sum(after[p] - self.before[p] for p in both) / wall, 2)

    def busiest_thread(self) -> dict:
        """``engine_busiest_thread_cores`` and its ``engine_busiest_thread`` ("name pid/tid")."""
        wall = time.perf_counter() - self.wall
        after = self.threads()
        used = {
            k: after[k][1] - self.threads_before[k][1] for k in after if k in self.threads_before
        }
        if not used:
            return {}
        pid, tid = max(used, key=used.get)
        return {
            "engine_busiest_thread_cores": round(used[(pid, tid)] / wall, 2),
            "engine_busiest_thread": f"{after[(pid, tid)][0]} {pid}/{tid}",
        }


def gpu_memory_mib() -> int | None:
    """GPU memory held by this process and its children (other jobs on the GPU excluded)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode:
        return None
    ours = process_tree(os.getpid())
    rows = [line.split(",") for line in done.stdout.splitlines() if line.strip()]
    return sum(int(mib) for pid, mib in rows if int(pid) in ours)


def wait_for_peer(args) -> None:
    """Touch ``--sync-mine`` (ready), wait up to ``--sync-timeout`` for ``--sync-theirs``."""
    if args.sync_mine:
        Path(args.sync_mine).parent.mkdir(parents=True, exist_ok=True)
        Path(args.sync_mine).touch()
    if not args.sync_theirs:
        return
    t0 = time.perf_counter()
    while not Path(args.sync_theirs).exists() and time.perf_counter() - t0 < args.sync_timeout:
        time.sleep(1)
    seen = "appeared" if Path(args.sync_theirs).exists() else "did not appear: going on alone"
    print(f"sync: {args.sync_theirs} {seen} after {time.perf_counter() - t0:.0f}s", flush=True)


def absolute_registry(source: Path, sets: list[str]) -> dict:
    """``source`` as a dict that works from anywhere (absolute base and adapter paths), with
    each ``KEY=YAML`` of ``sets`` as an ``engine.sglang`` setting."""
    source = source.resolve()
    config = yaml.safe_load(source.read_text())
    base = config.setdefault("base", {})
    local_model = source.parent / str(base.get("model", ""))
    if base.get("model") and local_model.exists():  # a folder beside the source registry
        base["model"] = str(local_model.resolve())
    for entry in config["adapters"]:
        entry["path"] = str((source.parent / entry["path"]).resolve())
    sglang = config.setdefault("engine", {}).setdefault("sglang", {})
    for item in sets:
        key, _, raw = item.partition("=")
        sglang[key] = yaml.safe_load(raw)
    return config


def write_registry(config: dict, path: Path) -> Path:
    """Write it and load it back: a bad setting fails here, not in a server started on it."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    load_registry(path)
    return path
