"""SGLang's pass counters as ``loadtest.bench --sglang-counters`` reads them: prometheus_client's
multiprocess files written by other processes (SGLang's own collector where sglang is
installed), the figures per window, the pairs table, and the refusal without SGLang."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loadtest.pairs import pairs_markdown, summarize_rounds
from loadtest.sglang_counters import CounterTrace, pass_figures, read_counters

ROOT = Path(__file__).resolve().parents[1]
needs_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="needs sglang (the GPU machine)"
)

SGLANG_SHAPED = """
from prometheus_client import Counter
labels = ["model_name", "tp_rank"]
passes = Counter("sglang:cuda_graph_passes_total", "passes", labels + ["mode"])
tokens = Counter("sglang:realtime_tokens_total", "tokens", labels + ["mode"])
outcomes = Counter("sglang:prefill_delayer_outcomes_total", "outcomes",
                   labels + ["input_estimation", "output_allow", "output_reason",
                             "actual_execution"])
other = Counter("sglang:num_retracted_reqs_total", "not counted here", labels)
mine = dict(model_name="m", tp_rank="{rank}")
passes.labels(**mine, mode="prefill_cuda_graph").inc({prefills})
passes.labels(**mine, mode="prefill_none").inc(1)
passes.labels(**mine, mode="decode_cuda_graph").inc({decodes})
tokens.labels(**mine, mode="prefill_compute").inc(120 * {prefills})
tokens.labels(**mine, mode="prefill_cache").inc(10)
tokens.labels(**mine, mode="decode").inc(200 * {decodes})
outcomes.labels(**mine, input_estimation="all", output_allow="false", output_reason="delay",
                actual_execution="false").inc(3)
outcomes.labels(**mine, input_estimation="none", output_allow="true", output_reason="",
                actual_execution="false").inc(2)
other.labels(**mine).inc(7)
"""


def write_in_process(directory: Path, code: str) -> None:
    """Run ``code`` in a new interpreter writing prometheus_client's multiprocess files there."""
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_counters_are_summed_over_the_processes_that_wrote_them(tmp_path):
    write_in_process(tmp_path, SGLANG_SHAPED.format(rank=0, prefills=4, decodes=30))
    write_in_process(tmp_path, SGLANG_SHAPED.format(rank=1, prefills=6, decodes=50))
    assert read_counters(str(tmp_path)) == {
        "prefill_passes": 4 + 1 + 6 + 1,  # with and without a CUDA graph
        "decode_passes": 80,
        "prefill_tokens": 120 * 10 + 2 * 10,  # computed and from the prefix cache
        "decode_tokens": 200 * 80,
        "delayer_delay": 6,
        "delayer_nothing_to_prefill": 4,
    }


def test_a_trace_measures_between_its_first_and_last_read_inside_the_window(tmp_path):
    trace = CounterTrace(str(tmp_path))
    write_in_process(tmp_path, SGLANG_SHAPED.format(rank=0, prefills=4, decodes=30))
    trace.samples.append((100.0, read_counters(str(tmp_path))))  # before the window
    trace.samples.append((101.0, read_counters(str(tmp_path))))
    write_in_process(tmp_path, SGLANG_SHAPED.format(rank=1, prefills=19, decodes=50))
    trace.samples.append((111.0, read_counters(str(tmp_path))))
    figures = trace.figures(100.5, 112.0, arrivals_per_s=40.0)
    # over 10 s: 20 prefill passes (19 + 1) with 19 · 120 + 10 tokens, 50 decode passes of 200
    assert figures["prefill_passes_per_s"] == pytest.approx(2.0)
    assert figures["requests_per_prefill"] == pytest.approx(40.0 / 2.0)
    assert figures["prefill_tokens_per_pass"] == pytest.approx((19 * 120 + 10) / 20)
    assert figures["decode_passes_per_s"] == pytest.approx(5.0)
    assert figures["decode_batch_mean"] == pytest.approx(200.0)
    assert figures["delayer_delays_per_s"] == pytest.approx(0.3)
    assert figures["delayer_outcomes"] == {"delay": 3, "nothing_to_prefill": 2}
    assert trace.figures(101.5, 110.0) == {}  # fewer than two reads inside: no figure


