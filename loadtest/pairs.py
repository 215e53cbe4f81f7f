"""Alternating pairs: each headline ratio as a median over rounds, with its range.

One engine instance's absolute throughput moves ±15 % from the next one's, and one 20-s point by
several per cent, so a single point pair says little. ``loadtest.bench --plan pairs`` measures
rounds of (base, adapters) at one concurrency, engine-direct and through the HTTP API, one round
after the other; ``loadtest.peer`` does the same through HTTP against another server. Each round
gives its ratios (adapters ÷ base, HTTP ÷ direct); this module reduces the rounds to medians
and ranges and writes them as JSON and markdown:

    python -m loadtest.pairs side-by-side /tmp/pairs /tmp/peer --users 256 --out /tmp/side
    python -m loadtest.pairs settings DIR/default DIR/continuous-4 --out DIR   # one engine each
    python -m loadtest.pairs settings fp8=DIR/fp8+DIR/fp8-2 --out DIR  # two engines, rounds pooled
    python -m loadtest.pairs split closed=DIR/closed think-1s=DIR/think --out DIR  # TTFT's parts

A round: ``{"users": 256, "adapters": 128, "round": 1, "points": {"direct-base": {...},
"direct-adapters": {...}, "http-base": {...}, "http-adapters": {...}}}``, each point the
statistics of ``loadtest.stats.summarize`` plus the cores busy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KINDS = ("direct-base", "direct-adapters", "http-base", "http-adapters")
RATIOS = {  # name: (numerator point, denominator point, metric)
    "adapters_over_base_tok_s_direct": ("direct-adapters", "direct-base", "output_throughput"),
    "adapters_over_base_tok_s_http": ("http-adapters", "http-base", "output_throughput"),
    "http_over_direct_tok_s_base": ("http-base", "direct-base", "output_throughput"),
    "http_over_direct_tok_s_adapters": ("http-adapters", "direct-adapters", "output_throughput"),
    "http_over_direct_ttft_p50_base": ("http-base", "direct-base", "ttft_p50"),
    "http_over_direct_ttft_p50_adapters": ("http-adapters", "direct-adapters", "ttft_p50"),
    "adapters_over_base_ttft_p50_direct": ("direct-adapters", "direct-base", "ttft_p50"),
    "adapters_over_base_ttft_p50_http": ("http-adapters", "http-base", "ttft_p50"),
    "http_over_direct_first_event_p50_base": ("http-base", "direct-base", "first_event_p50"),
    "http_over_direct_first_event_p50_adapters": (
        "http-adapters",
        "direct-adapters",
        "first_event_p50",
    ),
    "http_engine_over_direct_ttft_p50_base": ("http-base", "direct-base", "engine_ttft_p50"),
    "http_engine_over_direct_ttft_p50_adapters": (
        "http-adapters",
        "direct-adapters",
        "engine_ttft_p50",
    ),
    "http_server_over_direct_ttft_p50_base": ("http-base", "direct-base", "server_ttft_p50"),
    "http_server_over_direct_ttft_p50_adapters": (
        "http-adapters",
        "direct-adapters",
        "server_ttft_p50",
    ),
}
LABELS = {
    "adapters_over_base_tok_s_direct": "adapters ÷ base, tok/s, direct",
    "adapters_over_base_tok_s_http": "adapters ÷ base, tok/s, HTTP",
    "http_over_direct_tok_s_base": "HTTP ÷ direct, tok/s, base",
    "http_over_direct_tok_s_adapters": "HTTP ÷ direct, tok/s, adapters",
    "http_over_direct_ttft_p50_base": "HTTP ÷ direct, TTFT p50, base",
    "http_over_direct_ttft_p50_adapters": "HTTP ÷ direct, TTFT p50, adapters",
    "adapters_over_base_ttft_p50_direct": "adapters ÷ base, TTFT p50, direct",
    "adapters_over_base_ttft_p50_http": "adapters ÷ base, TTFT p50, HTTP",
    "http_over_direct_first_event_p50_base": "HTTP ÷ direct, first event p50, base",
    "http_over_direct_first_event_p50_adapters": "HTTP ÷ direct, first event p50, adapters",
    "http_engine_over_direct_ttft_p50_base": "HTTP's engine TTFT ÷ direct, p50, base",
    "http_engine_over_direct_ttft_p50_adapters": "HTTP's engine TTFT ÷ direct, p50, adapters",
    "http_server_over_direct_ttft_p50_base": "HTTP's server TTFT ÷ direct, p50, base",
    "http_server_over_direct_ttft_p50_adapters": "HTTP's server TTFT ÷ direct, p50, adapters",
}
PASS_FIGURES = ("prefill_passes_per_s", "requests_per_prefill", "prefill_tokens_per_pass",
                "decode_passes_per_s", "decode_batch_mean", "delayer_delays_per_s")  # fmt: skip
"""SGLang's scheduler passes (``loadtest.bench --sglang-counters``)."""
FIGURES = ("output_throughput", "ttft_p50", "ttft_p90", "first_event_p50", "engine_ttft_p50",
           "server_ttft_p50", "to_server_p50", "to_client_p50",
           "loop_lag_p50", "loop_lag_p99", "client_loop_lag_p50", "client_loop_lag_p99",
           "itl_p50", "tpot_mean", "gc_full_pause_s", "process_cpu_cores",
           "engine_children_cpu_cores", "engine_busiest_thread_cores", "client_cpu_cores",
           "completed", "failures", "served", *PASS_FIGURES)  # fmt: skip
