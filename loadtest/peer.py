"""Another OpenAI server as the peer: SGLang's own ``launch_server`` over the same model and
adapters, driven by the same Locust user in alternating (base, adapters) pairs.

    python -m loadtest.peer --config /tmp/synth7b/adapters.yaml --launch sglang --port 31000 \
        --set max_loras_per_batch=128 --set mem_fraction_static=0.7 \
        --users 256 --adapters 128 --pairs 3 --duration 20 --warmup 5 --out /tmp/peer
    python -m loadtest.peer --config adapters.yaml --launch ours ...   # engine.api (a control)
    python -m loadtest.peer --host http://127.0.0.1:31000 --model-format '{base}:{adapter}' ...

``--launch sglang`` starts ``python -m sglang.launch_server`` with the registry's base and every
registered adapter (``--lora-paths name=path ...``) and the registry's SGLang settings turned
into its flags (``sglang_server_cmd``); SGLang's own serving defaults stay (``stream_interval``
1, no adaptive interval: that is ours). SGLang 0.5.17's OpenAI API serves an adapter when the
request's ``model`` is ``<served name>:<adapter>`` (or ``lora_path`` in the body); any other
``model`` gets the base, silently, so the Locust user runs with ``--model-format
'{base}:{adapter}'`` and the run first checks that the server refuses an adapter it does not
have (``check_routing``): if it answered, adapter requests would be measuring the base.

Writes ``results.json`` (rounds, summary) and ``summary.md`` into ``--out`` (``loadtest.pairs``
makes the side-by-side with ``loadtest.bench --plan pairs``), and the server's log beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from engine.base_model import resolve_base
from engine.registry import SGLangSettings, load_registry, with_overrides
from loadtest.pairs import write_pairs
from loadtest.procs import ChildrenMeter, process_tree, start_server, wait_for_peer
from loadtest.report import describe
from loadtest.sweep import measure_point
from loadtest.targets import api_key_header

ROOT = Path(__file__).resolve().parents[1]
MODEL_FORMATS = {"sglang": "{base}:{adapter}", "ours": "{adapter}"}
SERVED_NAME = "base"


def sglang_server_cmd(
    base_dir: str, adapters: dict[str, str], settings: SGLangSettings, dtype: str, port: int
) -> list[str]:
    """``sglang.launch_server`` (0.5.17) for the registry's model, adapters and settings."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", base_dir,
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--enable-lora",
        "--max-loras-per-batch", str(settings.max_loras_per_batch),
        "--lora-backend", settings.lora_backend,
        "--attention-backend", settings.attention_backend,
        "--sampling-backend", settings.sampling_backend,
        "--mem-fraction-static", str(settings.mem_fraction_static),
        "--grammar-backend", "llguidance", "--log-level", "warning",
    ]  # fmt: skip
    optional = {
        "--max-loaded-loras": settings.max_loaded_loras,
        "--max-lora-rank": settings.max_lora_rank,
        "--chunked-prefill-size": settings.chunked_prefill_size,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
    if settings.lora_target_modules:
        cmd += ["--lora-target-modules", *settings.lora_target_modules]
    if not adapters and not (settings.max_lora_rank and settings.lora_target_modules):
        cmd += ["--max-lora-rank", "64", "--lora-target-modules", "all"]
    if not settings.cuda_graph:
        cmd.append("--disable-cuda-graph")
    if settings.stream_interval != "auto":
        cmd += ["--stream-interval", str(settings.stream_interval)]
    if settings.tp_size > 1:
        cmd += ["--tp-size", str(settings.tp_size)]
    if settings.dp_size > 1:
        cmd += ["--dp-size", str(settings.dp_size)]
    if adapters:
        cmd += ["--lora-paths", *(f"{name}={path}" for name, path in adapters.items())]
    return cmd


def ours_server_cmd(config: str, port: int) -> list[str]:
    return [sys.executable, "-m", "engine.api", "--config", config, "--port", str(port)]


def launch(args) -> subprocess.Popen:
    """Start the peer and return once it answers /health (SGLang's: 503 until warmed up)."""
    registry = load_registry(args.config)
    settings = with_overrides(registry.engine.sglang, args.set)
    if args.launch == "sglang":
        adapters = {a.name: str(a.path) for a in registry.adapters}
        base_dir = resolve_base(registry.base.model)
        cmd = sglang_server_cmd(base_dir, adapters, settings, registry.base.dtype, args.port)
    else:
        cmd = ours_server_cmd(args.config, args.port)
    print(f"starting: {' '.join(cmd[:24])} ... ({len(cmd)} arguments)", flush=True)
    t0 = time.perf_counter()
    server = start_server(cmd, f"http://127.0.0.1:{args.port}/health", args.start_timeout)
    print(f"peer up in {time.perf_counter() - t0:.0f}s", flush=True)
    return server


def check_routing(host: str, model_format: str) -> dict:
    """The peer serves adapters under ``model_format`` names and refuses unknown ones.

    Returns what it saw; raises if an unknown adapter is answered (adapter requests would then
    get the base) or a known one is refused.
    """
    auth = api_key_header()  # SGLang's own server, started without --api-key, ignores it
    cards = requests.get(f"{host}/v1/models", headers=auth, timeout=30).json()["data"]
    base = next(c["id"] for c in cards if not c.get("parent"))
    adapters = sorted(c["id"] for c in cards if c.get("parent"))
    if not adapters:
        raise RuntimeError(f"{host}/v1/models lists no adapters (cards with 'parent'): {cards}")

    def status(model: str) -> tuple[int, str]:
        body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 2, "temperature": 0}  # fmt: skip
        answer = requests.post(f"{host}/v1/chat/completions", json=body, headers=auth, timeout=120)
        return answer.status_code, answer.text[:300]

    known = model_format.format(base=base, adapter=adapters[0])
    unknown = model_format.format(base=base, adapter="no-such-adapter-x9")
    seen = {"base": base, "adapters": len(adapters), "known": known, "unknown": unknown}
    seen["known_status"], seen["known_body"] = status(known)
    seen["unknown_status"], seen["unknown_body"] = status(unknown)
    seen["base_status"], _ = status(base)
    if seen["unknown_status"] == 200:
        raise RuntimeError(f"the peer answered an adapter it does not have ({unknown}): {seen}")
    if seen["known_status"] != 200 or seen["base_status"] != 200:
        raise RuntimeError(f"the peer refused a model it lists: {seen}")
    return seen


