"""Task data → deterministic train / validation / test splits (JSONL, cached).

    python -m finetune.data                 # build every task's splits, print their sizes

The sources are in ``finetune/sources.py`` (and ``finetune/sql.py`` for Chinook). A split is chosen
by a hash of the example's input, so it never changes and no input is in two splits.

Training-only additions (``TRAIN_ONLY``: the SQL question families of ``finetune.sql_families``,
the whole-store questions of ``finetune.sql_store``, the cross-table ones of
``finetune.sql_paths`` and the nested ones of ``finetune.sql_nested``, minus anything near a
hand-written test question —
``sql_fresh.Decontaminator``) are appended to a task's train split and cached apart from it,
minus any input already in a split, so the template splits — val and test — are exactly what
they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .sources import data_root, read_address, read_news, read_sentiment, read_spam
from .sql import chinook_db, read_sql
from .sql_families import build_family_questions
from .sql_fresh import Decontaminator
from .sql_nested import build_nested_questions
from .sql_paths import build_path_questions
from .sql_store import build_store_questions

SPLITS = ("train", "val", "test")
CACHE_SUFFIX = ".v2.jsonl"  # v2: splits in hashed order (v1 kept the sources' class order)
TRAIN_ONLY_FILE = "train-only.v6.jsonl"  # additions to the train split; bump when they change


def bucket_of(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(key: str, val: float = 0.1, test: float = 0.1) -> str:
    bucket = bucket_of(key)
    return "test" if bucket < test else "val" if bucket < test + val else "train"


def read_sql_families() -> list[dict]:
    import sqlite3

    db_path = chinook_db()
    made = build_family_questions(db_path) + build_store_questions(db_path)
    with sqlite3.connect(db_path) as db:
        clean = Decontaminator(db)
        kept = [e for e in made if clean.keeps(e)]
    # decontaminated as they are built:
    return kept + build_path_questions(db_path) + build_nested_questions(db_path)


READERS = {
    "sentiment": read_sentiment,
    "news": read_news,
    "spam": read_spam,
    "address": read_address,
    "sql": read_sql,
}
TRAIN_ONLY = {"sql": read_sql_families}  # appended to the train split; val and test untouched


def input_key(example: dict) -> str:
    return json.dumps(example["input"], sort_keys=True)


def dedupe(examples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for ex in examples:
        key = input_key(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def build_splits(task: str) -> dict[str, list[dict]]:
    """Splits by a hash of each input; within a split, ordered by a second hash of it, so that
    the first N examples are a fair sample (the sources come sorted by class or template)."""
    splits = {s: [] for s in SPLITS}
    for ex in dedupe(READERS[task]()):
        splits[split_of(input_key(ex))].append(ex)
    for rows in splits.values():
        rows.sort(key=lambda ex: bucket_of("order:" + input_key(ex)))
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def load_hashed_split(task: str, split: str) -> list[dict]:
    """A task's split as chosen by the hash, built from its package once and cached as JSONL."""
    path = data_root() / task / f"{split}{CACHE_SUFFIX}"
    if not path.exists():
        for name, rows in build_splits(task).items():
            write_jsonl(data_root() / task / f"{name}{CACHE_SUFFIX}", rows)
    return read_jsonl(path)


def load_train_only(task: str) -> list[dict]:
    """A task's training-only additions, minus inputs already in a split (cached as JSONL)."""
    if task not in TRAIN_ONLY:
        return []
    path = data_root() / task / TRAIN_ONLY_FILE
    if not path.exists():
        taken = {input_key(e) for s in SPLITS for e in load_hashed_split(task, s)}
        rows = [e for e in dedupe(TRAIN_ONLY[task]()) if input_key(e) not in taken]
        rows.sort(key=lambda ex: bucket_of("order:" + input_key(ex)))
        write_jsonl(path, rows)
    return read_jsonl(path)


def load_split(task: str, split: str) -> list[dict]:
    """A task's split; the train split with the task's training-only additions after it."""
    rows = load_hashed_split(task, split)
    return rows + load_train_only(task) if split == "train" else rows


if __name__ == "__main__":
    for name in READERS:
        sizes = {s: len(load_split(name, s)) for s in SPLITS}
        print(f"{name:10s} {sizes}")
