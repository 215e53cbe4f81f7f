"""What merging keeps: each merged adapter's score on every task against the base's and the task's
own adapter's, as the share of the own adapter's lift it keeps, ``(merged − base) / (own − base)``.

    python -m finetune.evaluate --limit 100 --interleave --set base_weights='"fp16"' \\
        --out out/merge-eval/own                                   # each adapter on its task
    python -m finetune.evaluate --config out/merges/merged.yaml --limit 100 --interleave \\
        --set base_weights='"fp16"' --adapter five-cat five-svd --out out/merge-eval/merged
    python -m finetune.merge_report --own out/merge-eval/own --merged out/merge-eval/merged \\
        [more runs of merges …] --out results/combine/merges

The runs must score the same examples (the same ``--limit`` and split; it stops otherwise). Where
the base scored differently in a run of merges (fp16 batches may flip a rare greedy token), the
report says so and uses the own run's base. Writes ``merges.json``, ``merges.md`` and
``lift_kept.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loadtest.report import plt

KEEP_GOAL = 0.8  # issue #18: keep at least 80 % of each task's lift
MIN_LIFT_EXAMPLES = 3


def read_results(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "quality.json").read_text())["results"]


def score(result: dict, model: str) -> float:
    return result[model][result["metric"]]


def task_references(own: list[dict], merged: list[dict]) -> dict[str, dict]:
    """Per task: its metric, example count, the base's score and its own adapter's."""
    if not own:
        raise SystemExit("--own holds no results")
    tasks = [r["task"] for r in own]
    if len(set(tasks)) != len(tasks):
        raise SystemExit(
            f"--own scores a task more than once: {sorted(tasks)} (one own adapter each)"
        )
    refs = {
        r["task"]: {
            "metric": r["metric"],
            "n": r["n"],
            "base": score(r, "base"),
            "own": score(r, "finetuned"),
        }
        for r in own
    }
    for r in merged:
        ref = refs.get(r["task"])
        if ref is None:
            raise SystemExit(f"task {r['task']}: no own-adapter result to compare with")
        if r["n"] != ref["n"]:
            raise SystemExit(f"task {r['task']}: {r['n']} examples here, {ref['n']} in --own")
        ref.setdefault("base_in_merged_run", set()).add(score(r, "base"))
    for ref in refs.values():  # fp16 batches may flip a rare greedy token of the base
        ref["base_in_merged_run"] = sorted(ref.get("base_in_merged_run", ()))
    return refs


def lift_kept(value: float, ref: dict) -> float | None:
    """None where the own adapter's lift is under ``MIN_LIFT_EXAMPLES`` examples' worth (a share
    of a lift that small is noise)."""
    lift = ref["own"] - ref["base"]
    return (value - ref["base"]) / lift if lift * ref["n"] >= MIN_LIFT_EXAMPLES else None


def table(own: list[dict], merged: list[dict]) -> dict:
    refs = task_references(own, merged)
    rows: dict[str, dict[str, dict]] = {}
    for r in merged:
        value = score(r, "finetuned")
        rows.setdefault(r["adapter"], {})[r["task"]] = {
            "score": value,
            "kept": lift_kept(value, refs[r["task"]]),
        }
    return {"tasks": refs, "merged": rows}


def worst_kept(cells: dict[str, dict]) -> float | None:
    """The smallest share kept over the tasks the merge was scored on."""
    kept = [c["kept"] for c in cells.values() if c["kept"] is not None]
    return min(kept) if kept else None


def example_counts(refs: dict[str, dict]) -> str:
    low, high = min(r["n"] for r in refs.values()), max(r["n"] for r in refs.values())
    return str(low) if low == high else f"{low}–{high}"


def markdown(report: dict, command: str) -> str:
    tasks = list(report["tasks"])
    refs = report["tasks"]
    lines = [
        "### What merging keeps",
        "",
        f"`{command}`",
        "",
        "Score on each task, and in brackets the share of the task's own adapter's lift over the "
        f"base that the merge keeps. First {example_counts(refs)} test examples per task.",
        "",
        "| adapter | "
        + " | ".join(f"{t} ({refs[t]['metric']})" for t in tasks)
        + " | worst kept |",
        "|---" * (len(tasks) + 2) + "|",
        "| base | " + " | ".join(f"{refs[t]['base']:.3f}" for t in tasks) + " | |",
        "| own adapter | " + " | ".join(f"{refs[t]['own']:.3f}" for t in tasks) + " | 100 % |",
    ]
    for name, cells in report["merged"].items():
        row = []
        for t in tasks:
            cell = cells.get(t)
            if cell is None:
                row.append("—")
            elif cell["kept"] is None:
                row.append(f"{cell['score']:.3f}")
            else:
                row.append(f"{cell['score']:.3f} ({cell['kept']:.0%})")
        worst = worst_kept(cells)
        lines.append(
            f"| {name} | " + " | ".join(row) + f" | {'—' if worst is None else f'{worst:.0%}'} |"
        )
    moved = [t for t in tasks if set(refs[t]["base_in_merged_run"]) - {refs[t]["base"]}]
    if moved:
        lines += [
            "",
            "The base's score differed in the merged run on: "
            + ", ".join(
                f"{t} ({', '.join(f'{b:.3f}' for b in refs[t]['base_in_merged_run'])})"
                for t in moved
            )
            + "; shares use the own run's base.",
        ]
    keepers = [
        name
        for name, cells in report["merged"].items()
        if set(cells) == set(tasks) and (worst_kept(cells) or 0) >= KEEP_GOAL
    ]
    goal = f"≥ {KEEP_GOAL:.0%} of the lift on every task"
    lines += [
        "",
        f"No share where the own adapter's lift is under {MIN_LIFT_EXAMPLES} examples' worth.",
        f"Merges that keep {goal}: {', '.join(keepers) if keepers else 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    tasks = list(report["tasks"])
    names = list(report["merged"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colours = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        cells = report["merged"][name]
        kept = [(cells.get(t) or {}).get("kept") for t in tasks]
        x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        heights = [100 * k if k is not None else 0 for k in kept]
        ax.bar(x, heights, width, label=name, color=colours[i % len(colours)])
    ax.axhline(100 * KEEP_GOAL, color="grey", ls="--", lw=0.8, label=f"goal {KEEP_GOAL:.0%}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("share of the own adapter's lift kept (%)")
    ax.set_title("What merging keeps, per task")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--own", type=Path, required=True, help="evaluate's run of the own adapters"
    )
    parser.add_argument(
        "--merged", type=Path, nargs="+", required=True, help="evaluate's runs of the merges"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    merged = [result for run in args.merged for result in read_results(run)]
    report = table(read_results(args.own), merged)
    runs = " ".join(map(str, args.merged))
    command = f"python -m finetune.merge_report --own {args.own} --merged {runs} --out {args.out}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merges.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "merges.md").write_text(markdown(report, command))
    plot(report, args.out / "lift_kept.png")
    print(markdown(report, command))


if __name__ == "__main__":
    main()
