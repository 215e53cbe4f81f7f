"""lab/profile_http.py: py-spy's samples of each process summarised per point (cores busy, the
busiest thread, the scheduler's phases); the processes found by name; a CPU run end to end
(engine-direct and through HTTP with the real Locust) with a stand-in py-spy."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "lab" / "profile_http.py"
spec = importlib.util.spec_from_file_location("profile_http", SCRIPT)
profile_http = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_http)

SCHEDULER_RAW = """\
thread (0x1): MainThread;event_loop (scheduler.py:1);run_batch (scheduler.py:2) 60
thread (0x1): MainThread;event_loop (scheduler.py:1);synchronize (event.py:3) 40
"""
API_RAW = """\
thread (0x2): MainThread;run_forever (base_events.py:1);handle_loop (tokenizer_manager.py:9) 30
thread (0x2): MainThread;run_forever (base_events.py:1);data_received (httptools_impl.py:4) 20
thread (0x3): Thread-1;run (threading.py:1);work (x.py:1) 10
"""


def write_point(folder: Path, label: str, path: str, targets: dict, **more) -> None:
    meta = {"label": label, "streams": 256, "arm": "adapters", "path": path, "tok_s": 12000.0,
            "failures": 0, "rate": 100, "seconds": 1, "command": "python lab/profile_http.py run",
            "targets": targets}  # fmt: skip
    meta |= more
    (folder / f"{label}.meta.json").write_text(json.dumps(meta))


def test_summarize_reports_cores_busiest_thread_and_phases(tmp_path):
    (tmp_path / "256-adapters-http.scheduler.txt").write_text(SCHEDULER_RAW)
    (tmp_path / "256-adapters-http.api.txt.gz").write_bytes(gzip.compress(API_RAW.encode()))
    targets = {"scheduler": {"pid": 5, "sampled": 100, "proc_cores": 0.97},
               "api": {"pid": 4, "sampled": 60},
               "detokenizer": {"pid": 6, "error": "RuntimeError: py-spy exited 1"}}  # fmt: skip
    write_point(tmp_path, "256-adapters-http", "http", targets, api_cores_from_proc=0.7,
                locust_cores=0.5)  # fmt: skip
    write_point(tmp_path, "256-adapters-direct", "direct", {})
    results = profile_http.summarize(tmp_path, tmp_path / "out")
    assert [p["path"] for p in results["points"]] == ["direct", "http"]
    api = results["points"][1]["targets"]["api"]
    assert api["spy_cores"] == 0.6  # 60 samples of 2 threads over 100 × 1 nominal samplings
    assert api["busiest_thread"] == "thread (0x2): MainThread"
    assert api["busiest"]["busy_share"] == 0.5
    scheduler = results["points"][1]["targets"]["scheduler"]
    assert scheduler["busiest"]["phases"]["launching the forward"] == 0.6
    assert scheduler["busiest"]["phases"]["waiting for the GPU"] == 0.4
    md = (tmp_path / "out" / "http-profile.md").read_text()
    # /proc's cores where measured, else py-spy's lower bound
    assert "| 256-adapters-http | 12000 | 0 | ≥ 0.60 | 50 | 0.97 | 100 | — | — | — | — |" in md
    assert "256-adapters-http, detokenizer: RuntimeError: py-spy exited 1" in md
    assert "- 256-adapters-http: the API process 0.70, Locust 0.50" in md  # /proc, the whole run
    assert "| `handle_loop` | 60 |" in md  # 30 of the main thread's 50 samples
    assert "| `run_forever` |" not in md  # every sample's frame: not listed
    assert "`python lab/profile_http.py run`" in md
    assert (tmp_path / "out" / "http-profile.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "http-profile.json").read_text()) == results


def test_the_processes_are_found_by_sglangs_names_and_locusts_command_line():
    rename = "from pathlib import Path; Path('/proc/self/comm').write_text('sglang::detokenizer')"
    children = [
        subprocess.Popen([sys.executable, "-c", f"{rename}; import time; time.sleep(60)"]),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "locust"]),
    ]
    try:
        for _ in range(600):  # the child renames itself once its interpreter is up
            found = profile_http.target_pids(
                profile_http.os.getpid(), ["api", "scheduler", "detokenizer", "locust"]
            )
            if len(found) == 3:
                break
            subprocess.run(["sleep", "0.1"])
        assert found == {
            "api": profile_http.os.getpid(),
            "detokenizer": children[0].pid,
            "locust": children[1].pid,
        }
        assert profile_http.target_pids(profile_http.os.getpid(), ["scheduler"]) == {}
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_cpu_run_profiles_direct_and_http_points(tmp_path):
    """The whole run on the CPU backend: engine-direct clients, then Locust through the API this
    process serves; a stand-in py-spy writes one stack for each process it is pointed at."""
    synth, out = tmp_path / "synth", tmp_path / "profile"
    cmd = [sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", "2"]
    subprocess.run([*cmd, "--out", str(synth)], check=True, cwd=ROOT, capture_output=True)
    fake = tmp_path / "py-spy"
    fake.write_text(
        '#!/bin/sh\nsleep 2; while [ "$1" != "--output" ]; do shift; done\n'
        'echo "thread (1): MainThread;f (a.py:1) 5" > "$2"\n'
        "echo \"py-spy> Wrote raw flamegraph data to '$2'. Samples: 10 Errors: 0\"\n"
    )
    fake.chmod(0o755)
    run = [sys.executable, str(SCRIPT), "run", "--config", str(synth / "adapters.yaml"),
           "--backend", "hf", "--streams", "2", "--arms", "adapters", "--adapters", "2",
           "--warmup", "1", "--seconds", "2", "--pause", "0", "--prompt-words", "4-6",
           "--output-tokens", "4-6", "--py-spy", str(fake), "--out", str(out)]  # fmt: skip
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "http-profile.json").read_text())
    points = {p["label"]: p for p in results["points"]}
    assert set(points) == {"2-adapters-direct", "2-adapters-http"}
    for point in points.values():
        assert not point.get("error") and point["failures"] == 0 and point["tok_s"] > 0
        api = point["targets"]["api"]
        assert api["spy_cores"] == 0.01 and api["proc_cores"] >= 0  # the stand-in's 5 of 250 × 2
    assert "locust" not in points["2-adapters-direct"]["targets"]
    assert points["2-adapters-http"]["targets"]["locust"]["sampled"] == 10
    assert (out / "locust" / "2-adapters-http.jsonl").exists()
