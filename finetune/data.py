"""Task data → deterministic train / validation / test splits (JSONL, cached).

    python -m finetune.data                 # build every task's splits, print their sizes

The sources are in ``finetune/sources.py`` (and ``finetune/sql.py`` for Chinook). A split is chosen
by a hash of the example's input, so it never changes and no input is in two splits.
"""

from __future__ import annotations

import hashlib
import json

from .sources import data_root, read_address, read_news, read_sentiment, read_spam
from .sql import read_sql

SPLITS = ("train", "val", "test")
CACHE_SUFFIX = ".v2.jsonl"  # v2: splits in hashed order (v1 kept the sources' class order)


def bucket_of(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(key: str, val: float = 0.1, test: float = 0.1) -> str:
    bucket = bucket_of(key)
    return "test" if bucket < test else "val" if bucket < test + val else "train"


READERS = {
    "sentiment": read_sentiment,
    "news": read_news,
    "spam": read_spam,
    "address": read_address,
    "sql": read_sql,
}


def dedupe(examples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for ex in examples:
        key = json.dumps(ex["input"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def build_splits(task: str) -> dict[str, list[dict]]:
    """Splits by a hash of each input; within a split, ordered by a second hash of it, so that
    the first N examples are a fair sample (the sources come sorted by class or template)."""
    splits = {s: [] for s in SPLITS}
    for ex in dedupe(READERS[task]()):
        splits[split_of(json.dumps(ex["input"], sort_keys=True))].append(ex)
    for rows in splits.values():
        rows.sort(key=lambda ex: bucket_of("order:" + json.dumps(ex["input"], sort_keys=True)))
    return splits


def load_split(task: str, split: str) -> list[dict]:
    """A task's split, built from its package once and cached as JSONL."""
    path = data_root() / task / f"{split}{CACHE_SUFFIX}"
    if not path.exists():
        for name, rows in build_splits(task).items():
            out = data_root() / task / f"{name}{CACHE_SUFFIX}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [json.loads(line) for line in open(path, encoding="utf-8")]


if __name__ == "__main__":
    for name in READERS:
        sizes = {s: len(load_split(name, s)) for s in SPLITS}
        print(f"{name:10s} {sizes}")
