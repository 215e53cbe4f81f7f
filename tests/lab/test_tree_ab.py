"""lab/tree_ab.py (before/after tables of alternated runs) and lab/asgi_cost.py (the ASGI app's
cost a request and a chunk) as the results folders use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(data))


def test_each_round_pairs_its_own_before_and_after_and_the_ratios_reduce_to_a_median(tmp_path):
    for n, before, after in ((1, 400, 200), (2, 500, 300), (3, 300, 240), (10, 100, 50)):
        write(tmp_path / f"before-{n}", {"rounds": [{"p": {"ttft": before / 1000}}]})
        write(tmp_path / f"after-{n}", {"rounds": [{"p": {"ttft": after / 1000}}]})
    write(tmp_path / "before-4", {"rounds": [{"p": {"ttft": 1.0}}]})  # no after-4: left out
    cmd = [sys.executable, "lab/tree_ab.py", str(tmp_path), "--title", "T",
           "--figure", "TTFT ms=results.json:rounds.0.p.ttft*1000",
           "--figure", "absent=results.json:rounds.0.p.nothing"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    table = json.loads((tmp_path / "ab.json").read_text())
    assert table["rounds"] == ["1", "2", "3", "10"]
    ttft = table["figures"]["TTFT ms"]
    assert [r["ratio"] for r in ttft["rows"]] == pytest.approx([0.5, 0.6, 0.8, 0.5])
    assert ttft["after_over_before"] == pytest.approx({"median": 0.55, "min": 0.5, "max": 0.8})
    assert table["figures"]["absent"]["after_over_before"] is None
    text = (tmp_path / "ab.md").read_text()
    cells = "400.0 / 200.0 | 500.0 / 300.0 | 300.0 / 240.0 | 100.0 / 50.0"
    assert f"| TTFT ms | {cells} | **0.55** [0.50–0.80] |" in text
    assert "| absent | — / — | — / — | — / — | — / — | — |" in text
    assert (tmp_path / "ab.png").stat().st_size > 0


def test_a_figure_without_a_file_and_a_path_is_refused(tmp_path):
    write(tmp_path / "before-1", {})
    write(tmp_path / "after-1", {})
    cmd = [sys.executable, "lab/tree_ab.py", str(tmp_path), "--figure", "x=results.json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "LABEL=FILE:dotted.path" in done.stderr


def test_the_asgi_cost_of_this_tree_is_measured_and_written(tmp_path):
    cmd = [sys.executable, "lab/asgi_cost.py", "--rounds", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["tree"] == str(ROOT) and len(result["rounds"]) == 1
    assert result["us_per_request"]["median"] > 0
    assert "µs a request" in (tmp_path / "results.md").read_text()
