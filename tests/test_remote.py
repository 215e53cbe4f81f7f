"""``RemoteEngine`` and ``python app.py --remote`` against a real ``python -m engine.api`` on the
CPU default (SmolLM2, the test adapters); the cluster case is in tests/test_cluster.py, over the
cluster that file starts."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app import Catalog, create_app
from engine.cluster import wait_until_up
from engine.interface import (
    AdapterNotFoundError,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
    collect,
)
from engine.registry import AdapterSpec, Registry
from engine.remote import AdminRefusedError, RemoteEngine, RemoteError, response_format, unfilled
from engine.sampling import resolve

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "remote-test-token"
REVIEW = "A joyless slog."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registry_for, adapter_dirs, tmp_path_factory):
    """``python -m engine.api`` serving the app's test registry, in the exact mode of the
    ``hf_engine`` fixture (fp32 base weights), with the admin token set."""
    root = tmp_path_factory.mktemp("remote")
    config = registry_for.model_dump(mode="json", exclude_defaults=True)
    config["engine"] = {"backend": "hf", "hf": {"base_weights": "fp32"}}
    path = root / "adapters.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    adapter_root = str(Path(adapter_dirs["alpha"]).parent)
    env = dict(os.environ, LORALAND_ADMIN_TOKEN=TOKEN, LORALAND_ADAPTER_ROOT=adapter_root)
    cmd = [sys.executable, "-m", "engine.api", "--config", str(path), "--port", str(port),
           "--backend", "hf"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/get_model_info", process, timeout_s=600)
        yield url
    finally:
        process.terminate()
        process.wait(120)


@pytest.fixture(scope="module")
def remote(server, registry_for):
    return RemoteEngine(server, registry_for, admin_token=TOKEN)


def greedy_request(spec: AdapterSpec | None, content: str, **sampling) -> GenerationRequest:
    params = resolve(spec, temperature=0.0, **sampling)
    adapter = spec.name if spec else None
    messages = [{"role": "user", "content": content}]
    return GenerationRequest(adapter, messages=messages, params=params)


async def chunks_of(engine, request: GenerationRequest) -> list:
    return [chunk async for chunk in engine.stream(request)]


def test_the_remote_engine_streams_what_the_embedded_engine_answers(
    remote, hf_engine, registry_for
):
    """Templates filled by the caller (one field, two fields, the base): the same greedy text
    and token count, streamed in several chunks, with usage and timings on the last."""
    alpha, beta = registry_for.adapter("alpha"), registry_for.adapter("beta")
    contents = [
        (alpha, alpha.fill(REVIEW)),
        (beta, beta.render({"context": "Paris is in France.", "question": "Where is Paris?"})),
        (None, "Say hi."),
    ]
    assert remote.base_model_id == hf_engine.base_model_id and not remote.settings.cluster
    for spec, content in contents:
        request = greedy_request(spec, content)
        embedded = asyncio.run(collect(hf_engine.stream(request), request))
        chunks = asyncio.run(chunks_of(remote, greedy_request(spec, content)))
        last = chunks[-1]
        assert "".join(c.text for c in chunks) == embedded.text, spec
        assert len([c for c in chunks if c.text]) > 1  # token by token, not one block
        assert last.finish_reason == embedded.finish_reason
        assert last.usage.completion_tokens == embedded.usage.completion_tokens
        assert sum(len(c.token_ids) for c in chunks) == embedded.usage.completion_tokens
        assert last.usage.prompt_tokens == embedded.usage.prompt_tokens  # the same prompt
        assert last.timings.ttft_s is not None and last.timings.e2e_s >= last.timings.ttft_s


def test_a_default_max_tokens_resolved_by_the_caller_travels_as_resolved(
    remote, hf_engine, registry_for
):
    """The app asks the base with an adapter's resolved sampling (its side-by-side view):
    ``alpha``'s default 12 tokens, not the base's 256 the server would pick if it were left out."""
    alpha = resolve(registry_for.adapter("alpha"), temperature=0.0, ignore_eos=True)
    assert alpha.fit_max_tokens and alpha.max_tokens == 12
    request = GenerationRequest(adapter=None, prompt="Say hi.", params=alpha)
    embedded = asyncio.run(collect(hf_engine.stream(request), request))
    chunks = asyncio.run(chunks_of(remote, GenerationRequest(prompt="Say hi.", params=alpha)))
    assert embedded.usage.completion_tokens == chunks[-1].usage.completion_tokens == 12


def test_sampling_extensions_reach_the_server_and_answer_as_the_embedded_engine(remote, hf_engine):
    """``min_tokens``, ``repetition_penalty``, ``min_p`` travel to the server (only when set)."""
    request = greedy_request(None, "Say OK.", min_tokens=12, repetition_penalty=1.5, min_p=0.2)
    embedded = asyncio.run(collect(hf_engine.stream(request), request))
    chunks = asyncio.run(chunks_of(remote, request))
    assert "".join(c.text for c in chunks) == embedded.text
    assert chunks[-1].usage.completion_tokens == embedded.usage.completion_tokens >= 12


def test_log_probabilities_come_back_per_token(remote, hf_engine, registry_for):
    alpha = registry_for.adapter("alpha")
    request = greedy_request(alpha, alpha.fill(REVIEW), logprobs=2)
    embedded = asyncio.run(collect(hf_engine.stream(request), request))
    again = greedy_request(alpha, alpha.fill(REVIEW), logprobs=2)
    answer = asyncio.run(collect(remote.stream(again), again))
    assert [e.text for e in answer.logprobs] == [e.text for e in embedded.logprobs]
    for ours, theirs in zip(answer.logprobs, embedded.logprobs):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert len(ours.top) == 2


def server_ttft_sum(server: str, adapter: str) -> float:
    """The server's own TTFT histogram sum for one adapter (seconds, all its requests)."""
    metric = f'loraland_time_to_first_token_seconds_sum{{adapter="{adapter}"}}'
    lines = httpx.get(f"{server}/metrics", timeout=60).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(metric))


