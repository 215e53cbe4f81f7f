"""Load-test harness: statistics on known inputs, a real headless Locust run, a 2×2 sweep."""

from __future__ import annotations

import csv
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import uvicorn

from loadtest.stats import parse_range, percentile, ratios, summarize, zipf_weights

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_synth(out: Path, adapters: int) -> None:
    """A CI-sized synthetic model with ``adapters`` random adapters and their registry."""
    cmd = [sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", str(adapters)]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=ROOT, capture_output=True)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([0, 10], 90) == 9
    assert percentile([], 50) is None


def test_summarize_on_known_records():
    records = [
        {"start": 0.0, "ttft": 0.1, "e2e": 1.1, "itl": [0.1] * 10, "output_tokens": 11, "ok": True},
        {"start": 1.0, "ttft": 0.3, "e2e": 1.3, "itl": [0.2] * 5, "output_tokens": 6, "ok": True},
        {"start": 0.5, "ttft": None, "e2e": 0.2, "itl": [], "output_tokens": 0, "ok": False},
    ]
    s = summarize(records)
    assert s["completed"] == 2 and s["failures"] == 1
    assert s["duration_s"] == pytest.approx(2.3)
    assert s["output_throughput"] == pytest.approx(17 / 2.3)
    assert s["ttft_p50"] == pytest.approx(0.2)
    assert s["tpot_mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert s["itl_p50"] == pytest.approx(0.1)
    assert ratios(
        {"output_throughput": 5, "ttft_p50": 2}, {"output_throughput": 10, "ttft_p50": 1}
    )["output_throughput_ratio"] == pytest.approx(0.5)


def test_summarize_reports_the_first_event_only_where_the_records_have_it():
    records = [{"start": 0.0, "ttft": t, "first_event": f, "e2e": 1.0, "itl": [],
                "output_tokens": 4, "ok": True} for t, f in ((0.3, 0.1), (0.5, 0.2))]  # fmt: skip
    s = summarize(records)
    assert s["first_event_p50"] == pytest.approx(0.15) and s["ttft_p50"] == pytest.approx(0.4)
    assert "first_event_p50" not in summarize([{**r, "first_event": None} for r in records])


def test_direct_arm_times_the_first_text_as_an_http_client_does_and_keeps_the_first_token():
    """A token that decodes to no text yet (half a UTF-8 character) is the engine's first event,
    but an HTTP client sees nothing until the text comes; the direct arm times both."""
    import asyncio

    from engine.interface import Chunk, GenerationRequest, SamplingParams, Usage
    from loadtest.bench import timed_stream

    class HalfCharacterFirst:  # the one call timed_stream makes of an engine
        async def stream(self, request):
            yield Chunk("", [200])
            await asyncio.sleep(0.2)
            yield Chunk("é", [169])
            yield Chunk(" ok", [5], "length", Usage(3, 3))

    request = GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=3))
    record = asyncio.run(timed_stream(HalfCharacterFirst(), request))
    assert record["ok"] and record["output_tokens"] == 3
    assert record["first_event"] < 0.1
    assert record["ttft"] >= 0.2
    assert len(record["token_times"]) == 2 and len(record["itl"]) == 1


def test_steady_window_counts_tokens_streamed_inside_it_also_from_cut_requests():
    done = {"start": 10.0, "ttft": 0.5, "e2e": 4.5, "itl": [1.0] * 4, "output_tokens": 5,
            "token_times": [0.5, 1.5, 2.5, 3.5, 4.5], "ok": True}  # fmt: skip
    cut = {"start": 12.0, "token_times": [1.0, 2.0, 3.0], "output_tokens": 6, "ok": False,
           "cut": True}  # fmt: skip
    warmup = {"start": 8.0, "ttft": 1.0, "e2e": 3.0, "itl": [1.0, 1.0], "output_tokens": 3,
              "token_times": [1.0, 2.0, 3.0], "ok": True}  # fmt: skip
    s = summarize([done, cut, warmup], window=(10.0, 14.0))
    # inside [10, 14]: done's 10.5..13.5 (4), cut's 13 and 14 (2 chunks × 2), warmup's 10 and 11
    assert s["output_throughput"] == pytest.approx((4 + 4 + 2) / 4)
    assert s["duration_s"] == 4.0
    assert s["failures"] == 0 and s["completed"] == 1  # only `done` started inside and finished
    assert s["request_throughput"] == pytest.approx(1 / 4)  # warmup's end (11.0); done ends 14.5
    assert s["arrived_per_s"] == pytest.approx(2 / 4)  # done and cut started inside
    assert s["served"] == pytest.approx(0.5)  # one completion in the window per two arrivals
    assert summarize([warmup], window=(10.0, 14.0))["served"] is None  # none arrived in it
    assert s["ttft_p50"] == pytest.approx(0.5)


