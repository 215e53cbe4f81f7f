"""Hand-written SQL test sets: questions written by hand, outside the generators' templates.

    python -m finetune.sql_fresh          # coverage, and each question's nearest generated one
    python -m finetune.evaluate --tasks sql --split fresh --out results/finetune/sql-fresh
    python -m finetune.sql_fresh --by-feature results/finetune/sql-fresh   # → by_feature.md
    python -m finetune.evaluate --tasks sql --split fresh2 --out results/finetune/sql-fresh2
    python -m finetune.sql_fresh --by-feature results/finetune/sql-fresh2 --set fresh2
    python -m finetune.sql_fresh --plot results/finetune/sql-recipes-h200  # → template_vs_fresh.png

``sql_fresh.jsonl`` (77) and ``sql_fresh2.jsonl`` (81 of 87 written later by someone who had
read neither the generators nor the first set; 6 dropped as template-like or already asked)
hold one ``{"question", "sql"}`` per line: questions as a person would ask them (joins of 2-6
tables, GROUP BY / HAVING, top-N, date and price filters, subqueries, the employee self-join,
playlists, media types, invoice lines, support reps), each with a gold query
checked on the real Chinook rows. None is trained on: ``Decontaminator`` drops every generated
training question near a hand-written one (same query shape, wording or result), and
``tests/test_sql_fresh.py`` checks that none is left, nor in the template splits.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from pathlib import Path

from .sql import run_sql

FRESH_FILE = Path(__file__).with_name("sql_fresh.jsonl")
HAND_WRITTEN = {"fresh": FRESH_FILE, "fresh2": Path(__file__).with_name("sql_fresh2.jsonl")}
"""Each hand-written set by its ``--split`` name. ``fresh2`` was written after the training
generators, by someone who had not read them nor the first set."""
MAX_WORD_OVERLAP = 0.6
AGGREGATES = re.compile(r"\b(COUNT|SUM|AVG|MAX|MIN)\s*\(", re.IGNORECASE)
CLAUSES = re.compile(r"\b(?:WHERE|GROUP BY|HAVING|ORDER BY)\b", re.IGNORECASE)
DATE_COLUMNS = re.compile(r"\b(invoicedate|hiredate|birthdate)\b", re.IGNORECASE)
PRICES = re.compile(r"\b(total|unit_price)\b", re.IGNORECASE)


def load_fresh(name: str = "fresh") -> list[dict]:
    """A hand-written set in the shape of ``load_split``: ``{"input": {...}, "target": sql}``."""
    text = HAND_WRITTEN[name].read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"input": {"question": r["question"]}, "target": r["sql"]} for r in rows]


def load_all_hand_written() -> list[dict]:
    return [e for name in HAND_WRITTEN for e in load_fresh(name)]


def literals(sql: str) -> frozenset[str]:
    """The string and number literals of a query (LIMIT's count aside): what it asks about."""
    unlimited = re.sub(r"\bLIMIT\s+\d+", "", sql, flags=re.I)
    return frozenset(re.findall(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b", unlimited))


def tables_of(sql: str) -> frozenset[str]:
    unquoted = re.sub(r"'(?:[^']|'')*'", "''", sql)
    return frozenset(t.lower() for t in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", unquoted, re.I))


def answer_key(sql: str, rows: list[tuple]) -> tuple:
    """Two queries with the same literals and the same rows — each row's values in any order,
    repeats ignored — answer the same question, whatever their joins, DISTINCT or columns. A
    query without literals must also read the same tables: "the media type of most tracks" and
    "the media type of most tracks sold" both answer "MPEG audio file"."""
    said = literals(sql)
    return said or tables_of(sql), frozenset(tuple(sorted(map(repr, row))) for row in rows)


class Decontaminator:
    """Keeps a generated example only if no hand-written question is near it: not the same
    query shape (literals masked), not ≥ 60 % of the same words, not the same subquery clauses
    under another select list (``nested_tail``), not the same distinctive one-value answer
    (``distinctive_value``), not a count of a hand-written list (``counts_a_list``), and not the
    same answer (``answer_key``: a query written with other
    joins, DISTINCT or column order has another shape but answers the same question)."""

    def __init__(self, db: sqlite3.Connection, hand_written: list[dict] | None = None):
        self.db = db
        held_out = load_all_hand_written() if hand_written is None else hand_written
        self.shapes = {skeleton(e["target"]) for e in held_out}
        self.words = [words(e["input"]["question"]) for e in held_out]
        self.answers = {answer_key(e["target"], run_sql(db, e["target"]) or []) for e in held_out}
        self.nested_tails = {t for e in held_out if (t := nested_tail(e["target"]))}
        self.values = {v for e in held_out if (v := distinctive_value(db, e["target"]))}
        self.lists = {
            (len(rows), tables_of(e["target"]), literals(e["target"]))
            for e in held_out
            if len(rows := run_sql(db, e["target"]) or []) > 1
        }

    def keeps(self, example: dict) -> bool:
        rows = run_sql(self.db, example["target"])
        return bool(rows) and not self.near(example, rows)

    def near(self, example: dict, rows: list[tuple]) -> bool:
        """``rows``: what the example's query returns (``run_sql``)."""
        sql, mine = example["target"], words(example["input"]["question"])
        if skeleton(sql) in self.shapes:
            return True
        if any(len(mine & o) / len(mine | o) >= MAX_WORD_OVERLAP for o in self.words):
            return True
        if nested_tail(sql) in self.nested_tails or distinctive_value(self.db, sql) in self.values:
            return True
        return answer_key(sql, rows) in self.answers or self.counts_a_list(sql, rows)

    def counts_a_list(self, sql: str, rows: list[tuple]) -> bool:
        """A count of exactly the rows a hand-written list answer has, over the same tables and
        literals: that list's question with COUNT(*) in its select list."""
        if not re.match(r"\s*SELECT\s+COUNT\(\*\)", sql, re.I) or len(rows) != 1:
            return False
        return (rows[0][0], tables_of(sql), literals(sql)) in self.lists


def nested_tail(sql: str) -> str | None:
    """The shape of a query's clauses from its first WHERE / GROUP BY / HAVING / ORDER BY on,
    where they hold a subquery: the same NOT IN or HAVING … (SELECT …) under another select
    list ("how many genres …" for "which genres …") is the same question."""
    tail = tail_clauses(sql)
    return skeleton(tail) if re.search(r"\bSELECT\b", tail, re.I) else None


def distinctive_value(db: sqlite3.Connection, sql: str) -> str | None:
    """A one-value answer no other question would share by chance (a fraction with more than a
    money amount's two decimals, such as an average; read unrounded, unlike ``run_sql``),
    whatever tables the query read; None for anything else."""
    try:
        rows = db.execute(sql).fetchmany(2)
    except (sqlite3.Error, sqlite3.Warning, ValueError):  # what run_sql also turns away
        return None
    if len(rows) != 1 or len(rows[0]) != 1:
        return None
    value = rows[0][0]
    if isinstance(value, float) and abs(value - round(value, 2)) > 1e-9:
        return f"{value:.6g}"
    return None


def skeleton(sql: str) -> str:
    """A query's shape: string and number literals masked, case and spacing ignored."""
    masked = re.sub(r"'(?:[^']|'')*'", "?", sql)
    masked = re.sub(r"\b\d+(?:\.\d+)?\b", "?", masked)
    return " ".join(masked.lower().split())


def tail_clauses(sql: str) -> str:
    """The query from its first WHERE / GROUP BY / HAVING / ORDER BY on ("" if none)."""
    parts = CLAUSES.split(sql, maxsplit=1)
    return parts[1] if len(parts) == 2 else ""


def is_self_join(sql: str) -> bool:
    tables = re.findall(r"\b(FROM|JOIN)\s+employee\b", sql, re.IGNORECASE)
    return len(tables) > 1 and any(kind.upper() == "JOIN" for kind in tables)


def join_count(sql: str) -> int:
    return len(re.findall(r"\bJOIN\b", sql, re.IGNORECASE))


def features(sql: str) -> set[str]:
    """What a gold query exercises, read from its text (the coverage the tests assert)."""
    upper = sql.upper()
    found = {
        "join": join_count(sql) >= 1,
        "join_3plus_tables": join_count(sql) >= 2,
        "aggregate": bool(AGGREGATES.search(sql)),
        "group_by": "GROUP BY" in upper,
        "having": "HAVING" in upper,
        "order_limit": "ORDER BY" in upper and "LIMIT" in upper,
        "subquery": upper.count("SELECT") > 1,
        "dates": bool(DATE_COLUMNS.search(tail_clauses(sql))),
        "self_join": is_self_join(sql),
        "manager": "REPORTS_TO_ID" in upper,
        "prices": bool(PRICES.search(tail_clauses(sql))),
        "playlist": "PLAYLIST" in upper,
        "mediatype": "MEDIATYPE" in upper,
        "invoiceline": "INVOICELINE" in upper,
        "support_rep": "SUPPORT_REP_ID" in upper,
    }
    return {name for name, present in found.items() if present}


def coverage(examples: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        for name in features(ex["target"]):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def nearest(question: str, others: list[str]) -> tuple[float, str]:
    """The most similar other question by word overlap (Jaccard), with its score."""
    mine = words(question)
    scored = ((len(mine & words(o)) / len(mine | words(o)), o) for o in others)
    return max(scored, default=(0.0, ""))


def generated_examples() -> list[dict]:
    """Every generated question: the template splits and the training-only families."""
    from .data import SPLITS, load_split

    return [e for s in SPLITS for e in load_split("sql", s)]


def answered_right(out_dir: Path, name: str = "fresh") -> dict[str, list[bool]]:
    """Per model of an evaluate run on a hand-written set (``base``, and each adapter by name: a
    run with ``--adapter`` scores several): each question right or not."""
    from .tasks import TASKS

    fresh = load_fresh(name)
    right: dict[str, list[bool]] = {}
    for line in (out_dir / "outputs.jsonl").read_text().splitlines():
        row = json.loads(line)
        gold = fresh[row["index"]]["target"]
        score = TASKS["sql"].score(row["text"], gold)["execution_accuracy"]
        model = "base" if row["model"] == "base" else row["adapter"]
        right.setdefault(model, [False] * len(fresh))[row["index"]] = score == 1.0
    return right


def by_feature_table(right: dict[str, list[bool]], name: str = "fresh") -> str:
    """Right answers per feature of the gold query, for each model."""
    fresh, models = load_fresh(name), sorted(right, key=lambda m: m != "base")
    lines = [
        "| gold query has | n | " + " | ".join(models) + " |",
        "|---" * (2 + len(models)) + "|",
    ]
    for name in ["(all)", *coverage(fresh)]:
        rows = [i for i, e in enumerate(fresh) if name == "(all)" or name in features(e["target"])]
        cells = [f"{sum(right[m][i] for i in rows)}/{len(rows)}" for m in models]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def split_results(folder: Path, split: str) -> list[dict]:
    """The per-adapter results of every evaluate run of ``split`` in ``folder``: ``split/`` and
    ``split-*/`` (e.g. ``fresh-t32/``), each with its ``quality.json``."""
    runs = [folder / split, *sorted(folder.glob(f"{split}-*"))]
    found = [
        json.loads((d / "quality.json").read_text()) for d in runs if (d / "quality.json").exists()
    ]
    return [r for run in found for r in run["results"]]


def plot_template_vs_fresh(folder: Path) -> Path:
    """Grouped bars per adapter: execution accuracy on the template test split (``test/``) and
    on each hand-written set (``fresh/``, ``fresh2/``) there are runs of (``split_results``);
    an adapter a split has no run of has no bar there."""
    from loadtest.report import plt

    runs = {s: found for s in SPLITS if (found := split_results(folder, s))}
    if not runs:
        raise FileNotFoundError(
            f"no evaluate run (quality.json) under {folder}/test, fresh*, fresh2*"
        )
    adapters = list(dict.fromkeys(r["adapter"] for results in runs.values() for r in results))
    fig, ax = plt.subplots(figsize=(7.5 + len(adapters) * 0.3 * (len(runs) - 2), 4))
    width = 0.8 / len(runs)
    for k, (split, results) in enumerate(runs.items()):
        score = {r["adapter"]: r["finetuned"]["execution_accuracy"] for r in results}
        offset = (k - (len(runs) - 1) / 2) * width
        places = [i + offset for i, a in enumerate(adapters) if a in score]
        bars = ax.bar(
            places, [score[a] for a in adapters if a in score], width, label=SPLITS[split]
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(adapters)), adapters, fontsize=8)
    title = "SQL adapters: template vs hand-written" if "test" in runs else "SQL adapters"
    ax.set(ylabel="execution accuracy", ylim=(0, 1.18), title=title)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(loc="upper center", ncol=len(runs), fontsize=8)
    fig.tight_layout()
    path = folder / "template_vs_fresh.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SPLITS = {"test": "template test split", "fresh": "hand-written (fresh)",
          "fresh2": "hand-written, second set (fresh2)"}  # fmt: skip


def print_overlaps() -> None:
    fresh, generated = load_all_hand_written(), generated_examples()
    shapes = {skeleton(e["target"]) for e in generated}
    questions = [e["input"]["question"] for e in generated]
    print(f"{len(fresh)} hand-written questions; coverage: {coverage(fresh)}")
    print("word overlap with the nearest generated question (Jaccard), highest first:")
    rows = [(nearest(e["input"]["question"], questions), e) for e in fresh]
    for (score, other), ex in sorted(rows, key=lambda r: -r[0][0]):
        shared = "  SAME QUERY SHAPE" if skeleton(ex["target"]) in shapes else ""
        print(f"{score:.2f}  {ex['input']['question']}  ~  {other}{shared}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--by-feature", type=Path, metavar="DIR", help="an evaluate --split fresh output folder"
    )
    parser.add_argument("--set", default="fresh", choices=sorted(HAND_WRITTEN),
                        help="the hand-written set of that run (--by-feature)")  # fmt: skip
    plot_help = "DIR/test, DIR/fresh*, DIR/fresh2* (e.g. fresh-t32): evaluate runs → a plot"
    parser.add_argument("--plot", type=Path, metavar="DIR", help=plot_help)
    args = parser.parse_args()
    if args.plot:
        print(plot_template_vs_fresh(args.plot))
    elif args.by_feature:
        table = by_feature_table(answered_right(args.by_feature, args.set), args.set)
        (args.by_feature / "by_feature.md").write_text(table)
        print(table)
    else:
        print_overlaps()


if __name__ == "__main__":
    main()