STEADY_SERVED = 0.9
"""Completed ÷ arrived in the window below this: the point's arrivals outran the server."""


def median_range(values) -> dict:
    """Median, lowest and highest of the values that exist (None left out), and how many."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "n": len(present),
        "values": present,
    }


def process_cores(point: dict) -> float | None:
    """Cores the serving process kept busy: the server's (HTTP points), or the bench's own
    process, where clients and engine share one interpreter (direct points)."""
    if point.get("server_cpu_cores") is not None:
        return point["server_cpu_cores"]
    return point.get("engine_process_cpu_cores")


def figure(point: dict | None, metric: str) -> float | None:
    if not point:
        return None
    return process_cores(point) if metric == "process_cpu_cores" else point.get(metric)


def outran(point: dict | None) -> bool:
    """Arrivals outran the server at this open-loop point: its backlog grew all along, so its
    figures measure the backlog, not the server. (A closed loop cannot outrun its server; its
    completed ÷ arrived moves only with where its waves fall in the window.)"""
    if not point or not point.get("open_loop") or point.get("served") is None:
        return False
    return point["served"] < STEADY_SERVED


def round_ratios(points: dict) -> dict[str, float | None]:
    """One round's ratios; None where a point is missing, outran (``outran``) or a denominator
    is zero or absent."""
    out = {}
    for name, (top, bottom, metric) in RATIOS.items():
        if outran(points.get(top)) or outran(points.get(bottom)):
            out[name] = None
            continue
        a, b = figure(points.get(top), metric), figure(points.get(bottom), metric)
        out[name] = a / b if a is not None and b else None
    return out


def outran_rounds(group: list[dict]) -> list[str]:
    """ "kind (round r: completed ÷ arrived x)" for each point whose arrivals outran the server."""
    return [
        f"{kind} (round {r['round']}: {point['served']:.2f})"
        for r in group
        for kind, point in r["points"].items()
        if outran(point)
    ]


def group_key(r: dict) -> str:
    return f"u{r['users']}-a{r['adapters']}"


def figures_of(group: list[dict], kind: str) -> dict:
    return {m: median_range([figure(r["points"].get(kind), m) for r in group]) for m in FIGURES}


def summarize_rounds(rounds: list[dict]) -> dict:
    """Per (users, adapters): each ratio and each point's figures as median and range."""
    groups: dict[str, list[dict]] = {}
    for r in rounds:
        groups.setdefault(group_key(r), []).append(r)
    summary = {}
    for key, group in groups.items():
        per_round = [round_ratios(r["points"]) for r in group]
        kinds = [k for k in KINDS if any(k in r["points"] for r in group)]
        summary[key] = {
            "users": group[0]["users"],
            "adapters": group[0]["adapters"],
            "rounds": len(group),
            "ratios": {
                name: median_range([rr[name] for rr in per_round])
                for name in RATIOS
                if any(rr[name] is not None for rr in per_round)
            },
            "points": {kind: figures_of(group, kind) for kind in kinds},
            "outran": outran_rounds(group),
        }
    return summary


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 2) -> tuple[str, str]:
    """(median, "low–high") as table cells; "—" where there is nothing."""
    if not stat or stat.get("median") is None:
        return "—", "—"
    m, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f}", f"{lo:.{digits}f}–{hi:.{digits}f}"


