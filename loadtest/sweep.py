"""Sweep distinct adapters × concurrency with headless Locust; base-only control in the same run.

    python -m loadtest.sweep --host http://127.0.0.1:7860 --adapters 1,8,32 --users 32,128 \
        --duration 60 --out results/loadtest
    python -m loadtest.sweep --serve adapters.yaml --adapters 1,2 --users 1,4 --duration 10

For each concurrency it runs the base-only control first, then each adapter count (uniform
traffic). Per point: TTFT p50/p90/p99, ITL p50/p90, TPOT, e2e p50/p90, request/s, output tok/s,
failures, and ratios to the control. Writes results.json, results.csv, PNG plots and summary.md
into --out; a re-run skips the points results.json already has (resume).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "users", "adapters", "distribution", "completed", "failures", "request_throughput",
    "output_throughput", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "tpot_mean",
    "e2e_p50", "e2e_p90", "output_throughput_ratio", "ttft_p50_ratio", "client_cpu_cores",
    "server_cpu_cores", "engine_process_cpu_cores",
]  # fmt: skip


def point_key(users: int, adapters: int) -> str:
    return f"u{users}-a{adapters}"


def run_point(args, users: int, adapters: int, raw: Path) -> list[dict]:
    raw.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--headless", "--only-summary", "-u", str(users), "-r", str(users),
        "-t", f"{args.duration}s", "--host", args.host, "--stop-timeout", "30",
        "--adapters", str(adapters), "--distribution", "base" if adapters == 0 else "uniform",
        "--prompt-words", args.prompt_words, "--output-tokens", args.output_tokens,
        "--raw-out", str(raw), "--exit-code-on-error", "0",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"locust failed at {point_key(users, adapters)}:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used (Linux ``/proc``); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def steady_window(records: list[dict], args) -> tuple[float, float] | None:
    """From the warm-up's end to Locust's stop (``-t``); requests still running are let finish."""
    if not records:
        return None
    began = min(r["start"] for r in records)
    return began + args.warmup, began + args.duration


def serve(config: str, port: int) -> subprocess.Popen:
    """Start the API server for the sweep and wait until /health answers."""
    cmd = [sys.executable, "-m", "engine.server", "--config", config, "--port", str(port)]
    return start_server(cmd, f"http://127.0.0.1:{port}/health", timeout_s=600)


def start_server(cmd: list[str], url: str, timeout_s: float, env=None) -> subprocess.Popen:
    """Start ``cmd`` and return it once ``url`` answers; an error if it exits or never does."""
    import urllib.request

    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=30):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited during start-up: {' '.join(cmd)}") from None
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server did not answer {url} in {timeout_s:.0f} s: {' '.join(cmd)}")


def sweep(args) -> dict:
    from loadtest._stats import ratios, summarize

    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"points": {}}
    results["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    grid = [(u, a) for u in args.users for a in [0, *args.adapters]]
    for i, (users, adapters) in enumerate(grid, 1):
        key = point_key(users, adapters)
        label = "base-only control" if adapters == 0 else f"{adapters} adapters"
        if key in results["points"]:
            print(f"[{i}/{len(grid)}] {users} users, {label}: done already (resume)", flush=True)
            continue
        print(f"[{i}/{len(grid)}] {users} users, {label}: running {args.duration}s...", flush=True)
        meter = CpuMeter(args.server_pid)
        records = run_point(args, users, adapters, out / "raw" / f"{key}.jsonl")
        point = {"users": users, "adapters": adapters}
        point |= summarize(records, steady_window(records, args)) | meter.cores()
        point["distribution"] = "base" if adapters == 0 else "uniform"
        control = results["points"].get(point_key(users, 0), point)
        point |= ratios(point, control)
        results["points"][key] = point
        results_path.write_text(json.dumps(results, indent=1))
        print(f"    {describe(point)}", flush=True)
    write_outputs(results, out)
    return results


def describe(p: dict) -> str:
    if not p.get("completed"):
        done = f"{p['output_throughput']:.1f} output tok/s, " if p.get("output_throughput") else ""
        return f"{done}no request completed in the window ({p.get('failures', 0)} failures)"
    ratio = p.get("output_throughput_ratio")
    vs = f" ({ratio:.2f}× base)" if ratio and p["adapters"] else ""
    cpu = f", cores busy: Locust {p['client_cpu_cores']}" if "client_cpu_cores" in p else ""
    cpu += f", server {p['server_cpu_cores']}" if p.get("server_cpu_cores") is not None else ""
    if p.get("engine_process_cpu_cores") is not None:
        cpu += f", engine process {p['engine_process_cpu_cores']} cores busy"
    return (
        f"{p['output_throughput']:.1f} output tok/s{vs}, TTFT p50 {p['ttft_p50'] * 1000:.0f} ms, "
        f"ITL p50 {(p['itl_p50'] or 0) * 1000:.0f} ms, {p['completed']} done, "
        f"{p['failures']} failed{cpu}"
    )


def write_outputs(results: dict, out: Path) -> None:
    points = sorted(results["points"].values(), key=lambda p: (p["users"], p["adapters"]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    plot(points, out)
    (out / "summary.md").write_text(summary(points, results["settings"]))


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, ylabel, scale, name in [
        ("ttft_p50", "TTFT p50 (ms)", 1000, "ttft_vs_adapters.png"),
        ("output_throughput", "output tokens/s", 1, "throughput_vs_adapters.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for users in sorted({p["users"] for p in points}):
            row = [p for p in points if p["users"] == users and p.get(metric) is not None]
            lora = [p for p in row if p["adapters"] > 0]
            line = ax.plot(
                [p["adapters"] for p in lora], [p[metric] * scale for p in lora],
                marker="o", label=f"{users} concurrent",
            )  # fmt: skip
            for p in row:
                if p["adapters"] == 0:
                    ax.axhline(p[metric] * scale, color=line[0].get_color(), ls="--", lw=1)
        counts = sorted({p["adapters"] for p in points if p["adapters"]})
        if len(counts) > 1:  # one point on a log axis breaks matplotlib's minor ticks
            ax.set_xscale("log", base=2)
        ax.set_xticks(counts)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("distinct adapters in the traffic (dashed: base model only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def recommendation(points: list[dict]) -> str:
    lora = [p for p in points if p["adapters"] > 0 and p.get("output_throughput_ratio")]
    if not lora:
        return "Not enough points for a recommendation."
    widest = max(p["adapters"] for p in lora)
    busiest = max(p["users"] for p in lora)
    good = [p for p in lora if p["output_throughput_ratio"] >= 0.9]
    worst = min(lora, key=lambda p: p["output_throughput_ratio"])
    lines = [
        f"- `max_loaded_loras` ≥ {widest}: every adapter seen in the traffic stays loaded "
        "(no reload on the request path).",
        f"- `max_loras_per_batch` ≥ {min(widest, busiest)}: the distinct adapters one batch can "
        f"meet at {busiest} concurrent requests over {widest} adapters; below that, requests wait "
        "for a batch slot and throughput falls (the cliff past `max_loras_per_batch`).",
        f"- Lowest throughput ratio: {worst['output_throughput_ratio']:.2f}× base at "
        f"{worst['adapters']} adapters, {worst['users']} concurrent; "
        f"{len(good)}/{len(lora)} points kept ≥ 0.9× base.",
    ]
    return "\n".join(lines)


def summary(points: list[dict], settings: dict) -> str:
    head = (
        "| users | adapters | done | failed | out tok/s | × base | TTFT p50 ms | × base | "
        "ITL p50 ms | TPOT ms | e2e p50 s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {p['users']} | {p['adapters'] or 'base'} | {p.get('completed', 0)} | "
        f"{p.get('failures', 0)} | {cell(p.get('output_throughput'), digits=1)} | "
        f"{cell(p.get('output_throughput_ratio'), digits=2)} | {cell(p.get('ttft_p50'), 1000)} | "
        f"{cell(p.get('ttft_p50_ratio'), digits=2)} | {cell(p.get('itl_p50'), 1000, 1)} | "
        f"{cell(p.get('tpot_mean'), 1000, 1)} | {cell(p.get('e2e_p50'), digits=2)} |"
        for p in points
    ]
    command = settings.get("command", "")
    return (
        f"### Load-test sweep\n\n`{command}`\n\n{head}" + "\n".join(rows)
        + "\n\n![TTFT](ttft_vs_adapters.png) ![Throughput](throughput_vs_adapters.png)\n\n"
        + "**Recommendation**\n\n" + recommendation(points) + "\n"
    )  # fmt: skip


def cell(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    """A table cell; "—" where the point has no such figure (no request ended in the window)."""
    return "—" if value is None else f"{value * scale:.{digits}f}"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="a running server, e.g. http://127.0.0.1:7860")
    target.add_argument("--serve", metavar="CONFIG", help="start engine.server with this config")
    parser.add_argument("--port", type=int, default=8765, help="port for --serve")
    parser.add_argument("--adapters", type=ints, default=[1, 8, 32])
    parser.add_argument("--users", type=ints, default=[32, 128])
    parser.add_argument("--duration", type=int, default=60, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=0, help="drop requests started earlier")
    parser.add_argument("--prompt-words", default="90-110")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--out", default=str(ROOT / "results" / "loadtest"))
    parser.add_argument("--server-pid", type=int, help="record this server process's CPU per point")
    args = parser.parse_args()
    args.command = "python -m loadtest.sweep " + " ".join(sys.argv[1:])
    server = None
    if args.serve:
        server = serve(args.serve, args.port)
        args.host = f"http://127.0.0.1:{args.port}"
        args.server_pid = server.pid
    try:
        sweep(args)
    finally:
        if server:
            server.terminate()
            server.wait(30)
    print(f"results in {args.out}: results.json, results.csv, summary.md, *.png")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