def test_ttft_is_timed_from_the_send_so_it_holds_the_servers(server, remote, registry_for):
    """The server's clock starts after the request is sent and stops before its first token
    arrives here: the TTFT the remote engine reports is at least the server's own."""
    beta = registry_for.adapter("beta")
    filled = beta.render({"context": "Paris is in France.", "question": "Where?"})
    request = greedy_request(beta, filled)
    before = server_ttft_sum(server, "beta")
    done = asyncio.run(collect(remote.stream(request), request))
    server_ttft = server_ttft_sum(server, "beta") - before
    assert server_ttft > 0 and done.timings.ttft_s >= server_ttft


def test_refusals_become_the_engines_errors(remote, hf_engine):
    unknown = GenerationRequest("nope", prompt="Hi", params=SamplingParams(max_tokens=2))
    with pytest.raises(AdapterNotFoundError) as embedded:
        asyncio.run(chunks_of(hf_engine, unknown))
    with pytest.raises(AdapterNotFoundError) as remotely:
        asyncio.run(chunks_of(remote, unknown))
    assert str(remotely.value) == str(embedded.value)
    too_many = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=2, logprobs=9))
    with pytest.raises(InvalidRequestError) as refused:  # the server's 400: at most 5 here
        asyncio.run(chunks_of(remote, too_many))
    assert refused.value.param == "logprobs"
    too_long = GenerationRequest(prompt="Hi", params=SamplingParams(max_tokens=100_000))
    with pytest.raises(PromptTooLongError, match="maximum context length") as embedded:
        asyncio.run(chunks_of(hf_engine, too_long))
    with pytest.raises(PromptTooLongError) as remotely:
        asyncio.run(chunks_of(remote, too_long))
    assert str(remotely.value) == str(embedded.value) and remotely.value.status_code == 400


def test_admin_needs_the_token_and_reaches_the_server(server, remote, registry_for, adapter_dirs):
    no_token = RemoteEngine(server, registry_for)
    with pytest.raises(AdminRefusedError) as refused:
        asyncio.run(no_token.load_adapter("alpha-2", adapter_dirs["alpha"]))
    assert refused.value.status_code == 401 and "admin token" in str(refused.value)
    asyncio.run(remote.load_adapter("alpha-2", adapter_dirs["alpha"]))
    try:
        assert "alpha-2" in remote.adapters()
        with pytest.raises(AdminRefusedError) as taken:
            asyncio.run(remote.load_adapter("alpha-2", adapter_dirs["alpha"]))
        assert taken.value.status_code == 409 and "already loaded" in str(taken.value)
    finally:
        asyncio.run(remote.unload_adapter("alpha-2"))
    assert "alpha-2" not in remote.adapters()
    with pytest.raises(AdapterNotFoundError):
        asyncio.run(remote.unload_adapter("alpha-2"))


