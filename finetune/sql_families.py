"""Training-only SQL question families: joins, GROUP BY / ORDER BY / LIMIT, HAVING, dates, ….

    python -m finetune.sql_families       # how many questions each family gives, and one of each

The 12 templates in ``sql.py`` ask for one fact about one named row, so an adapter trained on
them alone never writes a join of three tables or a GROUP BY. These families add that, over real
Chinook rows, each with several phrasings. They go into the **train split only**
(``finetune.data.TRAIN_ONLY``), so the template splits — and the old test split's scores — stay
as they were. They were written apart from the hand-written test set (``sql_fresh.jsonl``): other
wording and other question shapes (a family is always about one named artist, album, playlist,
customer, rep, country, genre or month; the fresh set mostly asks about the whole store), and
``tests/test_sql_fresh.py`` checks that no generated query has the shape of a fresh one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .sql import q

PER_FAMILY = 200
MONTHS = ("January February March April May June July August September October November "
          "December").split()  # fmt: skip
MONTH_NAME = "CASE substr(invoicedate, 6, 2) " + " ".join(
    f"WHEN '{i:02d}' THEN '{name}'" for i, name in enumerate(MONTHS, 1)
) + " END"  # fmt: skip

ARTISTS = (
    "SELECT DISTINCT artist.name AS artist FROM artist JOIN album ON album.artist_id = artist.id"
)
ALBUMS = "SELECT title AS album FROM album GROUP BY title HAVING COUNT(*) = 1"  # unambiguous titles
PLAYLISTS = (
    "SELECT playlist.name AS playlist FROM playlist JOIN playlisttrack ON "
    "playlisttrack.playlist_id = playlist.id WHERE playlist.name IN "
    "(SELECT name FROM playlist GROUP BY name HAVING COUNT(*) = 1) GROUP BY playlist.id"
)
CUSTOMERS = "SELECT firstname AS first, lastname AS last FROM customer"
HAS_MANAGER = (
    "SELECT firstname AS first, lastname AS last FROM employee WHERE reports_to_id IS NOT NULL"
)
TOP_N = "(SELECT 2 AS n UNION SELECT 3 UNION SELECT 4 UNION SELECT 5)"

ARTIST_TRACKS = (
    "FROM track JOIN album ON track.album_id = album.id "
    "JOIN artist ON album.artist_id = artist.id WHERE artist.name = {artist}"
)
PLAYLIST_GENRES = (
    "FROM playlisttrack JOIN playlist ON playlisttrack.playlist_id = playlist.id "
    "JOIN track ON playlisttrack.track_id = track.id JOIN genre ON track.genre_id = genre.id "
    "WHERE playlist.name = {playlist}"
)
GENRE_SALES_IN_YEAR = (
    "FROM invoiceline JOIN invoice ON invoiceline.invoice_id = invoice.id "
    "JOIN track ON invoiceline.track_id = track.id JOIN genre ON track.genre_id = genre.id "
    "WHERE strftime('%Y', invoice.invoicedate) = {year} GROUP BY genre.id"
)
MANAGER_OF = (
    "FROM employee JOIN employee AS manager ON employee.reports_to_id = manager.id "
    "WHERE employee.firstname = {first} AND employee.lastname = {last}"
)
CUSTOMER_NAMED = "customer.firstname = {first} AND customer.lastname = {last}"


@dataclass(frozen=True)
class Family:
    """Questions about the rows of ``source``; ``{column}`` in ``sql`` is filled quoted."""

    name: str
    source: str
    phrasings: tuple[str, ...]
    sql: str
    ranked_by: str = ""  # top-N: the ranking values, best first; a tie at the cut drops the row


FAMILIES = [
    Family(
        "artist_track_count",
        ARTISTS,
        ("Count the songs {artist} has in the store, over all their albums.",
         "What is the number of tracks credited to {artist}?",
         "{artist}: how many tracks in total, all albums together?"),
        "SELECT COUNT(*) " + ARTIST_TRACKS,
    ),
    Family(
        "artist_genres",
        ARTISTS,
        ("What genres does {artist}'s music fall under?",
         "Name the genres of the tracks by {artist}.",
         "In which genres does {artist} have songs?"),
        "SELECT DISTINCT genre.name FROM artist JOIN album ON album.artist_id = artist.id "
        "JOIN track ON track.album_id = album.id JOIN genre ON track.genre_id = genre.id "
        "WHERE artist.name = {artist}",
    ),
    Family(
        "artist_shortest_tracks",
        f"SELECT artist, n FROM ({ARTISTS}), {TOP_N}",
        ("Give the {n} shortest songs by {artist}.",
         "Which {n} tracks by {artist} have the shortest running time?",
         "Name {artist}'s {n} briefest tracks."),
        "SELECT track.name " + ARTIST_TRACKS + " ORDER BY track.milliseconds LIMIT {n}",
        ranked_by="SELECT track.milliseconds " + ARTIST_TRACKS + " ORDER BY 1",
    ),
    Family(
        "artist_revenue",
        ARTISTS,
        ("How much money have {artist}'s songs made?",
         "What is the total revenue from tracks by {artist}?",
         "Add up what customers have paid for {artist} tracks."),
        "SELECT SUM(invoiceline.unit_price * invoiceline.quantity) FROM invoiceline "
        "JOIN track ON invoiceline.track_id = track.id JOIN album ON track.album_id = album.id "
        "JOIN artist ON album.artist_id = artist.id WHERE artist.name = {artist}",
    ),
    Family(
        "artist_albums_over_k_tracks",
        "SELECT artist.name AS artist, CAST(AVG(size) AS INTEGER) AS k FROM (SELECT "
        "album.artist_id AS owner, COUNT(*) AS size FROM album JOIN track ON track.album_id = "
        "album.id GROUP BY album.id) JOIN artist ON artist.id = owner GROUP BY artist.id "
        "HAVING COUNT(*) > 1",
        ("Which albums by {artist} contain more than {k} tracks?",
         "List {artist}'s albums that have over {k} songs.",
         "Of {artist}'s records, which have more than {k} tracks on them?"),
        "SELECT album.title FROM album JOIN artist ON album.artist_id = artist.id "
        "JOIN track ON track.album_id = album.id WHERE artist.name = {artist} "
        "GROUP BY album.id HAVING COUNT(*) > {k}",
    ),
    Family(
        "genre_top_artists",
        f"SELECT genre.name AS genre, n FROM genre, {TOP_N}",
        ("Which {n} artists have recorded the most {genre} tracks?",
         "List the top {n} artists by number of {genre} songs.",
         "Rank artists by how many {genre} tracks they have; give the first {n}."),
        "SELECT artist.name FROM artist JOIN album ON album.artist_id = artist.id "
        "JOIN track ON track.album_id = album.id JOIN genre ON track.genre_id = genre.id "
        "WHERE genre.name = {genre} GROUP BY artist.id ORDER BY COUNT(*) DESC LIMIT {n}",
        ranked_by="SELECT COUNT(*) FROM album JOIN track ON track.album_id = album.id "
        "JOIN genre ON track.genre_id = genre.id WHERE genre.name = {genre} "
        "GROUP BY album.artist_id ORDER BY 1 DESC",
    ),
    Family(
        "genre_longest_seconds",
        "SELECT name AS genre FROM genre",
        ("How long, in seconds, is the longest {genre} track?",
         "What is the maximum length in seconds of a {genre} song?",
         "Longest {genre} track: its duration in seconds?"),
        "SELECT MAX(track.milliseconds) / 1000.0 FROM track JOIN genre ON "
        "track.genre_id = genre.id WHERE genre.name = {genre}",
    ),
    Family(
        "genre_price_range",
        "SELECT name AS genre FROM genre",
        ("What are the lowest and highest prices of {genre} tracks?",
         "Give the minimum and maximum unit price among {genre} songs.",
         "Price range of the {genre} tracks: cheapest and dearest?"),
        "SELECT MIN(track.unit_price), MAX(track.unit_price) FROM track JOIN genre ON "
        "track.genre_id = genre.id WHERE genre.name = {genre}",
    ),
    Family(
        "album_minutes",
        ALBUMS,
        ("What is the total playing time of {album} in minutes?",
         "Add up the track lengths on the album {album} and give the result in minutes."),
        "SELECT SUM(track.milliseconds) / 60000.0 FROM track JOIN album ON "
        "track.album_id = album.id WHERE album.title = {album}",
    ),
    Family(
        "album_media_types",
        ALBUMS,
        ("What media types are the tracks of {album} in?",
         "In which file formats does the album {album} come?",
         "Name the media types used by songs on {album}."),
        "SELECT DISTINCT mediatype.name FROM track JOIN album ON track.album_id = album.id "
        "JOIN mediatype ON track.mediatype_id = mediatype.id WHERE album.title = {album}",
    ),
    Family(
        "album_revenue",
        ALBUMS,
        ("How much revenue have the tracks of {album} brought in?",
         "What have sales of songs from {album} earned in total?",
         "Total dollar sales for the album {album}?"),
        "SELECT SUM(invoiceline.unit_price * invoiceline.quantity) FROM invoiceline "
        "JOIN track ON invoiceline.track_id = track.id JOIN album ON track.album_id = album.id "
        "WHERE album.title = {album}",
    ),
    Family(
        "album_tracks_above_album_average",
        ALBUMS,
        ("Which songs on {album} are longer than that album's average track?",
         "On the album {album}, which tracks run longer than the album's mean length?"),
        "SELECT track.name FROM track JOIN album ON track.album_id = album.id "
        "WHERE album.title = {album} AND track.milliseconds > "
        "(SELECT AVG(other.milliseconds) FROM track AS other WHERE other.album_id = album.id)",
    ),
    Family(
        "album_unpurchased_tracks",
        ALBUMS,
        ("List the songs on {album} that nobody has purchased.",
         "Which tracks of the album {album} have zero sales?"),
        "SELECT track.name FROM track JOIN album ON track.album_id = album.id "
        "WHERE album.title = {album} AND track.id NOT IN (SELECT track_id FROM invoiceline)",
    ),
    Family(
        "track_media_type",
        "SELECT name AS track FROM track GROUP BY name HAVING COUNT(*) = 1",
        ("In which file format is the track {track} stored?",
         "What media type does {track} come as?",
         "Tell me the media type of the song {track}."),
        "SELECT mediatype.name FROM track JOIN mediatype ON "
        "track.mediatype_id = mediatype.id WHERE track.name = {track}",
    ),
    Family(
        "playlist_genre_count",
        "SELECT chosen.playlist, genre.name AS genre FROM (" + PLAYLISTS + ") AS chosen "
        "JOIN playlist ON playlist.name = chosen.playlist JOIN playlisttrack ON "
        "playlisttrack.playlist_id = playlist.id JOIN track ON playlisttrack.track_id = track.id "
        "JOIN genre ON track.genre_id = genre.id GROUP BY playlist.id, genre.id",
        ("How many {genre} tracks does the playlist {playlist} include?",
         "Count the tracks of genre {genre} in the {playlist} playlist.",
         "On the {playlist} playlist, how many tracks are {genre}?"),
        "SELECT COUNT(*) " + PLAYLIST_GENRES + " AND genre.name = {genre}",
    ),
    Family(
        "playlist_genre_breakdown",
        PLAYLISTS,
        ("Break down the playlist {playlist} by genre: each genre and its number of tracks.",
         "For the {playlist} playlist, give every genre with how many of its tracks are on it."),
        "SELECT genre.name, COUNT(*) " + PLAYLIST_GENRES + " GROUP BY genre.id",
    ),
    Family(
        "playlist_genres_over_k",
        f"SELECT playlist, k FROM ({PLAYLISTS}), (SELECT 2 AS k UNION SELECT 10 UNION SELECT 50)",
        ("Which genres have more than {k} tracks on the {playlist} playlist?",
         "On {playlist}, which genres are represented by over {k} songs?"),
        "SELECT genre.name " + PLAYLIST_GENRES + " GROUP BY genre.id HAVING COUNT(*) > {k}",
    ),
    Family(
        "invoice_tracks",
        "SELECT id AS invoice FROM invoice",
        ("Which songs were bought on invoice {invoice}?",
         "List the track names on invoice number {invoice}.",
         "What tracks does invoice #{invoice} contain?"),
        "SELECT track.name FROM invoiceline JOIN track ON invoiceline.track_id = track.id "
        "WHERE invoiceline.invoice_id = {invoice}",
    ),
    Family(
        "customer_genres",
        CUSTOMERS,
        ("What genres of music has {first} {last} bought?",
         "Which genres appear in {first} {last}'s purchases?"),
        "SELECT DISTINCT genre.name FROM customer JOIN invoice ON invoice.customer_id = "
        "customer.id JOIN invoiceline ON invoiceline.invoice_id = invoice.id JOIN track ON "
        "invoiceline.track_id = track.id JOIN genre ON track.genre_id = genre.id WHERE "
        + CUSTOMER_NAMED,
    ),
    Family(
        "customer_spend_in_year",
        "SELECT DISTINCT firstname AS first, lastname AS last, strftime('%Y', invoicedate) "
        "AS year FROM customer JOIN invoice ON invoice.customer_id = customer.id",
        ("How much did {first} {last} spend in {year}?",
         "What was {first} {last}'s total purchase amount during {year}?",
         "Sum of {first} {last}'s invoices from {year}?"),
        "SELECT SUM(invoice.total) FROM invoice JOIN customer ON invoice.customer_id = "
        "customer.id WHERE " + CUSTOMER_NAMED + " AND strftime('%Y', invoice.invoicedate) = {year}",
    ),
    Family(
        "customer_invoices_over",
        "SELECT firstname AS first, lastname AS last, CAST(AVG(total) AS INTEGER) AS x "
        "FROM customer JOIN invoice ON invoice.customer_id = customer.id GROUP BY customer.id",
        ("On which dates did {first} {last} get an invoice of more than {x} dollars?",
         "When was {first} {last} billed over ${x}? Give the invoice dates.",
         "List the dates of {first} {last}'s invoices with a total above {x}."),
        "SELECT invoice.invoicedate FROM invoice JOIN customer ON invoice.customer_id = "
        "customer.id WHERE " + CUSTOMER_NAMED + " AND invoice.total > {x}",
    ),
    Family(
        "country_buyers_in_year",
        "SELECT DISTINCT country, strftime('%Y', invoicedate) AS year FROM customer "
        "JOIN invoice ON invoice.customer_id = customer.id",
        ("Which customers from {country} made a purchase in {year}? First and last names.",
         "Name the customers in {country} who bought something during {year}.",
         "Who in {country} placed an order in {year}? Give first and last names."),
        "SELECT DISTINCT customer.firstname, customer.lastname FROM customer JOIN invoice ON "
        "invoice.customer_id = customer.id WHERE customer.country = {country} AND "
        "invoice.invoicedate BETWEEN {year} || '-01-01' AND {year} || '-12-31T23:59:59Z'",
    ),
    Family(
        "month_billing_cities",
        f"SELECT DISTINCT substr(invoicedate, 1, 7) AS month, {MONTH_NAME} AS month_name, "
        "substr(invoicedate, 1, 4) AS year FROM invoice",
        ("Which cities were invoices billed to in {month_name} {year}?",
         "List the billing cities of the orders from {month_name} {year}.",
         "Where did our {month_name} {year} invoices go? Just the cities."),
        "SELECT DISTINCT billingcity FROM invoice WHERE strftime('%Y-%m', invoicedate) = {month}",
    ),
    Family(
        "year_top_genres_sold",
        "SELECT DISTINCT strftime('%Y', invoicedate) AS year, n FROM invoice, " + TOP_N,
        ("What were the {n} best-selling genres of {year}, counting tracks sold?",
         "In {year}, which {n} genres sold the most tracks?"),
        "SELECT genre.name " + GENRE_SALES_IN_YEAR
        + " ORDER BY SUM(invoiceline.quantity) DESC LIMIT {n}",
        ranked_by="SELECT SUM(invoiceline.quantity) " + GENRE_SALES_IN_YEAR + " ORDER BY 1 DESC",
    ),
    Family(
        "city_support_reps",
        "SELECT DISTINCT city FROM customer",
        ("Which employees support the customers living in {city}?",
         "Name the sales agents assigned to customers in {city}.",
         "Customers in {city} are looked after by which staff members?"),
        "SELECT DISTINCT employee.firstname, employee.lastname FROM customer JOIN employee ON "
        "customer.support_rep_id = employee.id WHERE customer.city = {city}",
    ),
    Family(
        "rep_sales_in_year",
        "SELECT DISTINCT employee.firstname AS first, employee.lastname AS last, "
        "strftime('%Y', invoice.invoicedate) AS year FROM employee JOIN customer ON "
        "customer.support_rep_id = employee.id JOIN invoice ON invoice.customer_id = customer.id",
        ("What did the customers of {first} {last} spend in {year}?",
         "Total invoiced in {year} to customers whose rep is {first} {last}?",
         "How much did {first} {last}'s customers buy in {year}, in dollars?"),
        "SELECT SUM(invoice.total) FROM invoice JOIN customer ON invoice.customer_id = "
        "customer.id JOIN employee ON customer.support_rep_id = employee.id WHERE "
        "employee.firstname = {first} AND employee.lastname = {last} AND "
        "strftime('%Y', invoice.invoicedate) = {year}",
    ),
    Family(
        "manager_title",
        HAS_MANAGER,
        ("What job title does {first} {last}'s boss have?",
         "{first} {last} reports to someone: what is that person's title?",
         "Give the title of the employee that {first} {last} reports to."),
        "SELECT manager.title " + MANAGER_OF,
    ),
    Family(
        "manager_hire_date",
        HAS_MANAGER,
        ("When was {first} {last}'s manager hired?",
         "On what date did the supervisor of {first} {last} join the company?",
         "Hire date of the person {first} {last} reports to?"),
        "SELECT manager.hiredate " + MANAGER_OF,
    ),
    Family(
        "report_titles",
        "SELECT DISTINCT manager.firstname AS first, manager.lastname AS last FROM employee "
        "JOIN employee AS manager ON employee.reports_to_id = manager.id",
        ("What are the job titles of the people who report to {first} {last}?",
         "{first} {last} supervises staff with which titles?",
         "Which titles do {first} {last}'s direct reports hold?"),
        "SELECT DISTINCT employee.title FROM employee JOIN employee AS manager ON "
        "employee.reports_to_id = manager.id WHERE manager.firstname = {first} AND "
        "manager.lastname = {last}",
    ),
]  # fmt: skip


def fill(template: str, row: dict) -> str:
    """A gold query for one source row: text values quoted, numbers as they are."""
    return template.format(**{k: q(v) if isinstance(v, str) else v for k, v in row.items()})


def clear_cut(db: sqlite3.Connection, family: Family, row: dict) -> bool:
    """For a top-N family: more than N candidates and no tie between the N-th and the next."""
    if not family.ranked_by:
        return True
    values = [r[0] for r in db.execute(fill(family.ranked_by, row))]
    n = row["n"]
    return len(values) > n and values[n - 1] != values[n]


def has_answer(db: sqlite3.Connection, sql: str) -> bool:
    """Whether a gold query returns a value; a broken query raises (no family loses rows)."""
    return any(v is not None for r in db.execute(sql).fetchall() for v in r)


def source_rows(db: sqlite3.Connection, family: Family) -> list[dict]:
    """At most PER_FAMILY rows of the family's source, spread over all of them."""
    cursor = db.cursor()
    cursor.row_factory = sqlite3.Row
    rows = [dict(r) for r in cursor.execute(family.source)]
    return rows[:: max(1, len(rows) // PER_FAMILY)][:PER_FAMILY]


def family_examples(db: sqlite3.Connection, family: Family) -> Iterator[dict]:
    """One phrasing per row, in turn; more (up to all) where the source has few rows."""
    rows = source_rows(db, family)
    per_row = max(1, min(len(family.phrasings), PER_FAMILY // max(1, len(rows))))
    for i, row in enumerate(rows):
        sql = fill(family.sql, row)
        if not (clear_cut(db, family, row) and has_answer(db, sql)):
            continue
        for j in range(per_row):
            phrasing = family.phrasings[(i + j) % len(family.phrasings)]
            yield {"input": {"question": phrasing.format(**row)}, "target": sql}


def build_family_questions(db_path: Path) -> list[dict]:
    """Every family's questions, kept only where the gold query returns something."""
    with sqlite3.connect(db_path) as db:
        return [ex for family in FAMILIES for ex in family_examples(db, family)]


def main() -> None:
    from .sql import chinook_db

    with sqlite3.connect(chinook_db()) as db:
        for family in FAMILIES:
            examples = list(family_examples(db, family))
            sample = examples[0]["input"]["question"] if examples else "-"
            print(f"{family.name:34s} {len(examples):4d}  {sample}")


if __name__ == "__main__":
    main()
