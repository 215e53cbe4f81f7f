"""Training-only SQL questions that cross tables: filters reached by joins, dates, units.

    python -m finetune.sql_paths          # how many questions each shape gives, and one of each

The adapter trained on ``sql_families`` and ``sql_store`` never got a join of three or more
tables right on the hand-written set, nor a date range or a playlist: those modules group the
whole store by one thing, or ask about one named row, but never *filter* through a chain of
joins ("how many tracks are on the Grunge playlist", "revenue from Jazz tracks sold to
customers in Canada", "for each genre, how many tracks are MPEG audio files"). This module
composes such questions from parts over the real rows:

- a **root** table and its measures (tracks: count, minutes, average seconds, price; sales:
  revenue, tracks sold, distinct buyers; invoices: total, count, average, largest);
- **scopes** that filter it through the join chain from the root to another table (a genre, a
  media type, an artist, an album, a playlist, a country, a support rep, a year), alone or two
  together, and numeric conditions in a person's units (minutes, cents, megabytes);
- **shapes**: a filtered measure, the rows in scope, the distinct rows of another table in
  scope, per-group measures in scope and the group with the most;
- date ranges (quarters, halves, before/after a day), hire and birth dates.

Every gold query runs on Chinook and is kept only if it answers and is unambiguous (no tie at a
"most"). Decontamination is ``sql_fresh.Decontaminator``: against every hand-written set by
query shape, by wording and by result.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .sql import q
from .sql_fresh import Decontaminator

PER_SCOPE_VALUES = 6
"""How many values of each scope (the most frequent ones first) the questions use."""

JOINS = {
    "track": "track",
    "genre": "JOIN genre ON track.genre_id = genre.id",
    "mediatype": "JOIN mediatype ON track.mediatype_id = mediatype.id",
    "album": "JOIN album ON track.album_id = album.id",
    "artist": "JOIN artist ON album.artist_id = artist.id",
    "playlisttrack": "JOIN playlisttrack ON playlisttrack.track_id = track.id",
    "playlist": "JOIN playlist ON playlisttrack.playlist_id = playlist.id",
    "invoice": "JOIN invoice ON invoiceline.invoice_id = invoice.id",
    "customer": "JOIN customer ON invoice.customer_id = customer.id",
    "employee": "JOIN employee ON customer.support_rep_id = employee.id",
}
NEEDS = {"artist": ("album",), "playlist": ("playlisttrack",), "customer": ("invoice",),
         "employee": ("customer",)}  # fmt: skip
"""A table reached only through another one."""


def joined(root: str, tables: list[str]) -> str:
    """``FROM root JOIN …`` reaching every table, each joined once, each after what it needs."""
    order: list[str] = []

    def reach(table: str) -> None:
        needs = NEEDS.get(table, ())
        if root == "invoiceline" and table in TRACK_SIDE:
            needs = ("track", *needs)
        for before in needs:
            reach(before)
        if table != root and table not in order:
            order.append(table)

    for table in tables:
        if root != "invoiceline" and table in (*SALE_SIDE, "track") and table != root:
            raise ValueError(f"joined: {table} is not reached from {root}")
        reach(table)
    joins = {**JOINS, "track": "JOIN track ON invoiceline.track_id = track.id"}
    return " ".join([f"FROM {root}", *(joins[t] for t in order)])


TRACK_SIDE = ("genre", "mediatype", "album", "playlisttrack")
SALE_SIDE = ("invoice", "customer", "employee")
"""Tables only a sale reaches."""
REP_NAME = "employee.firstname || ' ' || employee.lastname"
"""How a support rep is listed as a scope value (the condition names both columns)."""
"""Tables a sale reaches through its track."""


@dataclass(frozen=True)
class Scope:
    """A filter reached by joins: the table, the condition, and how a question says it."""

    table: str
    column: str
    values: str
    """SQL listing the values to ask about, most frequent first."""
    track_phrase: str
    """How a question about tracks says it: "on the {v} playlist"."""
    sale_phrase: str
    """How a question about sales says it: "of tracks on the {v} playlist"."""

    def condition(self, value) -> str:
        if self.column == REP_NAME:
            first, last = value.split(" ", 1)
            return f"employee.firstname = {q(first)} AND employee.lastname = {q(last)}"
        return f"{self.column} = {q(value)}"


def values_by_use(table: str, column: str, via: str) -> str:
    unique = f"{column} IN (SELECT {column} FROM {table} GROUP BY {column} HAVING COUNT(*) = 1)"
    unique = unique if table in ("playlist", "album") else "1"
    return f"SELECT {column} {via} WHERE {unique} GROUP BY {column} ORDER BY COUNT(*) DESC"


TRACK_SCOPES = (
    Scope("genre", "genre.name",
          values_by_use("genre", "genre.name", "FROM track " + JOINS["genre"]),
          "in the {v} genre", "of {v} tracks"),
    Scope("mediatype", "mediatype.name",
          values_by_use("mediatype", "mediatype.name", "FROM track " + JOINS["mediatype"]),
          "stored as {v}", "of tracks stored as {v}"),
    Scope("artist", "artist.name",
          values_by_use("artist", "artist.name",
                        f"FROM track {JOINS['album']} {JOINS['artist']}"),
          "by {v}", "of tracks by {v}"),
    Scope("album", "album.title",
          values_by_use("album", "album.title", "FROM track " + JOINS["album"]),
          "on the album {v}", "of tracks from the album {v}"),
    Scope("playlist", "playlist.name",
          values_by_use("playlist", "playlist.name",
                        f"FROM track {JOINS['playlisttrack']} {JOINS['playlist']}"),
          "on the {v} playlist", "of tracks on the {v} playlist"),
)  # fmt: skip
SALE_SCOPES = (
    Scope("customer", "customer.country",
          "SELECT country FROM customer GROUP BY country ORDER BY COUNT(*) DESC",
          "", "to customers in {v}"),
    Scope("invoice", "invoice.billingcity",
          "SELECT billingcity FROM invoice GROUP BY billingcity ORDER BY COUNT(*) DESC",
          "", "billed to {v}"),
    Scope("employee", REP_NAME,
          f"SELECT {REP_NAME} FROM customer JOIN employee ON customer.support_rep_id = "
          "employee.id GROUP BY employee.id ORDER BY COUNT(*) DESC",
          "", "to customers looked after by the rep {v}"),
    Scope("invoice", "strftime('%Y', invoice.invoicedate)",
          "SELECT DISTINCT strftime('%Y', invoicedate) FROM invoice",
          "", "in {v}"),
)  # fmt: skip


@dataclass(frozen=True)
class Measure:
    sql: str
    asks: tuple[str, ...]
    """Questions with ``{scope}``."""


TRACK_MEASURES = (
    Measure("COUNT(*)", ("How many tracks are {scope}?", "Count the tracks {scope}.",
                         "What is the number of tracks {scope}?")),
    Measure("SUM(track.milliseconds) / 60000.0",
            ("How many minutes of music are there {scope}?",
             "What is the total running time in minutes of the tracks {scope}?")),
    Measure("AVG(track.milliseconds) / 1000.0",
            ("What is the average length in seconds of a track {scope}?",
             "On average, how many seconds long is a track {scope}?")),
    Measure("AVG(track.unit_price)", ("What is the average price of a track {scope}?",)),
    Measure("SUM(track.bytes) / 1048576.0",
            ("How many megabytes do the tracks {scope} take up?",)),
)  # fmt: skip
SALE_MEASURES = (
    Measure("SUM(invoiceline.unit_price * invoiceline.quantity)",
            ("How much revenue came from sales {scope}?", "What did sales {scope} bring in?",
             "How much money was made from sales {scope}?")),
    Measure("SUM(invoiceline.quantity)",
            ("How many tracks were sold in sales {scope}?",
             "Count the tracks sold in sales {scope}.")),
    Measure("COUNT(DISTINCT invoice.customer_id)",
            ("How many different customers bought tracks {scope}?",
             "How many distinct customers bought tracks {scope}?")),
)  # fmt: skip

GROUPS = {  # table → (label, key, noun, plural)
    "genre": ("genre.name", "genre.id", "genre", "genres"),
    "mediatype": ("mediatype.name", "mediatype.id", "media type", "media types"),
    "artist": ("artist.name", "artist.id", "artist", "artists"),
    "album": ("album.title", "album.id", "album", "albums"),
    "playlist": ("playlist.name", "playlist.id", "playlist", "playlists"),
    "customer": ("customer.country", "customer.country", "customer country", "customer countries"),
    "employee": ("employee.firstname, employee.lastname", "employee.id", "support rep",
                 "support reps"),
}  # fmt: skip
LISTS = {  # what a "which …" question lists, per table
    "track": ("DISTINCT track.name", "tracks", "songs"),
    "genre": ("DISTINCT genre.name", "genres", "genres"),
    "mediatype": ("DISTINCT mediatype.name", "media types", "formats"),
    "artist": ("DISTINCT artist.name", "artists", "artists"),
    "album": ("DISTINCT album.title", "albums", "albums"),
    "playlist": ("DISTINCT playlist.name", "playlists", "playlists"),
    "customer": ("DISTINCT customer.firstname, customer.lastname", "customers", "customers"),
}


def pick(options: tuple[str, ...], key: str, offset: int = 0) -> str:
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return options[(digest + offset) % len(options)]


def example(question: str, sql: str) -> dict:
    return {"input": {"question": question}, "target": sql}


def scope_values(db: sqlite3.Connection, scope: Scope, n: int = PER_SCOPE_VALUES) -> list:
    return [row[0] for row in db.execute(scope.values).fetchall()[:n] if row[0] is not None]


def single(db: sqlite3.Connection, sql: str, ordered_by: str) -> bool:
    """The first row of ``sql ORDER BY ordered_by`` is not tied with the second."""
    values = [row[-1] for row in db.execute(f"SELECT {ordered_by} {sql}").fetchall()]
    return len(values) > 2 and values[0] != values[1]


def filtered_track_measures(db: sqlite3.Connection) -> Iterator[dict]:
    for scope in TRACK_SCOPES:
        for value in scope_values(db, scope):
            where = f"{joined('track', [scope.table])} WHERE {scope.condition(value)}"
            said = scope.track_phrase.format(v=value)
            for m in TRACK_MEASURES:
                sql = f"SELECT {m.sql} {where}"
                for i in range(min(2, len(m.asks))):
                    yield example(pick(m.asks, sql, i).format(scope=said), sql)


def filtered_sales(db: sqlite3.Connection) -> Iterator[dict]:
    for scope in TRACK_SCOPES + SALE_SCOPES:
        for value in scope_values(db, scope):
            for m in SALE_MEASURES:
                buyers = "DISTINCT" in m.sql  # said of the tracks bought: a track scope only
                if buyers and scope in SALE_SCOPES:
                    continue
                said = (scope.track_phrase if buyers else scope.sale_phrase).format(v=value)
                tables = [scope.table] + (["invoice"] if "invoice." in m.sql else [])
                sql = (
                    f"SELECT {m.sql} {joined('invoiceline', tables)} WHERE {scope.condition(value)}"
                )
                for i in range(2):
                    text = pick(m.asks, sql, i)
                    yield example(text.format(scope=said), sql)


def two_scopes(db: sqlite3.Connection) -> Iterator[dict]:
    """Sales filtered twice: a track scope and a customer/date scope ("Rock tracks in 2010")."""
    for track_scope in TRACK_SCOPES[:3]:
        for sale_scope in SALE_SCOPES:
            for a in scope_values(db, track_scope, 3):
                for b in scope_values(db, sale_scope, 3):
                    said = " ".join((track_scope.sale_phrase.format(v=a),
                                     sale_scope.sale_phrase.format(v=b)))  # fmt: skip
                    cond = f"{track_scope.condition(a)} AND {sale_scope.condition(b)}"
                    for m in SALE_MEASURES[:2]:
                        tables = [track_scope.table, sale_scope.table]
                        sql = f"SELECT {m.sql} {joined('invoiceline', tables)} WHERE {cond}"
                        if db.execute(sql).fetchone()[0]:
                            yield example(pick(m.asks, sql).format(scope=said), sql)


def lists_in_scope(db: sqlite3.Connection) -> Iterator[dict]:
    """Rows of one table in a scope on another: "Which artists appear on the Grunge playlist?"."""
    asks = ("Which {plural} have tracks {scope}?", "List the {plural} with tracks {scope}.",
            "What {words} appear among the tracks {scope}?")  # fmt: skip
    for scope in TRACK_SCOPES:
        for value in scope_values(db, scope, 4):
            said = scope.track_phrase.format(v=value)
            for table, (listed, plural, words) in LISTS.items():
                if table in (scope.table, "customer"):
                    continue
                source = joined("track", [table, scope.table])
                sql = f"SELECT {listed} {source} WHERE {scope.condition(value)}"
                if table == "track":
                    text = pick(("Which tracks are {scope}?", "List the songs {scope}.",
                                 "What songs are {scope}?"), sql)  # fmt: skip
                else:
                    text = pick(asks, sql)
                yield example(text.format(plural=plural, words=words, scope=said), sql)
    buyers = ("Which customers bought tracks {scope}? Give first and last names.",
              "List the first and last names of customers who bought tracks {scope}.")  # fmt: skip
    for scope in TRACK_SCOPES:
        for value in scope_values(db, scope, 4):
            tables = [scope.table, "customer"]
            sql = (f"SELECT {LISTS['customer'][0]} {joined('invoiceline', tables)} "
                   f"WHERE {scope.condition(value)}")  # fmt: skip
            yield example(pick(buyers, sql).format(scope=scope.track_phrase.format(v=value)), sql)


def grouped_in_scope(db: sqlite3.Connection) -> Iterator[dict]:
    """Per-group measures in a scope: "For each genre, how many tracks are MPEG audio files?"."""
    each = (
        "For each {noun}, how many tracks are {scope}? Give the {noun} and the count.",
        "How many tracks {scope} does each {noun} have? Show the {noun} and the number.",
    )
    most = (
        "Which {noun} has the most tracks {scope}?",
        "Name the {noun} with the most tracks {scope}.",
    )
    sales_each = (
        "For each {noun}, how much revenue came from sales {scope}?",
        "Show the revenue per {noun} from sales {scope}.",
    )
    sales_most = ("Which {noun} made the most money from sales {scope}?",)
    track_groups = ("genre", "mediatype", "artist", "album", "playlist")
    yield from groups_in_scope(db, "track", TRACK_SCOPES, "track_phrase", track_groups,
                               "COUNT(*)", each, most)  # fmt: skip
    revenue = "SUM(invoiceline.unit_price * invoiceline.quantity)"
    sale_groups = ("genre", "mediatype", "artist", "customer", "employee")
    yield from groups_in_scope(db, "invoiceline", TRACK_SCOPES[:3] + SALE_SCOPES, "sale_phrase",
                               sale_groups, revenue, sales_each, sales_most)  # fmt: skip


def groups_in_scope(db, root, scopes, phrase, tables, measure, each, most) -> Iterator[dict]:
    """Each group's measure within a scope, and the group with the most (when not tied)."""
    for scope in scopes:
        for value in scope_values(db, scope, 3):
            said = getattr(scope, phrase).format(v=value)
            for table in tables:
                if table == scope.table:
                    continue
                label, key, noun, _ = GROUPS[table]
                body = (f"{joined(root, [table, scope.table])} WHERE {scope.condition(value)} "
                        f"GROUP BY {key}")  # fmt: skip
                sql = f"SELECT {label}, {measure} {body}"
                yield example(pick(each, sql).format(noun=noun, scope=said), sql)
                if single(db, f"{body} ORDER BY {measure} DESC", measure):
                    sql = f"SELECT {label} {body} ORDER BY {measure} DESC LIMIT 1"
                    yield example(pick(most, sql).format(noun=noun, scope=said), sql)


