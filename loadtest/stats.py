"""Serving statistics from raw per-request records, as vLLM's benchmark_serving defines them.

A record: ``{"start": s, "ttft": s, "e2e": s, "itl": [s, ...], "output_tokens": n, "ok": bool}``.
- TTFT: request sent → first token with text (the first non-empty ``delta.content``).
- First event: request sent → the server's first event (the engine's first token ids, even
  those that decode to no text yet), where recorded; vLLM's benchmark_serving times this one.
- ITL: gaps between consecutive streamed tokens (all pooled).
- TPOT: per request (e2e − TTFT) / (output tokens − 1). - E2E: request sent → last token.
- Served: with a ``window``, requests completed in it ÷ requests that arrived in it, per
  second; well below 1, arrivals outran the server (its backlog grew) and the point is no
  steady state.
- Throughput: with a ``window`` (steady state: after the warm-up, before the clients stop) the
  tokens streamed inside it, from every request that streamed there (also those cut at the end:
  ``token_times``, the chunks' arrival times since ``start``), over its length; without one,
  the completed requests' tokens over first start → last end.
"""

from __future__ import annotations

import math

WORDS = """the model adapter serve batch token river mountain city music album track review movie
message address street number question answer data engine request stream latency quiet bright
green blue history science market energy garden travel window paper light sound""".split()
"""Prompt words of the load-test clients (Locust and ``loadtest.bench``)."""


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def failed(record: dict) -> bool:
    """Neither completed nor left by its client / cut off when the clients stopped."""
    return not record.get("ok") and not record.get("cancelled") and not record.get("cut")


def tokens_inside(record: dict, low: float, high: float) -> float:
    """Output tokens a request streamed inside [low, high] (wall clock), spread over its chunks."""
    times = record.get("token_times") or []
    if not times:
        return 0.0
    inside = sum(low <= record["start"] + t <= high for t in times)
    return inside * record.get("output_tokens", len(times)) / len(times)


def summarize(records: list[dict], window: tuple[float, float] | None = None) -> dict:
    """Statistics of one load point; ``window`` = (from, to) wall-clock seconds of steady state."""
    if window:
        low, high = window
        stats = summarize([r for r in records if low <= r.get("start", low) <= high])
        seconds = high - low
        ended = [r for r in records if r.get("ok") and low <= r["start"] + r["e2e"] <= high]
        tokens = sum(tokens_inside(r, low, high) for r in records)
        arrived = sum(low <= r.get("start", low) <= high for r in records) / seconds
        return stats | {
            "duration_s": seconds,
            "arrived_per_s": arrived,
            "served": len(ended) / seconds / arrived if arrived else None,
            "request_throughput": len(ended) / seconds,
            "output_throughput": tokens / seconds,
            "output_tokens": round(tokens),
            "throughput_window": "steady",
        }
    ok = [r for r in records if r.get("ok")]
    failures = sum(failed(r) for r in records)
    if not ok:
        return {"completed": 0, "failures": failures}
    window = max(r["start"] + r["e2e"] for r in ok) - min(r["start"] for r in ok)
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    itl = [gap for r in ok for gap in r.get("itl", [])]
    tpot = [
        (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1)
        for r in ok
        if r.get("ttft") is not None and r["output_tokens"] > 1
    ]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["output_tokens"] for r in ok)
    first = [r["first_event"] for r in ok if r.get("first_event") is not None]
    events = {"first_event_p50": percentile(first, 50), "first_event_p90": percentile(first, 90)}
    return {
        "completed": len(ok),
        "failures": failures,
        "duration_s": window,
        "request_throughput": len(ok) / window if window > 0 else None,
        "output_throughput": tokens / window if window > 0 else None,
        "output_tokens": tokens,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50),
        "itl_p90": percentile(itl, 90),
        "tpot_mean": sum(tpot) / len(tpot) if tpot else None,
        "tpot_p50": percentile(tpot, 50),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p90": percentile(e2e, 90),
    } | (events if first else {})


def ratios(point: dict, control: dict) -> dict:
    """A point's key figures divided by the base-only control at the same concurrency."""
    out = {}
    for key in ("output_throughput", "request_throughput", "ttft_p50", "itl_p50", "e2e_p50"):
        a, b = point.get(key), control.get(key)
        out[f"{key}_ratio"] = a / b if a is not None and b else None
    return out


def parse_range(text: str) -> tuple[int, int]:
    """``"100"`` → (100, 100); ``"90-110"`` → (90, 110)."""
    low, sep, high = str(text).partition("-")
    low_n, high_n = int(low), int(high) if sep else int(low)
    if low_n < 1 or high_n < low_n:
        raise ValueError(f"bad range {text!r}: want N or LOW-HIGH with 1 <= LOW <= HIGH")
    return low_n, high_n


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1 / (k**s) for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def point_key(users: int, adapters: int) -> str:
    return f"u{users}-a{adapters}"
