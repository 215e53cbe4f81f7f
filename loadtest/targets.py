"""Which models a load test sends requests to, from a server's ``/v1/models`` (no Locust here:
importing Locust patches the standard library with gevent)."""

from __future__ import annotations

import logging
import os

from loadtest.stats import zipf_weights


class SetupError(Exception):
    """The load test cannot start as asked."""


def api_key_header() -> dict[str, str]:
    """``Authorization: Bearer $LORALAND_API_KEY`` when that is set (the server asks every /v1
    request for it), else nothing."""
    key = os.environ.get("LORALAND_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def pick_models(options, cards: list[dict]) -> dict:
    """The base and the adapters in play from ``/v1/models``' cards (the base: the card without a
    ``parent``), as the names requests will carry (``--model-format``)."""
    base = next((c["id"] for c in cards if not c.get("parent")), None)
    if base is None:
        raise SetupError("/v1/models lists no base model (a card without 'parent')")
    adapters = sorted(c["id"] for c in cards if c.get("parent"))
    if getattr(options, "models", ""):
        listed = [name.strip() for name in options.models.split(",") if name.strip()]
        if unknown := [name for name in listed if name not in adapters]:
            raise SetupError(f"--models names adapters the server does not list: {unknown}")
        adapters = listed
    wanted = 0 if options.distribution == "base" else options.adapters
    if wanted < 0:
        wanted = len(adapters)
    if wanted > len(adapters):
        logging.warning(
            "--adapters %d, but the server has %d: using all %d",
            wanted,
            len(adapters),
            len(adapters),
        )
        wanted = len(adapters)
    form = getattr(options, "model_format", "{adapter}")
    chosen = [model_name(form, base, a) for a in adapters[:wanted]]
    weights = (
        zipf_weights(len(chosen), options.zipf_s)
        if options.distribution == "zipf" and chosen
        else None
    )
    logging.info("models in play: %s", ", ".join(chosen) or f"{base} (base only)")
    return {"adapters": chosen, "base": base, "weights": weights}


def model_name(form: str, base: str, adapter: str) -> str:
    """A request's ``model`` for ``adapter``: ``--model-format`` filled in."""
    if "{adapter}" not in form:
        raise SetupError(f"--model-format {form!r} must contain {{adapter}}")
    try:
        return form.format(base=base, adapter=adapter)
    except (KeyError, IndexError, ValueError) as err:
        raise SetupError(f"--model-format {form!r}: only {{base}} and {{adapter}}: {err}") from None