def test_figures_without_passes_or_arrivals_say_none():
    figures = pass_figures({}, 10.0, None)
    assert figures["prefill_passes_per_s"] == 0.0
    assert figures["requests_per_prefill"] is None
    assert figures["prefill_tokens_per_pass"] is None and figures["decode_batch_mean"] is None
    assert "delayer_outcomes" not in figures


def counted(tok_s, prefills_per_s, requests_per_prefill):
    return {"output_throughput": tok_s, "ttft_p50": 0.1, "completed": 100, "failures": 0,
            "prefill_passes_per_s": prefills_per_s, "requests_per_prefill": requests_per_prefill,
            "prefill_tokens_per_pass": 130.0 * requests_per_prefill, "decode_passes_per_s": 60.0,
            "decode_batch_mean": 250.0, "delayer_delays_per_s": 5.0}  # fmt: skip


def test_the_pairs_summary_shows_the_passes_where_they_were_counted():
    rounds = [
        {"users": 256, "adapters": 128, "round": n, "points": {
            "direct-adapters": counted(15000, 12.0 + n, 8.0),
            "http-adapters": counted(14000, 30.0 + n, 3.0)}}
        for n in (1, 2, 3)
    ]  # fmt: skip
    table = pairs_markdown(summarize_rounds(rounds))
    assert "SGLang's scheduler passes" in table
    assert "| direct-adapters | 14.0 | 8.0 | 1040.0 | 60.0 | 250.0 | 5.0 |" in table
    assert "| http-adapters | 32.0 | 3.0 | 390.0 | 60.0 | 250.0 | 5.0 |" in table
    for r in rounds:
        for point in r["points"].values():
            point.pop("prefill_passes_per_s")
    assert "SGLang's scheduler passes" not in pairs_markdown(summarize_rounds(rounds))


def test_the_bench_refuses_to_count_sglangs_passes_on_the_cpu_backend(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--config", str(ROOT / "adapters.yaml"),
         "--backend", "hf", "--sglang-counters", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--sglang-counters counts SGLang's passes: not with --backend hf" in done.stderr


@needs_sglang
def test_sglangs_own_collector_writes_what_the_bench_reads(tmp_path):
    write_in_process(
        tmp_path,
        textwrap.dedent("""
        from types import SimpleNamespace
        from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector
        delayer = SimpleNamespace(prefill_delayer_max_delay_passes=8,
                                  prefill_delayer_forward_passes_buckets=None,
                                  prefill_delayer_wait_seconds_buckets=None)
        labels = dict(model_name="m", engine_type="unified", tp_rank="0", pp_rank="0",
                      moe_ep_rank="0")
        c = SchedulerMetricsCollector(labels=labels, enable_lora=True, server_args=delayer)
        c.increment_prefill_cuda_graph_pass(True)
        c.increment_prefill_cuda_graph_pass(False)
        for _ in range(5):
            c.increment_decode_cuda_graph_pass(True)
        c.increment_realtime_tokens(None, prefill_compute_tokens=300, prefill_cache_tokens=20,
                                    decode_tokens=40)
        c.observe_prefill_delayer_outcome(forward_passes=0, wait_seconds=0.0,
                                          input_estimation="all", output_allow=False,
                                          output_reason="delay", actual_execution=False)
        c.observe_prefill_delayer_outcome(forward_passes=2, wait_seconds=0.01,
                                          input_estimation="all", output_allow=True,
                                          output_reason="wait_success", actual_execution=True)
    """),
    )
    assert read_counters(str(tmp_path)) == {
        "prefill_passes": 2, "decode_passes": 5, "prefill_tokens": 320, "decode_tokens": 40,
        "delayer_delay": 1, "delayer_wait_success": 1,
    }  # fmt: skip
