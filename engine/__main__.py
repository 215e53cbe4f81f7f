"""Stream one completion from an adapter (or the base model) to the terminal.

    python -m engine --adapter sentiment "A joyless slog."   # fills the adapter's template
    python -m engine --adapter NAME --field review="A joyless slog."   # fields by name
    python -m engine --adapter NAME --no-template "prompt"   # the prompt as it is (chat-formatted)
    python -m engine --raw "Once upon a time"                # raw completion, no chat template
    python -m engine --list                                  # validate adapters.yaml, list adapters
    python -m engine "prompt"                                # the base model

Sampling settings not given resolve as in the API: the adapter's ``generation`` defaults from
adapters.yaml, else the server-wide ones (``engine.sampling.resolve``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import AdapterNotFoundError, EngineError, GenerationRequest, build_engine
from .base_model import resolve_base
from .factory import check_fit, choose_backend
from .registry import RegistryError, load_registry
from .sampling import resolve


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", help="the user message (or raw prompt with --raw)")
    parser.add_argument("--config", default="adapters.yaml", help="registry file")
    parser.add_argument("--adapter", help="adapter name; omit for the base model")
    parser.add_argument("--field", action="append", default=[], help="template field NAME=VALUE")
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"], help="override the registry")
    parser.add_argument("--max-tokens", type=int, help="default: the adapter's, else the server's")
    parser.add_argument("--temperature", type=float, help="default: the adapter's, else 1.0")
    parser.add_argument("--no-template", action="store_true", help="skip the adapter's template")
    parser.add_argument("--raw", action="store_true", help="no chat template: a raw completion")
    parser.add_argument("--list", action="store_true", help="list adapters and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace, registry) -> GenerationRequest:
    spec = next((a for a in registry.adapters if a.name == args.adapter), None)
    text = args.prompt
    if args.field:
        if spec is None:
            raise SystemExit("--field needs --adapter naming an adapter with a template")
        text = spec.render(dict(f.split("=", 1) for f in args.field))
    elif text and spec is not None and not (args.raw or args.no_template):
        try:
            text = spec.fill(text)
        except ValueError as err:
            raise SystemExit(f"{err} (--field NAME=VALUE), or pass --no-template") from None
    if not text:
        raise SystemExit("give a prompt or --field values")
    asked = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    params = resolve(spec or registry.base, **asked)
    if args.raw:
        return GenerationRequest(adapter=args.adapter, prompt=text, params=params)
    messages = [{"role": "user", "content": text}]
    return GenerationRequest(adapter=args.adapter, messages=messages, params=params)


async def run(args: argparse.Namespace) -> int:
    registry = load_registry(args.config)
    if args.list:
        check_fit(
            registry, resolve_base(registry.base.model), choose_backend(registry.engine.backend)
        )
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
