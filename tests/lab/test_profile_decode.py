"""lab/profile_decode.py's summariser on a small Chrome trace shaped as torch's profiler (Kineto)
writes it, and its run path over a stand-in engine: the GPU session has one try at it."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.interface import Chunk, Usage

SCRIPT = Path(__file__).resolve().parents[2] / "lab" / "profile_decode.py"
spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
profile_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_decode)

GRAPH_KERNELS = [  # (name, µs) per decode step, replayed from one CUDA graph
    ("_fwd_grouped_kernel_stage1", 100),
    ("_chunked_lora_shrink_kernel", 50),
    ("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NTN", 300),
    ("void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>(...)", 40),
]
SAMPLING = "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ArgMaxOps<float>>>"


def kernel(name, ts, dur, correlation, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": correlation, "device": 0, "stream": stream}}  # fmt: skip


def runtime(name, ts, correlation):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 4242, "tid": 4242, "ts": ts,
            "dur": 5, "args": {"correlation": correlation}}  # fmt: skip


def synthetic_trace(steps: int = 3, period: float = 1000.0) -> list[dict]:
    """``steps`` decode steps ``period`` µs apart: the graph's kernels back to back from +10 µs,
    then an eager argmax; a 50-µs copy overlapping step 0's GEMM on another stream."""
    events = []
    for step in range(steps):
        t0, graph, eager = step * period, 100 + step, 200 + step
        events += [runtime("cudaGraphLaunch", t0, graph), runtime("cudaLaunchKernel", t0, eager)]
        ts = t0 + 10
        for name, dur in GRAPH_KERNELS:
            events.append(kernel(name, ts, dur, graph))
            ts += dur
        events.append(kernel(SAMPLING, ts, 20, eager))
    events += [
        kernel("Memcpy DtoH (Device -> Pinned)", 200, 50, 999, stream=9, cat="gpu_memcpy"),
        {"ph": "X", "cat": "gpu_user_annotation", "name": "decode", "pid": 0, "tid": 7,
         "ts": 0, "dur": 5000},  # spans kernels: must not count as one
        {"ph": "X", "cat": "cpu_op", "name": "aten::argmax", "pid": 1, "tid": 1, "ts": 0,
         "dur": 3000},
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 100, "pid": 1, "tid": 1, "ts": 0},
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
    ]  # fmt: skip
    return events


def write_trace(path: Path, events, wrap: bool = True) -> Path:
    data = {"schemaVersion": 1, "traceEvents": events} if wrap else events
    text = json.dumps(data)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_categories_of_kernel_names():
    cat = profile_decode.categorize
    assert cat("_fwd_kernel_stage2") == "attention"
    assert cat("_fwd_grouped_kernel_stage1") == "attention"
    assert cat("_chunked_lora_expand_kernel") == "LoRA"
    assert cat("sgemm_lora_b_kernel") == "LoRA"  # LoRA before GEMM
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "base GEMM"
    assert cat("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu>") == "base GEMM"
    assert cat(SAMPLING) == "sampling"
    assert cat("void flashinfer::activation::act_and_mul_kernel<...>") == "norm/act/elementwise"
    assert cat("void at::native::vectorized_elementwise_kernel<4, ...>") == "norm/act/elementwise"
    assert cat("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert cat("Memcpy HtoD", "gpu_memcpy") == "norm/act/elementwise"
    assert cat("some_unknown_kernel") == "other"
    assert set(profile_decode.CATEGORY_NAMES) == {
        *(name for name, _ in profile_decode.CATEGORIES),
        "other",
    }


def test_busy_time_is_the_union_of_intervals():
    ops = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 30, "dur": 5}, {"ts": 31, "dur": 1}]
    assert profile_decode.busy_time(ops) == 20


@pytest.mark.parametrize("name,wrap", [("x-TP-0.trace.json.gz", True), ("x.json", False)])
def test_summarize_trace(tmp_path, name, wrap):
    path = write_trace(tmp_path / name, synthetic_trace())
    s = profile_decode.summarize_trace(path)
    graph_us = sum(d for _, d in GRAPH_KERNELS)  # 490 µs a step, then 20 of argmax
    assert s["graph_replays"] == 3 and s["steps"] == 3  # no step count given: the replays
    assert s["kernels"] == 3 * 5 + 1  # the annotation, CPU op and flow event left out
    window = 2000 + graph_us + 20  # the first kernel at 10 µs to the last one's end
    assert s["window_ms"] == pytest.approx(window / 1000)
    busy = 3 * (graph_us + 20)  # the copy overlaps step 0's GEMM: no extra busy time
    assert s["busy_ms"] == pytest.approx(busy / 1000)
    assert s["gpu_idle_share"] == pytest.approx(1 - busy / window)
    assert s["kernel_ms"] == pytest.approx((busy + 50) / 1000)
    assert s["graph_kernel_ms_per_replay"] == pytest.approx(graph_us / 1000)
    assert s["replay_period_ms_p50"] == pytest.approx(1.0)
    per_step = s["category_ms_per_step"]
    assert per_step["attention"] == pytest.approx(0.1)
    assert per_step["LoRA"] == pytest.approx(0.05)
    assert per_step["base GEMM"] == pytest.approx(0.3)
    assert per_step["sampling"] == pytest.approx(0.02)
    assert per_step["norm/act/elementwise"] == pytest.approx((3 * 40 + 50) / 3 / 1000)
    assert sum(s["category_shares"].values()) == pytest.approx(1.0)
    top = s["top_kernels"]
    assert top[0]["name"].startswith("nvjet") and top[0]["count"] == 3
    assert top[0]["ms"] == pytest.approx(0.9)


