"""The H200 targets report, read from the results files shipped in results/h200 and
results/parity-sglang (so a change to either side that breaks the other fails here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("h200_report", ROOT / "scripts" / "h200_report.py")
report = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(report)


def test_targets_table_from_the_shipped_results():
    text = report.markdown(ROOT / "results" / "h200", ROOT / "results" / "parity-sglang")
    sweep = json.loads((ROOT / "results" / "h200" / "results.json").read_text())
    headline = sweep["points"]["u256-a128"]
    assert f"**{headline['output_throughput_ratio']:.2f}×**" in text
    assert f"**{headline['ttft_p50_ratio']:.2f}×**" in text
    evict = json.loads((ROOT / "results" / "h200" / "evict.json").read_text())
    assert f"**{evict['reload_added_ms']:+.1f} ms**" in text
    assert "max_loras_per_batch=32" in text  # a tuning variant, next to the main run
    later = json.loads((ROOT / "results" / "h200" / "session5" / "results.json").read_text())
    assert f"**{later['points']['u256-a128']['output_throughput_ratio']:.2f}×**" in text
    assert "chunked_prefill_size=2048 (`session5`)" in text  # a later run's variant, labelled
    host = ROOT / "results" / "h200" / "session6" / "tune" / "evict-max_loaded_loras-128"
    added = json.loads((host / "evict.json").read_text())["reload_added_ms"]
    assert f"from disk (`session6/tune/evict-max_loaded_loras-128`) | **{added:+.1f} ms**" in text
    assert "| stream_interval=4 (`session6`) |" in text  # named by the setting it changes
    assert (ROOT / "results" / "h200" / "targets.md").read_text() == text  # regenerated


def test_peft_speedup_is_taken_at_the_points_both_ran():
    sweep = {"points": {"u32-a1": {"output_throughput": 300.0}, "u32-a8": {}}}
    peft = {"points": {
        "u32-a1": {"users": 32, "adapters": 1, "output_throughput": 20.0, "completed": 4},
        "u32-a8": {"users": 32, "adapters": 8, "output_throughput": 10.0},
        "u256-a1": {"users": 256, "adapters": 1, "output_throughput": 50.0},
    }}  # fmt: skip
    rows = report.peft_speedups(sweep, peft)
    assert [(r["users"], r["adapters"], r["speedup"]) for r in rows] == [(32, 1, 15.0)]
