"""Two trees' runs of one measurement, alternated (before-1, after-1, before-2, ...): each
figure per round, after ÷ before within the round, and the median [range] over rounds.

    python lab/tree_ab.py DIR --figure "TTFT ms=results.json:rounds.0.points.think.ttft_p50*1000" \
        [--figure ...] [--title TEXT]    # → DIR/ab.md, DIR/ab.json, DIR/ab.png

``DIR`` holds ``before-N`` and ``after-N`` folders (any N; a round needs both). A figure is
``label=FILE:dotted.path`` (list indices as numbers), optionally ``*SCALE``; FILE is relative to
each run's folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def parse_figure(spec: str) -> tuple[str, str, list[str], float]:
    label, _, where = spec.partition("=")
    where, _, scale = where.partition("*")
    file, _, path = where.partition(":")
    if not (label and file and path):
        raise SystemExit(f"--figure {spec!r}: give LABEL=FILE:dotted.path[*SCALE]")
    return label, file, path.split("."), float(scale or 1)


def value_at(run: Path, file: str, path: list[str], scale: float) -> float | None:
    node = json.loads((run / file).read_text())
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node.get(key)
        if node is None:
            return None
    return node * scale


def rounds_of(folder: Path) -> list[str]:
    names = {p.name.split("-", 1)[1] for p in folder.glob("before-*")}
    both = [n for n in names if (folder / f"after-{n}").is_dir()]
    return sorted(both, key=lambda n: (len(n), n))


def compare(folder: Path, specs: list[str]) -> dict:
    table = {"rounds": rounds_of(folder), "figures": {}}
    for spec in specs:
        label, file, path, scale = parse_figure(spec)
        rows = []
        for n in table["rounds"]:
            before = value_at(folder / f"before-{n}", file, path, scale)
            after = value_at(folder / f"after-{n}", file, path, scale)
            ratio = after / before if before and after is not None else None
            rows.append({"round": n, "before": before, "after": after, "ratio": ratio})
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        summary = (
            {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            if ratios
            else None
        )
        table["figures"][label] = {"rows": rows, "after_over_before": summary}
    return table


def cell(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(table: dict, title: str) -> str:
    heads = [f"round {n}: before / after" for n in table["rounds"]]
    lines = [f"### {title}", "",
             "| figure | " + " | ".join(heads) + " | after ÷ before, median [range] |",
             "|---|" + "---|" * (len(heads) + 1)]  # fmt: skip
    for label, figure in table["figures"].items():
        cells = [f"{cell(r['before'])} / {cell(r['after'])}" for r in figure["rows"]]
        s = figure["after_over_before"]
        ratio = "—" if s is None else f"**{s['median']:.2f}** [{s['min']:.2f}–{s['max']:.2f}]"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, title: str, path: Path) -> None:
    """Each figure's after ÷ before per round (dots) and their median (bar), 1 = no change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table["figures"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    for x, label in enumerate(labels):
        figure = table["figures"][label]
        ratios = [r["ratio"] for r in figure["rows"] if r["ratio"] is not None]
        if figure["after_over_before"]:
            ax.bar(x, figure["after_over_before"]["median"], 0.6, color="tab:blue", alpha=0.5)
        ax.plot([x] * len(ratios), ratios, "o", color="tab:blue")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("after ÷ before (bar: median; dots: rounds)")
    ax.set_title(title if len(title) < 80 else title[:77] + "...", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--figure", action="append", required=True, help="LABEL=FILE:path[*S]")
    parser.add_argument("--title", default="Before and after, alternated")
    args = parser.parse_args()
    table = compare(args.folder, args.figure)
    if not table["rounds"]:
        raise SystemExit(f"{args.folder}: no round with both before-N and after-N")
    (args.folder / "ab.json").write_text(json.dumps(table, indent=1))
    (args.folder / "ab.md").write_text(markdown(table, args.title))
    plot(table, args.title, args.folder / "ab.png")
    print(markdown(table, args.title))


if __name__ == "__main__":
    main()
