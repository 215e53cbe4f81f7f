"""The hand-written SQL test sets (finetune/sql_fresh.jsonl, sql_fresh2.jsonl): gold queries run
on the real Chinook rows, no question is a generated one or has a generated query's shape, wording
or result, and their coverage."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from finetune.sql import chinook_db, execution_match, run_sql
from finetune.sql_fresh import (
    HAND_WRITTEN,
    Decontaminator,
    by_feature_table,
    coverage,
    features,
    generated_examples,
    load_fresh,
    nearest,
    skeleton,
)

FRESH = load_fresh()
SECOND = load_fresh("fresh2")
EVERY = FRESH + SECOND
CLAIMED_COVERAGE = {
    "join": 40, "join_3plus_tables": 15, "aggregate": 45, "group_by": 30, "having": 6,
    "order_limit": 15, "subquery": 8, "dates": 8, "prices": 8, "manager": 6, "self_join": 4,
    "playlist": 5, "mediatype": 5, "invoiceline": 8, "support_rep": 5,
}  # fmt: skip
CLAIMED_COVERAGE_2 = {
    "join": 46, "join_3plus_tables": 24, "aggregate": 51, "group_by": 32, "having": 5,
    "order_limit": 16, "subquery": 6, "dates": 11, "prices": 10, "manager": 6, "self_join": 5,
    "playlist": 10, "mediatype": 4, "invoiceline": 13, "support_rep": 7,
}  # fmt: skip
MAX_WORD_OVERLAP = 0.6  # Jaccard of word sets with the nearest generated question (highest: 0.58)


def normalised(question: str) -> str:
    return " ".join(question.lower().rstrip("?.").split())


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_there_are_at_least_60_distinct_questions_in_the_tasks_shape(name):
    hand_written = load_fresh(name)
    assert len(hand_written) >= 60
    assert len({normalised(e["input"]["question"]) for e in hand_written}) == len(hand_written)
    assert all(set(e) == {"input", "target"} and set(e["input"]) == {"question"}
               for e in hand_written)  # fmt: skip


def test_the_two_sets_share_no_question():
    assert not {normalised(e["input"]["question"]) for e in FRESH} & {
        normalised(e["input"]["question"]) for e in SECOND
    }


@pytest.mark.parametrize("example", EVERY, ids=lambda e: e["input"]["question"][:50])
def test_gold_runs_returns_rows_without_repeats_and_matches_itself(example):
    with sqlite3.connect(chinook_db()) as db:
        rows = db.execute(example["target"]).fetchall()
        assert run_sql(db, example["target"]) is not None  # within the scorer's step limit
    assert rows and any(v is not None for row in rows for v in row)
    assert len(rows) == len(set(rows))  # a list answer names each thing once
    assert execution_match(chinook_db(), example["target"], example["target"])


@pytest.mark.parametrize(
    "name, claimed", [("fresh", CLAIMED_COVERAGE), ("fresh2", CLAIMED_COVERAGE_2)]
)
def test_coverage_is_at_least_what_the_docs_claim(name, claimed):
    counts = coverage(load_fresh(name))
    short = {k: counts.get(k, 0) for k, n in claimed.items() if counts.get(k, 0) < n}
    assert short == {}


def test_features_read_from_the_query_text():
    sql = (
        "SELECT boss.firstname, COUNT(*) FROM employee JOIN employee AS boss "
        "ON employee.reports_to_id = boss.id WHERE employee.hiredate LIKE '2003%' GROUP BY boss.id"
    )
    assert features(sql) == {"join", "aggregate", "group_by", "dates", "self_join", "manager"}
    nested = "SELECT COUNT(*) FROM employee WHERE reports_to_id = (SELECT id FROM employee)"
    assert features(nested) == {"aggregate", "subquery", "manager"}
    assert features("SELECT hiredate, total FROM invoice") == set()


def test_no_fresh_question_is_generated_or_has_a_generated_querys_shape_or_wording():
    """Both sets, against the template splits and the training-only families (both in
    load_split)."""
    generated = generated_examples()
    assert len(generated) > 5000
    questions = {normalised(e["input"]["question"]) for e in generated}
    shapes = {skeleton(e["target"]) for e in generated}
    assert not questions & {normalised(e["input"]["question"]) for e in EVERY}
    assert not shapes & {skeleton(e["target"]) for e in EVERY}
    everything = [e["input"]["question"] for e in generated]
    overlaps = {e["input"]["question"]: nearest(e["input"]["question"], everything) for e in EVERY}
    assert {q: o for q, o in overlaps.items() if o[0] >= MAX_WORD_OVERLAP} == {}


def test_no_training_only_query_answers_a_hand_written_one_from_the_same_tables():
    """A join written in another order has another shape; the decontamination compares results."""
    from finetune.data import load_train_only

    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db)
        assert all(clean.keeps(e) for e in load_train_only("sql"))


def test_decontamination_drops_the_same_query_written_another_way():
    gold = FRESH[0]  # "Which genre has the most tracks?"
    reordered = ("SELECT genre.name FROM track JOIN genre ON track.genre_id = genre.id "
                 "GROUP BY genre.name ORDER BY COUNT(*) DESC LIMIT 1")  # fmt: skip
    assert skeleton(reordered) != skeleton(gold["target"])
    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db, [gold])
        assert not clean.keeps({"input": {"question": "Top genre by size?"}, "target": reordered})
        assert not clean.keeps({"input": gold["input"], "target": "SELECT 1"})  # the wording
        other = "SELECT genre.name FROM genre ORDER BY genre.name LIMIT 1"
        assert clean.keeps({"input": {"question": "First genre by name?"}, "target": other})
        assert not clean.keeps({"input": {"question": "Nothing?"}, "target": "SELECT 1 WHERE 0"})


def test_decontamination_drops_a_held_out_subquery_or_value_under_another_select_list():
    """Held-out questions written here (not a hand-written set's): the same NOT IN under a
    COUNT(*), the same average over other joins, and a count of a held-out list."""
    held_out = [
        {"input": {"question": "Which genres were never sold?"},
         "target": "SELECT name FROM genre WHERE id NOT IN (SELECT track.genre_id FROM "
                   "invoiceline JOIN track ON invoiceline.track_id = track.id)"},
        {"input": {"question": "Tracks per album, on average?"},
         "target": "SELECT AVG(n) FROM (SELECT COUNT(*) AS n FROM track GROUP BY album_id)"},
        {"input": {"question": "Which customers live in Canada?"},
         "target": "SELECT firstname, lastname FROM customer WHERE country = 'Canada'"},
    ]  # fmt: skip
    near = [
        "SELECT COUNT(*) FROM genre WHERE id NOT IN (SELECT track.genre_id FROM invoiceline "
        "JOIN track ON invoiceline.track_id = track.id)",
        "SELECT AVG(value) FROM (SELECT COUNT(*) AS value FROM track JOIN album ON "
        "track.album_id = album.id GROUP BY album.id)",
        "SELECT COUNT(*) FROM customer WHERE country = 'Canada'",
    ]
    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db, held_out)
        for sql in near:
            assert not clean.keeps({"input": {"question": "Something else entirely?"},
                                    "target": sql}), sql  # fmt: skip
        apart = "SELECT COUNT(*) FROM genre WHERE id NOT IN (SELECT genre_id FROM track)"
        assert clean.keeps({"input": {"question": "Genres without tracks?"}, "target": apart})


def test_nearest_is_word_set_jaccard():
    assert nearest("Which genre sells best?", ["which genre sells best", "no"]) == (
        1.0,
        "which genre sells best",
    )
    assert nearest("a b", ["b c"])[0] == pytest.approx(1 / 3)


def test_skeleton_masks_literals_only():
    a = "SELECT COUNT(*) FROM album WHERE artist_id = (SELECT id FROM artist WHERE name = 'U2')"
    b = "select count(*) from album where artist_id = (select id from artist where name = 'It''s')"
    assert skeleton(a) == skeleton(b)
    assert skeleton("SELECT id FROM invoice WHERE total > 20") != skeleton(
        "SELECT id FROM invoice WHERE total < 20"
    )


def test_evaluate_split_fresh_scores_the_fresh_set_and_never_the_registry(monkeypatch):
    from finetune.evaluate import examples_of, main

    assert examples_of("sql", "fresh") == FRESH
    assert examples_of("sql", "fresh2") == SECOND
    with pytest.raises(SystemExit, match="no 'fresh' set for task news"):
        examples_of("news", "fresh")
    argv = ["evaluate", "--tasks", "sql", "--split", "fresh", "--update-registry"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2  # argparse's usage error, before any engine starts


def test_by_feature_table_counts_right_answers_per_feature():
    joins = ["join" in features(e["target"]) for e in FRESH]
    table = by_feature_table({"adapter": joins, "base": [False] * len(FRESH)})
    lines = table.splitlines()
    assert lines[0] == "| gold query has | n | base | adapter |"
    n_join = sum(joins)
    assert f"| (all) | {len(FRESH)} | 0/{len(FRESH)} | {n_join}/{len(FRESH)} |" in lines
    assert f"| join | {n_join} | 0/{n_join} | {n_join}/{n_join} |" in lines


def test_the_stored_fresh_run_rescores_to_its_own_numbers():
    """results/finetune/sql-fresh was scored on this very set, with this scorer."""
    from finetune.evaluate import rescore

    out = Path(__file__).resolve().parents[1] / "results" / "finetune" / "sql-fresh"
    stored = json.loads((out / "quality.json").read_text())
    assert stored["split"] == "fresh"
    (again,), outputs = rescore(out, len(FRESH), ["sql"], "fresh")
    assert again["n"] == stored["results"][0]["n"] == len(FRESH) and len(outputs) == 2 * len(FRESH)
    assert (again["base"], again["finetuned"]) == (
        stored["results"][0]["base"],
        stored["results"][0]["finetuned"],
    )


def test_template_vs_fresh_plot_from_two_runs(tmp_path):
    from finetune.sql_fresh import plot_template_vs_fresh

    for split, score in (("test", 0.9), ("fresh", 0.2)):
        result = {"adapter": "sql", "finetuned": {"execution_accuracy": score}}
        (tmp_path / split).mkdir()
        (tmp_path / split / "quality.json").write_text(json.dumps({"results": [result]}))
    path = plot_template_vs_fresh(tmp_path)
    assert path == tmp_path / "template_vs_fresh.png" and path.stat().st_size > 1000


def test_runs_of_one_split_in_several_folders_are_one_split(tmp_path):
    from finetune.sql_fresh import split_results

    for folder, adapter in (("fresh", "sql"), ("fresh-t32", "sql-t32"), ("fresh2-t32", "x")):
        result = {"adapter": adapter, "finetuned": {"execution_accuracy": 0.5}}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "quality.json").write_text(json.dumps({"results": [result]}))
    assert [r["adapter"] for r in split_results(tmp_path, "fresh")] == ["sql", "sql-t32"]
    assert [r["adapter"] for r in split_results(tmp_path, "fresh2")] == ["x"]


def test_decontamination_drops_the_same_answer_from_other_tables_or_with_distinct():
    """Leaks found in the v3 training data: another table with the same rows (billing country
    vs customer country, invoice totals vs invoice lines), DISTINCT."""
    held_out = [
        {"input": {"question": "Revenue in 2009?"},
         "target": "SELECT SUM(total) FROM invoice WHERE strftime('%Y', invoicedate) = '2009'"},
        {"input": {"question": "Steve Harris songs?"},
         "target": "SELECT DISTINCT name FROM track WHERE composer = 'Steve Harris'"},
    ]  # fmt: skip
    lines = ("SELECT SUM(invoiceline.unit_price * invoiceline.quantity) FROM invoiceline JOIN "
             "invoice ON invoiceline.invoice_id = invoice.id "
             "WHERE strftime('%Y', invoice.invoicedate) = '2009'")  # fmt: skip
    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db, held_out)
        assert not clean.keeps({"input": {"question": "What did sales bring in?"}, "target": lines})
        harris = "SELECT name FROM track WHERE composer = 'Steve Harris'"
        assert not clean.keeps({"input": {"question": "Tracks by him?"}, "target": harris})
        joins = "JOIN genre ON track.genre_id = genre.id"
        swapped = f"SELECT COUNT(*), genre.name FROM track {joins} GROUP BY genre.id"
        again = f"SELECT genre.name, COUNT(*) FROM track {joins} GROUP BY genre.name"
        clean = Decontaminator(db, [{"input": {"question": "Tracks per genre?"}, "target": again}])
        assert not clean.keeps({"input": {"question": "Count by genre"}, "target": swapped})


def test_answers_without_literals_must_also_read_the_same_tables():
    """ "The media type most tracks use" and "the media type most tracks sold" share an answer."""
    tracks = ("SELECT mediatype.name FROM track JOIN mediatype ON track.mediatype_id = mediatype.id"
              " GROUP BY mediatype.id ORDER BY COUNT(*) DESC LIMIT 1")  # fmt: skip
    sold = ("SELECT mediatype.name FROM invoiceline JOIN track ON invoiceline.track_id = track.id "
            "JOIN mediatype ON track.mediatype_id = mediatype.id GROUP BY mediatype.id "
            "ORDER BY COUNT(*) DESC LIMIT 1")  # fmt: skip
    with sqlite3.connect(chinook_db()) as db:
        assert run_sql(db, tracks) == run_sql(db, sold)
        clean = Decontaminator(db, [{"input": {"question": "Most used format?"}, "target": tracks}])
        assert clean.keeps({"input": {"question": "Best-selling format?"}, "target": sold})
