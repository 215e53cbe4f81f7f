"""Replicas behind sglang-router: all against one, adapter affinity against round-robin.

    python -m loadtest.router --config /tmp/synth7b/adapters.yaml --out /tmp/router \
        --set max_loras_per_batch=128 --set mem_fraction_static=0.7

Starts ``python -m engine.cluster`` with ``--replicas`` replicas (its router uses the shipped
policy, ``adapter_affinity``; ``--gpus 0,0`` puts two on one GPU) and two more routers over the
same replicas: one over replica 0 alone and one round-robin over all. The engines are the same
for every arm, so each ratio compares routing only. Then, in alternating rounds (the order flips
each round):

- ``scale``: ``--users`` streams over ``--adapters`` adapters, one replica vs all;
- ``scale-base``: the same streams to the base (no routing key: spread at random), one replica
  vs all;
- ``affinity``: the same streams over ``--many`` adapters (more than a batch holds),
  round-robin vs affinity;
- a hot-load through the control API (the first adapter under the adapter root that the
  registry does not list) must reach every replica, serve, and unload from every replica.

Writes ``results.json`` and ``summary.md`` (medians and ranges of the per-round ratios) and
``rounds.png`` into ``--out``; Locust's own csv per point under ``raw/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from engine.cluster import (
    REPLICA_PORT_OFFSET,
    check_port_free,
    replica_urls,
    router_command,
    start,
    stop_all,
    wait_until_up,
)
from engine.registry import load_registry
from loadtest.pairs import fmt, median_range
from loadtest.procs import absolute_registry, write_registry
from loadtest.report import describe
from loadtest.sweep import measure_point
from loadtest.targets import api_key_header

ARMS = {
    "scale": ("one-replica", "replicas"),
    "scale-base": ("one-replica", "replicas"),
    "affinity": ("round-robin", "adapter-affinity"),
}
"""Each comparison: (denominator arm, numerator arm)."""


def cluster_config(args, out: Path) -> tuple[Path, str | None]:
    """The registry for the cluster: ``--config`` with ``--replicas``, the ``--set`` SGLang
    settings, absolute adapter paths, and its first ``--many`` adapters; returns it and the
    path of an adapter left out, for the hot-load check."""
    source = Path(args.config).resolve()
    config = absolute_registry(source, args.set)
    spare = config["adapters"][args.many]["path"] if len(config["adapters"]) > args.many else None
    config["adapters"] = config["adapters"][: args.many]
    config["cluster"] = {"replicas": args.replicas, "policy": "adapter_affinity"}
    if args.gpus:
        config["cluster"]["gpus"] = args.gpus
    os.environ["LORALAND_ADAPTER_ROOT"] = str(source.parent / "adapters")  # the replicas'
    return write_registry(config, out / "cluster.yaml"), spare


def start_cluster(config: Path, port: int, backend: str | None, started: list) -> None:
    cmd = [sys.executable, "-m", "engine.cluster", "--config", str(config), "--port", str(port)]
    cmd += ["--backend", backend] if backend else []
    print("starting:", " ".join(cmd[1:]), flush=True)
    started.append(subprocess.Popen(cmd))
    t0 = time.perf_counter()
    wait_until_up(f"http://127.0.0.1:{port + 1}/health", started[-1], timeout_s=1800)
    print(f"cluster up in {time.perf_counter() - t0:.0f} s", flush=True)


def start_router(urls: list[str], port: int, policy: str, started: list) -> None:
    check_port_free("127.0.0.1", port)
    started.append(start(router_command(urls, "127.0.0.1", port, policy)))
    wait_until_up(f"http://127.0.0.1:{port}/readiness", started[-1], timeout_s=120)


def point_options(args, host: str, control: str) -> argparse.Namespace:
    return argparse.Namespace(
        host=host, duration=args.duration, warmup=args.warmup, prompt_words=args.prompt_words,
        output_tokens=args.output_tokens, server_pid=None, models_from=control,
        processes=args.locust_processes,
    )  # fmt: skip


def hot_load_check(control: str, router: str, urls: list[str], spare: str | None) -> dict:
    """A spare adapter loaded through the control API: on every replica, served through the
    router, then unloaded from every replica."""
    if spare is None:
        return {"skipped": "no adapter beyond --many under the adapter root"}
    name = "hot-" + Path(spare).name
    auth = {"authorization": f"Bearer {os.environ['LORALAND_ADMIN_TOKEN']}"}
    key = api_key_header()  # the replicas inherit LORALAND_API_KEY when it is set
    seen = {"name": name}
    answer = requests.post(f"{control}/v1/adapters", json={"name": name, "path": spare},
                           headers=auth, timeout=600)  # fmt: skip
    seen["load_status"] = answer.status_code

    def listed() -> list[bool]:
        listings = [requests.get(f"{u}/v1/models", headers=key, timeout=30) for u in urls]
        ids = [{c["id"] for c in listing.json()["data"]} for listing in listings]
        return [name in i for i in ids]

    seen["listed_after_load"] = listed()
    body = {"model": name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    served = requests.post(f"{router}/v1/chat/completions", json=body, timeout=300,
                           headers={"X-SMG-Routing-Key": name, **key})  # fmt: skip
    seen["served_status"] = served.status_code
    seen["unload_status"] = requests.delete(f"{control}/v1/adapters/{name}", headers=auth,
                                            timeout=600).status_code  # fmt: skip
    seen["listed_after_unload"] = listed()
    seen["ok"] = (
        seen["load_status"] == 200 and all(seen["listed_after_load"])
        and seen["served_status"] == 200 and seen["unload_status"] == 200
        and not any(seen["listed_after_unload"])
    )  # fmt: skip
    return seen


def summarize(results: dict) -> dict:
    summary = {}
    for comparison, (low, high) in ARMS.items():
        rounds = [r for r in results["rounds"] if r["comparison"] == comparison]
        if not rounds:
            continue
        for metric in ("output_throughput", "ttft_p50"):
            pairs = [(r["points"][high].get(metric), r["points"][low].get(metric)) for r in rounds]
            ratios = [a / b for a, b in pairs if a and b]
            summary[f"{comparison}:{high}/{low}:{metric}"] = median_range(ratios)
        for arm in (low, high):
            for metric in ("output_throughput", "ttft_p50"):
                values = [r["points"][arm].get(metric) for r in rounds]
                summary[f"{comparison}:{arm}:{metric}"] = median_range(values)
    for arm in ARMS["scale"]:
        summary[f"adapters/base:{arm}:output_throughput"] = median_range(
            adapters_over_base(results["rounds"], arm)
        )
    return summary


def adapters_over_base(rounds: list[dict], arm: str) -> list[float]:
    """Per round, the arm's tok/s with adapters ÷ with the base (``scale`` ÷ ``scale-base``)."""
    tok = {(r["comparison"], r["round"]): r["points"][arm].get("output_throughput")
           for r in rounds if r["comparison"] in ("scale", "scale-base")}  # fmt: skip
    ratios = [(tok[("scale", n)], tok.get(("scale-base", n))) for c, n in tok if c == "scale"]
    return [a / b for a, b in ratios if a and b]


