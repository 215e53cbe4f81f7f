"""Training-only SQL questions about the whole store: every grouping × measure, filters, rankings.

    python -m finetune.sql_store          # how many questions each shape gives, and one of each

``sql_families`` asks about one named artist, album, customer or month; the hand-written set
(``sql_fresh.jsonl``) mostly asks about the whole store ("total sales per billing country",
"the genre with most tracks"), which needs the schema's column names and GROUP BY / ORDER BY over
every table. This module composes such questions from parts — a fact table, a grouping reached
by its joins, a measure, a shape (each / most / least / top N / over or under a threshold) — and
single-table questions (filters on real values, NULL checks, rankings of rows, above-average and
never-sold subqueries), each gold query run on Chinook and kept only if it answers.

Decontamination: an example is dropped when its query has the shape (literals masked) of a
hand-written one, or its question shares ≥ 60 % of its words with one — the bounds
``tests/test_sql_fresh.py`` checks. Dropping only ever removes training data.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .sql import q
from .sql_fresh import load_fresh, skeleton, words

PHRASINGS_PER_QUERY = 3
MAX_WORD_OVERLAP = 0.6
MONTHS = ("January February March April May June July August September October November "
          "December").split()  # fmt: skip


@dataclass(frozen=True)
class Grouping:
    """A way to split a fact's rows: what is shown, the joins that reach it, the GROUP BY key."""

    noun: str
    plural: str
    label: str
    key: str
    joins: str = ""
    where: str = ""


@dataclass(frozen=True)
class Measure:
    """A number per group; ``most`` / ``least`` complete "Which genre has …?"."""

    phrase: str
    most: str
    least: str
    sql: str


@dataclass(frozen=True)
class Fact:
    source: str
    measures: tuple[Measure, ...]
    groupings: tuple[Grouping, ...]


GENRE = Grouping(
    "genre", "genres", "genre.name", "genre.id", " JOIN genre ON track.genre_id = genre.id"
)
MEDIATYPE = Grouping(
    "media type",
    "media types",
    "mediatype.name",
    "mediatype.id",
    " JOIN mediatype ON track.mediatype_id = mediatype.id",
)
ALBUM = Grouping(
    "album", "albums", "album.title", "album.id", " JOIN album ON track.album_id = album.id"
)
ARTIST = Grouping(
    "artist",
    "artists",
    "artist.name",
    "artist.id",
    " JOIN album ON track.album_id = album.id JOIN artist ON album.artist_id = artist.id",
)
COMPOSER = Grouping(
    "composer",
    "composers",
    "track.composer",
    "track.composer",
    where=" WHERE track.composer IS NOT NULL",
)
TRACK = Grouping("track", "tracks", "track.name", "track.id")
CUSTOMER = Grouping(
    "customer",
    "customers",
    "customer.firstname, customer.lastname",
    "customer.id",
    " JOIN customer ON invoice.customer_id = customer.id",
)
INVOICE_REP = Grouping(
    "support rep",
    "support reps",
    "employee.firstname, employee.lastname",
    "employee.id",
    " JOIN customer ON invoice.customer_id = customer.id "
    "JOIN employee ON customer.support_rep_id = employee.id",
)
CUSTOMER_REP = Grouping(
    "sales support agent",
    "sales support agents",
    "employee.firstname, employee.lastname",
    "employee.id",
    " JOIN employee ON customer.support_rep_id = employee.id",
)


def column(table: str, name: str, noun: str, plural: str, where: str = "") -> Grouping:
    return Grouping(noun, plural, f"{table}.{name}", f"{table}.{name}", where=where)