def pairs_markdown(summary: dict, title: str = "Alternating pairs") -> str:
    lines = []
    for group in sorted(summary.values(), key=lambda g: (g["users"], g["adapters"])):
        lines += [
            f"### {title}: {group['users']} streams, base vs {group['adapters']} adapters, "
            f"{group['rounds']} rounds\n",
            "| ratio (per round, then over rounds) | median | range | rounds |",
            "|---|---|---|---|",
        ]
        for name, stat in group["ratios"].items():
            median, spread = fmt(stat)
            lines.append(f"| {LABELS[name]} | {median} | {spread} | {stat['n']} |")
        if group.get("outran"):
            lines += ["", f"Arrivals outran the server (completed ÷ arrived below "
                      f"{STEADY_SERVED}; the backlog grew all along) at: "
                      f"{', '.join(group['outran'])}. The ratios involving them are left out: "
                      "they would compare backlogs, not paths."]  # fmt: skip
        lines += [
            "",
            "| point | tok/s median | tok/s range | TTFT p50 ms median | TTFT p50 ms range | "
            "TTFT p90 ms median | first event p50 ms median | engine's TTFT p50 ms median | "
            "server's TTFT p50 ms median | to the server / back to the client p50 ms median | "
            "loop lag p50 / p99 ms median | "
            "Locust's hub lag p50 / p99 ms median | full GC s median | "
            "TPOT ms median | ITL p50 ms median (per chunk) | serving process cores | "
            "SGLang children cores (busiest thread) | Locust cores | failed (sum) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, figures in group["points"].items():
            tok, tok_range = fmt(figures["output_throughput"], digits=0)
            ttft, ttft_range = fmt(figures["ttft_p50"], 1000, 0)
            ttft90, _ = fmt(figures["ttft_p90"], 1000, 0)
            first, _ = fmt(figures["first_event_p50"], 1000, 0)
            engine_first, _ = fmt(figures["engine_ttft_p50"], 1000, 0)
            server_first, _ = fmt(figures["server_ttft_p50"], 1000, 0)
            there, _ = fmt(figures["to_server_p50"], 1000, 1)
            back, _ = fmt(figures["to_client_p50"], 1000, 1)
            lag50, _ = fmt(figures["loop_lag_p50"], 1000, 1)
            lag99, _ = fmt(figures["loop_lag_p99"], 1000, 1)
            hub50, _ = fmt(figures["client_loop_lag_p50"], 1000, 1)
            hub99, _ = fmt(figures["client_loop_lag_p99"], 1000, 1)
            paused, _ = fmt(figures["gc_full_pause_s"], 1, 2)
            itl, _ = fmt(figures["itl_p50"], 1000, 1)
            tpot, _ = fmt(figures["tpot_mean"], 1000, 1)
            cores, _ = fmt(figures["process_cpu_cores"])
            children, _ = fmt(figures["engine_children_cpu_cores"])
            busiest, _ = fmt(figures["engine_busiest_thread_cores"])
            client, _ = fmt(figures["client_cpu_cores"])
            failed = sum(figures["failures"]["values"])
            lines.append(
                f"| {kind} | {tok} | {tok_range} | {ttft} | {ttft_range} | {ttft90} | {first} | "
                f"{engine_first} | {server_first} | {there} / {back} | {lag50} / {lag99} | "
                f"{hub50} / {hub99} | "
                f"{paused} | "
                f"{tpot} | {itl} | "
                f"{cores} | {children} ({busiest}) | {client} | {failed} |"
            )
        lines += ["", *passes_markdown(group["points"])]
    return "\n".join(lines)


def passes_markdown(points: dict) -> list[str]:
    """SGLang's scheduler passes per point, medians over the rounds (where counted)."""
    if not any(figures["prefill_passes_per_s"]["n"] for figures in points.values()):
        return []
    lines = [
        "SGLang's scheduler passes (its own counters, `--sglang-counters`), medians:\n",
        "| point | prefill passes/s | requests per prefill pass | prompt tokens per prefill "
        "pass | decode passes/s | decode batch (mean) | delayer's delays/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, figures in points.items():
        cells = [fmt(figures[name], digits=1)[0] for name in PASS_FIGURES]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def side_by_side(ours: dict, peer: dict, users: int) -> dict:
    """Our server against the peer through HTTP, same Locust user, at ``users`` streams: the
    medians and ranges of both summaries' HTTP points and adapter ratios."""
    mine = next((g for g in ours.values() if g["users"] == users), None)
    theirs = next((g for g in peer.values() if g["users"] == users), None)
    if mine is None or theirs is None:
        missing = [n for n, g in (("ours", mine), ("peer", theirs)) if g is None]
        return {"users": users, "missing": missing, "rows": []}
    rows, n = [], theirs["adapters"]
    rounds = mine["rounds"] if mine["rounds"] == theirs["rounds"] else None
    for label, kind, metric, scale in [
        ("base, tok/s", "http-base", "output_throughput", 1),
        (f"{theirs['adapters']} adapters, tok/s", "http-adapters", "output_throughput", 1),
        ("base, TTFT p50 ms", "http-base", "ttft_p50", 1000),
        (f"{theirs['adapters']} adapters, TTFT p50 ms", "http-adapters", "ttft_p50", 1000),
        ("base, TPOT mean ms", "http-base", "tpot_mean", 1000),
        (f"{theirs['adapters']} adapters, TPOT mean ms", "http-adapters", "tpot_mean", 1000),
        ("base, ITL p50 ms (per chunk)", "http-base", "itl_p50", 1000),
        (f"{n} adapters, ITL p50 ms (per chunk)", "http-adapters", "itl_p50", 1000),
        ("base, serving process cores", "http-base", "process_cpu_cores", 1),
        ("adapters, serving process cores", "http-adapters", "process_cpu_cores", 1),
    ]:
        a = mine["points"].get(kind, {}).get(metric)
        b = theirs["points"].get(kind, {}).get(metric)
        rows.append(row(label, a, b, scale, rounds))
    for label, name in [
        ("adapters ÷ base, tok/s", "adapters_over_base_tok_s_http"),
        ("adapters ÷ base, TTFT p50", "adapters_over_base_ttft_p50_http"),
    ]:
        rows.append(row(label, mine["ratios"].get(name), theirs["ratios"].get(name), 1, rounds))
    return {"users": users, "adapters": theirs["adapters"], "rounds": {
        "ours": mine["rounds"], "peer": theirs["rounds"]}, "rows": rows}  # fmt: skip


def row(label: str, ours: dict | None, peer: dict | None, scale: float, rounds: int | None) -> dict:
    def scaled(stat):
        if not stat or stat.get("median") is None:
            return None
        return {k: stat[k] * scale for k in ("median", "min", "max")} | {"n": stat["n"]}

    a, b = scaled(ours), scaled(peer)
    ratio = a["median"] / b["median"] if a and b and b["median"] else None
    return {"figure": label, "ours": a, "peer": b, "ours_over_peer": ratio,
            "ours_over_peer_by_round": ratios_by_round(ours, peer, rounds)}  # fmt: skip


def ratios_by_round(ours: dict | None, peer: dict | None, rounds: int | None) -> dict | None:
    """Round i of ours over round i of the peer, median and range; None unless both sides ran
    ``rounds`` rounds and have this figure in every one (``median_range`` leaves out missing
    ones, which would pair other rounds)."""
    a, b = (ours or {}).get("values") or [], (peer or {}).get("values") or []
    if not rounds or len(a) != rounds or len(b) != rounds or not all(b):
        return None
    return median_range([x / y for x, y in zip(a, b, strict=True)])


def side_by_side_markdown(report: dict, peer_name: str = "SGLang's own server") -> str:
    if report.get("missing"):
        users, missing = report["users"], report["missing"]
        return f"No side-by-side at {users} streams: no rounds from {missing}.\n"
    lines = [
        f"### Ours vs {peer_name}: HTTP, the same Locust user, {report['users']} streams "
        f"(rounds: ours {report['rounds']['ours']}, peer {report['rounds']['peer']})\n",
        "| figure | ours: median | ours: range | peer: median | peer: range | ours ÷ peer "
        "| ours ÷ peer, round by round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        digits = 2 if "÷" in r["figure"] or "cores" in r["figure"] else 0
        if "ITL" in r["figure"] or "TPOT" in r["figure"]:
            digits = 1
        a_med, a_rng = fmt(r["ours"], digits=digits)
        b_med, b_rng = fmt(r["peer"], digits=digits)
        ratio = "—" if r["ours_over_peer"] is None else f"{r['ours_over_peer']:.2f}"
        round_med, round_rng = fmt(r.get("ours_over_peer_by_round"))
        by_round = "—" if round_med == "—" else f"{round_med} [{round_rng}]"
        lines.append(
            f"| {r['figure']} | {a_med} | {a_rng} | {b_med} | {b_rng} | {ratio} | {by_round} |"
        )
    lines.append(
        "\nITL is the gap between streamed chunks: ours sends up to 4 tokens a chunk at 256 "
        "streams (`stream_interval: auto`), SGLang's server one (its default); TPOT is per token "
        "on both sides. Round by round: ours in round i over the peer in round i (median "
        "[range]), where both have every round."
    )
    return "\n".join(lines) + "\n"


def write_pairs(out: Path, results: dict, title: str = "Alternating pairs") -> dict:
    """results.json (rounds + summary) and summary.md into ``out``; returns the summary."""
    results["summary"] = summarize_rounds(results["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    command = results.get("settings", {}).get("command", "")
    head = f"`{command}`\n\n" if command else ""
    (out / "summary.md").write_text(head + pairs_markdown(results["summary"], title))
    return results["summary"]


def settings_table(runs: dict[str, dict], users: int | None = None) -> dict:
    """Engines that differ in one setting, each a pairs run (``{setting: results}``): every
    point's tok/s and TTFT p50 as median and range over its rounds, per setting, at ``users``
    streams (needed when a run has more than one concurrency)."""
    table = {}
    for name, results in runs.items():
        groups = [g for g in summarize_rounds(results["rounds"]).values()
                  if users is None or g["users"] == users]  # fmt: skip
        if len(groups) != 1:
            counts = sorted({r["users"] for r in results["rounds"]})
            raise ValueError(f"{name}: runs at {counts} streams; pick one with --users")
        group = groups[0]
        table[name] = {
            "users": group["users"],
            "rounds": group["rounds"],
            "engines": results.get("engines", 1),
            "ratios": {k: group["ratios"].get(k) for k in SETTINGS_RATIOS},
        }
        for kind, figures in group["points"].items():
            table[name][kind] = {
                "tok_s": figures["output_throughput"],
                "ttft_p50": figures["ttft_p50"],
                "served": figures["served"],
            }
    return table


SETTINGS_RATIOS = ("adapters_over_base_tok_s_http", "adapters_over_base_tok_s_direct")


def pooled_runs(specs: list[str]) -> dict[str, dict]:
    """``DIR`` or ``NAME=DIR+DIR...`` (engines of one setting in one job) → {name: results},
    each DIR a folder holding ``pairs/results.json``; several engines' rounds pooled."""
    runs = {}
    for spec in specs:
        name, _, folders = spec.rpartition("=")
        paths = [Path(f) for f in folders.split("+")] if name else [Path(folders)]
        rounds = []
        for path in paths:
            rounds += json.loads((path / "pairs" / "results.json").read_text())["rounds"]
        runs[name or paths[0].name] = {"rounds": rounds, "engines": len(paths)}
    return runs


def headline_markdown(table: dict) -> str:
    """Per setting, over every round of its engines: adapters' tok/s through HTTP and the
    adapters ÷ base ratios, each as median [range]."""

    def cell(stat: dict | None, digits: int) -> str:
        median, spread = fmt(stat, 1, digits)
        return median if spread == "—" else f"{median} [{spread}]"

    lines = [
        "| setting | engines | rounds | http-adapters tok/s | adapters ÷ base tok/s, HTTP "
        "| adapters ÷ base tok/s, direct |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        ratios = [cell(row.get("ratios", {}).get(k), 2) for k in SETTINGS_RATIOS]
        lines.append(
            f"| {name} | {row.get('engines', 1)} | {row['rounds']} "
            f"| {cell(row.get('http-adapters', {}).get('tok_s'), 0)} | {' | '.join(ratios)} |"
        )
    return "\n".join(lines) + "\n"


def settings_markdown(table: dict) -> str:
    """tok/s and TTFT per setting and point; with open-loop runs also completed ÷ arrived
    (below 1: that setting's server did not carry the arrivals)."""
    served = any(row.get(k, {}).get("served", {}).get("n") for row in table.values() for k in KINDS)
    columns = [("tok_s", "tok/s", 1, 0), ("ttft_p50", "TTFT p50 ms", 1000, 0)]
    columns += [("served", "completed ÷ arrived", 1, 2)] if served else []
    lines = [
        "| setting | rounds | "
        + " | ".join(f"{k} {label}" for _, label, _, _ in columns for k in KINDS) + " |",
        "|---|---|" + "---|" * (len(columns) * len(KINDS)),
    ]  # fmt: skip
    for name, row in table.items():
        cells = [fmt(row.get(k, {}).get(key), scale, digits)[0]
                 for key, _, scale, digits in columns for k in KINDS]  # fmt: skip
        lines.append(f"| {name} | {row['rounds']} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\nOver every round (median [range]):\n\n" + headline_markdown(table)
    )


def plot_settings(table: dict, out: Path) -> None:
    """Each setting's points side by side: bars at the median, whiskers over the rounds' range."""
    from loadtest.report import plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(KINDS)
    for i, kind in enumerate(KINDS):
        xs = [n + (i - (len(KINDS) - 1) / 2) * width for n in range(len(table))]
        for ax, figure, scale in ((axes[0], "tok_s", 1), (axes[1], "ttft_p50", 1000)):
            stats = [row.get(kind, {}).get(figure) or {} for row in table.values()]
            medians = [(s.get("median") or 0) * scale for s in stats]
            below = [m - (s.get("min") or 0) * scale if s.get("min") else 0
                     for m, s in zip(medians, stats, strict=True)]  # fmt: skip
            above = [(s.get("max") or 0) * scale - m if s.get("max") else 0
                     for m, s in zip(medians, stats, strict=True)]  # fmt: skip
            ax.bar(xs, medians, width, yerr=[below, above], capsize=2, label=kind)
    titles = ("output tok/s (median, range over rounds)", "TTFT p50, ms (median, range)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(table)), list(table), rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(KINDS), fontsize=8
    )
    users = next(iter(table.values()))["users"]
    fig.suptitle(f"Engine settings, {users} streams: engine-direct and HTTP, base and adapters")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "settings.png", dpi=110)
    plt.close(fig)


SPLIT_PARTS = (  # (label, figure it ends at, figure it starts from): the stacked TTFT parts
    ("the engine", "engine_ttft_p50", None),
    ("the API, before its first byte", "server_ttft_p50", "engine_ttft_p50"),
    ("to the server and back, the client", "ttft_p50", "server_ttft_p50"),
)
UNSPLIT = "not split (no server clock in that run)"
SPLIT_LABELS = (*(label for label, _, _ in SPLIT_PARTS), UNSPLIT, "client's TTFT p50")


def ttft_split(summary: dict) -> dict[str, dict[str, float | None]]:
    """Per point, the TTFT p50's parts in ms, each a median over rounds: the engine's TTFT,
    what the API adds before its first byte, the rest up to the client's first token. A
    direct point is the engine's alone. Parts a run cannot tell apart (no server clock) are
    ``None`` and their sum is ``UNSPLIT``. Parts of p50s, so they add up only about."""
    if len(summary) != 1:
        raise ValueError(f"a run at one concurrency, not {len(summary)}: {', '.join(summary)}")
    (group,) = summary.values()
    split = {}
    for kind, figures in group["points"].items():
        ms = {m: (figures[m]["median"] or 0) * 1000 if figures[m]["n"] else None for m in FIGURES}
        if kind.startswith("direct"):
            ms["engine_ttft_p50"] = ms["server_ttft_p50"] = ms["ttft_p50"]
        parts = {label: part(ms, end, start) for label, end, start in SPLIT_PARTS}
        unsplit = None
        if None in parts.values() and ms["ttft_p50"] is not None:
            unsplit = ms["ttft_p50"] - sum(v for v in parts.values() if v is not None)
        split[kind] = parts | {UNSPLIT: unsplit, "client's TTFT p50": ms["ttft_p50"]}
    return split


def part(ms: dict, end: str, start: str | None) -> float | None:
    if ms[end] is None or (start and ms[start] is None):
        return None
    return ms[end] - (ms[start] if start else 0)


def split_markdown(splits: dict[str, dict]) -> str:
    labels = SPLIT_LABELS
    lines = ["| run | point | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for run, split in splits.items():
        for kind, parts in split.items():
            cells = ["—" if parts[k] is None else f"{parts[k]:.1f}" for k in labels]
            lines.append(f"| {run} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_split(splits: dict[str, dict], out: Path) -> None:
    from loadtest.report import plt

    bars = [(run, kind, parts) for run, split in splits.items() for kind, parts in split.items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4.2))
    bottoms = [0.0] * len(bars)
    for label in SPLIT_LABELS[:-1]:
        heights = [parts[label] or 0 for _, _, parts in bars]
        color = "lightgrey" if label == UNSPLIT else None
        ax.bar(range(len(bars)), heights, 0.7, bottom=bottoms, label=label, color=color)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(range(len(bars)), [f"{run}\n{kind}" for run, kind, _ in bars], fontsize=7)
    ax.set_ylabel("ms (p50s, medians over rounds)")
    ax.set_title("Where the first token's time goes: engine-direct and through HTTP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ttft-split.png", dpi=110)
    plt.close(fig)


def named_runs(specs: list[str]) -> dict[str, Path]:
    """``name=DIR`` (or ``DIR``, named by its folder) → {name: DIR}."""
    runs = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        runs[name or Path(folder).name] = Path(folder)
    return runs


def write_report(out: Path, stem: str, data: dict, text: str, plot) -> None:
    """``stem``.json, ``stem``.md and the plot (``plot(data, out)``) in ``out``; the text shown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out / f"{stem}.md").write_text(text)
    plot(data, out)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    both = sub.add_parser("side-by-side", help="ours vs a peer server, HTTP points")
    both.add_argument("ours", type=Path, help="folder of bench --plan pairs (results.json)")
    both.add_argument("peer", type=Path, help="folder of loadtest.peer (results.json)")
    both.add_argument("--users", type=int, default=256)
    both.add_argument("--peer-name", default="SGLang's own server")
    both.add_argument("--out", type=Path, required=True)
    settings = sub.add_parser("settings", help="engines that differ in one setting, side by side")
    settings.add_argument("runs", nargs="+", help="one folder per setting (holding pairs/), "
                          "or NAME=DIR+DIR...: engines of one setting, rounds pooled")  # fmt: skip
    settings.add_argument("--users", type=int, help="the concurrency, if a run has several")
    settings.add_argument("--out", type=Path, required=True)
    split = sub.add_parser("split", help="the TTFT's parts per point: engine, API, the rest")
    split.add_argument("runs", nargs="+", help="NAME=DIR, each DIR a bench --plan pairs folder "
                       "(results.json) at one concurrency")  # fmt: skip
    split.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "split":
        splits = {}
        for name, folder in named_runs(args.runs).items():
            rounds = json.loads((folder / "results.json").read_text())["rounds"]
            try:
                splits[name] = ttft_split(summarize_rounds(rounds))
            except ValueError as err:
                raise SystemExit(f"{folder}: {err}") from None
        return write_report(args.out, "ttft-split", splits, split_markdown(splits), plot_split)
    if args.action == "settings":
        runs = pooled_runs(args.runs)
        try:
            table = settings_table(runs, args.users)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        return write_report(args.out, "settings", table, settings_markdown(table), plot_settings)
    ours = summarize_rounds(json.loads((args.ours / "results.json").read_text())["rounds"])
    peer = summarize_rounds(json.loads((args.peer / "results.json").read_text())["rounds"])
    report = side_by_side(ours, peer, args.users)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "side-by-side.json").write_text(json.dumps(report, indent=1))
    text = side_by_side_markdown(report, args.peer_name)
    (args.out / "side-by-side.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
