"""Reports of a load test: results.csv, plots, summary.md, and the evict/soak/HTTP tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLUMNS = [
    "users", "adapters", "distribution", "completed", "failures", "request_throughput",
    "output_throughput", "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "tpot_mean",
    "e2e_p50", "e2e_p90", "output_throughput_ratio", "ttft_p50_ratio", "client_cpu_cores",
    "server_cpu_cores", "engine_process_cpu_cores",
]  # fmt: skip


def describe(p: dict) -> str:
    if not p.get("completed"):
        done = f"{p['output_throughput']:.1f} output tok/s, " if p.get("output_throughput") else ""
        return f"{done}no request completed in the window ({p.get('failures', 0)} failures)"
    ratio = p.get("output_throughput_ratio")
    vs = f" ({ratio:.2f}× base)" if ratio and p["adapters"] else ""
    cpu = f", cores busy: Locust {p['client_cpu_cores']}" if "client_cpu_cores" in p else ""
    cpu += f", server {p['server_cpu_cores']}" if p.get("server_cpu_cores") is not None else ""
    if p.get("engine_process_cpu_cores") is not None:
        cpu += f", engine process {p['engine_process_cpu_cores']} cores busy"
    return (
        f"{p['output_throughput']:.1f} output tok/s{vs}, TTFT p50 {p['ttft_p50'] * 1000:.0f} ms, "
        f"ITL p50 {(p['itl_p50'] or 0) * 1000:.0f} ms, {p['completed']} done, "
        f"{p['failures']} failed{cpu}"
    )


def write_outputs(results: dict, out: Path) -> None:
    points = sorted(results["points"].values(), key=lambda p: (p["users"], p["adapters"]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    plot(points, out)
    (out / "summary.md").write_text(summary(points, results["settings"]))


def plot(points: list[dict], out: Path) -> None:
    for metric, ylabel, scale, name in [
        ("ttft_p50", "TTFT p50 (ms)", 1000, "ttft_vs_adapters.png"),
        ("output_throughput", "output tokens/s", 1, "throughput_vs_adapters.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for users in sorted({p["users"] for p in points}):
            row = [p for p in points if p["users"] == users and p.get(metric) is not None]
            lora = [p for p in row if p["adapters"] > 0]
            line = ax.plot(
                [p["adapters"] for p in lora], [p[metric] * scale for p in lora],
                marker="o", label=f"{users} concurrent",
            )  # fmt: skip
            for p in row:
                if p["adapters"] == 0:
                    ax.axhline(p[metric] * scale, color=line[0].get_color(), ls="--", lw=1)
        counts = sorted({p["adapters"] for p in points if p["adapters"]})
        if len(counts) > 1:  # one point on a log axis breaks matplotlib's minor ticks
            ax.set_xscale("log", base=2)
        ax.set_xticks(counts)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("distinct adapters in the traffic (dashed: base model only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def recommendation(points: list[dict]) -> str:
    lora = [p for p in points if p["adapters"] > 0 and p.get("output_throughput_ratio")]
    if not lora:
        return "Not enough points for a recommendation."
    widest = max(p["adapters"] for p in lora)
    busiest = max(p["users"] for p in lora)
    good = [p for p in lora if p["output_throughput_ratio"] >= 0.9]
    worst = min(lora, key=lambda p: p["output_throughput_ratio"])
    lines = [
        f"- `max_loaded_loras` ≥ {widest}: every adapter seen in the traffic stays loaded "
        "(no reload on the request path).",
        f"- `max_loras_per_batch` ≥ {min(widest, busiest)}: the distinct adapters one batch can "
        f"meet at {busiest} concurrent requests over {widest} adapters; below that, requests wait "
        "for a batch slot and throughput falls (the cliff past `max_loras_per_batch`).",
        f"- Lowest throughput ratio: {worst['output_throughput_ratio']:.2f}× base at "
        f"{worst['adapters']} adapters, {worst['users']} concurrent; "
        f"{len(good)}/{len(lora)} points kept ≥ 0.9× base.",
    ]
    return "\n".join(lines)


def summary(points: list[dict], settings: dict) -> str:
    head = (
        "| users | adapters | done | failed | out tok/s | × base | TTFT p50 ms | × base | "
        "ITL p50 ms | TPOT ms | e2e p50 s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {p['users']} | {p['adapters'] or 'base'} | {p.get('completed', 0)} | "
        f"{p.get('failures', 0)} | {cell(p.get('output_throughput'), digits=1)} | "
        f"{cell(p.get('output_throughput_ratio'), digits=2)} | {cell(p.get('ttft_p50'), 1000)} | "
        f"{cell(p.get('ttft_p50_ratio'), digits=2)} | {cell(p.get('itl_p50'), 1000, 1)} | "
        f"{cell(p.get('tpot_mean'), 1000, 1)} | {cell(p.get('e2e_p50'), digits=2)} |"
        for p in points
    ]
    command = settings.get("command", "")
    return (
        f"### Load-test sweep\n\n`{command}`\n\n{head}" + "\n".join(rows)
        + "\n\n![TTFT](ttft_vs_adapters.png) ![Throughput](throughput_vs_adapters.png)\n\n"
        + "**Recommendation**\n\n" + recommendation(points) + "\n"
    )  # fmt: skip


def cell(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    """A table cell; "—" where the point has no such figure (no request ended in the window)."""
    return "—" if value is None else f"{value * scale:.{digits}f}"


def evict_markdown(report: dict) -> str:
    ms = {k: round(v * 1000, 1) for k, v in report["ttft_p50_s"].items()}
    return (
        f"### Evicted-adapter reload: {report['ring']} adapters cycled through "
        f"{report['gpu_slots']} GPU slots, {report['rounds']} rounds\n\n"
        "| TTFT p50 (ms) | base | adapter resident on the GPU | adapter evicted, reloaded | "
        "added by the reload |\n|---|---|---|---|---|\n"
        f"| | {ms['base']} | {ms['resident']} | {ms['reloaded']} | "
        f"{report['reload_added_ms']:+.1f} ms |\n"
    )


def points_of(folder: Path) -> dict:
    path = folder / "results.json"
    return json.loads(path.read_text())["points"] if path.exists() else {}


def http_report(direct_dir: Path, http_dir: Path) -> dict:
    """HTTP vs direct at the points both measured (this run's sweep, same engine)."""
    direct, over_http = points_of(direct_dir), points_of(http_dir)
    rows = []
    for key, h in sorted(over_http.items(), key=lambda kv: (kv[1]["users"], kv[1]["adapters"])):
        d = direct.get(key, {})
        row = {"users": h["users"], "adapters": h["adapters"]}
        for metric in ("output_throughput", "ttft_p50", "itl_p50"):
            row[f"http_{metric}"], row[f"direct_{metric}"] = h.get(metric), d.get(metric)
            both = h.get(metric) is not None and d.get(metric)
            row[f"{metric}_http_over_direct"] = h[metric] / d[metric] if both else None
        rows.append(
            row
            | {
                "http_failures": h.get("failures"),
                "server_cpu_cores": h.get("server_cpu_cores"),
                "client_cpu_cores": h.get("client_cpu_cores"),
                "http_output_throughput_vs_base": h.get("output_throughput_ratio"),
                "http_ttft_p50_vs_base": h.get("ttft_p50_ratio"),
            }
        )
    return {"points": rows}


def http_markdown(report: dict) -> str:
    lines = [
        "| users | adapters | HTTP tok/s | direct tok/s | HTTP ÷ direct | HTTP TTFT p50 ms | "
        "direct TTFT p50 ms | HTTP × base (tok/s) | HTTP × base (TTFT) | failed | "
        "cores busy: engine process | cores busy: Locust |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["points"]:
        lines.append(
            f"| {r['users']} | {r['adapters'] or 'base'} | {cell(r['http_output_throughput'])} | "
            f"{cell(r['direct_output_throughput'])} | "
            f"{cell(r['output_throughput_http_over_direct'], digits=2)} | "
            f"{cell(r['http_ttft_p50'], 1000)} | {cell(r['direct_ttft_p50'], 1000)} | "
            f"{cell(r['http_output_throughput_vs_base'], digits=2)} | "
            f"{cell(r['http_ttft_p50_vs_base'], digits=2)} | {r['http_failures']} | "
            f"{cell(r.get('server_cpu_cores'), digits=2)} | "
            f"{cell(r.get('client_cpu_cores'), digits=2)} |"
        )
    busy = report.get("cpu_cores_busy", {})
    lines.append(
        f"\nCPU cores busy over the whole step: engine process (API + SGLang's tokenizer manager) "
        f"{busy.get('engine_process')}, Locust clients {busy.get('locust_clients')}."
    )
    return "\n".join(lines) + "\n"


def soak_markdown(report: dict) -> str:
    """The soak's verdict as a table (the app's Benchmarks tab shows it)."""
    before, after = report["before"], report["after"]
    hot = report["hotloads"]
    return (
        f"### Soak: {report['streams']} streams over {report['adapters']} adapters, "
        f"{report['seconds'] / 60:.0f} min\n\n"
        "| requests | completed | left by the client | failed or lost | hot-load/use/unload |\n"
        "|---|---|---|---|---|\n"
        f"| {report['requests']} | {report['completed']} | {report['cancelled_by_client']} | "
        f"{report['failed']} | {sum(h['ok'] for h in hot)}/{len(hot)} ok |\n\n"
        "| | running | GPU memory of the engine (MiB) |\n|---|---|---|\n"
        f"| before | {before.get('running')} | {before.get('gpu_memory_mib')} |\n"
        f"| after | {after.get('running')} | {after.get('gpu_memory_mib')} |\n"
    )
