"""The OpenAI-compatible HTTP API: wire types (protocol) and routes."""

from .routes import create_api

__all__ = ["create_api"]
