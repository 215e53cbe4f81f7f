"""Greedy-token parity between two evaluation runs (e.g. SGLang on a GPU vs the CPU backend).

    python -m finetune.evaluate --limit 50 --out /tmp/cpu                       # CPU backend
    python3 -m finetune.evaluate --backend sglang --dtype float16 --out $OUT/q  # on the GPU
    python scripts/parity.py /tmp/cpu /tmp/gpu --first 50 --out /tmp/parity \
        --margins adapters.yaml      # + why each mismatch happened (the reference model, CPU)

Reads both runs' ``outputs.jsonl`` and compares, per task and model (base / adapter), the token
ids of the first ``--first`` test prompts: identical sequences, matching tokens up to the shorter
one, and where the first mismatch falls. Writes ``parity.json`` and ``parity.md``.

``--margins CONFIG`` replays each mismatched sequence on the CPU in float32 (the config's base
and adapters, the same chat template) up to its first differing token, and reports the logit
margin there: reference token's logit minus the candidate's. A margin of a few hundredths is a
near-tie that half-precision rounding flips; a large one would be a real divergence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
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


def mismatches(reference: dict, candidate: dict, first: int) -> list[dict]:
    out = []
    for (task, model, index), ref in sorted(reference.items()):
        got = candidate.get((task, model, index))
        if index >= first or got is None or (cut := first_mismatch(ref, got)) is None:
            continue
        out.append({"task": task, "model": model, "index": index, "at": cut,
                    "prefix": ref[:cut], "reference": ref[cut : cut + 1],
                    "candidate": got[cut : cut + 1]})  # fmt: skip
    return out


def margins(config: Path, cases: list[dict]) -> list[dict]:
    """Reference-model (CPU, float32) logits at each first mismatch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.base_model import resolve_base
    from engine.interface import GenerationRequest
    from engine.registry import load_registry
    from engine.text import end_of_turn_ids, prompt_token_ids
    from finetune.data import load_split
    from finetune.tasks import TASKS

    registry = load_registry(config)
    base_dir = resolve_base(registry.base.model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    end = min(end_of_turn_ids(tokenizer))  # a sequence that stopped: its next token was the end
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    by_task = {a.task: a for a in registry.adapters}
    model = PeftModel.from_pretrained(model, str(by_task[cases[0]["task"]].path), cases[0]["task"])
    for task, spec in by_task.items():
        if task not in model.peft_config:
            model.load_adapter(str(spec.path), adapter_name=task)
    rows = []
    for case in cases:
        example = load_split(case["task"], "test")[case["index"]]
        messages = [{"role": "user", "content": TASKS[case["task"]].prompt(example["input"])}]
        ids = prompt_token_ids(tokenizer, GenerationRequest(messages=messages), True)
        base = case["model"] == "base"
        if not base:
            model.set_adapter(case["task"])
        with torch.no_grad(), model.disable_adapter() if base else contextlib.nullcontext():
            logits = model(torch.tensor([ids + case["prefix"]])).logits[0, -1]
        ref, got = (case[k][0] if case[k] else end for k in ("reference", "candidate"))
        top2 = torch.topk(logits, 2).values
        rows.append({
            "task": case["task"], "model": case["model"], "index": case["index"],
            "at": case["at"], "reference_token": tokenizer.decode([ref]),
            "candidate_token": tokenizer.decode([got]),
            "margin": round(float(logits[ref] - logits[got]), 4),
            "top1_minus_top2": round(float(top2[0] - top2[1]), 4),
        })  # fmt: skip
    return rows


def margins_markdown(rows: list[dict]) -> str:
    lines = [
        "| task | model | prompt | at token | reference (CPU fp32) | candidate | logit margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['model']} | {r['index']} | {r['at']} | "
            f"{r['reference_token']!r} | {r['candidate_token']!r} | {r['margin']:.3f} |"
        )
    if rows:
        values = sorted(r["margin"] for r in rows)
        lines.append(
            f"\nLogit margin at the first mismatch: median {values[len(values) // 2]:.3f}, "
            f"largest {values[-1]:.3f} ({len(values)} sequences)."
        )
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--margins", type=Path, metavar="CONFIG",
                        help="replay each mismatch on the CPU with CONFIG's models")  # fmt: skip
    args = parser.parse_args()
    reference, candidate = read_outputs(args.reference), read_outputs(args.candidate)
    rows = compare(reference, candidate, args.first)
    if not rows:
        raise SystemExit("no prompt appears in both runs")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"reference": str(args.reference), "candidate": str(args.candidate)}
    (args.out / "parity.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    text = markdown(rows)
    cases = mismatches(reference, candidate, args.first) if args.margins else []
    if cases:  # nothing to replay when every sequence matched
        found = margins(args.margins, cases)
        (args.out / "margins.json").write_text(json.dumps(found, indent=1))
        text += "\n### Why they differ\n\n" + margins_markdown(found)
    (args.out / "parity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