COUNT_TRACKS = Measure("number of tracks", "the most tracks", "the fewest tracks", "COUNT(*)")
TRACK_MEASURES = (
    COUNT_TRACKS,
    Measure(
        "total playing time in minutes",
        "the longest total playing time",
        "the shortest total playing time",
        "SUM(track.milliseconds) / 60000.0",
    ),
    Measure(
        "average track length in seconds",
        "the longest tracks on average",
        "the shortest tracks on average",
        "AVG(track.milliseconds) / 1000.0",
    ),
    Measure(
        "average track price",
        "the highest average track price",
        "the lowest average track price",
        "AVG(track.unit_price)",
    ),
    Measure(
        "total file size in megabytes",
        "the largest total file size",
        "the smallest total file size",
        "SUM(track.bytes) / 1048576.0",
    ),
)
SALES_MEASURES = (
    Measure(
        "revenue from track sales",
        "the most revenue from track sales",
        "the least revenue from track sales",
        "SUM(invoiceline.unit_price * invoiceline.quantity)",
    ),
    Measure(
        "number of tracks sold",
        "the most tracks sold",
        "the fewest tracks sold",
        "SUM(invoiceline.quantity)",
    ),
)
INVOICE_MEASURES = (
    Measure(
        "total sales", "the highest total sales", "the lowest total sales", "SUM(invoice.total)"
    ),
    Measure(
        "average invoice total",
        "the highest average invoice total",
        "the lowest average invoice total",
        "AVG(invoice.total)",
    ),
    Measure("number of invoices", "the most invoices", "the fewest invoices", "COUNT(*)"),
    Measure(
        "largest single invoice total",
        "the largest single invoice",
        "the smallest largest invoice",
        "MAX(invoice.total)",
    ),
)
SALES_SOURCE = "FROM invoiceline JOIN track ON invoiceline.track_id = track.id"

FACTS = (
    Fact("FROM track", TRACK_MEASURES, (GENRE, MEDIATYPE, ALBUM, ARTIST, COMPOSER)),
    Fact(SALES_SOURCE, SALES_MEASURES, (GENRE, MEDIATYPE, ALBUM, ARTIST, TRACK)),
    Fact("FROM invoice", INVOICE_MEASURES, (
        column("invoice", "billingcountry", "billing country", "billing countries"),
        column("invoice", "billingcity", "billing city", "billing cities"),
        column("invoice", "billingstate", "billing state", "billing states",
               " WHERE invoice.billingstate IS NOT NULL"),
        Grouping("year", "years", "strftime('%Y', invoice.invoicedate)",
                 "strftime('%Y', invoice.invoicedate)"),
        CUSTOMER, INVOICE_REP)),
    Fact("FROM customer", (Measure("number of customers", "the most customers",
                                   "the fewest customers", "COUNT(*)"),), (
        column("customer", "country", "country", "countries"),
        column("customer", "city", "city", "cities"),
        column("customer", "state", "state", "states", " WHERE customer.state IS NOT NULL"),
        CUSTOMER_REP)),
    Fact("FROM employee", (Measure("number of employees", "the most employees",
                                   "the fewest employees", "COUNT(*)"),), (
        column("employee", "city", "city", "cities"),
        column("employee", "title", "job title", "job titles"))),
    Fact("FROM album", (Measure("number of albums", "the most albums", "the fewest albums",
                                "COUNT(*)"),), (
        Grouping("artist", "artists", "artist.name", "artist.id",
                 " JOIN artist ON album.artist_id = artist.id"),)),
    Fact("FROM playlisttrack JOIN track ON playlisttrack.track_id = track.id",
         TRACK_MEASURES[:3], (
             Grouping("playlist", "playlists", "playlist.name", "playlist.id",
                      " JOIN playlist ON playlisttrack.playlist_id = playlist.id"),)),
)  # fmt: skip

SHAPES = {
    "each": ("For each {noun}, give the {measure}.", "Show the {measure} per {noun}.",
             "List every {noun} with its {measure}.", "What is the {measure} of each {noun}?"),
    "most": ("Which {noun} has {most}?", "Name the {noun} with {most}.",
             "What {noun} comes first by {measure}?"),
    "least": ("Which {noun} has {least}?", "Name the {noun} with {least}.",
              "What {noun} comes last by {measure}?"),
    "top": ("Which {n} {plural} have {most}?", "List the top {n} {plural} by {measure}.",
            "Give the {n} {plural} with {most}."),
    "over": ("Which {plural} have a {measure} above {k}?",
             "List the {plural} whose {measure} is more than {k}.",
             "Show every {noun} with a {measure} greater than {k}."),
    "under": ("Which {plural} have a {measure} below {k}?",
              "List the {plural} whose {measure} is less than {k}."),
}  # fmt: skip


