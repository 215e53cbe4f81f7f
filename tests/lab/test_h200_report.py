"""The H200 targets report, read from the shipped results (results/serving/h200-7b-adapter-scaling
and results/parity/sglang-vs-cpu), so a change to either side that breaks the other fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "results" / "serving" / "h200-7b-adapter-scaling"
SPEC = importlib.util.spec_from_file_location("h200_report", ROOT / "lab" / "h200_report.py")
report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(report)


def test_targets_table_from_the_shipped_results():
    text = report.markdown(RUNS, ROOT / "results" / "parity" / "sglang-vs-cpu")
    sweep = json.loads((RUNS / "full-grid" / "results.json").read_text())
    headline = sweep["points"]["u256-a128"]
    assert f"**{headline['output_throughput_ratio']:.2f}×**" in text
    assert f"**{headline['ttft_p50_ratio']:.2f}×**" in text
    evict = json.loads((RUNS / "full-grid" / "evict.json").read_text())
    assert f"**{evict['reload_added_ms']:+.1f} ms**" in text
    assert "max_loras_per_batch=32 (`full-grid`)" in text  # a tuning variant, labelled
    later = json.loads((RUNS / "full-grid-repeat" / "results.json").read_text())
    assert f"**{later['points']['u256-a128']['output_throughput_ratio']:.2f}×**" in text
    assert "chunked_prefill_size=2048 (`full-grid-repeat`)" in text
    host = RUNS / "128-adapters-cpu" / "tune" / "evict-max_loaded_loras-128"
    added = json.loads((host / "evict.json").read_text())["reload_added_ms"]
    assert f"(`128-adapters-cpu/tune/evict-max_loaded_loras-128`) | **{added:+.1f} ms**" in text
    assert "| stream_interval=4 (`128-adapters-cpu`) |" in text  # named by the setting it changes
    assert (RUNS / "targets.md").read_text() == text  # regenerated


def test_peft_speedup_is_taken_at_the_points_both_ran():
    sweep = {"points": {"u32-a1": {"output_throughput": 300.0}, "u32-a8": {}}}
    peft = {"points": {
        "u32-a1": {"users": 32, "adapters": 1, "output_throughput": 20.0, "completed": 4},
        "u32-a8": {"users": 32, "adapters": 8, "output_throughput": 10.0},
        "u256-a1": {"users": 256, "adapters": 1, "output_throughput": 50.0},
    }}  # fmt: skip
    rows = report.peft_speedups(sweep, peft)
    assert [(r["users"], r["adapters"], r["speedup"]) for r in rows] == [(32, 1, 15.0)]
