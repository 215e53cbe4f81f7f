"""The whole-store SQL questions (finetune.sql_store): every fact × grouping asked in every
shape, no ranking with a tie at its cut, and all of it in the train split only."""

from __future__ import annotations

import re
import sqlite3

import pytest

from finetune.data import SPLITS, load_hashed_split, load_train_only
from finetune.sql import chinook_db
from finetune.sql_fresh import Decontaminator
from finetune.sql_store import FACTS, SALES_SOURCE, build_store_questions

TIED = {(SALES_SOURCE, "track.name"), ("FROM customer", "customer.city")}
RANKED = re.compile(r"^SELECT (.+?) (FROM .+) ORDER BY (.+?)( DESC)? LIMIT (\d+)$")
STORE = build_store_questions(chinook_db())


@pytest.fixture(scope="module")
def db():
    with sqlite3.connect(chinook_db()) as connection:
        yield connection


def test_every_fact_and_grouping_is_asked_per_group_and_ranked():
    """Except where every cut ties (tracks sold once or twice each, one or two customers per
    city): those groupings are only listed per group."""
    targets = [e["target"] for e in STORE]
    for fact in FACTS:
        for group in fact.groupings:
            mine = [t for t in targets if fact.source in t and f"GROUP BY {group.key}" in t]
            assert any(t.startswith(f"SELECT {group.label}, ") for t in mine), group.noun
            ranked = any(" LIMIT " in t or " HAVING " in t for t in mine)
            ties_everywhere = (fact.source, group.label) in TIED
            assert ranked != ties_everywhere, (fact.source, group.label)


def test_no_ranking_has_a_tie_at_its_cut(db):
    ranked = [m for e in STORE if (m := RANKED.match(e["target"]))]
    assert len(ranked) > 100
    for match in ranked:
        _, source, order, desc, n = match.groups()
        values = [r[0] for r in db.execute(f"SELECT {order} {source} ORDER BY {order}{desc or ''}")]
        assert len(values) > int(n) and values[int(n) - 1] != values[int(n)], match.group(0)


def test_questions_are_distinct_and_train_only_unless_a_template_asks_them(db):
    """Train-only, after the decontamination against every hand-written set."""
    assert len({e["input"]["question"] for e in STORE}) == len(STORE)
    clean = Decontaminator(db)
    questions = [e["input"]["question"] for e in STORE if clean.keeps(e)]
    assert len(questions) > 1000
    train_only = {e["input"]["question"] for e in load_train_only("sql")}
    templates = {e["input"]["question"] for s in SPLITS for e in load_hashed_split("sql", s)}
    assert set(questions) - train_only <= templates
    assert len(set(questions) & train_only) > 1000