def test_the_runs_step_count_wins_over_graph_replays(tmp_path):
    path = write_trace(tmp_path / "t.trace.json.gz", synthetic_trace())
    s = profile_decode.summarize_trace(path, steps=6)  # e.g. 3 prefill steps among them
    assert s["steps"] == 6 and s["graph_replays"] == 3
    assert s["ms_per_step"] == pytest.approx(s["window_ms"] / 6)


def test_a_trace_without_kernels_is_refused(tmp_path):
    path = write_trace(tmp_path / "t.trace.json", [runtime("cudaGraphLaunch", 0, 1)])
    with pytest.raises(ValueError, match="no GPU kernels"):
        profile_decode.summarize_trace(path)


def test_summarize_cli_writes_the_report(tmp_path):
    traces = tmp_path / "traces"
    for streams, arm, steps in [(256, "base", 4), (128, "adapters", 3), (128, "base", 3)]:
        folder = traces / f"{streams}-{arm}"
        folder.mkdir(parents=True)
        meta = {"label": f"{streams}-{arm}", "streams": streams, "arm": arm, "tok_s": 5000.0,
                "profiled_tok_s": 4000.0, "num_steps": steps, "failures": 0}  # fmt: skip
        (folder / "meta.json").write_text(json.dumps(meta))
        write_trace(folder / f"{streams}-{arm}-TP-0.trace.json.gz", synthetic_trace(steps))
    broken = traces / "256-adapters"
    broken.mkdir()
    meta = {"label": "256-adapters", "streams": 256, "arm": "adapters", "error": "TimeoutError: x"}
    (broken / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    profile_decode.main(["summarize", str(traces), "--out", str(out)])
    results = json.loads((out / "profile.json").read_text())
    labels = [p["label"] for p in results["points"]]
    assert labels == ["128-base", "128-adapters", "256-base", "256-adapters"]
    assert results["points"][2]["trace"]["steps"] == 4
    md = (out / "profile.md").read_text()
    assert "| 128-base | 0 | 5000 | 4000 | 25.6 | 3 | – | 3 |" in md
    assert "256-adapters: TimeoutError: x" in md
    assert "`nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NTN` | base GEMM" in md
    assert (out / "profile.png").stat().st_size > 0


def test_summarize_cli_fails_without_any_trace(tmp_path):
    (tmp_path / "traces").mkdir()
    with pytest.raises(SystemExit, match="no trace"):
        profile_decode.main(["summarize", str(tmp_path / "traces"), "--out", str(tmp_path)])


# ---------------------------------------------------------------- the run path, stand-ins


class FakeManager:
    """SGLang's tokenizer manager as the run uses it: ``start_profile`` returns once profiling
    started; the scheduler writes the trace after ``num_steps`` steps, by itself."""

    def __init__(self):
        self.requests, self.stopped = [], 0

    async def start_profile(self, req):
        self.requests.append(req)

        async def write_later():
            await asyncio.sleep(0.2)
            name = f"{req.profile_id}-TP-0.trace.json.gz"
            write_trace(Path(req.output_dir) / name, synthetic_trace(req.num_steps))

        self.task = asyncio.create_task(write_later())

    async def stop_profile(self):
        self.stopped += 1


class FakeEngine:
    backend = "sglang"

    def __init__(self):
        self.engine = SimpleNamespace(tokenizer_manager=FakeManager())
        self.adapters_seen = set()

    async def stream(self, request):
        self.adapters_seen.add(request.adapter)
        for _ in range(request.params.max_tokens - 1):
            await asyncio.sleep(0.005)
            yield Chunk("x", [1])
        yield Chunk("x", [1], "length", Usage(10, request.params.max_tokens))


def run_args(tmp_path, **kw):
    args = dict(out=str(tmp_path), num_steps=3, trace_timeout=5, no_profile=False, adapters=2,
                prompt_words=(5, 5), output_tokens=(8, 8), warmup=0.1, measure=0.3)  # fmt: skip
    return SimpleNamespace(**(args | kw))


def fake_request(folder, steps, label):
    return SimpleNamespace(output_dir=str(folder), num_steps=steps, profile_id=label)


def test_profile_point_records_a_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_decode, "profile_request", fake_request)
    engine = FakeEngine()
    args = run_args(tmp_path)
    meta = asyncio.run(profile_decode.profile_point(engine, args, ["a", "b", "c"], 4, "adapters"))
    assert "error" not in meta, meta
    assert meta["tok_s"] > 0 and meta["failures"] == 0
    assert meta["trace_window_s"] == pytest.approx(0.00251)
    assert engine.adapters_seen == {"a", "b"}
    req = engine.engine.tokenizer_manager.requests[0]
    assert Path(req.output_dir).is_absolute() and req.num_steps == 3
    assert json.loads((tmp_path / "traces" / "4-adapters" / "meta.json").read_text()) == meta
    results = profile_decode.summarize(tmp_path / "traces", tmp_path)
    assert results["points"][0]["trace"]["steps"] == 3
    profile_decode.drop_traces(tmp_path / "traces")
    assert [p.name for p in (tmp_path / "traces" / "4-adapters").iterdir()] == ["meta.json"]


