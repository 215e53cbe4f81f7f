"""lab/http_ttft_cpu.py end to end on this machine, small: our API over the no-model engine,
real uvicorn and Locust; closed against open loop, and h11 against httptools."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, *mode: str) -> dict | None:
    cmd = [sys.executable, "lab/http_ttft_cpu.py", *mode, "--users", "4", "--gap-ms", "20",
           "--pairs", "1", "--duration", "4", "--warmup", "1", "--output-tokens", "8-10",
           "--http-port", str(free_port()), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if not (tmp_path / "results.json").exists():  # the pairs plan writes under pairs/
        return None
    return json.loads((tmp_path / "results.json").read_text())


def test_closed_and_open_loop_points_split_the_first_token_at_the_servers_door(tmp_path):
    results = run(tmp_path, "--arrivals")
    points = results["rounds"][0]["points"]
    assert list(points) == ["closed", "open"]
    assert points["open"]["output_throughput"] > 0 and not points["open"]["failures"]
    for point in points.values():  # each hop a part of a TTFT; the server's share the rest
        assert 0 < point["to_server_p50"] < point["ttft_p50"]
        assert 0 < point["to_client_p50"] < point["ttft_p50"]
    assert "client's send to the server's arrival" in (tmp_path / "summary.md").read_text()


def test_each_uvicorn_http_implementation_serves_its_own_points(tmp_path):
    results = run(tmp_path, "--parsers", "h11,httptools")
    points = results["rounds"][0]["points"]
    assert set(points) == {"h11", "httptools"}
    assert all(p["completed"] and not p["failures"] for p in points.values())


def test_each_point_runs_on_a_fresh_event_loop_of_its_kind(tmp_path):
    results = run(tmp_path, "--loops", "asyncio")  # uvloop is not a dependency: not here
    point = results["rounds"][0]["points"]["asyncio"]
    assert point["completed"] and not point["failures"] and point["to_server_p50"] > 0


def test_pairs_run_open_loop_on_both_arms(tmp_path):
    run(tmp_path, "--arrival-rate", "20")  # the pairs plan
    results = json.loads((tmp_path / "pairs" / "results.json").read_text())
    assert results["settings"]["arrivals"] == "Poisson, 20.0/s"
    points = results["rounds"][0]["points"]
    assert all(p["completed"] and not p["failures"] for p in points.values())
    assert "Poisson arrivals 20.0/s" in (tmp_path / "pairs" / "summary.md").read_text()


def test_waves_set_the_closed_loop_beside_a_think_time_with_how_arrivals_bunch(tmp_path):
    results = run(tmp_path, "--waves")
    points = results["rounds"][0]["points"]
    assert list(points) == ["closed", "think"]
    for point in points.values():
        assert point["completed"] and not point["failures"]
        assert point["ttft_p50_busiest_quarter"] > 0 and point["arrivals_per_100ms_p99"] > 0
    # 4 users answered in well under a second sleep most of each cycle: fewer requests arrive
    assert points["think"]["request_throughput"] < points["closed"]["request_throughput"]
    assert "busiest ¼ of arrivals" in (tmp_path / "summary.md").read_text()
