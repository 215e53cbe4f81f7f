"""Alternating pairs (medians and ranges of per-round ratios), the Locust user's model names, and
the peer server's command line: pure logic, no model."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.registry import SGLangSettings
from loadtest.pairs import (
    KINDS,
    median_range,
    pairs_markdown,
    round_ratios,
    side_by_side,
    side_by_side_markdown,
    summarize_rounds,
    write_pairs,
)
from loadtest.peer import sglang_server_cmd
from loadtest.targets import SetupError, model_name, pick_models

ROOT = Path(__file__).resolve().parents[1]


def point(tok_s, ttft, cores=0.5, failures=0, http=True):
    cpu = {"server_cpu_cores": cores} if http else {"engine_process_cpu_cores": cores}
    return {"output_throughput": tok_s, "ttft_p50": ttft, "itl_p50": 0.01, "tpot_mean": 0.02,
            "completed": 100,
            "failures": failures, "client_cpu_cores": 0.3, **cpu}  # fmt: skip


def a_round(number, direct_base, direct_lora, http_base, http_lora, users=256):
    return {
        "users": users, "adapters": 128, "round": number,
        "points": {
            "direct-base": point(*direct_base, http=False),
            "direct-adapters": point(*direct_lora, http=False),
            "http-base": point(*http_base),
            "http-adapters": point(*http_lora),
        },
    }  # fmt: skip


ROUNDS = [
    a_round(1, (10000, 0.080), (9000, 0.090), (9500, 0.100), (8100, 0.120)),
    a_round(2, (12000, 0.080), (12000, 0.080), (6000, 0.400), (6600, 0.320)),
    a_round(3, (11000, 0.100), (10450, 0.110), (11000, 0.100), (10450, 0.110)),
]


def test_median_and_range_skip_missing_values():
    assert median_range([3, None, 1, 2]) == {
        "median": 2, "min": 1, "max": 3, "n": 3, "values": [3, 1, 2]
    }  # fmt: skip
    assert median_range([4, 1, 2, 3])["median"] == 2.5  # an even count: the middle two's mean
    assert median_range([None, None]) == {
        "median": None, "min": None, "max": None, "n": 0, "values": []
    }  # fmt: skip


def test_each_ratio_is_taken_within_a_round():
    r = round_ratios(ROUNDS[0]["points"])
    assert r["adapters_over_base_tok_s_direct"] == pytest.approx(0.9)
    assert r["adapters_over_base_tok_s_http"] == pytest.approx(8100 / 9500)
    assert r["http_over_direct_tok_s_base"] == pytest.approx(0.95)
    assert r["http_over_direct_tok_s_adapters"] == pytest.approx(0.9)
    assert r["http_over_direct_ttft_p50_base"] == pytest.approx(1.25)
    assert r["adapters_over_base_ttft_p50_http"] == pytest.approx(1.2)
    missing = round_ratios({"http-base": point(100, 0.1), "http-adapters": point(None, 0.2)})
    assert missing["adapters_over_base_tok_s_http"] is None  # no throughput figure
    assert missing["http_over_direct_tok_s_base"] is None  # no direct point
    zero = round_ratios({"http-base": point(0, 0.1), "http-adapters": point(50, 0.2)})
    assert zero["adapters_over_base_tok_s_http"] is None


def test_rounds_reduce_to_medians_and_ranges_of_the_ratios_not_ratios_of_medians():
    summary = summarize_rounds(ROUNDS)
    group = summary["u256-a128"]
    assert group["rounds"] == 3 and group["users"] == 256 and group["adapters"] == 128
    tok = group["ratios"]["adapters_over_base_tok_s_direct"]
    assert tok["values"] == pytest.approx([0.9, 1.0, 0.95])
    assert (tok["median"], tok["min"], tok["max"]) == pytest.approx((0.95, 0.9, 1.0))
    http = group["ratios"]["http_over_direct_tok_s_base"]
    assert (http["median"], http["min"], http["max"]) == pytest.approx((0.95, 0.5, 1.0))
    ttft = group["ratios"]["http_over_direct_ttft_p50_base"]
    assert (ttft["median"], ttft["min"], ttft["max"]) == pytest.approx((1.25, 1.0, 5.0))
    base = group["points"]["http-base"]
    assert base["output_throughput"]["median"] == 9500
    assert base["process_cpu_cores"]["median"] == 0.5  # the server's cores through HTTP
    direct = group["points"]["direct-base"]
    assert direct["process_cpu_cores"]["median"] == 0.5  # the bench process's, direct
    table = pairs_markdown(summary)
    assert "| HTTP ÷ direct, tok/s, base | 0.95 | 0.50–1.00 | 3 |" in table
    assert "| adapters ÷ base, tok/s, direct | 0.95 | 0.90–1.00 | 3 |" in table
    assert "| http-base | 9500 | 6000–11000 | 100 | 100–400 |" in table


def test_a_point_whose_arrivals_outran_the_server_leaves_its_rounds_ratios_out():
    backlog = a_round(4, (3500, 0.044), (4600, 0.059), (7000, 0.080), (7000, 0.083))
    for kind, served in zip(KINDS, (0.0, 0.97, 0.97, 0.97), strict=True):  # nothing finished
        backlog["points"][kind] |= {"served": served, "open_loop": True}  # in direct-base's window
    ratios = round_ratios(backlog["points"])
    assert ratios["http_over_direct_tok_s_base"] is None  # the backlog, not the path
    assert ratios["adapters_over_base_tok_s_direct"] is None
    assert ratios["http_over_direct_tok_s_adapters"] == pytest.approx(7000 / 4600)
    group = summarize_rounds([*ROUNDS, backlog])["u256-a128"]
    assert group["outran"] == ["direct-base (round 4: 0.00)"]
    assert group["ratios"]["http_over_direct_tok_s_base"]["n"] == 3
    assert "Arrivals outran the server" in pairs_markdown({"g": group})
    assert "outran" not in pairs_markdown(summarize_rounds(ROUNDS))
    waves = a_round(5, (9000, 0.06), (8000, 0.4), (8500, 0.08), (7600, 0.41))
    waves["points"]["direct-adapters"] |= {"served": 0.86, "open_loop": False}  # a closed loop
    assert round_ratios(waves["points"])["http_over_direct_ttft_p50_adapters"] == pytest.approx(
        0.41 / 0.4
    )  # whose waves fell unevenly in the window: kept


def test_concurrencies_are_summarised_apart(tmp_path):
    rounds = [*ROUNDS, a_round(1, (20000, 0.2), (18000, 0.2), (15000, 0.5), (14000, 0.6), 512)]
    summary = write_pairs(tmp_path, {"settings": {"command": "bench"}, "rounds": rounds})
    assert set(summary) == {"u256-a128", "u512-a128"}
    assert summary["u512-a128"]["rounds"] == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["u512-a128"]["ratios"]["adapters_over_base_tok_s_direct"]["n"] == 1
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("`bench`") and "512 streams" in text and "256 streams" in text


def test_side_by_side_sets_our_http_points_beside_the_peers():
    ours = summarize_rounds(ROUNDS)
    peer_rounds = [
        {"users": 256, "adapters": 128, "round": n,
         "points": {"http-base": point(b, 0.05), "http-adapters": point(a, 0.06)}}
        for n, (b, a) in enumerate([(12000, 11000), (13000, 12000), (11000, 9000)], 1)
    ]  # fmt: skip
    report = side_by_side(ours, summarize_rounds(peer_rounds), 256)
    rows = {r["figure"]: r for r in report["rows"]}
    assert rows["base, tok/s"]["ours"]["median"] == 9500
    assert rows["base, tok/s"]["peer"]["median"] == 12000
    assert rows["base, tok/s"]["ours_over_peer"] == pytest.approx(9500 / 12000)
    assert rows["128 adapters, TTFT p50 ms"]["peer"]["median"] == pytest.approx(60)
    assert rows["adapters ÷ base, tok/s"]["peer"]["min"] == pytest.approx(9000 / 11000)
    text = side_by_side_markdown(report)
    ours_by_round = [r["points"]["http-base"]["output_throughput"] for r in ROUNDS]
    by_round = [x / y for x, y in zip(ours_by_round, (12000, 13000, 11000), strict=True)]
    assert rows["base, tok/s"]["ours_over_peer_by_round"]["values"] == pytest.approx(by_round)
    low, mid, high = sorted(by_round)
    cells = f"| 0.79 | {mid:.2f} [{low:.2f}–{high:.2f}] |"
    assert f"| base, tok/s | 9500 | 6000–11000 | 12000 | 11000–13000 {cells}" in text
    one_round_short = summarize_rounds(peer_rounds[:2])
    assert side_by_side(ours, one_round_short, 256)["rows"][0]["ours_over_peer_by_round"] is None
    peer_rounds[1]["points"]["http-base"]["output_throughput"] = None  # a round without it
    gap = side_by_side(ours, summarize_rounds(peer_rounds), 256)["rows"][0]
    assert gap["peer"]["n"] == 2 and gap["ours_over_peer_by_round"] is None  # not rounds 1 and 3
    assert side_by_side(ours, {}, 256)["missing"] == ["peer"]
    assert "no rounds from ['peer']" in side_by_side_markdown(side_by_side(ours, {}, 256))


def test_side_by_side_command_writes_json_and_markdown(tmp_path):
    write_pairs(tmp_path / "ours", {"rounds": ROUNDS})
    write_pairs(tmp_path / "peer", {"rounds": ROUNDS})
    cmd = [sys.executable, "-m", "loadtest.pairs", "side-by-side", str(tmp_path / "ours"),
           str(tmp_path / "peer"), "--users", "256", "--out", str(tmp_path / "side")]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    report = json.loads((tmp_path / "side" / "side-by-side.json").read_text())
    assert all(r["ours_over_peer"] == pytest.approx(1) for r in report["rows"])
    assert "Ours vs SGLang's own server" in (tmp_path / "side" / "side-by-side.md").read_text()


def options(**kw):
    defaults = {"distribution": "uniform", "adapters": -1, "zipf_s": 1.1, "models": "",
                "model_format": "{adapter}"}  # fmt: skip
    return argparse.Namespace(**defaults | kw)


OUR_CARDS = [{"id": "SmolLM2"}, *({"id": n, "parent": "SmolLM2"} for n in ("b", "a", "c"))]
SGLANG_CARDS = [  # SGLang 0.5.17's /v1/models: the served name, then each adapter with a parent
    {"id": "base", "root": "base"},
    *({"id": n, "root": f"/tmp/{n}", "parent": "base"} for n in ("lora-001", "lora-000")),
]


def test_model_names_default_to_the_adapter_and_take_a_format_for_sglangs_server():
    chosen = pick_models(options(adapters=2), OUR_CARDS)
    assert chosen == {"adapters": ["a", "b"], "base": "SmolLM2", "weights": None}
    sglang = pick_models(options(model_format="{base}:{adapter}"), SGLANG_CARDS)
    assert sglang["adapters"] == ["base:lora-000", "base:lora-001"] and sglang["base"] == "base"
    assert pick_models(options(distribution="base"), SGLANG_CARDS)["adapters"] == []
    assert model_name("{base}:{adapter}", "/m/base", "x") == "/m/base:x"  # split on the first :


def test_an_explicit_adapter_list_replaces_the_servers_order_and_must_exist():
    chosen = pick_models(options(models="c, a"), OUR_CARDS)
    assert chosen["adapters"] == ["c", "a"]
    assert pick_models(options(models="c,a", adapters=1), OUR_CARDS)["adapters"] == ["c"]
    with pytest.raises(SetupError, match="does not list"):
        pick_models(options(models="a,zzz"), OUR_CARDS)


def test_a_model_format_without_the_adapter_or_with_unknown_fields_is_refused():
    with pytest.raises(SetupError, match="must contain"):
        model_name("{base}", "base", "a")  # every request would go to the base
    with pytest.raises(SetupError, match="only"):
        model_name("{adapter}-{task}", "base", "a")
    with pytest.raises(SetupError, match="no base model"):
        pick_models(options(), [{"id": "a", "parent": "x"}])


def test_the_peer_server_gets_the_registry_settings_as_sglang_0_5_17_flags():
    settings = SGLangSettings(max_loras_per_batch=128, mem_fraction_static=0.7)
    adapters = {"lora-000": "/s/adapters/lora-000", "lora-001": "/s/adapters/lora-001"}
    cmd = sglang_server_cmd("/s/base", adapters, settings, "auto", 31000)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(itertools.pairwise(cmd))
    assert flags["--model-path"] == "/s/base" and flags["--port"] == "31000"
    assert flags["--max-loras-per-batch"] == "128" and flags["--mem-fraction-static"] == "0.7"
    assert flags["--lora-backend"] == "csgmv" and flags["--attention-backend"] == "triton"
    assert flags["--sampling-backend"] == "pytorch" and flags["--dtype"] == "auto"
    assert "--enable-lora" in cmd and "--disable-cuda-graph" not in cmd
    assert "--stream-interval" not in cmd  # "auto" is ours; SGLang's server keeps its default
    at = cmd.index("--lora-paths")  # nargs='*': the list comes last
    assert cmd[at + 1 :] == ["lora-000=/s/adapters/lora-000", "lora-001=/s/adapters/lora-001"]
    off = SGLangSettings(cuda_graph=False, stream_interval=4, max_loaded_loras=8)
    cmd = sglang_server_cmd("/s/base", {}, off, "float16", 1)
    flags = dict(itertools.pairwise(cmd))
    assert "--disable-cuda-graph" in cmd and flags["--stream-interval"] == "4"
    assert flags["--max-loaded-loras"] == "8" and "--lora-paths" not in cmd
    assert flags["--max-lora-rank"] == "64" and flags["--lora-target-modules"] == "all"


def test_the_server_clock_sees_a_chat_streams_first_text_and_not_its_role_event():
    from engine.api.protocol import ChunkWriter
    from loadtest.bench import ServerClock

    writer = ChunkWriter("chat", "chatcmpl-1", "sql", 0, ["sql"])
    assert ServerClock.FIRST_TEXT not in writer.role(0)
    assert ServerClock.FIRST_TEXT in writer.text(0, 'SELECT "x"')
    assert ServerClock.FIRST_TEXT in writer.choice(0, "last", "stop")
    assert ServerClock.FIRST_TEXT not in writer.choice(0, "", "stop")  # no text: not a first text
    for event in (writer.text(0, '"id": "not-this-one"'), writer.role(0)):  # the head's id only
        assert ServerClock.CHAT_ID.search(event)[1] == b"chatcmpl-1"


def test_the_loop_lag_probe_sees_a_blocked_event_loop():
    import asyncio
    import time

    from loadtest.bench import LoopLag

    async def block_once():
        lag = LoopLag(interval=0.005)
        probing = asyncio.create_task(lag.run())
        await asyncio.sleep(0.02)
        time.sleep(0.05)  # the loop writes nothing else meanwhile: every timer waits
        await asyncio.sleep(0.02)
        probing.cancel()
        return lag

    lag = asyncio.run(block_once())
    assert max(late for _, late in lag.samples) >= 0.045
    figures = lag.figures(0, time.time())
    assert 0 <= figures["loop_lag_p50"] <= figures["loop_lag_p99"]
    assert lag.figures(0, 1) == {"loop_lag_p50": None, "loop_lag_p99": None}  # none in the window


def test_settings_command_sets_engines_side_by_side_with_a_plot(tmp_path):
    for name, rounds in (("default", ROUNDS), ("continuous-4", ROUNDS[:1])):
        write_pairs(tmp_path / name / "pairs", {"rounds": rounds})
    cmd = [sys.executable, "-m", "loadtest.pairs", "settings", str(tmp_path / "default"),
           str(tmp_path / "continuous-4"), "--out", str(tmp_path / "out")]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    table = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert list(table) == ["default", "continuous-4"]
    assert table["default"]["rounds"] == 3 and table["continuous-4"]["rounds"] == 1
    assert table["default"]["direct-base"]["tok_s"]["median"] == 11000
    assert table["continuous-4"]["http-adapters"]["ttft_p50"]["median"] == 0.120
    text = (tmp_path / "out" / "settings.md").read_text()
    assert "| continuous-4 | 1 | 10000 | 9000 | 9500 | 8100 | 80 | 90 | 100 | 120 |" in text
    assert (tmp_path / "out" / "settings.png").stat().st_size > 0


def test_settings_pool_the_rounds_of_one_settings_engines_and_give_their_ranges(tmp_path):
    """A B A B engines in one job: each setting's headline over all its engines' rounds."""
    for name, rounds in (("fp8", ROUNDS[:1]), ("fp8-2", ROUNDS[1:]), ("hook", ROUNDS[2:])):
        write_pairs(tmp_path / name / "pairs", {"rounds": rounds})
    pooled = f"fp8={tmp_path / 'fp8'}+{tmp_path / 'fp8-2'}"
    cmd = [sys.executable, "-m", "loadtest.pairs", "settings", pooled, str(tmp_path / "hook"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    table = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert table["fp8"]["rounds"] == 3 and table["fp8"]["engines"] == 2
    assert table["hook"]["rounds"] == 1 and table["hook"]["engines"] == 1
    text = (tmp_path / "out" / "settings.md").read_text()
    assert "| fp8 | 2 | 3 | 8100 [6600–10450] | 0.95 [0.85–1.10] | 0.95 [0.90–1.00] |" in text
    assert "| hook | 1 | 1 | 10450 [10450–10450] | 0.95 [0.95–0.95] | 0.95 [0.95–0.95] |" in text


def test_settings_need_one_concurrency_per_run(tmp_path):
    from loadtest.pairs import settings_table

    both = {"rounds": [*ROUNDS, a_round(4, *([(1, 0.1)] * 4), users=512)]}
    with pytest.raises(ValueError, match=r"\[256, 512\] streams"):
        settings_table({"default": both})
    assert settings_table({"default": both}, users=512)["default"]["rounds"] == 1


def test_closed_loop_clients_with_a_think_time_sleep_between_answers_and_the_title_says_so():
    import asyncio

    from loadtest.bench import Traffic, arrivals_of, closed_loop
    from loadtest.no_model import NoModelEngine

    engine = NoModelEngine("base", [], gap_s=0)  # answers at once: only the sleeps take time
    traffic = Traffic([None], (2, 3), (2, 2))
    thinking, _ = asyncio.run(closed_loop(engine, traffic, users=2, seconds=0.5, think=0.2))
    back_to_back, _ = asyncio.run(closed_loop(engine, traffic, users=2, seconds=0.5))
    assert 2 <= len(thinking) <= 6  # each user at most 3 requests: one per 0.2-s sleep
    assert len(back_to_back) > 6
    options = argparse.Namespace(arrival_rate=0, think_time=1.0)
    assert arrivals_of(options) == "closed, 1.0-s think time"
    assert arrivals_of(options, title=True) == "1.0-s think time"
    assert arrivals_of(argparse.Namespace(arrival_rate=0, think_time=0)) == "closed"


def test_settings_under_open_loop_show_whether_each_carried_its_arrivals():
    from loadtest.pairs import settings_markdown, settings_table

    carried, backlog = a_round(1, *([(9000, 0.07)] * 4)), a_round(1, *([(6000, 0.09)] * 4))
    for r, served in ((carried, 0.99), (backlog, 0.81)):
        for point in r["points"].values():
            point |= {"served": served, "open_loop": True}
    text = settings_markdown(settings_table({"graph-bs-512": {"rounds": [carried]},
                                             "default": {"rounds": [backlog]}}))  # fmt: skip
    assert "direct-base completed ÷ arrived" in text
    assert "| default | 1 | 6000 | 6000 | 6000 | 6000 | 90 | 90 | 90 | 90 | 0.81 |" in text
    closed = settings_markdown(settings_table({"default": {"rounds": ROUNDS}}))
    assert "arrived" not in closed  # closed-loop runs: no such column


def test_split_stacks_the_engines_the_apis_and_the_clients_part_of_the_first_token(tmp_path):
    rounds = []
    for number, engine_ms in ((1, 300), (2, 320), (3, 310)):
        r = a_round(number, (9000, 0.320), (8000, 0.330), (8000, 0.400), (7500, 0.420))
        for kind in ("http-base", "http-adapters"):
            r["points"][kind] |= {"engine_ttft_p50": engine_ms / 1000, "server_ttft_p50": 0.350}
        rounds.append(r)
    write_pairs(tmp_path / "think", {"rounds": rounds})
    write_pairs(tmp_path / "closed", {"rounds": ROUNDS})
    cmd = [sys.executable, "-m", "loadtest.pairs", "split", f"waves={tmp_path / 'think'}",
           str(tmp_path / "closed"), "--out", str(tmp_path / "out")]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    split = json.loads((tmp_path / "out" / "ttft-split.json").read_text())
    assert list(split) == ["waves", "closed"]
    http = split["waves"]["http-base"]
    assert http["the engine"] == pytest.approx(310)
    assert http["the API, before its first byte"] == pytest.approx(40)
    assert http["to the server and back, the client"] == pytest.approx(50)
    assert split["waves"]["direct-adapters"]["the engine"] == pytest.approx(330)
    assert split["waves"]["direct-adapters"]["the API, before its first byte"] == 0
    assert http["not split (no server clock in that run)"] is None
    closed = split["closed"]["http-base"]  # no server clock in that run: one unsplit part
    assert closed["the engine"] is None
    assert closed["not split (no server clock in that run)"] == closed["client's TTFT p50"]
    assert (
        "| waves | http-base | 310.0 | 40.0 | 50.0 | — | 400.0 |"
        in (tmp_path / "out" / "ttft-split.md").read_text()
    )
    assert (tmp_path / "out" / "ttft-split.png").stat().st_size > 0


def test_split_needs_one_concurrency_per_run(tmp_path):
    write_pairs(tmp_path / "both", {"rounds": [*ROUNDS, a_round(4, *([(1, 0.1)] * 4), users=512)]})
    cmd = [sys.executable, "-m", "loadtest.pairs", "split", str(tmp_path / "both"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "one concurrency, not 2: u256-a128, u512-a128" in done.stderr
    assert "Traceback" not in done.stderr
