"""Which hand-written SQL questions a cached training-only file has a near copy of (the rules of
``finetune.sql_fresh.Decontaminator``), and whether an adapter's stored outputs answer them.

    python lab/sql_near_copies.py ~/.cache/loraland/data/sql/train-only.v5.jsonl \
        --outputs fresh=results/finetune/sql-fresh/outputs.jsonl \
        --outputs fresh2=results/finetune/sql-fresh2/outputs.jsonl

Prints set names and indices only, never a hand-written question's text (the second set stays
unread).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data import read_jsonl
from finetune.sql import chinook_db, execution_match, run_sql
from finetune.sql_fresh import Decontaminator, load_fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("train_only", type=Path)
    parser.add_argument("--outputs", action="append", default=[], metavar="SET=FILE")
    args = parser.parse_args()
    examples, path = read_jsonl(args.train_only), chinook_db()
    with sqlite3.connect(path) as db:
        clean = Decontaminator(db)
        near = [e for e in examples if clean.near(e, run_sql(db, e["target"]) or [])]
        print(f"{len(near)} of {len(examples)} training examples are near a hand-written one")
        for name, file in (item.split("=", 1) for item in args.outputs):
            answers = {
                r["index"]: r["text"] for r in read_jsonl(Path(file)) if r["model"] != "base"
            }
            gold, hit, right = load_fresh(name), 0, 0
            for index, question in enumerate(gold):
                one = Decontaminator(db, [question])
                if any(one.near(e, run_sql(db, e["target"]) or []) for e in near):
                    correct = execution_match(path, answers[index], question["target"])
                    hit, right = hit + 1, right + correct
                    print(f"  {name} #{index}: near a training example, answered {correct}")
            total = sum(execution_match(path, answers[i], q["target"]) for i, q in enumerate(gold))
            print(f"{name}: {total}/{len(gold)}; without the {hit} near: "
                  f"{total - right}/{len(gold) - hit}")  # fmt: skip


if __name__ == "__main__":
    main()
