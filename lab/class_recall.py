"""Per-class recall of the classification adapters, from evaluation runs' stored outputs.

    python lab/class_recall.py results/finetune/smollm2 results/finetune/smollm2-60x8 \
        results/finetune/gemma3-270m --first 60

Accuracy rewards the majority class (spam: 52 of the first 60 test messages are ham); this shows
what each adapter does with every class. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data import load_split
from finetune.tasks import TASKS

CLASSIFIERS = ("spam", "sentiment", "news")


def recall(run: Path, task: str, first: int) -> dict[str, tuple[int, int]]:
    """``{class: (right, total)}`` of the adapter's answers on the first ``first`` examples."""
    examples = load_split(task, "test")
    right, total = Counter(), Counter()
    for line in (run / "outputs.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["task"] == task and row["model"] == "adapter" and row["index"] < first:
            target = examples[row["index"]]["target"]
            total[target] += 1
            right[target] += int(TASKS[task].score(row["text"], target)["accuracy"])
    return {label: (right[label], total[label]) for label in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--first", type=int, default=60)
    args = parser.parse_args()
    print(f"| run | task | right / total per class (first {args.first} test examples) |")
    print("|---|---|---|")
    for run in args.runs:
        for task in CLASSIFIERS:
            cells = ", ".join(f"{k} {r}/{n}" for k, (r, n) in recall(run, task, args.first).items())
            print(f"| {run} | {task} | {cells} |")


if __name__ == "__main__":
    main()
