"""lab/pin_scheduler.py: the cores split for the engine thread, every thread of a process tree
placed on them, the thread's scheduler counters, the pinned ÷ free and HTTP ÷ direct summaries,
and a CPU run end to end (engine-direct and through HTTP with the real Locust)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "lab" / "pin_scheduler.py"
spec = importlib.util.spec_from_file_location("pin_scheduler", SCRIPT)
pin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pin)

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


def test_cpu_lists_parse_as_the_kernel_writes_them():
    assert pin.parse_cpu_list("0-3,8\n") == {0, 1, 2, 3, 8}
    assert pin.parse_cpu_list("5") == {5}


def test_the_engine_gets_the_last_physical_core_and_its_siblings(monkeypatch):
    monkeypatch.setattr(pin, "siblings", lambda cpu: {cpu, cpu - 8} if cpu >= 8 else {cpu, cpu + 8})
    assert pin.split_cores(set(range(16))) == ({7, 15}, set(range(16)) - {7, 15})
    # siblings that would leave the others nothing: the one CPU alone
    assert pin.split_cores({7, 15}) == ({15}, {7})
    with pytest.raises(SystemExit, match="two CPUs"):
        pin.split_cores({3})


@needs_two_cpus
def test_place_pins_the_engine_thread_alone_and_every_other_thread_elsewhere():
    busy = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
    child = subprocess.Popen([sys.executable, "-c", busy + "time.sleep(60)"])
    try:
        for _ in range(600):  # until the interpreter has started its second thread
            if len(pin.tasks(child.pid)) == 2:
                break
            subprocess.run(["sleep", "0.1"])
        allowed = os.sched_getaffinity(0)
        isolated, rest = pin.split_cores(allowed)
        cores = {"allowed": allowed, "isolated": isolated, "rest": rest}
        main, other = sorted(pin.tasks(child.pid))
        engine = (child.pid, main)
        assert pin.place(child.pid, engine, "pinned", cores) == 2
        assert os.sched_getaffinity(main) == isolated
        assert os.sched_getaffinity(other) == rest
        assert pin.place(child.pid, engine, "free", cores) == 2
        assert os.sched_getaffinity(main) == os.sched_getaffinity(other) == allowed
        counters = pin.thread_sched(child.pid, main)
        assert counters["cpu_ns"] > 0 and counters["voluntary"] >= 0
    finally:
        child.kill()
        child.wait()


def test_the_placements_alternate_by_round():
    args = pin.parse_args(["run", "--config", "x.yaml", "--out", "o", "--arms", "base",
                           "--paths", "http", "--rounds", "3"])  # fmt: skip
    order = [(p["round"], p["placement"]) for p in pin.plan(args)]
    assert order == [(1, "free"), (1, "pinned"), (2, "pinned"), (2, "free"), (3, "free"),
                     (3, "pinned")]  # fmt: skip


def point(label: str, round_: int, arm: str, path: str, placement: str, tok_s: float,
          tpot: float) -> dict:  # fmt: skip
    return {"label": label, "round": round_, "streams": 256, "arm": arm, "path": path,
            "placement": placement, "tok_s": tok_s, "tpot_p50": tpot, "order": round_,
            "command": "python lab/pin_scheduler.py run", "failures": 0,
            "engine": {"cpu_share": 0.99, "waiting_share": 0.0, "involuntary_per_s": 2,
                       "counters": "perf_event_open: No such file or directory"},
            "cores": {"cpus": 16, "isolated": [15], "rest": list(range(15))}}  # fmt: skip


def test_summarize_reports_pinned_over_free_and_http_over_direct(tmp_path):
    figures = {  # round: (free direct, free http, pinned direct, pinned http) tok/s
        1: (17000, 14000, 16000, 14500),
        2: (13600, 12100, 15000, 13000),
        3: (13700, 13200, 15500, 13700),
    }
    for r, row in figures.items():
        placed = [("free", "direct"), ("free", "http"), ("pinned", "direct"), ("pinned", "http")]
        cells = zip(placed, row)
        for (placement, path), tok_s in cells:
            label = f"256-base-{path}-{placement}-r{r}"
            meta = point(label, r, "base", path, placement, tok_s, 0.015)
            (tmp_path / f"{label}.meta.json").write_text(json.dumps(meta))
    results = pin.summarize(tmp_path, tmp_path / "out")
    http_pinned = next(r for r in results["ratios"] if r["path"] == "http")
    assert http_pinned["pairs"] == 3
    assert http_pinned["tok_s_ratio"] == {"median": 13700 / 13200, "low": 14500 / 14000,
                                          "high": 13000 / 12100}  # fmt: skip
    free = next(r for r in results["http_over_direct"] if r["placement"] == "free")
    assert free["tok_s_ratio"]["median"] == 12100 / 13600
    md = (tmp_path / "out" / "pin-scheduler.md").read_text()
    assert "| 256 | base | http | 3 | 1.04 [1.04–1.07] | 1.00 [1.00–1.00] |" in md
    assert "pinned: the engine thread on [15]" in md
    assert "no hardware counters (perf_event_open: No such file or directory)" in md
    assert (tmp_path / "out" / "pin-scheduler.png").stat().st_size > 0


@needs_two_cpus
def test_a_cpu_run_alternates_the_placements_direct_and_through_http(tmp_path):
    """The whole run on the CPU backend: its worker thread is the engine thread."""
    synth, out = tmp_path / "synth", tmp_path / "pin"
    cmd = [sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", "2"]
    subprocess.run([*cmd, "--out", str(synth)], check=True, cwd=ROOT, capture_output=True)
    run = [sys.executable, str(SCRIPT), "run", "--config", str(synth / "adapters.yaml"),
           "--backend", "hf", "--streams", "2", "--arms", "adapters", "--adapters", "2",
           "--warmup", "1", "--seconds", "2", "--rounds", "1", "--pause", "0",
           "--prompt-words", "4-6", "--output-tokens", "4-6", "--out", str(out)]  # fmt: skip
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "pin-scheduler.json").read_text())
    labels = [p["label"] for p in results["points"]]
    assert labels == ["2-adapters-direct-free-r1", "2-adapters-http-free-r1",
                      "2-adapters-direct-pinned-r1", "2-adapters-http-pinned-r1"]  # fmt: skip
    for p in results["points"]:
        assert not p.get("error") and p["failures"] == 0 and p["tok_s"] > 0
        assert 0 < p["engine"]["cpu_share"] <= 1.05 and p["engine"]["waiting_share"] >= 0
        assert p["process_cores"]["api"] > 0 and p["host_stolen_cores"] >= 0
    pinned = [p for p in results["points"] if p["placement"] == "pinned"]
    for p in pinned:  # all the engine thread's CPU time was spent on the isolated core
        assert p["isolated_busy"] >= 0.9 * p["engine"]["cpu_share"] - 0.02
    assert "locust" in results["points"][1]["process_cores"]
    assert [r["path"] for r in results["ratios"]] == ["direct", "http"]