def test_an_adapter_hot_loaded_on_the_server_since_is_served_by_the_apps_api(
    server, remote, registry_for, adapter_dirs
):
    """The app's API asks the server before a 404: the adapter list it read at start is old."""
    from conftest import LiveServer

    from engine.api import create_api

    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"name": "alpha-3", "path": adapter_dirs["alpha"]}
    loaded = httpx.post(f"{server}/v1/adapters", json=body, headers=auth, timeout=300)
    assert loaded.status_code == 200, loaded.text
    live = LiveServer(create_api(remote, registry_for))
    try:
        assert "alpha-3" not in remote.adapters()  # not read since the load
        chat = {"model": "alpha-3", "messages": [{"role": "user", "content": REVIEW}],
                "max_tokens": 2}  # fmt: skip
        answer = httpx.post(f"{live.url}/v1/chat/completions", json=chat, timeout=300)
        assert answer.status_code == 200, answer.text
        assert "alpha-3" in remote.adapters()
        missing = httpx.post(f"{live.url}/v1/chat/completions", json=chat | {"model": "alpha-4"})
        assert missing.status_code == 404
    finally:
        live.stop()
        httpx.delete(f"{server}/v1/adapters/alpha-3", headers=auth, timeout=300)
        asyncio.run(remote.refresh())  # the module's engine: the next tests see alpha-3 gone
    assert "alpha-3" not in remote.adapters()


def test_the_app_over_a_remote_engine(remote, registry_for, tmp_path):
    """gradio_client drives the UI; the app's own API passes requests on; merging is refused."""
    from conftest import LiveServer
    from gradio_client import Client

    live = LiveServer(create_app(remote, registry_for, tmp_path))
    try:
        client = Client(f"{live.url}/", verbose=False)
        tuned, tuned_stats, base, base_stats = client.predict(
            "alpha", REVIEW, "", "", "", api_name="/compare"
        )
        assert tuned and base
        for stats in (tuned_stats, base_stats):
            assert "TTFT" in stats and "tok/s" in stats and "finish:" in stats
        table = client.predict(REVIEW, api_name="/every_adapter")
        rows = {row[0]: row for row in table["data"]}
        assert set(rows) == {"alpha", "beta", "base"}
        assert all(
            answer and probability.endswith("%") for _, answer, _, probability in rows.values()
        )
        history = client.predict("Say hi.", [], "beta", api_name="/chat")
        assert [m["role"] for m in history] == ["user", "assistant"]
        body = {"model": "alpha", "messages": [{"role": "user", "content": REVIEW}],
                "max_tokens": 3}  # fmt: skip
        answer = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=300)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        missing = httpx.post(f"{live.url}/v1/chat/completions", json=body | {"model": "nope"})
        assert missing.status_code == 404
        merge = httpx.post(f"{live.url}/v1/adapters/merge", json={})
        assert merge.status_code == 404 and "--remote" in merge.json()["error"]["message"]
        assert httpx.get(f"{live.url}/health", timeout=300).json()["ok"]
    finally:
        live.stop()


def test_an_adapter_the_local_registry_lacks(server, registry_for):
    """Its card comes from the server; its template is the server's only, so requests to it
    are refused instead of answered without it."""
    alpha_only = Registry(adapters=[registry_for.adapter("alpha")])
    engine = RemoteEngine(server, alpha_only)
    card = Catalog(engine, alpha_only).spec("beta")
    assert card.category == "generation" and card.task == "qa"
    assert "{context}" in card.template and "{question}" in card.template
    request = greedy_request(None, "Where is Paris?")
    request.adapter = "beta"
    with pytest.raises(InvalidRequestError, match=r"server's adapters\.yaml"):
        asyncio.run(chunks_of(engine, request))


def test_a_template_worded_otherwise_than_the_servers_is_refused(server, registry_for):
    """The same fields, other words: the app would answer otherwise than the server's API."""
    alpha = registry_for.adapter("alpha")
    reworded = alpha.model_copy(update={"template": alpha.template.replace("positive", "good")})
    assert reworded.template != alpha.template
    engine = RemoteEngine(server, Registry(adapters=[reworded]))
    request = greedy_request(reworded, reworded.fill(REVIEW))
    with pytest.raises(InvalidRequestError, match="worded otherwise"):
        asyncio.run(chunks_of(engine, request))


