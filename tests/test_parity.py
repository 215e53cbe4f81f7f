"""Greedy-token parity between two evaluation runs (scripts/parity.py) on hand-made outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "parity", Path(__file__).resolve().parents[1] / "scripts" / "parity.py"
)
parity = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(parity)

REFERENCE = {
    ("spam", "base", 0): [1, 2, 3],
    ("spam", "base", 1): [4, 5],
    ("spam", "adapter", 0): [7, 8],
    ("spam", "adapter", 9): [1],  # beyond --first
}
CANDIDATE = {
    ("spam", "base", 0): [1, 2, 3],
    ("spam", "base", 1): [4, 6, 7],
    ("spam", "adapter", 0): [7, 8, 2],  # ran on past the reference's end
    ("spam", "adapter", 9): [2],
}


def test_compare_counts_identical_sequences_and_where_they_part():
    rows = {(r["task"], r["model"]): r for r in parity.compare(REFERENCE, CANDIDATE, first=5)}
    assert rows[("spam", "base")]["identical"] == 1
    assert rows[("spam", "base")]["first_mismatch_tokens"] == [1]
    assert rows[("spam", "base")]["token_match"] == round((3 + 1) / (3 + 3), 4)
    assert rows[("spam", "adapter")]["prompts"] == 1
    assert rows[("spam", "adapter")]["first_mismatch_tokens"] == [2]
    assert "1/3 sequences identical" in parity.markdown(list(rows.values()))


def test_mismatches_carry_the_shared_prefix_and_both_next_tokens():
    cases = parity.mismatches(REFERENCE, CANDIDATE, first=5)
    assert [(c["model"], c["index"], c["at"]) for c in cases] == [("adapter", 0, 2), ("base", 1, 1)]
    adapter, base = cases
    assert base["prefix"] == [4] and base["reference"] == [5] and base["candidate"] == [6]
    assert adapter["reference"] == [] and adapter["candidate"] == [2]  # the reference had stopped