UNITS = (  # (column, a person's unit, factor to the stored unit, amounts, longer, shorter)
    ("track.milliseconds", "minutes", 60000, (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15), "longer than",
     "shorter than"),
    ("track.milliseconds", "seconds", 1000, (90, 120, 150, 200, 240), "longer than",
     "shorter than"),
    ("track.bytes", "megabytes", 1048576, (5, 8, 10, 12), "bigger than", "smaller than"),
)  # fmt: skip


def in_units(db: sqlite3.Connection) -> Iterator[dict]:
    """Numeric conditions in a person's units, alone and in a scope."""
    for column, unit, factor, amounts, more, less in UNITS:
        for amount in amounts:
            for op, word in ((">", more), ("<", less)):
                cond = f"{column} {op} {amount * factor}"
                sql = f"SELECT COUNT(*) FROM track WHERE {cond}"
                yield example(f"How many tracks are {word} {amount} {unit}?", sql)
                if amount in NUMBER_WORDS:  # "five minutes": the same query, in words
                    said = f"{word} {NUMBER_WORDS[amount]} {unit}"
                    yield example(pick((f"Count the tracks that run {said}.",
                                        f"How many songs last {said}?"), sql), sql)  # fmt: skip
                for scope in TRACK_SCOPES[:3]:
                    for value in scope_values(db, scope, 2):
                        said = scope.track_phrase.format(v=value)
                        where = f"WHERE {scope.condition(value)} AND {cond}"
                        base = f"{joined('track', [scope.table])} {where}"
                        sql = f"SELECT COUNT(*) {base}"
                        if db.execute(sql).fetchone()[0]:
                            yield example(
                                f"How many tracks {said} are {word} {amount} {unit}?", sql
                            )
                            sql = f"SELECT DISTINCT track.name {base}"
                            yield example(pick((f"Which tracks {said} are {word} {amount} {unit}?",
                                                f"List the songs {said} {word} {amount} {unit}."),
                                               sql), sql)  # fmt: skip
    for cents in (99, 100, 150, 199):
        sql = f"SELECT COUNT(*) FROM track WHERE track.unit_price > {cents / 100}"
        yield example(f"How many tracks cost more than {cents} cents?", sql)
        sql = f"SELECT COUNT(*) FROM track WHERE track.unit_price < {cents / 100}"
        yield example(f"How many tracks cost less than {cents} cents?", sql)