def test_ranges_and_zipf():
    assert parse_range("100") == (100, 100) and parse_range("90-110") == (90, 110)
    with pytest.raises(ValueError):
        parse_range("10-5")
    weights = zipf_weights(3, 1.0)
    assert weights[0] / weights[2] == pytest.approx(3) and sum(weights) == pytest.approx(1)


def test_headless_locust_run_writes_raw_file_and_custom_ttft(hf_engine, registry_for, tmp_path):
    from conftest import LiveServer

    from engine.api import create_api

    live = LiveServer(create_api(hf_engine, registry_for))
    raw = tmp_path / "raw.jsonl"
    cmd = [  # from the repository root, as docs/loadtest.md says
        sys.executable, "-m", "locust", "-f", "loadtest/", "--headless",
        "-u", "2", "-r", "2", "-t", "6s", "--host", live.url, "--adapters", "2",
        "--distribution", "zipf", "--prompt-words", "5-8", "--output-tokens", "4",
        "--raw-out", str(raw), "--csv", str(tmp_path / "run"), "--stop-timeout", "20",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        live.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert records and all(r["ok"] for r in records)
    assert {r["model"] for r in records} <= {"alpha", "beta"}
    assert all(r["output_tokens"] == 4 and r["ttft"] > 0 for r in records)
    assert all(0 < r["first_event"] <= r["ttft"] for r in records)  # the role event comes first
    stats = list(csv.DictReader((tmp_path / "run_stats.csv").read_text().splitlines()))
    ttft = [row for row in stats if row["Type"] == "TTFT"]
    assert ttft and 0 < sum(int(row["Request Count"]) for row in ttft) <= len(records)
    assert {row["Name"] for row in ttft} <= {"alpha", "beta"}  # a row per adapter
    printed = done.stdout[done.stdout.index("Output tokens over the run") :].splitlines()[3:]
    table = printed[: next(i for i, line in enumerate(printed) if line.startswith("Aggregated"))]
    rows = {line.split()[0]: int(line.split()[2]) for line in table}
    total_per_s, total = map(float, printed[len(table)].split()[1:3])
    assert rows and set(rows) <= {"alpha", "beta"} and total == sum(rows.values())
    # headless too: every answer recorded is counted (one cut at the stop may be counted alone)
    assert total >= sum(r["output_tokens"] for r in records) > 0 and total_per_s > 0


def test_open_loop_locust_in_its_web_ui_shows_tokens_per_second_per_kind(
    hf_engine, registry_for, tmp_path
):
    from conftest import LiveServer

    from engine.api import create_api

    live = LiveServer(create_api(hf_engine, registry_for))
    web_port = free_port()
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--autostart", "-u", "1", "-r", "1",
        "-t", "8s", "--autoquit", "30", "--web-host", "127.0.0.1", "--web-port", str(web_port),
        "--host", live.url, "--arrival-rate", "2", "--rows", "kind", "--adapters", "1",
        "--prompt-words", "5", "--output-tokens", "3", "--raw-out", str(tmp_path / "raw.jsonl"),
        "--csv", str(tmp_path / "run"), "--stop-timeout", "20",
    ]  # fmt: skip
    locust = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tokens = []
    try:
        while locust.poll() is None and not any(row["tokens"] for row in tokens):
            time.sleep(0.5)
            try:
                stats = requests.get(f"http://127.0.0.1:{web_port}/stats/requests", timeout=5)
            except requests.ConnectionError:
                continue
            extended = stats.json().get("extended_stats", [])
            tokens = [row for table in extended for row in table["data"] if row["name"] == "lora"]
        locust.wait(timeout=120)
    finally:
        locust.kill()
        live.stop()
    assert tokens and tokens[0]["tokens"] > 0, locust.stderr.read()[-2000:]
    stats = list(csv.DictReader((tmp_path / "run_stats.csv").open()))
    assert {row["Name"] for row in stats if row["Type"] == "E2E"} == {"lora"}
    records = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert records and all(r["ok"] and r["model"] == "alpha" for r in records)


