"""Issue #6's targets against the H200 results files: one table, written for the app's tab.

    python lab/h200_report.py results/serving/h200-7b-adapter-scaling \
        --parity results/parity/sglang-vs-cpu

Each run of ``loadtest.bench`` is one subfolder (``--runs``, the first holding the soak and the
peft baseline). Reads each run's sweep (``results.json``), ``evict.json``, tuning variants
(``tune/*/results.json``; an evict test run as a variant, ``tune/*/evict.json``, is one with
fewer adapters in host memory) and HTTP comparisons (``**/http/compare.json``); the first run's
``soak.json`` and peft baseline (``peft/results.json``); and the SGLang-vs-CPU parity
(``parity.json``, ``margins.json``). Writes ``targets.md`` into the folder. Every ratio is taken
inside one run (the same engine process); numbers of different runs are shown side by side, not
divided.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADLINE = "u256-a128"
RUNS = ("full-grid", "full-grid-repeat", "128-adapters-cpu")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[ok]


def peft_speedups(sweep: dict, peft: dict) -> list[dict]:
    """SGLang's output throughput over the peft baseline's at the points both ran."""
    rows = []
    for key, slow in sorted(peft["points"].items()):
        fast = sweep["points"].get(key)
        if fast and slow.get("output_throughput"):
            rows.append(
                {
                    "users": slow["users"],
                    "adapters": slow["adapters"],
                    "sglang": fast["output_throughput"],
                    "peft": slow["output_throughput"],
                    "speedup": fast["output_throughput"] / slow["output_throughput"],
                    "peft_completed": slow.get("completed", 0),
                }
            )
    return rows


def where(folder: Path, path: Path) -> str:
    """A row's label suffix naming the subfolder it comes from; none for the folder itself."""
    inside = path.relative_to(folder)
    return "" if inside == Path(".") else f" (`{inside}`)"


def runs(folder: Path, names: tuple[str, ...] = RUNS) -> list[tuple[str, Path]]:
    """Each run's folder with its label suffix, in the given order."""
    return [(where(folder, folder / n), folder / n) for n in names if (folder / n).is_dir()]


def headline_rows(sweep: dict | None, where: str) -> list[tuple[str, str, str]]:
    point = (sweep or {}).get("points", {}).get(HEADLINE)
    if not point:
        return []
    tput, ttft = point["output_throughput_ratio"], point["ttft_p50_ratio"]
    base = sweep["points"]["u256-a0"]
    return [
        (
            f"128 adapters at 256 streams: output throughput ≥ 0.9× base{where}",
            f"**{tput:.2f}×** ({point['output_throughput']:,.0f} vs "
            f"{base['output_throughput']:,.0f} tok/s)",
            verdict(tput >= 0.9),
        ),
        (
            f"128 adapters at 256 streams: TTFT p50 ≤ 1.5× base{where}",
            f"**{ttft:.2f}×** ({point['ttft_p50'] * 1000:.0f} vs {base['ttft_p50'] * 1000:.0f} ms)",
            verdict(ttft <= 1.5),
        ),
    ]


def evict_row(evict: dict, where: str) -> tuple[str, str, str]:
    added = evict["reload_added_ms"]
    return (
        f"evicted adapter reloads with ≤ 20 ms added TTFT{where}",
        f"**{added:+.1f} ms** ({evict['rounds']} rounds)",
        verdict(added <= 20),
    )


def host_evict_row(evict: dict, where: str) -> tuple[str, str, str]:
    """Fewer adapters in host memory than in the ring: the evicted one comes back from disk."""
    return (
        f"adapter evicted from GPU and host memory reloads from disk{where}",
        f"**{evict['reload_added_ms']:+.1f} ms** ({evict['rounds']} rounds)",
        "measured: beyond the target, which is GPU eviction (rows above)",
    )


def targets(folder: Path, parity_dir: Path | None) -> list[tuple[str, str, str]]:
    first = runs(folder)[0][1]
    sweep, soak = load(first / "results.json"), load(first / "soak.json")
    peft = load(first / "peft" / "results.json")
    rows = []
    for label, path in runs(folder):
        rows += headline_rows(load(path / "results.json"), label)
    if sweep and peft:
        speedups = peft_speedups(sweep, peft)
        low = min(speedups, key=lambda r: r["speedup"])
        high = max(speedups, key=lambda r: r["speedup"])
        rows.append(
            (
                "≥ 20× the peft baseline (same points)",
                f"**{low['speedup']:.1f}–{high['speedup']:.1f}×** at {len(speedups)} points "
                f"(32/256 streams, 1/8 adapters)",
                verdict(low["speedup"] >= 20),
            )
        )
    else:
        rows.append(("≥ 20× the peft baseline", "—", verdict(None)))
    for label, path in runs(folder):
        if evict := load(path / "evict.json"):
            rows.append(evict_row(evict, label))
        for host_evict in sorted((path / "tune").glob("*/evict.json")):
            rows.append(host_evict_row(load(host_evict), where(folder, host_evict.parent)))
    if soak:
        lost = soak["requests"] - soak["completed"] - soak["cancelled_by_client"] - soak["failed"]
        before, after = soak["before"], soak["after"]
        grown = after["gpu_memory_mib"] - before["gpu_memory_mib"]
        rows.append(
            (
                "soak: 0 failed or lost among those not cancelled",
                f"**{soak['failed']} failed, {lost} lost** of {soak['requests']:,}",
                verdict(soak["failed"] == 0 and lost == 0),
            )
        )
        rows.append(
            (
                "soak: memory and request slots back to the start",
                f"running {before['running']} → {after['running']}; GPU memory "
                f"{grown:+d} MiB ({grown / before['gpu_memory_mib']:+.1%})",
                "slots yes; memory " + ("yes" if grown <= 0 else "not exactly"),
            )
        )
    rows += parity_rows(parity_dir)
    for path in sorted(folder.glob("**/http/compare.json")) or [None]:
        http = load(path) if path else None
        label = where(folder, path.parent.parent) if path else ""
        rows.append(
            (
                f"HTTP API vs engine-direct, same engine{label}",
                http_line(http),
                "measured" if http else "not run",
            )
        )
    return rows