QUARTERS = {"first quarter": ("01-01", "04-01"), "second quarter": ("04-01", "07-01"),
            "third quarter": ("07-01", "10-01"), "fourth quarter": ("10-01", None),
            "first half": ("01-01", "07-01"), "second half": ("07-01", None)}  # fmt: skip
INVOICE_MEASURES = (
    ("COUNT(*)", "How many invoices were there {when}?", "Count the invoices {when}."),
    ("SUM(invoice.total)", "What was the total of all invoices {when}?",
     "How much was billed {when}?"),
    ("AVG(invoice.total)", "What was the average invoice total {when}?",
     "On average, how much was an invoice {when}?"),
    ("MAX(invoice.total)", "What was the largest invoice total {when}?",
     "How big was the biggest invoice {when}?"),
)  # fmt: skip


def date_ranges(year: int) -> Iterator[tuple[str, str]]:
    """(how a person says it, the condition on invoice.invoicedate) for parts of a year."""
    for part, (start, end) in QUARTERS.items():
        end_day = f"{year}-{end}" if end else f"{year + 1}-01-01"
        yield (
            f"in the {part} of {year}",
            (f"invoice.invoicedate >= '{year}-{start}' AND invoice.invoicedate < '{end_day}'"),
        )
    yield f"before {year}", f"invoice.invoicedate < '{year}-01-01'"
    yield f"after the end of {year}", f"invoice.invoicedate >= '{year + 1}-01-01'"
    yield f"from {year} on", f"invoice.invoicedate >= '{year}-01-01'"


