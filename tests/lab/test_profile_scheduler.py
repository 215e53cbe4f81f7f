"""lab/profile_scheduler.py: py-spy's collapsed stacks summarised by the scheduler loop's phases;
the scheduler found among a process's children by its name."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "lab" / "profile_scheduler.py"
spec = importlib.util.spec_from_file_location("profile_scheduler", SCRIPT)
profile_scheduler = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_scheduler)

# Frames as py-spy names them (``Class.method (file:line)``), copied from a run on SGLang 0.5.17
LOOP = "Scheduler.event_loop_overlap (scheduler.py:1763)"
RESULT = "Scheduler.process_batch_result (scheduler.py:3700)"
UPDATE = "Scheduler.update_running_batch (scheduler.py:3400)"
MAIN = "thread (101): MainThread"
RAW = "\n".join(
    [
        f"{MAIN};{LOOP};{RESULT};Event.synchronize (torch/cuda/streams.py:254) 40",
        f"{MAIN};{LOOP};{RESULT};SchedulerOutputStreamer.stream_output (o.py:5);"
        "Socket.send_pyobj (zmq/sugar/socket.py:1002) 20",
        f"{MAIN};{LOOP};{RESULT};"
        "SchedulerBatchResultProcessor.process_batch_result_decode (d.py:863) 10",
        f"{MAIN};{LOOP};Scheduler.run_batch (s.py:20);ModelRunner.forward (m.py:7) 6",
        f"{MAIN};{LOOP};Scheduler.run_batch (s.py:20);ModelRunner.forward (m.py:7);"
        "PrefillCudaGraphRunner._execute_body_capture (p.py:9);BreakableCUDAGraph.replay (b.py:3);"
        "TritonAttnBackend.forward_extend (triton_backend.py:1413) 3",
        f"{MAIN};{LOOP};Scheduler.run_batch (s.py:20);ModelRunner.forward_extend (m.py:9) 1",
        f"{MAIN};{LOOP};Scheduler.run_batch (s.py:20);LoRAManager.prepare_lora_batch (l.py:456);"
        "ChunkedSgmvLoRABackend.prepare_lora_batch (c.py:283) 5",
        f"{MAIN};{LOOP};Scheduler.get_next_batch_to_run (s.py:30) 3",
        f"{MAIN};{LOOP};{UPDATE};RadixCache.evict (radix_cache.py:570) 2",
        f"{MAIN};{LOOP};SchedulerRequestReceiver.recv_requests (r.py:122) 5",
        f"{MAIN};{LOOP};Scheduler.on_idle (s.py:40) 5",
        "thread (102): watchdog;watchdog_thread (w.py:9);sleep (w.py:10) 3",
        "not a stack line",
    ]
)


def test_phases_follow_the_innermost_frame_that_names_one():
    stacks = profile_scheduler.parse_raw(RAW)
    assert len(stacks) == 12 and {t for t, _, _ in stacks} == {MAIN, "thread (102): watchdog"}
    main = [(frames, n) for t, frames, n in stacks if t == MAIN]
    summary = profile_scheduler.thread_summary(main, window_samples=200)
    assert summary["samples"] == 100 and summary["busy_share"] == 0.5
    assert summary["phases"] == {
        "waiting for the GPU": 0.4,  # Event.synchronize under process_batch_result
        "streaming out": 0.2,  # stream_output under process_batch_result
        "processing results": 0.1,
        "launching the forward": 0.06,
        "launching a prefill": 0.04,  # the prefill graph's eager attention, an eager prefill
        "the LoRA batch's indices": 0.05,  # prepare_lora_batch under run_batch
        "scheduling the next batch": 0.03,
        "the prefix tree": 0.02,  # RadixCache.evict under update_running_batch
        "taking in requests": 0.05,
        "other": 0.05,
    }
    assert summary["top_self"][0] == {
        "line": "Event.synchronize (torch/cuda/streams.py:254)",
        "share": 0.4,
    }
    inclusive = {t["function"]: t["share"] for t in summary["top_inclusive"]}
    assert inclusive["Scheduler.event_loop_overlap"] == 1.0
    assert inclusive["Scheduler.process_batch_result"] == 0.7


def test_summarize_writes_the_busiest_threads_table_and_plot(tmp_path):
    (tmp_path / "256-adapters.txt").write_text(RAW)
    meta = {"label": "256-adapters", "streams": 256, "arm": "adapters", "rate": 250, "seconds": 0.5,
            "sampled": 100, "tok_s": 11800.0, "command": "python lab/x.py run"}  # fmt: skip
    (tmp_path / "256-adapters.meta.json").write_text(json.dumps(meta))
    failed = {"label": "64-adapters", "error": "RuntimeError: py-spy exited 1: no permission"}
    (tmp_path / "64-adapters.meta.json").write_text(json.dumps(failed))
    results = profile_scheduler.summarize(tmp_path, tmp_path / "out")
    point = next(p for p in results["points"] if p["label"] == "256-adapters")
    assert point["busiest_thread"] == MAIN and point["threads"][MAIN] == 100
    # 100 samples of 250 × 0.5 samplings; py-spy's own count (100: those it found busy) is not the
    # window, or the share would read 100 % whatever the thread did
    assert point["busiest"]["busy_share"] == 0.8
    md = (tmp_path / "out" / "scheduler.md").read_text()
    assert "| 256-adapters | 11800 | 100 | 80 | 40 | 20 | 10 | 6 | 4 | 5 | 3 | 2 | 5 | 5 |" in md
    assert "64-adapters: RuntimeError: py-spy exited 1: no permission" in md
    assert "`python lab/x.py run`" in md
    assert (tmp_path / "out" / "scheduler.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "scheduler.json").read_text()) == results


def test_the_scheduler_is_the_child_named_like_sglangs():
    code = (
        "from pathlib import Path; import time; "
        "Path('/proc/self/comm').write_text('sglang::scheduler'); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):  # the child renames itself once its interpreter is up
            if Path(f"/proc/{child.pid}/comm").read_text().startswith("sglang::schedul"):
                break
            time.sleep(0.1)
        assert profile_scheduler.scheduler_pid(os.getpid()) == child.pid
    finally:
        child.kill()
        child.wait()


def test_without_such_a_child_the_process_itself_is_sampled():
    assert profile_scheduler.scheduler_pid(os.getpid()) == os.getpid()


def test_a_py_spy_that_fails_is_an_error_naming_it(tmp_path):
    with pytest.raises(RuntimeError, match="py-spy exited"):
        profile_scheduler.record(sys.executable, 1, 1, 10, tmp_path / "x.txt")


def test_record_returns_py_spys_own_count_of_samples(tmp_path):
    """py-spy prints how many samples it took (those that found a busy thread); record keeps it."""
    fake = tmp_path / "py-spy"
    fake.write_text(
        '#!/bin/sh\nwhile [ "$1" != "--output" ]; do shift; done\n'
        'echo "thread (1): MainThread;f (a.py:1) 3" > "$2"\n'
        "echo \"py-spy> Wrote raw flamegraph data to '$2'. Samples: 42 Errors: 0\"\n"
    )
    fake.chmod(0o755)
    raw = tmp_path / "p.txt"
    assert profile_scheduler.record(str(fake), 1, 1, 250, raw) == 42
    assert profile_scheduler.parse_raw(raw.read_text()) == [
        ("thread (1): MainThread", ["f (a.py:1)"], 3)
    ]