def parity_rows(parity_dir: Path | None) -> list[tuple[str, str, str]]:
    parity = load(parity_dir / "parity.json") if parity_dir else None
    if not parity:
        return [("SGLang = CPU greedy tokens, first 50 prompts per task", "—", verdict(None))]
    rows = parity["rows"]
    same, total = sum(r["identical"] for r in rows), sum(r["prompts"] for r in rows)
    adapters = [r for r in rows if r["model"] == "adapter"]
    a_same, a_total = sum(r["identical"] for r in adapters), sum(r["prompts"] for r in adapters)
    margins = load(parity_dir / "margins.json") or []
    widest = max((m["margin"] for m in margins), default=None)
    why = f"; every mismatch a near-tie (≤ {widest:.3f} logits on the CPU)" if margins else ""
    return [
        (
            "SGLang = CPU greedy tokens, first 50 prompts per task",
            f"**{same}/{total}** identical ({same / total:.1%}); adapters {a_same}/{a_total}{why}",
            "met up to float16 rounding" if margins else "see parity.md",
        )
    ]


def http_line(http: dict | None) -> str:
    if not http:
        return "—"
    parts = [
        f"{r['adapters'] or 'base'} @ {r['users']} streams: "
        f"{r['output_throughput_http_over_direct']:.2f}× direct tok/s"
        for r in http["points"]
        if r.get("output_throughput_http_over_direct")
    ]
    busy = http.get("cpu_cores_busy", {})
    return "; ".join(parts) + f"; engine process {busy.get('engine_process')} cores busy"


def changed_settings(main: dict, variant: dict) -> str:
    """A tuning variant's name: the engine settings it changes from its session's main sweep."""
    before, after = main["settings"]["engine"], variant["settings"]["engine"]
    changed = [f"{k}={json.dumps(v)}" for k, v in after.items() if before.get(k) != v]
    return ", ".join(changed).replace('"', "") or "same settings"


def tuning_rows(folder: Path) -> list[dict]:
    rows, variants = [], []
    for label, path in runs(folder):
        main = load(path / "results.json")
        name = "main sweep (csgmv, CUDA graphs, max_loras_per_batch=128)"
        variants.append((name + label, main))
        for tuned in sorted((path / "tune").glob("*/results.json")):
            run = load(tuned)
            variants.append((changed_settings(main, run) + label, run))
    for name, run in variants:
        points = (run or {}).get("points", {})
        if HEADLINE in points and "u256-a0" in points:
            p, b = points[HEADLINE], points["u256-a0"]
            rows.append(
                {
                    "variant": name,
                    "base": b["output_throughput"],
                    "adapters": p["output_throughput"],
                    "tput_ratio": p["output_throughput_ratio"],
                    "ttft_ratio": p["ttft_p50_ratio"],
                    "ttft_ms": p["ttft_p50"] * 1000,
                    "itl_ms": p["itl_p50"] * 1000,
                    "window_s": run["settings"]["duration"] - run["settings"]["warmup"],
                }
            )
    return rows


def markdown(folder: Path, parity_dir: Path | None) -> str:
    lines = ["### Issue #6 targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(folder, parity_dir)]
    first = runs(folder)[0][1]
    sweep, peft = load(first / "results.json"), load(first / "peft" / "results.json")
    if sweep and peft:
        lines += [
            "",
            "### SGLang over the peft baseline (transformers + peft on the same GPU)",
            "",
            "| streams | adapters | SGLang tok/s | peft tok/s | speedup | peft done |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['users']} | {r['adapters'] or 'base'} | {r['sglang']:,.0f} | {r['peft']:,.0f} | "
            f"{r['speedup']:.1f}× | {r['peft_completed']} |"
            for r in peft_speedups(sweep, peft)
        ]
    tuning = tuning_rows(folder)
    if tuning:
        lines += [
            "",
            "### Tuning: 128 adapters at 256 streams, one engine per variant",
            "",
            "| variant | base tok/s | 128 adapters tok/s | × base | TTFT p50 ms | × base | "
            "ITL p50 ms | window s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['variant']} | {r['base']:,.0f} | {r['adapters']:,.0f} | "
            f"{r['tput_ratio']:.2f} | {r['ttft_ms']:.0f} | {r['ttft_ratio']:.2f} | "
            f"{r['itl_ms']:.1f} | {r['window_s']:.0f} |"
            for r in tuning
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="folder holding one subfolder per run")
    parser.add_argument("--parity", type=Path, help="folder of scripts/parity.py's output")
    args = parser.parse_args()
    text = markdown(args.folder, args.parity)
    (args.folder / "targets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
