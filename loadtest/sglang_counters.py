"""SGLang's own counters of its scheduler's passes, sampled while a load test runs.

    python -m loadtest.bench --config /tmp/synth7b/adapters.yaml --plan pairs --pairs 1 \
        --users 256 --adapters 128 --sglang-counters --out /tmp/passes

With ``--sglang-counters`` the bench starts SGLang with ``enable_metrics`` and reads, once a
second, the counters its scheduler writes (prometheus_client's multiprocess files, in
``PROMETHEUS_MULTIPROC_DIR``). Each point then records over its steady window how many prefill
and decode passes ran, the prompt tokens a prefill pass took and the requests it admitted (the
point's arrivals a second ÷ its prefill passes a second), the decode batch's mean size, and the
prefill delayer's decisions by outcome: whether the HTTP arm runs more, smaller prefill passes
than the engine-direct one, and whether ``prefill_delay_min_slots`` merges them. A read costs
the serving process a few milliseconds a second (in a thread); the counters cost SGLang's
scheduler a counter increment a pass. A long prompt's chunks count as prefill passes, and a
pass's prompt tokens include those from the prefix cache. Names as SGLang 0.5.17's
``SchedulerMetricsCollector`` writes them. The figures hold for ``tp_size`` 1: with more, every
rank counts its decode passes (rank 0 alone the rest), so decode passes read that many times
over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict

log = logging.getLogger(__name__)

PASSES = "sglang:cuda_graph_passes_total"
"""Forward passes by ``mode``: prefill_cuda_graph, prefill_none, decode_cuda_graph, decode_none."""
TOKENS = "sglang:realtime_tokens_total"
"""Tokens by ``mode``, added each pass: prefill_compute, prefill_cache, decode (the batch)."""
DELAYER = "sglang:prefill_delayer_outcomes_total"
"""The prefill delayer's decisions by ``output_reason``: delay (a pass without the prefill),
no_wait, wait_success, wait_timeout, token_watermark, or "" (nothing to prefill)."""


def multiprocess_dir() -> str | None:
    """Where SGLang's processes write their metrics (set by ``sglang.Engine`` with
    ``enable_metrics``); None where it set none."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def read_counters(path: str) -> dict[str, float]:
    """The scheduler's counters summed over its processes: ``prefill_passes``,
    ``decode_passes``, ``prefill_tokens``, ``decode_tokens`` and ``delayer_<outcome>``."""
    from prometheus_client.multiprocess import MultiProcessCollector

    totals: dict[str, float] = defaultdict(float)
    for family in MultiProcessCollector(None, path=path).collect():
        for sample in family.samples:
            if key := counter_key(sample.name, sample.labels):
                totals[key] += sample.value
    return dict(totals)


def counter_key(name: str, labels: dict[str, str]) -> str | None:
    """This module's name for one of SGLang's counter samples; None for the rest."""
    if name == PASSES:
        return f"{labels.get('mode', '').split('_')[0]}_passes"
    if name == TOKENS:
        mode = labels.get("mode", "")
        return "decode_tokens" if mode == "decode" else "prefill_tokens"
    if name == DELAYER:
        return f"delayer_{labels.get('output_reason') or 'nothing_to_prefill'}"
    return None


class CounterTrace:
    """SGLang's counters read every ``interval`` seconds while ``run`` runs."""

    def __init__(self, path: str, interval: float = 1.0):
        self.path = path
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        """(wall-clock time, counters) per read."""
        self.failed_reads = 0

    async def run(self) -> None:
        while True:
            try:
                counters = await asyncio.to_thread(read_counters, self.path)
            except Exception as err:  # a file caught mid-write: this read is lost, not the trace
                self.failed_reads += 1
                if self.failed_reads in (1, 10, 100, 1000):  # said, not once a second
                    log.warning("SGLang's counters unread (%d reads so far): %s",
                                self.failed_reads, err)  # fmt: skip
            else:
                self.samples.append((time.time(), counters))
            await asyncio.sleep(self.interval)

    def figures(self, low: float, high: float, arrivals_per_s: float | None = None) -> dict:
        """The passes over [low, high] (wall clock), between the first and last reads inside
        it; ``arrivals_per_s``: the point's requests arriving a second, each prefilled once."""
        inside = [(at, counters) for at, counters in self.samples if low <= at <= high]
        if len(inside) < 2:
            return {}
        (start, first), (end, last) = inside[0], inside[-1]
        delta = {key: last.get(key, 0.0) - first.get(key, 0.0) for key in last}
        return pass_figures(delta, end - start, arrivals_per_s)


def pass_figures(delta: dict[str, float], seconds: float, arrivals_per_s: float | None) -> dict:
    """Rates and sizes of the passes from counter increases over ``seconds``."""
    prefills, decodes = delta.get("prefill_passes", 0.0), delta.get("decode_passes", 0.0)
    prompt_tokens = delta.get("prefill_tokens", 0.0)
    figures = {
        "prefill_passes_per_s": prefills / seconds,
        "decode_passes_per_s": decodes / seconds,
        "prefill_tokens_per_pass": prompt_tokens / prefills if prefills else None,
        "requests_per_prefill": (
            arrivals_per_s * seconds / prefills if prefills and arrivals_per_s else None
        ),
        "decode_batch_mean": delta.get("decode_tokens", 0.0) / decodes if decodes else None,
        "delayer_delays_per_s": delta.get("delayer_delay", 0.0) / seconds,
    }
    outcomes = {k.removeprefix("delayer_"): v for k, v in delta.items() if k.startswith("delayer")}
    return figures | {"delayer_outcomes": outcomes} if outcomes else figures