def test_the_server_froze_its_start_up_heap_and_reports_its_collector_pauses(server, remote):
    """``server.freeze_heap`` (on by default): the libraries' objects are out of the collector's
    sight, and /metrics has every collection's count and pause per generation."""
    asyncio.run(chunks_of(remote, greedy_request(None, "Say hi.", max_tokens=4)))
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("loraland_gc_")
    }
    assert values["loraland_gc_frozen_objects"] > 50_000  # torch, transformers, the app
    assert values['loraland_gc_collections_total{generation="0"}'] >= 1  # the request's
    assert values['loraland_gc_pause_seconds_total{generation="0"}'] > 0
    assert values['loraland_gc_pause_max_seconds{generation="0"}'] > 0


def test_nothing_answering_is_a_clear_error(registry_for):
    with pytest.raises(RemoteError, match="nothing answers"):
        RemoteEngine(f"http://127.0.0.1:{free_port()}", registry_for)


@pytest.mark.parametrize(
    "template, content, value",
    [
        ("Review: {review}", "Review: Review: x", "Review: x"),
        ("Q {q}\nA {q}", "Q a\nA a", "a"),
        ("Q {q}\nA {q}", "Q a\nA b", None),
        ("{input}", "anything\nat all", "anything\nat all"),
        ("Say {x} {{literally}}", "Say hi {literally}", "hi"),
        ("Review: {review}", "Critique: x", None),
    ],
)
def test_unfilled_inverts_a_one_field_template(template, content, value):
    spec = AdapterSpec(name="t", path=Path("."), template=template)
    assert unfilled(spec, content) == value


def test_unfilled_is_linear_in_the_content_even_for_a_recurring_field():
    """800 KB through a template that repeats its field: found, and with no backtracking (a
    regex backreference took ~1 min on this size)."""
    spec = AdapterSpec(name="t", path=Path("."), template="Q {q}\nA {q}")
    value = "ab{}" * 100_000
    assert unfilled(spec, spec.fill(value)) == value
    assert unfilled(spec, spec.fill(value) + "x") is None


def test_a_regex_constraint_is_refused_behind_the_router_only():
    from engine.constraints import Constraint

    params = SamplingParams(constraint=Constraint("regex", "(fresh|rotten)"))
    assert response_format(params, cluster=False) == {"type": "regex", "regex": "(fresh|rotten)"}
    with pytest.raises(InvalidRequestError, match="sglang-router"):
        response_format(params, cluster=True)
    assert response_format(SamplingParams(), cluster=True) == {"type": "text"}


def test_the_server_ends_its_tokenizer_process_when_it_stops(registry_for, tmp_path):
    """A prompt over ``OFF_LOOP_CHARS`` starts a tokenizer process; SIGTERM ends it with the
    server (it used to outlive it, adopted by PID 1)."""
    import psutil  # Locust's dependency

    config = registry_for.model_dump(mode="json", exclude_defaults=True)
    config["engine"] = {"backend": "hf"}
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [sys.executable, "-m", "engine.api", "--config", str(path), "--port", str(port)]
    process = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/get_model_info", process, timeout_s=600)
        body = {"model": "base", "prompt": "word " * 2000, "max_tokens": 1}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=600).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "no tokenizer process was started for a 10,000-character prompt"
    finally:
        process.terminate()
        process.wait(120)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"still running after the server stopped: {[p.cmdline() for p in alive]}"


def test_a_tool_round_trip_through_the_apps_api_over_a_remote_engine(remote, registry_for):
    """``python app.py --remote``: a call made under ``tool_choice`` and its result sent back
    reach the server as the server takes them (a tool's message keeps its ``tool_call_id``)."""
    import openai
    from conftest import LiveServer
    from helpers import WEATHER_TOOL

    from engine.api import create_api

    live = LiveServer(create_api(remote, registry_for))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        answer = client.chat.completions.create(
            model="base",
            messages=ask,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
        ).choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.tool_calls
        results = [{"role": "tool", "tool_call_id": c.id, "content": "18 C"}
                   for c in answer.message.tool_calls]  # fmt: skip
        messages = [*ask, answer.message.model_dump(), *results]
        follow_up = client.chat.completions.create(
            model="base", messages=messages, max_tokens=4, temperature=0
        )
        assert follow_up.choices[0].message.content
        counted = httpx.post(f"{live.url}/tokenize", json={"messages": messages}).json()
        assert counted["count"] == follow_up.usage.prompt_tokens
    finally:
        live.stop()
