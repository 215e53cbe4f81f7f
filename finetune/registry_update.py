"""Write trained adapters and their scores into adapters.yaml (its header and comments are kept)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .data import load_split
from .tasks import Task


def new_registry_head(base: str) -> str:
    return (
        f"# Adapters trained on base '{base}': python -m finetune.train --base {base} --task all\n"
        f"base:\n  model: {base}\n  chat_template: true\n  dtype: auto\n"
        "engine:\n  backend: auto\n"
    )


def read_entries(config: Path, base: str | None = None) -> tuple[str, list[dict]]:
    if not config.exists() and base:
        return new_registry_head(base), []
    text = config.read_text()
    head, sep, _ = text.partition("\nadapters:")
    entries = (yaml.safe_load(text) or {}).get("adapters") or []
    return (head if sep else text.rstrip()) + "\n", entries


class BlockDumper(yaml.SafeDumper):
    """Multi-line strings (prompt templates) as ``|`` blocks, readable in adapters.yaml."""


BlockDumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None
    ),
)


def write_entries(config: Path, head: str, entries: list[dict]) -> None:
    body = yaml.dump(
        {"adapters": entries}, Dumper=BlockDumper, sort_keys=False, allow_unicode=True, width=100
    )
    config.write_text(head + body)


def register_adapter(config: Path, task: Task, adapter_dir: Path, base: str | None = None) -> None:
    """Insert or replace the adapter's entry: path, template, examples, generation defaults."""
    head, entries = read_entries(config, base)
    examples = [e["input"] for e in load_split(task.name, "val")[:3]]
    entry = {
        "name": adapter_dir.name,
        "path": os.path.relpath(adapter_dir.resolve(), config.resolve().parent),
        "task": task.name,
        "category": task.category,
        "description": task.description,
        "template": task.template,
        "examples": examples,
        "generation": {"max_tokens": task.max_tokens, "temperature": 0.0},
    }
    if base:
        entry["trained_on"] = base
    names = [e.get("name") for e in entries]
    if entry["name"] not in names:
        entries.append(entry)
    else:  # replaced where it stands: retraining one adapter does not reorder the registry
        i = names.index(entry["name"])
        if "eval" in entries[i]:
            entry["eval"] = entries[i]["eval"]
        entries[i] = entry
    write_entries(config, head, entries)


def set_eval(config: Path, name: str, metric: str, score: float, base: float, n: int) -> None:
    head, entries = read_entries(config)
    for entry in entries:
        if entry.get("name") == name:
            entry["eval"] = {"metric": metric, "score": round(score, 6),
                             "base_score": round(base, 6), "n": n}  # fmt: skip
    write_entries(config, head, entries)