def markdown(results: dict) -> str:
    s, settings = results["summary"], results["settings"]
    lines = [
        "# Replicas behind sglang-router",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"{settings['replicas']} replicas (GPUs {settings.get('gpus') or 'one each'}), "
        f"{settings['users']} streams, "
        f"{settings['duration']}-s points ({settings['warmup']} s warm-up), "
        f"{settings['pairs']} alternating rounds per comparison. Median [min–max] of the rounds.",
        "",
        "| comparison | arm | output tok/s | TTFT p50 (ms) |",
        "|---|---|---|---|",
    ]
    for comparison, arms in ARMS.items():
        for arm in arms:
            tok = s.get(f"{comparison}:{arm}:output_throughput") or {}
            ttft = s.get(f"{comparison}:{arm}:ttft_p50") or {}
            lines.append(f"| {comparison} | {arm} | {cell(tok)} | {cell(ttft, 1000)} |")
    lines += ["", "| ratio | tok/s | TTFT p50 |", "|---|---|---|"]
    for comparison, (low, high) in ARMS.items():
        tok = s.get(f"{comparison}:{high}/{low}:output_throughput") or {}
        ttft = s.get(f"{comparison}:{high}/{low}:ttft_p50") or {}
        lines.append(f"| {comparison}: {high} ÷ {low} | {cell(tok, 1, 2)} | {cell(ttft, 1, 2)} |")
    for arm in ARMS["scale"]:
        tok = s.get(f"adapters/base:{arm}:output_throughput") or {}
        lines.append(f"| {arm}: {results['settings']['adapters']} adapters ÷ base | "
                     f"{cell(tok, 1, 2)} | |")  # fmt: skip
    lines += ["", f"Hot-load across replicas: `{json.dumps(results.get('hot_load'))}`", ""]
    return "\n".join(lines)