def test_sweep_over_a_2x2_grid_on_a_tiny_synthetic_model_writes_everything(tmp_path):
    synth = tmp_path / "synth"
    tiny_synth(synth, adapters=2)
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "loadtest.sweep", "--serve", str(synth / "adapters.yaml"),
        "--port", "8799", "--adapters", "1,2", "--users", "1,2", "--duration", "4",
        "--prompt-words", "5", "--output-tokens", "4", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["points"]) == {f"u{u}-a{a}" for u in (1, 2) for a in (0, 1, 2)}
    for point in results["points"].values():
        assert point["completed"] > 0 and point["failures"] == 0
        assert point["output_throughput_ratio"] is not None
        assert point["client_cpu_cores"] > 0 and point["server_cpu_cores"] > 0
    assert len(list(csv.DictReader((out / "results.csv").read_text().splitlines()))) == 6
    for name in ("ttft_vs_adapters.png", "throughput_vs_adapters.png"):
        assert (out / name).stat().st_size > 5_000
    assert "Recommendation" in (out / "summary.md").read_text()
    locust_rows = list(csv.DictReader((out / "raw" / "u2-a2_stats.csv").open()))
    assert {row["Name"] for row in locust_rows if row["Type"] == "TTFT"} <= {"lora-000", "lora-001"}
    assert (out / "raw" / "u2-a2.html").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.stdout.count("done already (resume)") == 6