def pick(options: tuple[str, ...] | list[str], key: str, offset: int = 0) -> str:
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return options[(digest + offset) % len(options)]


def example(question: str, sql: str) -> dict:
    return {"input": {"question": question}, "target": sql}


def phrased(shape: str, sql: str, **slots) -> Iterator[dict]:
    """The query with PHRASINGS_PER_QUERY of its shape's phrasings (fewer if it has fewer)."""
    options = SHAPES[shape]
    for i in range(min(PHRASINGS_PER_QUERY, len(options))):
        yield example(pick(options, sql, i).format(**slots), sql)


def round_threshold(value: float) -> float | int:
    """A threshold a person would say: two significant figures, an integer when it is one."""
    rounded = float(f"{value:.2g}")
    return int(rounded) if rounded >= 1 else rounded


def ranked_values(db: sqlite3.Connection, sql: str) -> list:
    return [row[-1] for row in db.execute(sql)]


def grouped_questions(db: sqlite3.Connection, fact: Fact, group: Grouping, m: Measure):
    base = f"{fact.source}{group.joins}{group.where} GROUP BY {group.key}"
    slots = {"noun": group.noun, "plural": group.plural, "measure": m.phrase,
             "most": m.most, "least": m.least}  # fmt: skip
    yield from phrased("each", f"SELECT {group.label}, {m.sql} {base}", **slots)
    values = sorted(ranked_values(db, f"SELECT {m.sql} {base}"), reverse=True)
    if len(values) < 3:
        return
    if values[0] != values[1]:
        yield from phrased(
            "most", f"SELECT {group.label} {base} ORDER BY {m.sql} DESC LIMIT 1", **slots
        )
    if values[-1] != values[-2]:
        yield from phrased(
            "least", f"SELECT {group.label} {base} ORDER BY {m.sql} LIMIT 1", **slots
        )
    for n in (3, 5):
        if len(values) > n and values[n - 1] != values[n]:
            sql = f"SELECT {group.label} {base} ORDER BY {m.sql} DESC LIMIT {n}"
            yield from phrased("top", sql, n=n, **slots)
    high, low = values[len(values) // 4], values[3 * len(values) // 4]
    for shape, k, op in (
        ("over", round_threshold(high), ">"),
        ("under", round_threshold(low), "<"),
    ):
        if k and k not in values:
            yield from phrased(
                shape, f"SELECT {group.label} {base} HAVING {m.sql} {op} {k}", k=k, **slots
            )


def store_groupings(db: sqlite3.Connection) -> Iterator[dict]:
    for fact in FACTS:
        for group in fact.groupings:
            for measure in fact.measures:
                yield from grouped_questions(db, fact, group, measure)


# ---------------------------------------------------------------- one table, real values

NAMES = ("names", "firstname, lastname")
ROW_FILTERS = (  # (table, column, how a person names the filter, what to list: (phrase, columns))
    ("customer", "country", "from {v}", (NAMES, ("email addresses", "email"),
                                         ("phone numbers", "phone"), ("cities", "DISTINCT city"))),
    ("customer", "city", "living in {v}", (NAMES, ("email addresses", "email"),
                                           ("companies", "company"))),
    ("employee", "title", "with the title {v}", (NAMES, ("hire dates", "hiredate"),
                                                 ("cities", "DISTINCT city"))),
    ("employee", "city", "based in {v}", (NAMES, ("job titles", "title"))),
    ("invoice", "billingcountry", "billed to {v}", (("ids", "id"), ("dates", "invoicedate"),
                                                    ("billing cities", "DISTINCT billingcity"))),
    ("invoice", "billingcity", "billed to the city of {v}", (("ids", "id"), ("totals", "total"))),
    ("track", "composer", "written by {v}", (("names", "name"),)),
)  # fmt: skip
ROW_QUESTIONS = ("What are the {what} of the {table}s {filter}?",
                 "List the {what} of every {table} {filter}.",
                 "Give me the {what} of {table}s {filter}.")  # fmt: skip
COUNT_QUESTIONS = ("How many {table}s are {filter}?", "Count the {table}s {filter}.")
NUMBERS = (  # (table, column, phrase): aggregates over one table, with and without a filter
    ("invoice", "total", "invoice total"),
    ("track", "milliseconds / 1000.0", "track length in seconds"),
    ("track", "unit_price", "track price"),
    ("track", "bytes", "track file size in bytes"),
)
AGGREGATE_WORDS = {"AVG": "average", "MAX": "largest", "MIN": "smallest", "SUM": "sum of the"}


def filter_values(db: sqlite3.Connection, table: str, col: str, limit: int = 16) -> list[str]:
    rows = db.execute(
        f"SELECT {col} FROM {table} WHERE {col} IS NOT NULL GROUP BY {col} ORDER BY COUNT(*) DESC, "
        f"{col} LIMIT {limit}"
    )
    return [r[0] for r in rows]


def filtered_rows(db: sqlite3.Connection) -> Iterator[dict]:
    for table, col, filter_phrase, listings in ROW_FILTERS:
        for value in filter_values(db, table, col):
            where = f"WHERE {col} = {q(value)}"
            slots = {"table": table, "filter": filter_phrase.format(v=value)}
            for what, columns in listings:
                sql = f"SELECT {columns} FROM {table} {where}"
                yield example(pick(ROW_QUESTIONS, sql).format(what=what, **slots), sql)
            sql = f"SELECT COUNT(*) FROM {table} {where}"
            yield example(pick(COUNT_QUESTIONS, sql).format(**slots), sql)


def aggregates(db: sqlite3.Connection) -> Iterator[dict]:
    for table, expr, phrase in NUMBERS:
        for fn, word in AGGREGATE_WORDS.items():
            sql = f"SELECT {fn}({expr}) FROM {table}"
            yield example(pick(("What is the {w} {p}?", "Give the {w} {p} over all {t}s."), sql)
                          .format(w=word, p=phrase, t=table), sql)  # fmt: skip
    for country in filter_values(db, "invoice", "billingcountry", 10):
        for fn, word in AGGREGATE_WORDS.items():
            sql = f"SELECT {fn}(total) FROM invoice WHERE billingcountry = {q(country)}"
            yield example(
                f"What is the {word} invoice total for invoices billed to {country}?", sql
            )
    for year in range(2007, 2012):
        for i, month in enumerate(MONTHS, 1):
            month_of = "strftime('%Y-%m', invoicedate)"
            sql = f"SELECT COUNT(*) FROM invoice WHERE {month_of} = '{year}-{i:02d}'"
            yield example(
                pick(
                    (
                        "How many invoices were issued in {m} {y}?",
                        "Count the invoices dated {m} {y}.",
                    ),
                    sql,
                ).format(m=month, y=year),
                sql,
            )
        for fn, word in (("AVG", "average"), ("MIN", "smallest"), ("COUNT", "number of")):
            arg = "*" if fn == "COUNT" else "total"
            sql = f"SELECT {fn}({arg}) FROM invoice WHERE invoicedate LIKE '{year}-%'"
            noun = "invoices" if fn == "COUNT" else "invoice total"
            yield example(f"What was the {word} {noun} in {year}?", sql)  # fmt: skip


NULL_CHECKS = (  # (table, column, what is missing, what to list)
    ("customer", "company", "no company", "firstname, lastname"),
    ("customer", "state", "no state", "firstname, lastname, country"),
    ("customer", "fax", "no fax number", "firstname, lastname"),
    ("invoice", "billingstate", "no billing state", "id"),
    ("track", "composer", "no composer", "name"),
)


LISTED = {
    "firstname, lastname": "first and last names",
    "name": "names",
    "id": "ids",
    "firstname, lastname, country": "names and countries",
}


def null_checks(db: sqlite3.Connection) -> Iterator[dict]:
    for table, col, missing, listed in NULL_CHECKS:
        for negate, phrase in (("", missing), ("NOT ", missing.replace("no ", "a "))):
            sql = f"SELECT {listed} FROM {table} WHERE {col} IS {negate}NULL"
            yield example(f"Which {table}s have {phrase}? Give their {LISTED[listed]}.", sql)
            sql = f"SELECT COUNT(*) FROM {table} WHERE {col} IS {negate}NULL"
            yield example(pick(("How many {t}s have {p}?", "Count the {t}s with {p}."), sql)
                          .format(t=table, p=phrase), sql)  # fmt: skip


RANKINGS = (  # (table, listed, what the listed columns are, order column, highest, lowest)
    ("track", "name", "", "milliseconds", "longest", "shortest"),
    ("track", "name", "", "bytes", "largest", "smallest"),
    ("track", "name, composer", "names and composers", "milliseconds", "longest", "shortest"),
    ("invoice", "id", "ids", "total", "biggest", "smallest"),
    ("invoice", "billingcity", "billing cities", "total", "biggest", "smallest"),
    ("invoice", "invoicedate", "dates", "total", "biggest", "smallest"),
    ("employee", "firstname, lastname", "", "birthdate", "youngest", "oldest"),
    ("employee", "firstname, lastname", "", "hiredate", "most recently hired", "earliest hired"),
    ("employee", "title", "job titles", "birthdate", "youngest", "oldest"),
    ("customer", "email", "email addresses", "lastname", "last in the alphabet",
     "first in the alphabet"),
)  # fmt: skip
RANK_QUESTIONS = ("What are the {n} {word} {table}s?", "List the {n} {word} {table}s.",
                  "Give the {n} {word} {table}s.")  # fmt: skip
RANK_LISTED = ("What are the {what} of the {n} {word} {table}s?",
               "Give the {what} of the {n} {word} {table}s.")  # fmt: skip
RANK_ONE = ("Which {table} is the {word}?", "Name the {word} {table}.")
RANK_ONE_LISTED = ("What are the {what} of the {word} {table}?",)


def clear_cut(db: sqlite3.Connection, table: str, col: str, desc: str, n: int) -> bool:
    values = ranked_values(db, f"SELECT {col} FROM {table} ORDER BY {col}{desc}")
    return len(values) > n and values[n - 1] != values[n]


def rank_phrasings(n: int, what: str) -> tuple[str, ...]:
    if n == 1:
        return RANK_ONE_LISTED if what else RANK_ONE
    return RANK_LISTED if what else RANK_QUESTIONS


def rankings(db: sqlite3.Connection) -> Iterator[dict]:
    for table, listed, what, col, high, low in RANKINGS:
        for desc, word in ((" DESC", high), ("", low)):
            for n in (1, 2, 3, 4, 5, 10):
                if not clear_cut(db, table, col, desc, n):
                    continue
                sql = f"SELECT {listed} FROM {table} ORDER BY {col}{desc} LIMIT {n}"
                text = pick(rank_phrasings(n, what), sql)
                yield example(text.format(n=n, word=word, table=table, what=what), sql)


SUBQUERIES = (  # questions whose gold needs a subquery: above average, never sold, empty
    ("Which invoices have a total above the average invoice total? Give the ids.",
     "SELECT id FROM invoice WHERE total > (SELECT AVG(total) FROM invoice)"),
    ("How many invoices are above the average invoice total?",
     "SELECT COUNT(*) FROM invoice WHERE total > (SELECT AVG(total) FROM invoice)"),
    ("How many tracks are bigger than the average file size?",
     "SELECT COUNT(*) FROM track WHERE bytes > (SELECT AVG(bytes) FROM track)"),
    ("How many tracks cost more than the average track price?",
     "SELECT COUNT(*) FROM track WHERE unit_price > (SELECT AVG(unit_price) FROM track)"),
    ("Which albums have never had a track sold?",
     "SELECT title FROM album WHERE id NOT IN (SELECT track.album_id FROM invoiceline "
     "JOIN track ON invoiceline.track_id = track.id)"),
    ("How many albums have never sold a track?",
     "SELECT COUNT(*) FROM album WHERE id NOT IN (SELECT track.album_id FROM invoiceline "
     "JOIN track ON invoiceline.track_id = track.id)"),
    ("Which media types have never been sold?",
     "SELECT name FROM mediatype WHERE id NOT IN (SELECT track.mediatype_id FROM invoiceline "
     "JOIN track ON invoiceline.track_id = track.id)"),
    ("Which artists have no albums?",
     "SELECT name FROM artist WHERE id NOT IN (SELECT artist_id FROM album)"),
    ("Which playlists have no tracks?",
     "SELECT name FROM playlist WHERE id NOT IN (SELECT playlist_id FROM playlisttrack)"),
    ("How many customers have never bought anything?",
     "SELECT COUNT(*) FROM customer WHERE id NOT IN (SELECT customer_id FROM invoice)"),
    ("How many tracks are on no playlist?",
     "SELECT COUNT(*) FROM track WHERE id NOT IN (SELECT track_id FROM playlisttrack)"),
    ("How many albums does an artist have on average?",
     "SELECT AVG(n) FROM (SELECT COUNT(*) AS n FROM album GROUP BY artist_id)"),
    ("On average, how many invoices does a customer have?",
     "SELECT AVG(n) FROM (SELECT COUNT(*) AS n FROM invoice GROUP BY customer_id)"),
    ("What is the average number of tracks on a playlist?",
     "SELECT AVG(n) FROM (SELECT COUNT(*) AS n FROM playlisttrack GROUP BY playlist_id)"),
    ("List each employee's first name with the first name of the person they report to.",
     "SELECT employee.firstname, boss.firstname FROM employee JOIN employee AS boss "
     "ON employee.reports_to_id = boss.id"),
    ("Which employees manage at least one other employee?",
     "SELECT DISTINCT boss.firstname, boss.lastname FROM employee JOIN employee AS boss "
     "ON employee.reports_to_id = boss.id"),
)  # fmt: skip


def build_store_questions(db_path: Path) -> list[dict]:
    """Every whole-store question whose gold query answers, minus the decontaminated ones."""
    fresh = load_fresh()
    shapes = {skeleton(e["target"]) for e in fresh}
    fresh_words = [words(e["input"]["question"]) for e in fresh]
    with sqlite3.connect(db_path) as db:
        examples = [*store_groupings(db), *filtered_rows(db), *aggregates(db), *null_checks(db),
                    *rankings(db), *(example(text, sql) for text, sql in SUBQUERIES)]  # fmt: skip
        return [e for e in examples if answers(db, e["target"])
                and skeleton(e["target"]) not in shapes
                and not too_close(words(e["input"]["question"]), fresh_words)]  # fmt: skip


def answers(db: sqlite3.Connection, sql: str) -> bool:
    """A broken gold query raises: a typo in a part must fail loudly, not thin the data."""
    return any(v is not None for row in db.execute(sql).fetchall() for v in row)


def too_close(mine: set[str], others: list[set[str]]) -> bool:
    return any(len(mine & o) / len(mine | o) >= MAX_WORD_OVERLAP for o in others)


def main() -> None:
    from .sql import chinook_db

    examples = build_store_questions(chinook_db())
    print(f"{len(examples)} whole-store questions")
    for e in examples[:: max(1, len(examples) // 25)]:
        print(f"  {e['input']['question']}\n      {e['target']}")


if __name__ == "__main__":
    main()
