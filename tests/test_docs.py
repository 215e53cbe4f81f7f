"""The README and docs: every command they document names a module or script that exists, and
the README stays short (narratives live in docs/)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "lab" / "README.md"]
NOT_INSTALLED_HERE = ("sglang",)  # the GPU set's modules; CI installs the CPU set
MODULE = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")
SCRIPT = re.compile(r"\b(?:python3?|bash) ((?:scripts|lab)/[\w./-]+\.(?:py|sh))")


def documented(pattern: re.Pattern) -> list[tuple[str, str]]:
    return sorted({(p.name, m) for p in DOCS for m in pattern.findall(p.read_text())})


@pytest.mark.parametrize(("doc", "module"), documented(MODULE))
def test_every_documented_module_exists(doc, module):
    if module.split(".")[0] in NOT_INSTALLED_HERE:
        pytest.skip(f"{module} is in the GPU set")
    assert importlib.util.find_spec(module) is not None, f"{doc}: python -m {module}"


@pytest.mark.parametrize(("doc", "script"), documented(SCRIPT))
def test_every_documented_script_exists(doc, script):
    assert (ROOT / script).is_file(), f"{doc}: {script}"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12_000
    commands = [line.strip() for line in text.splitlines() if line.startswith("    pip install")]
    assert commands[0].endswith("python app.py")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, "the README's test command is what .ci/run runs"


def test_the_targets_table_is_the_same_in_the_docs_and_the_apps_benchmarks_tab():
    """``results/serving/targets.md`` (the app shows it) and docs/benchmarks.md's first section."""
    rows = [
        line
        for line in (ROOT / "results/serving/targets.md").read_text().splitlines()
        if line.startswith("|")
    ]
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert len(rows) >= 10 and all(row in docs for row in rows)