def cell(stat: dict, scale: float = 1.0, digits: int = 0) -> str:
    median, spread = fmt(stat, scale, digits)
    return median if spread == "—" else f"{median} [{spread}]"


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib here: rounds.png left out (make it with --plot-only)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in ARMS if any(r["comparison"] == c for r in results["rounds"])]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), squeeze=False)
    for ax, comparison in zip(axes[0], shown, strict=True):
        rounds = [r for r in results["rounds"] if r["comparison"] == comparison]
        for arm in ARMS[comparison]:
            values = [(r["points"][arm].get("output_throughput") or 0) / 1000 for r in rounds]
            ax.plot(range(1, len(values) + 1), values, marker="o", label=arm)
        ax.set_title(f"{comparison}: output tok/s per round")
        ax.set_xticks(range(1, len(rounds) + 1))
        ax.set_xlabel("round")
        ax.set_ylabel("k tok/s")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)


def run(args) -> dict:
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    config, spare = cluster_config(args, out)
    urls = replica_urls(load_registry(config).cluster, args.port)
    control, main_router = f"http://127.0.0.1:{args.port + 1}", f"http://127.0.0.1:{args.port}"
    results = {"settings": {k: v for k, v in vars(args).items()}, "rounds": []}
    results["settings"]["command"] = "python -m loadtest.router " + " ".join(sys.argv[1:])
    started: list[subprocess.Popen] = []
    try:
        start_cluster(config, args.port, args.backend, started)
        start_router(urls[:1], args.port + 100, "round_robin", started)
        start_router(urls, args.port + 200, "round_robin", started)
        hosts = {"one-replica": args.port + 100, "round-robin": args.port + 200,
                 "replicas": args.port, "adapter-affinity": args.port}  # fmt: skip
        warm = point_options(args, f"http://127.0.0.1:{args.port + 200}", control)
        warm.duration, warm.warmup = 10, 0
        measure_point(warm, min(args.users, 128), args.many, out / "raw" / "warm-up.jsonl")
        wanted = [("scale", args.adapters), ("scale-base", 0), ("affinity", args.many)]
        for number in range(1, args.pairs + 1):  # a round of each comparison, then the next
            for comparison, adapters in [c for c in wanted if c[0] in args.comparisons]:
                arms = ARMS[comparison] if number % 2 else ARMS[comparison][::-1]
                points = {}
                for arm in arms:
                    print(f"[router] {comparison} round {number}: {arm}", flush=True)
                    options = point_options(args, f"http://127.0.0.1:{hosts[arm]}", control)
                    raw = out / "raw" / f"{comparison}-{arm}-r{number}.jsonl"
                    points[arm] = measure_point(options, args.users, adapters, raw)
                    print(f"    {describe(points[arm])}", flush=True)
                results["rounds"].append({"comparison": comparison, "round": number,
                                          "adapters": adapters, "points": points})  # fmt: skip
                results["summary"] = summarize(results)
                write(out, results)
        results["hot_load"] = hot_load_check(control, main_router, urls, spare)
        results["replica_urls"] = urls
        write(out, results)
        plot(results, out)
    finally:
        stop_all(started[::-1])  # the routers first, then the cluster (which stops its replicas)
    print((out / "summary.md").read_text(), flush=True)
    return results


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="adapters.yaml with more than --many adapters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="an engine.sglang setting for every replica")  # fmt: skip
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8300,
                        help=f"the cluster's router; control +1, replicas +{REPLICA_PORT_OFFSET}…, "
                        "the one-replica router +100, the round-robin one +200")  # fmt: skip
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=128, help="adapters in the scale rounds")
    parser.add_argument("--many", type=int, default=512, help="adapters in the affinity rounds")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--comparisons", default="scale,scale-base,affinity",
                        type=lambda t: t.split(","))  # fmt: skip
    parser.add_argument("--gpus", type=lambda t: [int(g) for g in t.split(",")],
                        help="cluster.gpus, e.g. 0,0: two replicas sharing GPU 0 (they need "
                             "--set 'extra={max_total_tokens: N}')")  # fmt: skip
    parser.add_argument("--duration", type=int, default=20, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--prompt-words", default="90-110")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--locust-processes", type=int, default=4,
                        help="Locust processes per point (one tops out near one core)")  # fmt: skip
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot-only", action="store_true", help="rounds.png from results.json")
    args = parser.parse_args()
    if not args.plot_only and not args.config:
        parser.error("--config is required")
    if unknown := sorted(set(args.comparisons) - set(ARMS)):
        parser.error(f"--comparisons: no {', '.join(unknown)} (there are {', '.join(ARMS)})")
    if args.plot_only:
        plot(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
        return
    os.environ["LORALAND_ADMIN_TOKEN"] = os.urandom(16).hex()  # this run's cluster's only
    run(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
