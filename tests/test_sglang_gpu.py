"""The real SGLang backend on a GPU: greedy tokens match the CPU backend (skips without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang"),
]
SCRIPT = Path(__file__).resolve().parents[1] / "lab" / "gpu_check.py"


def test_sglang_serves_a_mixed_batch_with_cpu_greedy_tokens(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "reference", str(tmp_path)], check=True)
    out = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "run",
            str(tmp_path),
            "--out",
            str(out),
            "--dtypes",
            "float16",
        ],
    )  # exits 1 when a check fails: the report says which
    report = json.loads(out.read_text())["sglang_float16"]
    assert report["mixed_vs_cpu"]["token_match_rate"] >= 0.95
    assert report["single_vs_cpu"]["token_match_rate"] >= 0.95
    assert all(s["chunks"] > 1 for s in report["streamed"].values())
    assert report["cancel"]["unload_after_cut"] == "ok"
    failed = [name for name, ok in report["ok"].items() if not ok]
    assert failed == [], json.dumps(report["features"], indent=1)[:4000]
