"""lab/long_prompt_stall.py: its report from stored rounds (per-round ratios, medians, the plot),
written again with ``--from-json`` as the results folder's COMMANDS does; and one real round on the
CPU default, short."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "lab" / "long_prompt_stall.py"
spec = importlib.util.spec_from_file_location("long_prompt_stall", SCRIPT)
long_prompt_stall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(long_prompt_stall)


def arm(max_gap: float, p50: float, answer: float, tokens: int) -> dict:
    return {"max_gap_s": max_gap, "p50_gap_s": p50, "long_answer_s": answer,
            "tokens_meanwhile": tokens}  # fmt: skip


ROUNDS = [
    {"fixed": arm(5.0, 3.0, 40.0, 13), "shrinking": arm(2.5, 1.5, 40.0, 26)},
    {"fixed": arm(6.0, 3.0, 44.0, 13), "shrinking": arm(2.0, 2.0, 44.0, 20)},
    {"fixed": arm(4.0, 2.0, 40.0, 10), "shrinking": arm(3.0, 1.0, 48.0, 20)},
]


def test_the_report_from_stored_rounds_has_per_round_ratios_and_a_plot(tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"rounds": ROUNDS}))
    cmd = [sys.executable, str(SCRIPT), "--prompt-tokens", "6000", "--pairs", "3",
           "--out", str(tmp_path / "out"), "--from-json", str(tmp_path / "in.json")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    data = json.loads((tmp_path / "out" / "stall.json").read_text())
    assert data["rounds"] == ROUNDS
    assert data["summary"]["fixed"]["max_gap_s"] == {"median": 5.0, "min": 4.0, "max": 6.0}
    assert data["ratios"]["max_gap_s"] == {"median": 0.5, "min": 1 / 3, "max": 0.75}
    table = (tmp_path / "out" / "stall.md").read_text()
    assert "| max_gap_s | 5.00 [4.00–6.00] | 2.50 [2.00–3.00] | 0.50 [0.33–0.75] |" in table
    assert (tmp_path / "out" / "stall.png").stat().st_size > 0


def test_one_round_on_the_cpu_default_counts_the_streams_waits(hf_engine):
    prompt = long_prompt_stall.long_prompt(hf_engine, 300, random.Random(0))
    assert len(hf_engine.tokenizer.encode(prompt)) <= 300
    result = asyncio.run(long_prompt_stall.one_round(hf_engine, prompt))
    assert result["tokens_meanwhile"] >= 1 and result["long_answer_s"] > 0
    assert result["max_gap_s"] >= result["p50_gap_s"] > 0
