"""Sampling settings of a request, resolved in one place: the request's value, else the adapter's
``generation`` default from adapters.yaml (the base's, ``base.generation``, for the base model and
adapters without an entry), else the server-wide default (``SamplingParams()``).

The API, the app, the CLI and the evaluator all call ``resolve``, so one adapter answers the same
input the same way wherever it is asked.
"""

from __future__ import annotations

import dataclasses

from .interface import SamplingParams
from .registry import AdapterSpec, BaseSpec, GenerationDefaults

RESOLVED_FIELDS = tuple(GenerationDefaults.model_fields)
"""The fields an adapter may set a default for (max_tokens, temperature, top_p, top_k, stop,
response_format)."""


def resolve(spec: AdapterSpec | BaseSpec | None, **requested) -> SamplingParams:
    """``SamplingParams`` from the request's explicit values (``None`` = not given), the
    defaults of ``spec`` (an adapter's entry, or the base's for the base model and adapters
    without one; ``None``: none), and the server-wide defaults, in that order; then validated."""
    params = SamplingParams()
    defaults = spec.generation if spec else GenerationDefaults()
    layers = [
        {k: getattr(defaults, k) for k in RESOLVED_FIELDS if getattr(defaults, k) is not None},
        {k: v for k, v in requested.items() if v is not None},
    ]
    known = {f.name for f in dataclasses.fields(SamplingParams)} - {"fit_max_tokens"}
    known |= {"response_format"}
    for layer in layers:
        for name, value in layer.items():
            if name not in known:
                raise TypeError(f"unknown sampling field {name!r}")
            if name == "response_format":
                params.constraint = value.constraint()
            else:
                setattr(params, name, list(value) if isinstance(value, list) else value)
    params.fit_max_tokens = requested.get("max_tokens") is None
    params.validate()
    return params