def invoice_dates(db: sqlite3.Connection) -> Iterator[dict]:
    for year in range(2007, 2012):
        for when, cond in date_ranges(year):
            for fn, *asks in INVOICE_MEASURES:
                sql = f"SELECT {fn} FROM invoice WHERE {cond}"
                if db.execute(sql).fetchone()[0]:
                    yield example(pick(tuple(asks), sql).format(when=when), sql)
        per_month = (f"SELECT strftime('%m', invoice.invoicedate), SUM(invoice.total) FROM invoice "
                     f"WHERE strftime('%Y', invoice.invoicedate) = '{year}' "
                     "GROUP BY strftime('%m', invoice.invoicedate)")  # fmt: skip
        yield example(f"Show the total billed in each month of {year}.", per_month)
        country = (f"SELECT invoice.billingcountry, COUNT(*) FROM invoice "
                   f"WHERE strftime('%Y', invoice.invoicedate) = '{year}' "
                   "GROUP BY invoice.billingcountry")  # fmt: skip
        yield example(f"How many invoices did each billing country get in {year}?", country)
    for fn, *asks in INVOICE_MEASURES:
        sql = (f"SELECT strftime('%Y', invoice.invoicedate), {fn} FROM invoice "
               "GROUP BY strftime('%Y', invoice.invoicedate)")  # fmt: skip
        yield example(pick(tuple(asks), sql).format(when="in each year") + " Give the year too.",
                      sql)  # fmt: skip
    firsts = (
        ("earliest", "", "first"),
        ("latest", " DESC", "most recent"),
    )
    for word, desc, said in firsts:
        if not single(
            db, f"FROM invoice ORDER BY invoice.invoicedate{desc}", "invoice.invoicedate"
        ):
            continue
        order = f"ORDER BY invoice.invoicedate{desc} LIMIT 1"
        yield example(
            f"When was the {said} invoice issued?",
            f"SELECT invoice.invoicedate FROM invoice {order}",
        )
        yield example(
            f"Which customer got the {word} invoice? Give first and last names.",
            f"SELECT customer.firstname, customer.lastname FROM invoice "
            f"JOIN customer ON invoice.customer_id = customer.id {order}",
        )
        yield example(
            f"Which city was the {said} invoice billed to?",
            f"SELECT invoice.billingcity FROM invoice {order}",
        )


