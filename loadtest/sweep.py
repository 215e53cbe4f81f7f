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
import json
import os
import subprocess
import sys
from pathlib import Path

from engine.paths import work_dir
from loadtest.procs import CpuMeter, start_server
from loadtest.report import describe, write_outputs
from loadtest.stats import percentile, point_key, ratios, summarize

ROOT = Path(__file__).resolve().parents[1]


def run_point(args, users: int, adapters: int, raw: Path) -> list[dict]:
    """One Locust run; beside ``raw`` (<key>.jsonl) Locust's own report: <key>_stats.csv and the
    rest of ``--csv``, and <key>.html."""
    raw.unlink(missing_ok=True)
    raw.with_suffix(".hub-lag.jsonl").unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--headless", "--only-summary", "-u", str(users), "-r", str(users),
        "-t", f"{args.duration}s", "--host", args.host, "--stop-timeout", "30",
        "--adapters", str(adapters), "--distribution", "base" if adapters == 0 else "uniform",
        "--prompt-words", args.prompt_words, "--output-tokens", args.output_tokens,
        "--raw-out", str(raw), "--exit-code-on-error", "0",
        "--csv", str(raw.with_suffix("")), "--html", str(raw.with_suffix(".html")),
        "--model-format", getattr(args, "model_format", "{adapter}"),
        "--prompt-template", getattr(args, "prompt_template", "raw"),
    ]  # fmt: skip
    if getattr(args, "models", ""):
        cmd += ["--models", args.models]
    if getattr(args, "models_from", ""):
        cmd += ["--models-from", args.models_from]
    if getattr(args, "processes", 1) > 1:
        cmd += ["--processes", str(args.processes)]
    if getattr(args, "think_time", 0):
        cmd += ["--think-time", str(args.think_time)]
    if getattr(args, "arrival_rate", 0):
        cmd += ["--arrival-rate", str(args.arrival_rate)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"locust failed at {point_key(users, adapters)}:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]


def measure_point(args, users: int, adapters: int, raw: Path) -> dict:
    """One Locust point: its statistics in the steady window and the cores the server process
    (``args.server_pid``) and Locust used meanwhile."""
    return measured(args, users, adapters, raw)[0]


def measured(args, users: int, adapters: int, raw: Path) -> tuple[dict, list[dict]]:
    """``measure_point``'s point with the raw records it was taken from."""
    meter = CpuMeter(args.server_pid)
    records = run_point(args, users, adapters, raw)
    point = {"users": users, "adapters": adapters}
    window = steady_window(records, args)
    point |= summarize(records, window) | meter.cores() | client_lag(raw, window)
    point["distribution"] = "base" if adapters == 0 else "uniform"
    return point, records


def client_lag(raw: Path, window: tuple[float, float] | None) -> dict:
    """The Locust processes' hub lag in the steady window (``HubLag``): p50 and p99, seconds."""
    path = raw.with_suffix(".hub-lag.jsonl")
    if window is None or not path.exists():
        return {}
    late = [lag for line in path.read_text().splitlines() if line.strip()
            for at, lag in json.loads(line) if window[0] <= at <= window[1]]  # fmt: skip
    return {
        "client_loop_lag_p50": percentile(late, 50),
        "client_loop_lag_p99": percentile(late, 99),
    }


def steady_window(records: list[dict], args) -> tuple[float, float] | None:
    """From the warm-up's end to Locust's stop (``-t``); requests still running are let finish."""
    if not records:
        return None
    began = min(r["start"] for r in records)
    return began + args.warmup, began + args.duration


def serve(config: str, port: int) -> subprocess.Popen:
    """Start the API server for the sweep and wait until /health answers."""
    cmd = [sys.executable, "-m", "engine.api", "--config", config, "--port", str(port)]
    return start_server(cmd, f"http://127.0.0.1:{port}/health", timeout_s=600)


def sweep(args) -> dict:
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
        point = measure_point(args, users, adapters, out / "raw" / f"{key}.jsonl")
        control = results["points"].get(point_key(users, 0), point)
        point |= ratios(point, control)
        results["points"][key] = point
        results_path.write_text(json.dumps(results, indent=1))
        print(f"    {describe(point)}", flush=True)
    write_outputs(results, out)
    return results


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="a running server, e.g. http://127.0.0.1:7860")
    target.add_argument("--serve", metavar="CONFIG", help="start engine.api with this config")
    parser.add_argument("--port", type=int, default=8765, help="port for --serve")
    parser.add_argument("--adapters", type=ints, default=[1, 8, 32])
    parser.add_argument("--users", type=ints, default=[32, 128])
    parser.add_argument("--duration", type=int, default=60, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=0, help="drop requests started earlier")
    parser.add_argument("--prompt-words", default="90-110")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--out", default=str(work_dir() / "loadtest"))
    parser.add_argument("--server-pid", type=int, help="record this server process's CPU per point")
    parser.add_argument("--model-format", default="{adapter}",
                        help="how a request names an adapter: {adapter} (ours) or "
                             "{base}:{adapter} (SGLang's own server)")  # fmt: skip
    parser.add_argument("--models", default="", help="comma list of adapters to use instead")
    parser.add_argument("--models-from", default="",
                        help="a server listing the adapters (behind engine.cluster: its control "
                        "API, the router's port + 1)")  # fmt: skip
    parser.add_argument("--processes", type=int, default=1, help="Locust processes per point")
    parser.add_argument("--think-time", type=float, default=0.0,
                        help="closed loop: seconds a user waits after each answer")  # fmt: skip
    parser.add_argument("--arrival-rate", type=float, default=0.0,
                        help="open loop: requests a second (Poisson)")  # fmt: skip
    template = "raw | apply | '' (send no prompt_template: another server)"
    parser.add_argument("--prompt-template", default="raw", help=template)
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
