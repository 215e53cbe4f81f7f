"""Serve the OpenAI-compatible API alone (no UI).

python -m engine.api --config adapters.yaml --port 8000
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..factory import build_engine
from ..registry import load_registry
from .routes import create_api
from .server import run_server


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible API over adapters.yaml")
    parser.add_argument("--config", default="adapters.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    registry = load_registry(args.config)
    engine = build_engine(registry, backend=args.backend)
    app = create_api(
        engine,
        registry,
        admin_token=os.environ.get("LORALAND_ADMIN_TOKEN"),
        adapter_root=os.environ.get("LORALAND_ADAPTER_ROOT", Path(args.config).parent / "adapters"),
        api_key=os.environ.get("LORALAND_API_KEY"),
    )
    run_server(app, args.host, args.port)


if __name__ == "__main__":
    main()