NAMED = "employee.firstname, employee.lastname"


def employee_dates(db: sqlite3.Connection) -> Iterator[dict]:
    for column, event in (("employee.hiredate", "hired"), ("employee.birthdate", "born")):
        years = sorted({r[0] for r in db.execute(f"SELECT strftime('%Y', {column}) FROM employee")})
        for year in years:
            sql = f"SELECT {NAMED} FROM employee WHERE strftime('%Y', {column}) = '{year}'"
            yield example(
                f"Which employees were {event} in {year}? Give first and last names.", sql
            )
            sql = f"SELECT COUNT(*) FROM employee WHERE {column} < '{year}-01-01'"
            if db.execute(sql).fetchone()[0]:
                yield example(f"How many employees were {event} before {year}?", sql)
            sql = f"SELECT {NAMED} FROM employee WHERE {column} >= '{year}-01-01'"
            yield example(f"List the employees {event} in {year} or later.", sql)
        for word, desc in (("first", ""), ("last", " DESC")):
            if single(db, f"FROM employee ORDER BY {column}{desc}", column):
                yield example(f"Who was {event} {word}? Give the first and last name.",
                              f"SELECT employee.firstname, employee.lastname FROM employee "
                              f"ORDER BY {column}{desc} LIMIT 1")  # fmt: skip


