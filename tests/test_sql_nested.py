"""The nested SQL questions (finetune.sql_nested): every shape gives questions whose gold query
answers on Chinook, the golds compute what their questions ask (checked against the rows in
Python), nothing is near a hand-written question, and all of it is in the train split only."""

from __future__ import annotations

import sqlite3
import statistics
from collections import Counter

import pytest

from finetune.data import load_train_only
from finetune.sql import chinook_db, run_sql
from finetune.sql_fresh import Decontaminator
from finetune.sql_nested import SHAPES, build_nested_questions

NESTED = build_nested_questions(chinook_db())


@pytest.fixture(scope="module")
def db():
    with sqlite3.connect(chinook_db()) as connection:
        yield connection


def gold_of(*words: str, starts: str) -> str:
    """The gold query of the question with all ``words`` whose query starts with ``starts``."""
    matches = {e["target"] for e in NESTED if e["target"].startswith(starts)
               and all(w in e["input"]["question"] for w in words)}  # fmt: skip
    assert len(matches) == 1, (words, matches)
    return matches.pop()


def test_every_shape_gives_questions_and_every_gold_nests_a_query(db):
    for name, shape in SHAPES.items():
        assert len(list(shape(db))) >= 40, name
    assert len(NESTED) > 800
    assert all(e["target"].count("SELECT") >= 2 for e in NESTED)
    assert all(run_sql(db, e["target"]) for e in NESTED)
    questions = [e["input"]["question"] for e in NESTED]
    assert len(set(questions)) == len(questions)


def test_an_average_of_a_per_group_count_is_the_mean_of_the_counts(db):
    sql = gold_of(
        "average",
        "number of tracks",
        "genre",
        starts="SELECT AVG(value) FROM (SELECT COUNT(*) AS value FROM track JOIN genre",
    )
    per_genre = Counter(g for (g,) in db.execute("SELECT genre_id FROM track"))
    assert db.execute(sql).fetchone()[0] == pytest.approx(statistics.fmean(per_genre.values()))


def test_groups_above_or_below_the_average_group_are_those_counted_in_python(db):
    per_genre = Counter(g for (g,) in db.execute("SELECT genre_id FROM track"))
    mean = statistics.fmean(per_genre.values())
    names = dict(db.execute("SELECT id, name FROM genre"))
    above = {names[g] for g, n in per_genre.items() if n > mean}
    below = {names[g] for g, n in per_genre.items() if n < mean}
    asked = [e for e in NESTED if e["target"].startswith("SELECT genre.name FROM track ")
             and "number of tracks" in e["input"]["question"]
             and "average" in e["input"]["question"]]  # fmt: skip
    assert len(asked) >= 3
    for e in asked:
        higher = any(w in e["input"]["question"] for w in ("above", "higher", "beat"))
        assert {row[0] for row in db.execute(e["target"])} == (above if higher else below), e


def test_artists_never_sold_are_those_without_a_sold_track_in_python(db):
    sql = gold_of("artists", "never", starts="SELECT COUNT(*) FROM artist WHERE id NOT IN")
    sold_albums = {
        a
        for (a,) in db.execute(
            "SELECT track.album_id FROM invoiceline JOIN track ON invoiceline.track_id = track.id"
        )
    }
    artist_of = dict(db.execute("SELECT id, artist_id FROM album"))
    sold_artists = {artist_of[a] for a in sold_albums}
    artists = {a for (a,) in db.execute("SELECT id FROM artist")}
    assert db.execute(sql).fetchone()[0] == len(artists - sold_artists) > 0  # fmt: skip


def test_no_average_minimum_or_below_leaves_out_groups_without_rows(db):
    """71 artists have no album and many tracks never sold: a GROUP BY has no group for them,
    so only a maximum or an "above" is asked over such groups."""
    over_artists = [e for e in NESTED if "FROM album JOIN artist" in e["target"]]
    assert over_artists and all(e["target"].startswith(("SELECT MAX(", "SELECT COUNT(*)"))
                                and " < " not in e["target"] for e in over_artists)  # fmt: skip
    assert not [e for e in NESTED if "lowest number of albums" in e["input"]["question"]]
    assert [e for e in NESTED if e["target"].startswith("SELECT AVG(value)")
            and "GROUP BY genre.id" in e["target"]]  # every genre has tracks  # fmt: skip


def test_no_nested_question_is_near_a_hand_written_one(db):
    clean = Decontaminator(db)
    assert not [e for e in NESTED if clean.near(e, run_sql(db, e["target"]))]


def test_the_train_split_carries_them():
    train_only = {e["input"]["question"] for e in load_train_only("sql")}
    assert sum(e["input"]["question"] in train_only for e in NESTED) > 0.95 * len(NESTED)
