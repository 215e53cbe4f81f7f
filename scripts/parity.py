"""Greedy-token parity between two evaluation runs (e.g. SGLang on a GPU vs the CPU backend).

    python -m finetune.evaluate --limit 50 --out /tmp/cpu                       # CPU backend
    python3 -m finetune.evaluate --backend sglang --dtype float16 --out $OUT/q  # on the GPU
    python scripts/parity.py /tmp/cpu results/gpu/parity-run --first 50 --out results/gpu

Reads both runs' ``outputs.jsonl`` and compares, per task and model (base / adapter), the token
ids of the first ``--first`` test prompts: identical sequences, matching tokens up to the shorter
one, and where the first mismatch falls. Writes ``parity.json`` and ``parity.md``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def read_outputs(run: Path) -> dict[tuple[str, str, int], list[int]]:
    rows = (json.loads(line) for line in (run / "outputs.jsonl").read_text().splitlines())
    return {(r["task"], r["model"], r["index"]): r["ids"] for r in rows}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token; None when the sequences are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(reference: dict, candidate: dict, first: int) -> list[dict]:
    groups: dict[tuple[str, str], list[int | None]] = defaultdict(list)
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for (task, model, index), ref in sorted(reference.items()):
        if index >= first or (task, model, index) not in candidate:
            continue
        got = candidate[(task, model, index)]
        cut = first_mismatch(ref, got)
        groups[(task, model)].append(cut)
        same = len(ref) if cut is None else cut
        tokens[(task, model)][0] += same
        tokens[(task, model)][1] += max(len(ref), len(got))
    return [
        {
            "task": task,
            "model": model,
            "prompts": len(cuts),
            "identical": sum(c is None for c in cuts),
            "token_match": round(tokens[(task, model)][0] / max(1, tokens[(task, model)][1]), 4),
            "first_mismatch_tokens": sorted(c for c in cuts if c is not None),
        }
        for (task, model), cuts in groups.items()
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | model | prompts | identical | tokens matching | first mismatch at token |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = ", ".join(map(str, r["first_mismatch_tokens"][:8])) or "—"
        lines.append(
            f"| {r['task']} | {r['model']} | {r['prompts']} | {r['identical']} | "
            f"{r['token_match']:.1%} | {where} |"
        )
    total, same = sum(r["prompts"] for r in rows), sum(r["identical"] for r in rows)
    lines.append(f"\n**{same}/{total} sequences identical ({same / max(1, total):.1%}).**")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="evaluation run folder (outputs.jsonl)")
    parser.add_argument("candidate", type=Path, help="evaluation run folder (outputs.jsonl)")
    parser.add_argument("--first", type=int, default=50, help="prompts per task compared")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = compare(read_outputs(args.reference), read_outputs(args.candidate), args.first)
    if not rows:
        raise SystemExit("no prompt appears in both runs")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"reference": str(args.reference), "candidate": str(args.candidate)}
    (args.out / "parity.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (args.out / "parity.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