def customer_dates(db: sqlite3.Connection) -> Iterator[dict]:
    """Dates through joins: a country's or a customer's invoices in a year."""
    countries = [r[0] for r in db.execute(SALE_SCOPES[0].values).fetchall()[:5]]
    for country in countries:
        for year in (2009, 2010, 2011):
            sql = (f"SELECT SUM(invoice.total) FROM invoice JOIN customer ON invoice.customer_id = "
                   f"customer.id WHERE customer.country = {q(country)} AND "
                   f"strftime('%Y', invoice.invoicedate) = '{year}'")  # fmt: skip
            yield example(f"How much did customers in {country} spend in {year}?", sql)


NUMBER_WORDS = dict(enumerate("zero one two three four five six seven eight nine ten".split()))
NUMBER_WORDS |= {12: "twelve", 15: "fifteen"}
BOSS_JOIN = "FROM employee JOIN employee AS boss ON employee.reports_to_id = boss.id"
"""The employee hierarchy: ``reports_to_id`` names the manager's row, joined as ``boss``."""


def person(table: str, first: str, last: str) -> str:
    return f"{table}.firstname = {q(first)} AND {table}.lastname = {q(last)}"


def hierarchy(db: sqlite3.Connection) -> Iterator[dict]:
    """The employee self-join: who reports to whom, counts per manager, comparisons with one's
    manager, colleagues under the same manager."""
    people = db.execute("SELECT firstname, lastname FROM employee").fetchall()
    bosses = db.execute("SELECT DISTINCT boss.firstname, boss.lastname " + BOSS_JOIN).fetchall()
    named = "employee.firstname, employee.lastname"
    for first, last in bosses:
        who = f"{first} {last}"
        sql = f"SELECT {named} {BOSS_JOIN} WHERE {person('boss', first, last)}"
        yield example(pick((f"Who reports to {who}? Give first and last names.",
                            f"List the employees whose manager is {who}."), sql), sql)  # fmt: skip
        sql = f"SELECT COUNT(*) {BOSS_JOIN} WHERE {person('boss', first, last)}"
        yield example(pick((f"How many employees does {who} manage?",
                            f"Count the people who report to {who}."), sql), sql)  # fmt: skip
    for first, last in people:
        who = f"{first} {last}"
        mine = person("employee", first, last)
        sql = f"SELECT boss.firstname, boss.lastname {BOSS_JOIN} WHERE {mine}"
        if db.execute(sql).fetchall():
            yield example(pick((f"Who is {who}'s manager?", f"To whom does {who} report?",
                                f"Name {who}'s boss."), sql), sql)  # fmt: skip
        bare = mine.replace("employee.", "")
        same = (f"SELECT {named} FROM employee WHERE employee.reports_to_id = "
                f"(SELECT reports_to_id FROM employee WHERE {bare}) AND NOT ({mine})")  # fmt: skip
        if db.execute(same).fetchall():
            yield example(f"Which employees share a manager with {who}? Leave {first} out.", same)
    for column, word in (("boss.lastname", "last name"), ("boss.title", "title")):
        sql = f"SELECT {column}, COUNT(*) {BOSS_JOIN} GROUP BY boss.id"
        yield example(f"For each manager, how many people report to them? Give the manager's "
                      f"{word} and the count.", sql)  # fmt: skip
    for column, later, earlier in (("birthdate", "younger than", "born before"),
                                   ("hiredate", "hired after", "hired before")):  # fmt: skip
        for op, said in ((">", later), ("<", earlier)):
            sql = f"SELECT {named} {BOSS_JOIN} WHERE employee.{column} {op} boss.{column}"
            if db.execute(sql).fetchall():
                yield example(f"Which employees were {said} their manager?" if "before" in said
                              or "after" in said else f"Which employees are {said} their manager?",
                              sql)  # fmt: skip
    for title in ("Sales Manager", "IT Manager", "General Manager"):
        sql = f"SELECT {named} {BOSS_JOIN} WHERE boss.title = {q(title)}"
        yield example(f"Who reports to the {title}? Give first and last names.", sql)


