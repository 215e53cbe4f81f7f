"""The heuristics analysis: each heuristic on hand-made examples, statistics on known cases, and
the whole analysis on small synthetic results files."""

from __future__ import annotations

import json

import pytest

from finetune.analyze import (
    analyze,
    gzip_ratio,
    leave_one_task_out,
    ranks,
    spearman,
    task_heuristics,
)

EXAMPLES = [
    {"input": {"text": "the cat sat"}, "target": "cat"},
    {"input": {"text": "a dog"}, "target": "dog barks"},
]


def test_heuristics_on_hand_made_examples():
    h = task_heuristics(EXAMPLES)
    assert h["input_words_mean"] == 2.5 and h["input_words_std"] == 0.5
    assert h["output_words_mean"] == 1.5 and h["output_words_std"] == 0.5
    assert h["distinct_outputs"] == 2 and h["output_vocab"] == 3
    assert h["output_in_input"] == pytest.approx((1.0 + 0.5) / 2)


def test_gzip_ratio_is_lower_for_repetitive_outputs():
    assert gzip_ratio(["fresh"] * 200) < gzip_ratio([f"{i * 7919 % 10007}" for i in range(200)])


def test_ranks_average_ties_and_spearman_on_monotone_data():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    rho, p = spearman([1, 2, 3, 4, 5], [3, 9, 27, 81, 243])
    assert rho == pytest.approx(1.0)
    assert p == pytest.approx(2 / 120)  # exact: only the identity and its reverse are as extreme
    rho, _ = spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == (None, 1.0)


def test_leave_one_task_out_recovers_an_exact_linear_relation():
    rows = [{"task": f"t{i}", "h": i, "finetuned": 0.1 + 0.2 * i} for i in range(4)]
    result = leave_one_task_out(rows, "h")
    assert result["loto_mae"] == pytest.approx(0.0, abs=1e-9)
    assert result["mean_predictor_mae"] > 0.2


def quality(scores: dict[str, tuple[float, float]]) -> dict:
    return {
        "results": [
            {"task": t, "metric": "accuracy", "n": 10,
             "base": {"accuracy": b}, "finetuned": {"accuracy": f}}
            for t, (b, f) in scores.items()
        ]
    }  # fmt: skip


def test_analysis_on_synthetic_results_writes_tables_and_plots(tmp_path):
    first = {"a": (0.1, 0.9), "b": (0.5, 0.7), "c": (0.0, 0.4), "d": (0.3, 0.95)}
    second = {"a": (0.2, 0.95), "b": (0.6, 0.8), "c": (0.1, 0.5), "d": (0.2, 0.9)}
    paths = {}
    for base, scores in (("small", first), ("large", second)):
        paths[base] = tmp_path / f"{base}.json"
        paths[base].write_text(json.dumps(quality(scores)))
    heuristics = {
        t: task_heuristics([{"input": {"x": "w " * (i + 1)}, "target": "y " * (4 - i)}])
        for i, t in enumerate("abcd")
    }
    out = tmp_path / "analysis"
    result = analyze(paths, out, heuristics)
    assert len(result["rows"]) == 8
    pooled = [c for c in result["correlations"] if c["group"] == "pooled"]
    assert {c["n"] for c in pooled} == {8}
    expected = {"heuristics.csv", "correlations.csv", "loto.csv", "analysis.md",
                "heuristics_vs_lift.png", "base_comparison.png"}  # fmt: skip
    assert expected <= {p.name for p in out.iterdir()}
    text = (out / "analysis.md").read_text()
    assert "| small |" in text and "| large |" in text and "Spearman" in text