def warm_up(options, adapters: int, out: Path) -> None:
    """A short point first: kernels compile and every adapter is touched, outside the numbers."""
    warm = argparse.Namespace(**{**vars(options), "duration": 5, "warmup": 0})
    measure_point(warm, 64, adapters, out / "raw" / "warm-up.jsonl")


def run_pairs(args, server_pid: int | None) -> dict:
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    options = argparse.Namespace(
        host=args.host, duration=args.duration, warmup=args.warmup,
        prompt_words=args.prompt_words, output_tokens=args.output_tokens,
        server_pid=server_pid, model_format=args.model_format,
        prompt_template="raw" if args.model_format == "{adapter}" else "",  # ours: its extension
    )  # fmt: skip
    results = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "rounds": []}
    results["settings"]["command"] = "python -m loadtest.peer " + " ".join(sys.argv[1:])
    results["routing"] = check_routing(args.host, args.model_format)
    print(f"routing: {json.dumps(results['routing'])}", flush=True)
    warm_up(options, max(args.adapters), out)
    for users in args.users:
        if users == args.sync_users:
            wait_for_peer(args)
        for adapters in args.adapters:
            for number in range(1, args.pairs + 1):
                points = {}
                for kind, count in [("http-base", 0), ("http-adapters", adapters)]:
                    print(f"[peer] {users} streams, round {number}, {kind}", flush=True)
                    children = ChildrenMeter(server_pid) if server_pid else None
                    raw = out / "raw" / f"u{users}-a{count}-r{number}.jsonl"
                    point = measure_point(options, users, count, raw)
                    point["engine_children_cpu_cores"] = children.cores() if children else None
                    points[kind] = point
                    print(f"    {describe(point)}", flush=True)
                results["rounds"].append(
                    {"users": users, "adapters": adapters, "round": number, "points": points}
                )
                write_pairs(out, results, f"Peer ({args.launch or args.host}), HTTP")
                bad = [k for k, p in points.items()
                       if p.get("failures") or not p.get("output_throughput")]  # fmt: skip
                if args.strict and bad:
                    raise RuntimeError(f"peer: points without a clean result: {bad}")
    print((out / "summary.md").read_text(), flush=True)
    return results


def main() -> None:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--launch", choices=["sglang", "ours"], help="start this server")
    target.add_argument("--host", help="a running server, e.g. http://127.0.0.1:31000")
    parser.add_argument("--config", help="adapters.yaml (model, adapters, SGLang settings)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="SGLang setting, as loadtest.bench's --set")  # fmt: skip
    parser.add_argument("--port", type=int, default=31000)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--model-format", help="default: {base}:{adapter} for sglang, else ours")
    parser.add_argument("--users", type=ints, default=[256])
    parser.add_argument("--adapters", type=ints, default=[128])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=20, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--prompt-words", default="90-110")
    parser.add_argument("--output-tokens", default="90-110")
    parser.add_argument("--strict", action="store_true",
                        help="stop where a point had failures or no result")  # fmt: skip
    parser.add_argument("--sync-users", type=int, help="start these rounds with the other job")
    parser.add_argument("--sync-mine", help="file touched when this server is ready")
    parser.add_argument("--sync-theirs", help="file the other job touches when it is due")
    parser.add_argument("--sync-timeout", type=float, default=300)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.launch and not args.config:
        parser.error("--launch needs --config")
    args.model_format = args.model_format or MODEL_FORMATS.get(args.launch, "{adapter}")
    server = None
    if args.launch:
        server = launch(args)
        args.host = f"http://127.0.0.1:{args.port}"
    try:
        run_pairs(args, server.pid if server else None)
    finally:
        if server:
            stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the server and every process it started (SGLang's scheduler and detokenizer hold the
    GPU's memory; the next step on this GPU needs it back)."""
    family = process_tree(server.pid) - {server.pid}
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