REP_JOIN = "FROM customer JOIN employee ON customer.support_rep_id = employee.id"
"""A customer's support rep: ``customer.support_rep_id`` names an employee."""


def support_reps(db: sqlite3.Connection) -> Iterator[dict]:
    """Customers and their sales support agents, both ways."""
    reps = db.execute(
        f"SELECT DISTINCT employee.firstname, employee.lastname {REP_JOIN}"
    ).fetchall()
    spent = f"{REP_JOIN} JOIN invoice ON invoice.customer_id = customer.id"
    for first, last in reps:
        who, mine = f"{first} {last}", person("employee", first, last)
        asks = {
            f"SELECT COUNT(*) {REP_JOIN} WHERE {mine}":
                (f"How many customers does {who} look after?",
                 f"How many customers have {who} as their support rep?"),
            f"SELECT DISTINCT customer.country {REP_JOIN} WHERE {mine}":
                (f"Which countries are {who}'s customers from?",),
            f"SELECT SUM(invoice.total) {spent} WHERE {mine}":
                (f"How much have the customers of {who} spent in total?",
                 f"What is the total of all invoices of {who}'s customers?"),
            f"SELECT COUNT(*) {spent} WHERE {mine}":
                (f"How many invoices did the customers of support rep {who} get?",),
        }  # fmt: skip
        for sql, options in asks.items():
            yield example(pick(options, sql), sql)
    customers = db.execute("SELECT firstname, lastname FROM customer").fetchall()
    for first, last in customers:
        sql = (f"SELECT employee.firstname, employee.lastname {REP_JOIN} "
               f"WHERE {person('customer', first, last)}")  # fmt: skip
        yield example(
            pick(
                (
                    f"Who is the support rep of {first} {last}?",
                    f"Which sales support agent looks after {first} {last}?",
                ),
                sql,
            ),
            sql,
        )
    for label, noun in (("employee.lastname", "last name"), ("employee.firstname", "first name")):
        sql = f"SELECT {label}, COUNT(*) {REP_JOIN} GROUP BY employee.id"
        yield example(f"How many customers does each support rep have? Give the rep's {noun} "
                      "and the count.", sql)  # fmt: skip
        sql = f"SELECT {label}, SUM(invoice.total) {spent} GROUP BY employee.id"
        yield example(f"How much have each sales support agent's customers spent? Show the "
                      f"agent's {noun} and the total.", sql)  # fmt: skip