def test_profile_point_timeout_is_recorded_and_stops_the_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_decode, "profile_request", lambda folder, steps, label:
                        SimpleNamespace(output_dir=str(tmp_path / "elsewhere"), num_steps=steps,
                                        profile_id=label))  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    engine = FakeEngine()
    args = run_args(tmp_path, trace_timeout=1)
    meta = asyncio.run(profile_decode.profile_point(engine, args, ["a"], 2, "base"))
    assert meta["error"].startswith("TimeoutError: no complete trace")
    assert meta["tok_s"] > 0 and engine.adapters_seen == {None}
    assert engine.engine.tokenizer_manager.stopped == 1


def test_profiling_needs_the_sglang_backend(tmp_path):
    engine = FakeEngine()
    engine.engine = object()
    meta = asyncio.run(profile_decode.profile_point(engine, run_args(tmp_path), [], 1, "base"))
    assert "needs the SGLang backend" in meta["error"]


def test_run_arguments():
    args = profile_decode.parse_args(["run", "--config", "c.yaml", "--out", "o",
                                      "--set", "max_loras_per_batch=128"])  # fmt: skip
    assert args.streams == [128, 256] and args.arms == ["base", "adapters"]
    assert args.adapters == 128 and args.num_steps == 50 and not args.keep_traces
    assert args.set == ["max_loras_per_batch=128"]


def test_a_trace_still_being_written_is_read_again(tmp_path, monkeypatch):
    path = tmp_path / "t-TP-0.trace.json.gz"
    full = gzip.compress(json.dumps({"traceEvents": synthetic_trace()}).encode())
    path.write_bytes(full[: len(full) // 2])  # the scheduler is still writing it
    sleep = asyncio.sleep

    async def finish_writing(seconds):
        path.write_bytes(full)
        await sleep(0)

    monkeypatch.setattr(profile_decode.asyncio, "sleep", finish_writing)
    assert asyncio.run(profile_decode.trace_window(path, 3)) == pytest.approx(0.00251)


def test_decode_and_prefill_steps_are_told_apart_by_their_attention_kernels(tmp_path):
    """Two layers: 3 decode steps (the grouped decode kernel twice each) and one prefill step
    (the extend kernel twice): a profile of N forward steps mixes both."""
    events = synthetic_trace(steps=3)
    events += [
        kernel(name, 5000 + 10 * i, 5, 300 + i)
        for i, name in enumerate(
            ["_fwd_grouped_kernel_stage1"] * 3
            + ["_fwd_kernel", "_fwd_kernel", "_fwd_kernel_stage2"]
        )
    ]
    path = write_trace(tmp_path / "t.trace.json", events)
    summary = profile_decode.summarize_trace(path, steps=4, layers=2)
    assert summary["decode_attention_calls"] == 6 and summary["prefill_attention_calls"] == 2
    assert (summary["decode_steps"], summary["prefill_steps"]) == (3, 1)
    assert "prefill_steps" not in profile_decode.summarize_trace(path, steps=4)
    assert profile_decode.attention_kind("BatchDecodeWithKVCacheKernel") == "decode"
    assert profile_decode.attention_kind("BatchPrefillWithKVCacheKernel") == "prefill"
    assert profile_decode.attention_kind("_fwd_kernel_stage2") is None


def test_layers_come_from_the_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32}))
    assert profile_decode.layers_of(str(tmp_path)) == 32
    assert profile_decode.layers_of("smollm2") is None
