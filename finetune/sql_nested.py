"""Training-only SQL questions whose gold nests one query in another: aggregates of aggregates,
groups against the average group, counts of groups, NOT IN across joins, rows against an average.

    python -m finetune.sql_nested         # how many questions each shape gives, and two of each

The adapter trained on ``sql_families``, ``sql_store`` and ``sql_paths`` answered 2 of the first
hand-written set's 14 questions that need HAVING or a subquery: it wrote an aggregate where an
aggregate of an aggregate was asked, compared a row with itself, or invented a filter
(``results/finetune/sql-rank64-truncated-32/README.md``). Those modules have only 16 fixed
subquery examples. This one composes such questions from the same parts as ``sql_store`` (a
fact, a grouping, a measure) and ``sql_paths`` (scopes reached by joins), over the real rows:

- ``of_groups``: the average, largest or smallest of a per-group measure
  ("What is the average number of tracks per album?");
- ``against_average``: the groups above or below the average group, and how many there are;
- ``count_groups``: how many groups pass a threshold ("How many artists have more than 5 albums?");
- ``never``: rows with no match across a chain of joins (artists never sold, customers who never
  bought a genre, genres never bought in a country), listed or counted;
- ``rows_vs_average``: the rows in a scope above the average of the whole table or of the scope.

Every gold query runs on Chinook and is kept only if it answers, names each row once and is not
near a hand-written question (``sql_fresh.Decontaminator``: shape, wording, answer, subquery
clauses, a count of a listed answer). An average, a minimum or a "below" over groups is asked
only where every row of the grouped table has a group (``complete``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .sql import q
from .sql_fresh import Decontaminator
from .sql_paths import JOINS, TRACK_SCOPES, kept_questions, names_each_once
from .sql_store import FACTS, Fact, Grouping, Measure, example, pick, round_threshold

PHRASINGS_PER_QUERY = 2
VALUES_PER_SCOPE = 4
"""How many values of each scope (the most frequent first) the questions use."""
LONG_LIST = 40
"""A listed answer longer than this is asked as a count instead."""


def with_article(word: str) -> str:
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def phrasings(options: tuple[str, ...], sql: str, **slots) -> Iterator[dict]:
    """The query with PHRASINGS_PER_QUERY of its phrasings; ``{a_X}`` is slot X with "a"/"an"."""
    slots |= {f"a_{k}": with_article(str(v)) for k, v in list(slots.items()) if v != ""}
    for i in range(min(PHRASINGS_PER_QUERY, len(options))):
        yield example(pick(options, sql, i).format(**slots), sql)


def grouped(fact: Fact, group: Grouping) -> str:
    return f"{fact.source}{group.joins}{group.where} GROUP BY {group.key}"


def combos() -> Iterator[tuple[Fact, Grouping, Measure]]:
    for fact in FACTS:
        for group in fact.groupings:
            for measure in fact.measures:
                yield fact, group, measure


def complete(db: sqlite3.Connection, fact: Fact, group: Grouping) -> bool:
    """Every artist, album, playlist … has a group: one with no rows (an artist without albums,
    a track never sold) is missing from a GROUP BY, and an average, a minimum or a "below"
    over the groups would leave its zero out."""
    table, _, column = group.key.partition(".")
    if column != "id":  # a column's values: each has rows by construction
        return True
    everyone = ("SELECT COUNT(DISTINCT support_rep_id) FROM customer" if table == "employee"
                else f"SELECT COUNT(*) FROM {table}")  # fmt: skip
    groups = db.execute(f"SELECT COUNT(*) FROM (SELECT 1 {grouped(fact, group)})").fetchone()[0]
    return groups == db.execute(everyone).fetchone()[0]


# ---------------------------------------------------------------- aggregates of aggregates

OF_GROUPS = {
    "AVG": ("What is the average {measure} per {noun}?",
            "On average, what is the {measure} of {a_noun}?",
            "Across all {plural}, what is the mean {measure}?"),
    "MAX": ("What is the highest {measure} of any {noun}?",
            "What is the largest {measure} that a single {noun} has?"),
    "MIN": ("What is the lowest {measure} of any {noun}?",
            "What is the smallest {measure} that a single {noun} has?"),
}  # fmt: skip


def of_groups(db: sqlite3.Connection) -> Iterator[dict]:
    for fact, group, m in combos():
        inner = f"SELECT {m.sql} AS value {grouped(fact, group)}"
        whole = complete(db, fact, group)
        for fn, options in OF_GROUPS.items():
            if m.sql.startswith(f"{fn}(") or (fn != "MAX" and not whole):
                continue  # the largest of largests needs no nesting; zeros left out
            sql = f"SELECT {fn}(value) FROM ({inner})"
            yield from phrasings(options, sql, measure=m.phrase, noun=group.noun,
                               plural=group.plural)  # fmt: skip


AGAINST = {
    ">": ("Which {plural} have {a_measure} above the average {noun}'s?",
          "List the {plural} whose {measure} is higher than the average over all {plural}.",
          "Which {plural} beat the average {noun} on {measure}?"),
    "<": ("Which {plural} have {a_measure} below the average {noun}'s?",
          "List the {plural} whose {measure} is lower than the average over all {plural}."),
}  # fmt: skip
COUNT_AGAINST = {
    ">": ("How many {plural} have {a_measure} above the average {noun}'s?",
          "Count the {plural} whose {measure} is higher than the average {noun}'s."),
    "<": ("How many {plural} have {a_measure} below the average {noun}'s?",
          "Count the {plural} whose {measure} is lower than the average {noun}'s."),
}  # fmt: skip


def against_average(db: sqlite3.Connection) -> Iterator[dict]:
    for fact, group, m in combos():
        if not complete(db, fact, group):
            continue
        base = grouped(fact, group)
        average = f"(SELECT AVG(value) FROM (SELECT {m.sql} AS value {base}))"
        slots = {"measure": m.phrase, "noun": group.noun, "plural": group.plural}
        for op in (">", "<"):
            having = f"HAVING {m.sql} {op} {average}"
            listed = f"SELECT {group.label} {base} {having}"
            if len(db.execute(listed).fetchall()) <= LONG_LIST:
                yield from phrasings(AGAINST[op], listed, **slots)
            counted = f"SELECT COUNT(*) FROM (SELECT {group.key} {base} {having})"
            yield from phrasings(COUNT_AGAINST[op], counted, **slots)


COUNT_OVER = {
    ">": ("How many {plural} have {a_measure} above {k}?",
          "Count the {plural} with {a_measure} of more than {k}.",
          "For how many {plural} is the {measure} greater than {k}?"),
    "<": ("How many {plural} have {a_measure} below {k}?",
          "Count the {plural} with {a_measure} of less than {k}."),
}  # fmt: skip


def count_groups(db: sqlite3.Connection) -> Iterator[dict]:
    for fact, group, m in combos():
        base = grouped(fact, group)
        values = sorted((row[0] for row in db.execute(f"SELECT {m.sql} {base}")), reverse=True)
        if len(values) < 4:
            continue
        whole = complete(db, fact, group)
        for op, value in ((">", values[len(values) // 3]), ("<", values[2 * len(values) // 3])):
            k = round_threshold(value)
            if not k or k in values or (op == "<" and not whole):
                continue
            sql = f"SELECT COUNT(*) FROM (SELECT {group.key} {base} HAVING {m.sql} {op} {k})"
            yield from phrasings(COUNT_OVER[op], sql, measure=m.phrase, noun=group.noun,
                               plural=group.plural, k=k)  # fmt: skip


# ---------------------------------------------------------------- NOT IN across joins

SOLD = "FROM invoiceline JOIN track ON invoiceline.track_id = track.id"
BOUGHT = f"{SOLD} {JOINS['invoice']}"
NEVER_SOLD = (  # (listed table, what to list, noun, plural, the id column reached by a sale)
    ("artist", "name", "artist", "artists",
     f"SELECT album.artist_id {SOLD} {JOINS['album']}"),
    ("genre", "name", "genre", "genres", f"SELECT track.genre_id {SOLD}"),
    ("track", "name", "track", "tracks", "SELECT track_id FROM invoiceline"),
    ("playlist", "name", "playlist", "playlists",
     f"SELECT playlisttrack.playlist_id {SOLD} {JOINS['playlisttrack']}"),
)  # fmt: skip
NEVER_LISTED = ("Which {plural} have never had a track sold?",
                "List the {plural} with no sales at all.",
                "Which {plural} never sold anything?")  # fmt: skip
NEVER_COUNTED = ("How many {plural} have never had a track sold?",
                 "Count the {plural} with no sales at all.")  # fmt: skip


def top_values(db: sqlite3.Connection, sql: str, n: int = VALUES_PER_SCOPE) -> list:
    return [row[0] for row in db.execute(sql).fetchall()[:n]]


def never_sold(db: sqlite3.Connection) -> Iterator[dict]:
    for table, listed, noun, plural, sold in NEVER_SOLD:
        where = f"WHERE id NOT IN ({sold})"
        yield from listed_or_counted(db, f"SELECT {listed} FROM {table} {where}",
                                     f"SELECT COUNT(*) FROM {table} {where}", NEVER_LISTED,
                                     NEVER_COUNTED, plural=plural, noun=noun)  # fmt: skip


def customers_never_buying_a_genre(db: sqlite3.Connection) -> Iterator[dict]:
    genres = top_values(db, f"SELECT genre.name {SOLD} {JOINS['genre']} GROUP BY genre.id "
                            "ORDER BY COUNT(*) DESC")  # fmt: skip
    for genre in genres:
        bought = (f"SELECT invoice.customer_id {BOUGHT} {JOINS['genre']} "
                  f"WHERE genre.name = {q(genre)}")  # fmt: skip
        where = f"WHERE id NOT IN ({bought})"
        yield from listed_or_counted(
            db, f"SELECT firstname, lastname FROM customer {where}",
            f"SELECT COUNT(*) FROM customer {where}",
            ("Which customers have never bought {a_g} track?",
             "List the customers who never purchased any {g} music."),
            ("How many customers have never bought {a_g} track?",
             "Count the customers who never purchased any {g} music."), g=genre)  # fmt: skip


def genres_never_bought_in_a_country(db: sqlite3.Connection) -> Iterator[dict]:
    countries = top_values(db, "SELECT country FROM customer GROUP BY country "
                               "ORDER BY COUNT(*) DESC")  # fmt: skip
    for country in countries:
        bought = (f"SELECT track.genre_id {BOUGHT} {JOINS['customer']} "
                  f"WHERE customer.country = {q(country)}")  # fmt: skip
        where = f"WHERE id NOT IN ({bought})"
        yield from listed_or_counted(
            db, f"SELECT name FROM genre {where}", f"SELECT COUNT(*) FROM genre {where}",
            ("Which genres were never bought by customers in {c}?",
             "List the genres that nobody from {c} has purchased."),
            ("How many genres were never bought by customers in {c}?",
             "Count the genres that nobody from {c} has purchased."), c=country)  # fmt: skip


def genres_missing_from_a_playlist(db: sqlite3.Connection) -> Iterator[dict]:
    playlists = top_values(db, "SELECT name FROM playlist WHERE name IN (SELECT name FROM "
                               "playlist GROUP BY name HAVING COUNT(*) = 1) AND id IN (SELECT "
                               "playlist_id FROM playlisttrack) ORDER BY name")  # fmt: skip
    for playlist in playlists:
        on = (f"SELECT track.genre_id FROM playlisttrack {JOINS['playlist']} "
              "JOIN track ON playlisttrack.track_id = track.id "
              f"WHERE playlist.name = {q(playlist)}")  # fmt: skip
        where = f"WHERE id NOT IN ({on})"
        yield from listed_or_counted(
            db, f"SELECT name FROM genre {where}", f"SELECT COUNT(*) FROM genre {where}",
            ("Which genres have no track on the {p} playlist?",
             "List the genres missing from the {p} playlist."),
            ("How many genres have no track on the {p} playlist?",), p=playlist)  # fmt: skip


def never(db: sqlite3.Connection) -> Iterator[dict]:
    """Rows with no match across a chain of joins (NOT IN), listed or counted."""
    yield from never_sold(db)
    yield from customers_never_buying_a_genre(db)
    yield from genres_never_bought_in_a_country(db)
    yield from genres_missing_from_a_playlist(db)


def listed_or_counted(db, listed: str, counted: str, list_options, count_options, **slots):
    rows = db.execute(listed).fetchall()
    if 0 < len(rows) <= LONG_LIST:
        yield from phrasings(list_options, listed, **slots)
    yield from phrasings(count_options, counted, **slots)


# ---------------------------------------------------------------- rows against an average

ROW_MEASURES = (  # (column, "longer", noun phrase)
    ("track.milliseconds", "longer", "track length"),
    ("track.bytes", "larger", "file size"),
)
AGAINST_ALL = (
    "Which tracks {scope} are {cmp} than the average track?",
    "List the tracks {scope} whose {what} is above the average over all tracks.",
)
AGAINST_SCOPE = (
    "Which tracks {scope} are {cmp} than the average track {scope}?",
    "List the tracks {scope} whose {what} is above the average for tracks {scope}.",
)


def rows_vs_average(db: sqlite3.Connection) -> Iterator[dict]:
    for scope in TRACK_SCOPES:
        source = "FROM track " + scope_joins(scope.table)
        for value in top_values(db, scope.values):
            where = f"WHERE {scope.condition(value)}"
            phrase = scope.track_phrase.format(v=value)
            for col, cmp, what in ROW_MEASURES:
                name = col.split(".")[1]
                for options, average in (
                    (AGAINST_ALL, f"(SELECT AVG({name}) FROM track)"),
                    (AGAINST_SCOPE, f"(SELECT AVG({col}) {source} {where})"),
                ):
                    listed = f"SELECT track.name {source} {where} AND {col} > {average}"
                    counted = f"SELECT COUNT(*) {source} {where} AND {col} > {average}"
                    yield from listed_or_counted(
                        db, listed, counted, options,
                        tuple(o.replace("Which tracks", "How many tracks")
                              .replace("List the tracks", "Count the tracks") for o in options),
                        scope=phrase, cmp=cmp, what=what)  # fmt: skip


def scope_joins(table: str) -> str:
    chain = {
        "genre": ["genre"],
        "mediatype": ["mediatype"],
        "album": ["album"],
        "artist": ["album", "artist"],
        "playlist": ["playlisttrack", "playlist"],
    }[table]
    return " ".join(JOINS[t] for t in chain)  # fmt: skip


SHAPES = {
    "of_groups": of_groups,
    "against_average": against_average,
    "count_groups": count_groups,
    "never": never,
    "rows_vs_average": rows_vs_average,
}


def build_nested_questions(db_path: Path) -> list[dict]:
    return kept_questions(db_path, SHAPES)


def main() -> None:
    from .sql import chinook_db

    with sqlite3.connect(chinook_db()) as db:
        clean = Decontaminator(db)
        for name, shape in SHAPES.items():
            made = list(shape(db))
            kept = [e for e in made if clean.keeps(e) and names_each_once(db, e["target"])]
            print(f"{name}: {len(kept)} kept of {len(made)}")
            for e in kept[:: max(1, len(kept) // 2)][:2]:
                print(f"    {e['input']['question']}\n        {e['target']}")


if __name__ == "__main__":
    main()
