"""Stream one completion from an adapter (or the base model) to the terminal.

python -m engine --adapter NAME "prompt"            # chat-formatted prompt, streamed
python -m engine --adapter NAME --field review="A joyless slog."   # fill the adapter's template
python -m engine --list                             # validate adapters.yaml, list adapters
python -m engine "prompt"                           # the base model
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import AdapterNotFoundError, EngineError, GenerationRequest, SamplingParams, build_engine
from .base_model import resolve_base
from .factory import check_fit
from .registry import RegistryError, load_registry


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", help="the user message (or raw prompt with --raw)")
    parser.add_argument("--config", default="adapters.yaml", help="registry file")
    parser.add_argument("--adapter", help="adapter name; omit for the base model")
    parser.add_argument("--field", action="append", default=[], help="template field NAME=VALUE")
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"], help="override the registry")
    parser.add_argument("--max-tokens", type=int, help="default: the adapter's, else 128")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--raw", action="store_true", help="no chat template: a raw completion")
    parser.add_argument("--list", action="store_true", help="list adapters and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace, registry) -> GenerationRequest:
    spec = (
        registry.adapter(args.adapter)
        if args.adapter in {a.name for a in registry.adapters}
        else None
    )
    text = args.prompt
    if args.field:
        if spec is None:
            raise SystemExit("--field needs --adapter naming an adapter with a template")
        text = spec.render(dict(f.split("=", 1) for f in args.field))
    if not text:
        raise SystemExit("give a prompt or --field values")
    default_tokens = spec.generation.max_tokens if spec else 128
    params = SamplingParams(
        max_tokens=args.max_tokens or default_tokens, temperature=args.temperature
    )
    if args.raw:
        return GenerationRequest(adapter=args.adapter, prompt=text, params=params)
    messages = [{"role": "user", "content": text}]
    return GenerationRequest(adapter=args.adapter, messages=messages, params=params)


async def run(args: argparse.Namespace) -> int:
    registry = load_registry(args.config)
    if args.list:
        check_fit(registry, resolve_base(registry.base.model))
        print(f"{args.config}: valid, base {registry.base.model}")
        for spec in registry.adapters:
            print(f"{spec.name:24s} {spec.category:16s} {spec.description}")
        return 0
    request = build_request(args, registry)
    engine = build_engine(registry, backend=args.backend)
    try:
        async for chunk in engine.stream(request):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                t, u = chunk.timings, chunk.usage
                rate = f"{t.decode_tokens_per_s:.1f} tok/s" if t.decode_tokens_per_s else "n/a"
                print(
                    f"\n[{engine.backend}] {u.prompt_tokens} prompt + {u.completion_tokens} "
                    f"completion tokens, TTFT {t.ttft_s * 1000:.0f} ms, decode {rate}, "
                    f"finish={chunk.finish_reason}",
                    file=sys.stderr,
                )
    finally:
        await engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return asyncio.run(run(args))
    except (RegistryError, AdapterNotFoundError, EngineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
