"""The cross-table SQL questions (finetune.sql_paths): every shape gives questions whose gold
query answers on Chinook, joins reach every table they filter on, no "most" has a tie, and all of
it is in the train split only."""

from __future__ import annotations

import re
import sqlite3
from itertools import permutations

import pytest

from finetune.data import load_train_only
from finetune.sql import chinook_db, run_sql
from finetune.sql_fresh import Decontaminator, join_count
from finetune.sql_paths import JOINS, SHAPES, build_path_questions, joined

PATHS = build_path_questions(chinook_db())
MOST = re.compile(r"^SELECT (.+?) (FROM .+) ORDER BY (.+?)( DESC)? LIMIT 1$")


@pytest.fixture(scope="module")
def db():
    with sqlite3.connect(chinook_db()) as connection:
        yield connection


def test_every_shape_gives_questions_and_many_cross_three_tables(db):
    for name, shape in SHAPES.items():
        assert len(list(shape(db))) >= 10, name
    assert len(PATHS) > 1200
    assert sum(join_count(e["target"]) >= 2 for e in PATHS) > 500


@pytest.mark.parametrize("root", ["track", "invoiceline"])
def test_joined_reaches_every_pair_of_tables_in_any_order(db, root):
    reachable = [t for t in JOINS if t != "track"] if root == "invoiceline" else [
        "genre", "mediatype", "album", "artist", "playlist"]  # fmt: skip
    for pair in permutations(reachable, 2):
        source = joined(root, list(pair))
        assert db.execute(f"SELECT COUNT(*) {source}").fetchone()[0] > 0, source
        assert len(re.findall(r"JOIN (\w+) ", source)) == len(
            set(re.findall(r"JOIN (\w+) ", source))
        )


def test_questions_are_distinct_gold_answers_and_lists_name_each_thing_once(db):
    questions = [e["input"]["question"] for e in PATHS]
    assert len(set(questions)) > 0.97 * len(questions)  # a few phrasings meet; dedupe drops them
    assert all(run_sql(db, e["target"]) for e in PATHS)
    for e in PATHS:
        rows = db.execute(e["target"]).fetchall()
        assert len(rows) == len(set(rows)), e


def test_no_most_has_a_tie_at_the_top(db):
    most = [m for e in PATHS if (m := MOST.match(e["target"])) and "GROUP BY" in e["target"]]
    assert len(most) > 50
    for match in most:
        _, source, order, desc = match.groups()
        values = [r[0] for r in db.execute(f"SELECT {order} {source} ORDER BY {order}{desc or ''}")]
        assert values[0] != values[1], match.group(0)


def test_they_are_decontaminated_and_in_the_train_split_only(db):
    clean = Decontaminator(db)
    assert all(clean.keeps(e) for e in PATHS)
    train_only = {e["input"]["question"] for e in load_train_only("sql")}
    assert len({e["input"]["question"] for e in PATHS} - train_only) < 0.03 * len(PATHS)


def test_joined_refuses_a_table_its_root_does_not_reach():
    with pytest.raises(ValueError, match="invoice is not reached from track"):
        joined("track", ["genre", "invoice"])


def test_a_support_rep_scope_names_first_and_last_name(db):
    from finetune.sql_paths import SALE_SCOPES

    rep = next(s for s in SALE_SCOPES if s.table == "employee")
    condition = rep.condition("Jane Peacock")
    assert condition == "employee.firstname = 'Jane' AND employee.lastname = 'Peacock'"
    source = joined("invoiceline", ["employee"])
    assert db.execute(f"SELECT COUNT(*) {source} WHERE {condition}").fetchone()[0] > 0


def test_the_hierarchy_and_the_reps_are_asked_through_their_real_keys(db):
    """The adapter wrote ``employee.manager_id`` and ``invoice.support_rep_id``, columns Chinook
    lacks: these shapes teach ``reports_to_id`` (as a self-join) and ``customer.support_rep_id``."""
    from finetune.sql_paths import hierarchy, support_reps

    managed = list(hierarchy(db))
    assert sum("employee.reports_to_id = boss.id" in e["target"] for e in managed) >= 15
    reps = list(support_reps(db))
    assert len(reps) > 59 and all("customer.support_rep_id = employee.id" in e["target"]
                                  for e in reps)  # fmt: skip
    assert all(run_sql(db, e["target"]) for e in managed + reps)
