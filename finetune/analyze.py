"""Which base fine-tunes best, and do task-complexity heuristics predict the lift?

    python -m finetune.analyze            # shipped SmolLM2 results → out/results/analysis
    python -m finetune.analyze --results smollm2=A/quality.json gemma3-270m=B/quality.json

Per task, from its training split (words = lower-cased ``\\w+`` runs, so no base's tokenizer is
favoured and JSON or SQL punctuation is not a word):
input and output length (mean, standard deviation), distinct outputs (classes) and output
vocabulary, gzip ratio of the outputs (compressed / raw bytes: low = repetitive, predictable
outputs), the share of output words found in the input, and each base's zero-shot score.
It reports each heuristic's Spearman correlation with the lift (fine-tuned − base, points) per base
and pooled, with a permutation p-value — with 5 tasks per base, only |rho| = 1 reaches p < 0.05, so
read these as descriptions, not findings — and a leave-one-task-out linear predictor of the
fine-tuned score from each heuristic against predicting the mean of the other tasks.
Writes heuristics.csv, correlations.csv, loto.csv, analysis.md and two PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import math
import random
import re
import statistics
from pathlib import Path

import matplotlib

from engine.paths import work_dir

from .data import load_split

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = {"smollm2": ROOT / "results" / "finetune" / "smollm2" / "quality.json"}
HEURISTICS = [
    "input_words_mean", "input_words_std", "output_words_mean", "output_words_std",
    "distinct_outputs", "output_vocab", "output_gzip_ratio", "output_in_input",
    "base_zero_shot",
]  # fmt: skip


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def input_text(example: dict) -> str:
    return " ".join(str(v) for v in example["input"].values())


def gzip_ratio(texts: list[str]) -> float:
    raw = "\n".join(texts).encode()
    return len(gzip.compress(raw, mtime=0)) / max(1, len(raw))


def overlap(example: dict) -> float:
    """Share of the output's words that also occur in the input."""
    out = words(example["target"])
    seen = set(words(input_text(example)))
    return sum(w in seen for w in out) / max(1, len(out))


def task_heuristics(examples: list[dict]) -> dict[str, float]:
    """Heuristics of one task from its training examples (``input`` fields + ``target``)."""
    inputs = [len(words(input_text(e))) for e in examples]
    outputs = [len(words(e["target"])) for e in examples]
    targets = [e["target"] for e in examples]
    return {
        "input_words_mean": statistics.fmean(inputs),
        "input_words_std": statistics.pstdev(inputs),
        "output_words_mean": statistics.fmean(outputs),
        "output_words_std": statistics.pstdev(outputs),
        "distinct_outputs": len(set(targets)),
        "output_vocab": len({w for t in targets for w in words(t)}),
        "output_gzip_ratio": gzip_ratio(targets),
        "output_in_input": statistics.fmean(overlap(e) for e in examples),
    }


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spearman(x: list[float], y: list[float], samples: int = 20000) -> tuple[float | None, float]:
    """Spearman's rho and its two-sided permutation p-value (exact up to 8 points)."""
    rx, ry = ranks(x), ranks(y)
    rho = pearson(rx, ry)
    if rho is None:
        return None, 1.0
    if len(x) <= 8:
        perms = [list(p) for p in itertools.permutations(ry)]
    else:
        rng = random.Random(0)
        perms = [rng.sample(ry, len(ry)) for _ in range(samples)]
    extreme = sum(abs(pearson(rx, p) or 0.0) >= abs(rho) - 1e-12 for p in perms)
    return rho, extreme / len(perms)


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def leave_one_task_out(rows: list[dict], heuristic: str) -> dict:
    """Predict each task's fine-tuned score from the other tasks' (heuristic, score) pairs."""
    errors, baseline = [], []
    for task in sorted({r["task"] for r in rows}):
        train = [r for r in rows if r["task"] != task]
        test = [r for r in rows if r["task"] == task]
        a, b = linear_fit([r[heuristic] for r in train], [r["finetuned"] for r in train])
        mean = statistics.fmean(r["finetuned"] for r in train)
        for r in test:
            predicted = min(1.0, max(0.0, a + b * r[heuristic]))
            errors.append(abs(predicted - r["finetuned"]))
            baseline.append(abs(mean - r["finetuned"]))
    return {
        "heuristic": heuristic,
        "loto_mae": statistics.fmean(errors),
        "mean_predictor_mae": statistics.fmean(baseline),
    }


def read_results(path: Path) -> dict[str, dict]:
    """``{task: {metric, base, finetuned, n}}`` from a quality.json (primary metric only)."""
    data = json.loads(Path(path).read_text())
    return {
        r["task"]: {
            "metric": r["metric"],
            "base": r["base"][r["metric"]],
            "finetuned": r["finetuned"][r["metric"]],
            "n": r["n"],
        }
        for r in data["results"]
    }


def build_rows(results: dict[str, dict[str, dict]], heuristics: dict[str, dict]) -> list[dict]:
    rows = []
    for base, by_task in results.items():
        for task, r in by_task.items():
            if task not in heuristics:
                continue
            rows.append({
                "base": base, "task": task, "metric": r["metric"], "n": r["n"],
                "base_score": r["base"], "finetuned": r["finetuned"],
                "lift": (r["finetuned"] - r["base"]) * 100,
                **heuristics[task], "base_zero_shot": r["base"],
            })  # fmt: skip
    return rows