def money(db: sqlite3.Connection) -> Iterator[dict]:
    """Money in a person's words: "spent … altogether", "made the most money"."""
    spent = (
        "SELECT customer.firstname, customer.lastname FROM customer JOIN invoice ON "
        "invoice.customer_id = customer.id GROUP BY customer.id HAVING SUM(invoice.total) "
    )
    for dollars in (38, 40, 42, 44, 46, 48, 50):
        for op, word in ((">", "more"), ("<", "less")):
            sql = f"{spent}{op} {dollars}"
            if db.execute(sql).fetchall():
                yield example(pick((f"Which customers have spent {word} than {dollars} dollars in "
                                    "total? Give first and last names.",
                                    f"List the customers whose purchases add up to {word} than "
                                    f"${dollars}."), sql), sql)  # fmt: skip
    revenue = "SUM(invoiceline.unit_price * invoiceline.quantity)"
    for table in ("mediatype", "artist", "album", "genre"):
        label, key, noun, _ = GROUPS[table]
        body = f"{joined('invoiceline', [table])} GROUP BY {key}"
        for desc, word in ((" DESC", "the most"), ("", "the least")):
            if single(db, f"{body} ORDER BY {revenue}{desc}", revenue):
                sql = f"SELECT {label} {body} ORDER BY {revenue}{desc} LIMIT 1"
                yield example(
                    pick(
                        (
                            f"Which {noun} made {word} money?",
                            f"Which {noun} earned {word} from sales?",
                        ),
                        sql,
                    ),
                    sql,
                )
    by_country = "FROM invoice GROUP BY invoice.billingcountry ORDER BY SUM(invoice.total)"
    for desc, word in ((" DESC", "the most"), ("", "the least")):
        if single(db, by_country + desc, "SUM(invoice.total)"):
            sql = f"SELECT invoice.billingcountry {by_country}{desc} LIMIT 1"
            yield example(f"Which billing country has spent {word} money altogether?", sql)


def during_years(db: sqlite3.Connection) -> Iterator[dict]:
    """A whole calendar year, said as "in 2010" or "during 2010": strftime on the year."""
    for year in range(2007, 2012):
        cond = f"strftime('%Y', invoice.invoicedate) = '{year}'"
        for fn, *asks in INVOICE_MEASURES:
            sql = f"SELECT {fn} FROM invoice WHERE {cond}"
            for i in range(2):
                yield example(pick(tuple(asks), sql, i).format(when=f"during {year}"), sql)
        sql = f"SELECT invoice.id FROM invoice WHERE {cond} AND invoice.total > 15"
        yield example(
            f"Which invoices from {year} came to more than 15 dollars? Give the ids.", sql
        )
        for event in ("hiredate", "birthdate"):
            sql = (f"SELECT COUNT(*) FROM employee WHERE strftime('%Y', employee.{event}) = "
                   f"'{year - 5}'")  # fmt: skip
            if db.execute(sql).fetchone()[0]:
                word = "hired" if event == "hiredate" else "born"
                yield example(f"How many employees were {word} in {year - 5}?", sql)


SHAPES = {
    "filtered track measures": filtered_track_measures,
    "filtered sales": filtered_sales,
    "two scopes": two_scopes,
    "lists in a scope": lists_in_scope,
    "grouped in a scope": grouped_in_scope,
    "units": in_units,
    "invoice dates": invoice_dates,
    "employee dates": employee_dates,
    "customer dates": customer_dates,
    "hierarchy": hierarchy,
    "support reps": support_reps,
    "money": money,
    "during a year": during_years,
}


def build_path_questions(db_path: Path) -> list[dict]:
    return kept_questions(db_path, SHAPES)


def kept_questions(db_path: Path, shapes: dict) -> list[dict]:
    """Every question of every shape whose gold query answers and names each row once, minus
    the decontaminated ones."""
    with sqlite3.connect(db_path) as db:
        clean = Decontaminator(db)
        return [e for shape in shapes.values() for e in shape(db)
                if clean.keeps(e) and names_each_once(db, e["target"])]  # fmt: skip


def names_each_once(db: sqlite3.Connection, sql: str) -> bool:
    """A list answer names each thing once ("Music" is two playlists: grouped by id, it shows
    twice)."""
    rows = db.execute(sql).fetchall()
    return len(rows) == len(set(rows))


def main() -> None:
    from .sql import chinook_db

    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db)
        for name, shape in SHAPES.items():
            made = list(shape(db))
            kept = [e for e in made if clean.keeps(e)]
            print(f"{name}: {len(kept)} kept of {len(made)}")
            for e in kept[:: max(1, len(kept) // 3)][:3]:
                print(f"    {e['input']['question']}\n        {e['target']}")


if __name__ == "__main__":
    main()