def test_engine_bench_sweep_evict_soak_and_http_on_a_tiny_synthetic_model(tmp_path):
    synth, out = tmp_path / "synth", tmp_path / "bench"
    tiny_synth(synth, adapters=3)
    cmd = [
        sys.executable, "-m", "loadtest.bench", "--config", str(synth / "adapters.yaml"),
        "--backend", "hf", "--plan", "sweep,evict,soak,http", "--adapters", "2", "--users", "3",
        "--duration", "3", "--warmup", "0.5", "--prompt-words", "4-6", "--output-tokens", "6-8",
        "--evict-rounds", "1", "--soak-seconds", "6", "--soak-users", "6", "--soak-adapters", "2",
        "--disconnect", "0.5", "--hotload-every", "2", "--spare-adapter",
        str(synth / "adapters" / "lora-002"), "--http-users", "3", "--http-adapters", "2",
        "--http-port", "8798", "--min-completed", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    served_on = uvicorn.Config(app=None).get_loop_factory()()  # python -m engine.api's loop
    assert results["settings"]["event_loop"] == type(served_on).__module__
    served_on.close()
    points = results["points"]
    assert set(points) == {"u3-a0", "u3-a2"}
    assert points["u3-a2"]["completed"] > 0 and points["u3-a2"]["failures"] == 0
    assert points["u3-a2"]["output_throughput_ratio"] > 0
    assert points["u3-a2"]["engine_process_cpu_cores"] > 0  # engine and clients, one process
    assert {"results.csv", "summary.md", "throughput_vs_adapters.png"} <= {
        p.name for p in out.iterdir()
    }
    evict = json.loads((out / "evict.json").read_text())
    assert evict["ttft_p50_s"]["reloaded"] > 0
    assert f"{evict['reload_added_ms']:+.1f} ms" in (out / "evict.md").read_text()
    soak = json.loads((out / "soak.json").read_text())
    assert soak["failed"] == 0 and soak["cancelled_by_client"] > 0 and soak["completed"] > 0
    assert soak["hotloads"] and all(h["ok"] for h in soak["hotloads"])
    assert soak["after"]["running"] == soak["before"]["running"] == 0
    http = json.loads((out / "http" / "compare.json").read_text())
    assert [(r["users"], r["adapters"]) for r in http["points"]] == [(3, 0), (3, 2)]
    for row in http["points"]:  # the same engine through the API, next to its direct numbers
        assert row["http_failures"] == 0 and row["output_throughput_http_over_direct"] > 0
        assert row["server_cpu_cores"] > 0 and row["client_cpu_cores"] > 0
    assert http["cpu_cores_busy"]["locust_clients"] > 0
    assert "HTTP ÷ direct" in (out / "http" / "compare.md").read_text()


def test_process_cpu_seconds_reads_a_live_process_and_not_a_missing_one():
    from loadtest.procs import process_cpu_seconds

    sum(i * i for i in range(300_000))
    assert process_cpu_seconds(os.getpid()) > 0
    assert process_cpu_seconds(2**22 + 7) is None


@pytest.mark.parametrize("target", ["client", "api"])
def test_http_ceiling_drives_the_real_locust_user_against_a_model_free_stream(target, tmp_path):
    cmd = [
        sys.executable, "-m", "loadtest.http_ceiling", "--target", target, "--users", "2",
        "--duration", "3",
        "--warmup", "0.5", "--output-tokens", "5", "--token-gap-ms", "1", "--port", "8797",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    points = json.loads((tmp_path / "results.json").read_text())["points"]
    assert set(points) == {"u2-a0", "u2-a1"}
    for point in points.values():
        assert point["failures"] == 0 and point["completed"] > 0
        assert point["output_throughput"] > 0 and point["itl_p50"] >= 0.001
        assert point["client_cpu_cores"] > 0 and point["server_cpu_cores"] > 0


def test_engine_bench_pairs_alternate_direct_and_http_rounds_on_a_tiny_model(tmp_path):
    synth, out = tmp_path / "synth", tmp_path / "bench"
    tiny_synth(synth, adapters=2)
    theirs = tmp_path / "peer-ready"
    theirs.touch()  # the peer is there already: no wait
    cmd = [
        sys.executable, "-m", "loadtest.bench", "--config", str(synth / "adapters.yaml"),
        "--backend", "hf", "--plan", "pairs", "--pairs", "2", "--adapters", "2", "--users", "2",
        "--duration", "3", "--warmup", "0.5", "--prompt-words", "4-6", "--output-tokens", "4-6",
        "--http-port", "8796", "--min-completed", "1", "--pairs-strict", "--sync-users", "2",
        "--sync-mine", str(tmp_path / "ours-due"), "--sync-theirs", str(theirs),
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ours-due").exists() and "appeared after" in done.stdout
    results = json.loads((out / "pairs" / "results.json").read_text())
    assert [(r["users"], r["adapters"], r["round"]) for r in results["rounds"]] == [
        (2, 2, 1), (2, 2, 2)
    ]  # fmt: skip
    for r in results["rounds"]:
        assert list(r["points"]) == ["direct-base", "direct-adapters", "http-base", "http-adapters"]
        assert all(p["output_throughput"] > 0 and not p["failures"] for p in r["points"].values())
        assert r["points"]["http-base"]["server_cpu_cores"] > 0
        assert r["points"]["direct-base"]["engine_process_cpu_cores"] > 0
        for point in r["points"].values():  # this process's full collections, every arm
            assert point["gc_full_collections"] >= 0 and point["gc_full_pause_s"] >= 0
            assert 0 <= point["loop_lag_p50"] <= point["loop_lag_p99"]  # its event loop's wake
        http_base = r["points"]["http-base"]
        assert 0 < http_base["first_event_p50"] <= http_base["ttft_p50"]
        assert 0 < http_base["engine_ttft_p50"] <= http_base["ttft_p50"]  # inside the server
        assert 0 < http_base["server_ttft_p50"] <= http_base["ttft_p50"]  # arrival to first write
        # each request matched by its chat id: the client's send to the server's arrival, and
        # the first text written to the client's read, each a part of its TTFT
        assert 0 < http_base["to_server_p50"] < http_base["ttft_p50"]
        assert 0 < http_base["to_client_p50"] < http_base["ttft_p50"]
        assert 0 <= http_base["client_loop_lag_p50"] <= http_base["client_loop_lag_p99"]
    ratios = results["summary"]["u2-a2"]["ratios"]
    assert ratios["http_over_direct_tok_s_base"]["n"] == 2
    assert ratios["adapters_over_base_tok_s_http"]["median"] > 0
    assert "HTTP ÷ direct, tok/s, base" in (out / "pairs" / "summary.md").read_text()
    assert ratios["http_engine_over_direct_ttft_p50_base"]["n"] == 2
    assert ratios["http_server_over_direct_ttft_p50_adapters"]["n"] == 2


def test_peer_drives_a_launched_server_in_pairs_after_checking_its_adapter_names(tmp_path):
    synth, out = tmp_path / "synth", tmp_path / "peer"
    tiny_synth(synth, adapters=2)
    cmd = [
        sys.executable, "-m", "loadtest.peer", "--launch", "ours", "--config",
        str(synth / "adapters.yaml"), "--port", "8795", "--users", "2", "--adapters", "2",
        "--pairs", "1", "--duration", "3", "--warmup", "0.5", "--prompt-words", "4",
        "--output-tokens", "4", "--strict", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    routing = results["routing"]
    assert routing["known_status"] == 200 and routing["unknown_status"] == 404
    (only,) = results["rounds"]
    assert list(only["points"]) == ["http-base", "http-adapters"]
    assert all(p["output_throughput"] > 0 for p in only["points"].values())
    assert results["summary"]["u2-a2"]["ratios"]["adapters_over_base_tok_s_http"]["n"] == 1


def test_structured_overhead_runs_both_modes_in_pairs_and_every_schema_answer_is_json(tmp_path):
    from loadtest import structured

    out = tmp_path / "structured"
    structured.main(["--streams", "1,2", "--pairs", "2", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert [p["streams"] for p in result["points"]] == [1, 2]
    for point in result["points"]:
        assert [list(run) for run in point["pairs"]] == [["free", "schema"], ["schema", "free"]]
        for run in point["pairs"]:
            assert run["schema"]["json_answers"] == point["streams"]
            assert all(run[m]["completion_tokens"] > 0 for m in structured.MODES)
        rates = [
            (r["free"]["stream_decode_tok_s"], r["schema"]["stream_decode_tok_s"])
            for r in point["pairs"]
        ]
        ratios = sorted(schema / free for free, schema in rates)
        assert point["decode_ratio"] == {
            "median": sum(ratios) / 2,
            "min": ratios[0],
            "max": ratios[1],
        }
    assert "| 2 |" in (out / "results.md").read_text()
    assert (out / "overhead.png").stat().st_size > 10_000


def test_think_time_spaces_each_users_requests(hf_engine, registry_for, tmp_path):
    """--think-time: a user's next request starts no sooner than that long after its last ended
    (a floor that holds however slow the machine is)."""
    from conftest import LiveServer

    from engine.api import create_api

    live = LiveServer(create_api(hf_engine, registry_for))
    raw = tmp_path / "raw.jsonl"
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "1", "-r", "1",
        "-t", "6s", "--host", live.url, "--adapters", "1", "--prompt-words", "3",
        "--output-tokens", "2", "--think-time", "1.5", "--raw-out", str(raw),
        "--stop-timeout", "20",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        live.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    records = sorted((json.loads(line) for line in raw.read_text().splitlines()),
                     key=lambda r: r["start"])  # fmt: skip
    assert len(records) >= 2 and all(r["ok"] for r in records)
    gaps = [b["start"] - (a["start"] + a["e2e"]) for a, b in itertools.pairwise(records)]
    assert min(gaps) >= 1.4


def test_bursty_arrival_profile_on_known_arrivals():
    from loadtest.bursty import arrival_profile, arrivals_per_bin, burst_of, in_flight

    waves = [{"start": s + i * 0.001, "e2e": 0.5, "ttft": 0.1 + 0.02 * i}
             for s in (0.0, 1.0) for i in range(10)]  # fmt: skip
    steady = [{"start": 0.05 + 0.1 * i, "e2e": 0.5, "ttft": 0.1} for i in range(20)]
    starts = sorted(r["start"] for r in waves)
    assert burst_of(0.0095, starts) == 10 and burst_of(0.5, starts) == 0
    assert arrivals_per_bin(starts, 0.0, 2.0)[:11] == [10] + [0] * 9 + [10]
    assert in_flight(waves, 0.0, 2.0) == pytest.approx(20 * 0.5 / 2.0)
    bunched, even = arrival_profile(waves, (0.0, 2.0)), arrival_profile(steady, (0.0, 2.0))
    assert bunched["arrival_cv"] == pytest.approx(3.0) and even["arrival_cv"] == 0
    assert bunched["arrivals_per_100ms"] == even["arrivals_per_100ms"] == 1.0
    assert bunched["ttft_p50_busiest_quarter"] == pytest.approx(0.26)  # bursts 8, 9, 9, 10, 10
    assert bunched["ttft_p50_quietest_quarter"] == pytest.approx(0.12)  # bursts 1, 1, 2, 2, 3


def test_bursty_plots_rounds_but_no_empty_burst_figure_without_raw_records(tmp_path):
    """A results folder whose per-request records were not kept (the H200 runs) gets its
    rounds figure and no bursty.png drawn from nothing."""
    from loadtest.bursty import plot, plot_rounds

    shipped = Path("results/serving/h200-7b-bursty-arrivals/results.json")
    results = json.loads(shipped.read_text())
    plot_rounds(results, tmp_path)
    plot(results, tmp_path)
    assert (tmp_path / "rounds.png").stat().st_size > 10_000
    assert not (tmp_path / "bursty.png").exists()


def test_bursty_marks_an_arm_whose_arrivals_outran_the_server():
    from loadtest.bursty import markdown, summarize

    folder = ROOT / "results/serving/h200-7b-bursty-arrivals"
    results = json.loads((folder / "one-round/results.json").read_text())
    summary = summarize(results["rounds"])  # one round of three: the H200's time ran out
    assert summary["poisson:served"]["median"] == pytest.approx(60.636 / 82.36, abs=0.01)
    assert summary["closed:served"]["median"] == pytest.approx(1.0, abs=0.02)
    text = markdown(results | {"summary": summary})
    assert "1 of 3 rounds" in text and "completed ÷ arrived" in text
    results = json.loads((folder / "results.json").read_text())  # all three rounds, later
    summary = summarize(results["rounds"])
    assert summary["poisson:served"]["median"] == pytest.approx(0.81, abs=0.01)
    assert "3 of 3 rounds" in markdown(results | {"summary": summary})


def test_gc_pauses_runs_both_modes_and_only_the_frozen_server_has_frozen_objects(tmp_path):
    cmd = [
        sys.executable, "-m", "loadtest.gc_pauses", "--users", "4", "--rounds", "1",
        "--duration", "3", "--warmup", "0.5", "--output-tokens", "5", "--port", str(free_port()),
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    points = json.loads((tmp_path / "results.json").read_text())["rounds"][0]["points"]
    assert (
        points["frozen"]["frozen_objects"] > 50_000 and points["not frozen"]["frozen_objects"] == 0
    )
    for point in points.values():
        assert point["completed"] > 0 and point["failures"] == 0
        assert point["gen2_collections"] >= 0 and point["gen2_pause_s"] >= 0
    assert "frozen ÷ not frozen" in (tmp_path / "results.md").read_text()


def test_the_children_meter_names_the_busiest_thread_of_a_child():
    """What says whether SGLang's scheduler loop (one thread of a child process) is saturated:
    here a child spinning on one thread is the busiest, with some CPU over the window."""
    from loadtest.procs import ChildrenMeter, process_cpu_seconds

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        meter = ChildrenMeter(os.getpid())
        start = process_cpu_seconds(busy.pid)
        deadline = time.monotonic() + 120  # a busy machine may give it little CPU: wait for it
        while process_cpu_seconds(busy.pid) - start < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = meter.busiest_thread()
    finally:
        busy.kill()
        busy.wait()
    assert found["engine_busiest_thread"].endswith(f" {busy.pid}/{busy.pid}")
    assert found["engine_busiest_thread_cores"] > 0