def correlations(rows: list[dict]) -> list[dict]:
    groups = {b: [r for r in rows if r["base"] == b] for b in sorted({r["base"] for r in rows})}
    if len(groups) > 1:
        groups["pooled"] = rows
    out = []
    for heuristic in HEURISTICS:
        for group, members in groups.items():
            rho, p = spearman([r[heuristic] for r in members], [r["lift"] for r in members])
            out.append({"heuristic": heuristic, "group": group, "n": len(members),
                        "rho": rho, "p": p})  # fmt: skip
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_heuristics(rows: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(3, 3, figsize=(12, 10))
    bases = sorted({r["base"] for r in rows})
    for ax, heuristic in zip(axes.flat, HEURISTICS, strict=True):
        for base, marker in zip(bases, "os^v", strict=False):
            mine = [r for r in rows if r["base"] == base]
            ax.scatter([r[heuristic] for r in mine], [r["lift"] for r in mine],
                       marker=marker, label=base)  # fmt: skip
            for r in mine:
                ax.annotate(r["task"], (r[heuristic], r["lift"]), fontsize=7, alpha=0.7)
        ax.set_xlabel(heuristic)
        ax.set_ylabel("lift (points)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("Task heuristics vs fine-tuning lift")
    fig.tight_layout()
    fig.savefig(out / "heuristics_vs_lift.png", dpi=110)
    plt.close(fig)


def plot_bases(rows: list[dict], out: Path) -> None:
    tasks = sorted({r["task"] for r in rows})
    bases = sorted({r["base"] for r in rows})
    width = 0.8 / (2 * len(bases))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, base in enumerate(bases):
        score = {r["task"]: r for r in rows if r["base"] == base}
        for j, (key, alpha) in enumerate((("base_score", 0.45), ("finetuned", 1.0))):
            offset = (2 * i + j) * width - 0.4 + width / 2
            ax.bar([k + offset for k in range(len(tasks))],
                   [score[t][key] if t in score else 0 for t in tasks], width, alpha=alpha,
                   color=f"C{i}", label=f"{base} {'fine-tuned' if j else 'zero-shot'}")  # fmt: skip
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("primary metric (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "base_comparison.png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], corr: list[dict], loto: list[dict]) -> str:
    bases = sorted({r["base"] for r in rows})
    head = "| base | mean zero-shot | mean fine-tuned | mean lift | tasks |"
    lines = ["### Base models", "", head, "|---|---|---|---|---|"]
    for base in bases:
        mine = [r for r in rows if r["base"] == base]
        lines.append(
            f"| {base} | {statistics.fmean(r['base_score'] for r in mine):.3f} | "
            f"{statistics.fmean(r['finetuned'] for r in mine):.3f} | "
            f"{statistics.fmean(r['lift'] for r in mine):+.1f} | {len(mine)} |"
        )
    lines += ["", "| task | " + " | ".join(f"{b} zero-shot → fine-tuned" for b in bases) + " |",
              "|---|" + "---|" * len(bases)]  # fmt: skip
    for task in sorted({r["task"] for r in rows}):
        cells = []
        for base in bases:
            r = next((r for r in rows if r["base"] == base and r["task"] == task), None)
            cells.append(f"{r['base_score']:.3f} → {r['finetuned']:.3f}" if r else "—")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    groups = [*bases, "pooled"] if len(bases) > 1 else bases
    head = "| heuristic | " + " | ".join(groups) + " |"
    lines += ["", "### Spearman correlation with the lift (rho, permutation p)", "", head,
              "|---|" + "---|" * len(groups)]  # fmt: skip
    for heuristic in HEURISTICS:
        cells = []
        for group in groups:
            c = next(c for c in corr if c["heuristic"] == heuristic and c["group"] == group)
            cell = f"{c['rho']:+.2f} (p={c['p']:.2f}, n={c['n']})" if c["rho"] is not None else "—"
            cells.append(cell)
        lines.append(f"| {heuristic} | " + " | ".join(cells) + " |")
    lines += ["", "### Leave-one-task-out prediction of the fine-tuned score (all bases' rows)", "",
              "| heuristic | MAE, linear fit on it | MAE, mean of the other tasks |",
              "|---|---|---|"]  # fmt: skip
    for row in sorted(loto, key=lambda r: r["loto_mae"]):
        lines.append(
            f"| {row['heuristic']} | {row['loto_mae']:.3f} | {row['mean_predictor_mae']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def analyze(results: dict[str, Path], out: Path, heuristics: dict | None = None) -> dict:
    """Run the whole analysis; ``heuristics`` (per task) defaults to the real training splits."""
    scores = {base: read_results(path) for base, path in results.items()}
    if heuristics is None:
        tasks = sorted({t for by_task in scores.values() for t in by_task})
        heuristics = {t: task_heuristics(load_split(t, "train")) for t in tasks}
    rows = build_rows(scores, heuristics)
    if len({r["task"] for r in rows}) < 3:
        raise SystemExit("need results on at least 3 tasks to analyze")
    corr = correlations(rows)
    loto = [leave_one_task_out(rows, h) for h in HEURISTICS]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "heuristics.csv", rows)
    write_csv(out / "correlations.csv", corr)
    write_csv(out / "loto.csv", loto)
    (out / "analysis.md").write_text(markdown(rows, corr, loto))
    plot_heuristics(rows, out)
    plot_bases(rows, out)
    return {"rows": rows, "correlations": corr, "loto": loto}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", nargs="+", metavar="BASE=QUALITY_JSON",
                        help="default: results/finetune/smollm2/quality.json")  # fmt: skip
    parser.add_argument("--out", type=Path, default=work_dir() / "results" / "analysis")
    args = parser.parse_args()
    results = dict(DEFAULT_RESULTS)
    if args.results:
        results = {k: Path(v) for k, _, v in (item.partition("=") for item in args.results)}
    missing = [str(p) for p in results.values() if not Path(p).exists()]
    if missing:
        raise SystemExit(f"missing results (run python -m finetune.evaluate first): {missing}")
    analyze(results, args.out)
    print((args.out / "analysis.md").read_text())


if __name__ == "__main__":
    main()
