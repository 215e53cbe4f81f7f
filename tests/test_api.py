"""The OpenAI-compatible API, over real HTTP against a live server on the CPU backend."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from engine.api import create_api

BASE = "SmolLM2-135M-Instruct"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(hf_engine, registry_for, adapter_dirs, tmp_path_factory):
    from conftest import LiveServer

    root = tmp_path_factory.mktemp("adapter_root")
    shutil.copytree(adapter_dirs["beta"], root / "gamma")
    app = create_api(hf_engine, registry_for, admin_token=TOKEN, adapter_root=root)
    live = LiveServer(app)
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def wait_for(condition, seconds: float) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (polled every 10 ms)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def chat_body(model, stream=False, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    }
    return body | extra


def read_sse(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("model", ["alpha", BASE])
def test_chat_streamed_chunks_join_to_the_non_streamed_text(client, model):
    whole = client.post("/v1/chat/completions", json=chat_body(model)).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["object"] == "chat.completion" and whole["model"] == model
    assert whole["usage"]["completion_tokens"] > 0
    body = chat_body(model, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1] if e["choices"]]
    assert "".join(pieces) == text
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert [e for e in events[1:-1] if e["choices"]][-1]["choices"][0]["finish_reason"]
    assert all("usage" in e and e["usage"] is None for e in events[:-2])  # as OpenAI's chunks


def test_streamed_chunks_have_no_usage_field_unless_asked(client):
    body = chat_body("alpha", stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = read_sse(response)
    assert all("usage" not in e for e in events[:-1])


@pytest.mark.parametrize("model", ["beta", "base"])
def test_completions_streamed_and_not(client, model):
    body = {"model": model, "prompt": "The sky is", "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion"
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        events = read_sse(response)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]


def test_adapter_answers_differ_from_base_and_sglang_model_form_works(client):
    def answer(model):
        body = chat_body(model)
        return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]

    assert answer("alpha") != answer(BASE)
    assert answer(f"{BASE}:alpha") == answer("alpha")


@pytest.mark.parametrize("model", ["alpha", "base"])
def test_no_messages_is_named_as_such_not_as_a_last_message_of_another_role(client, model):
    for body in ({"model": model, "messages": []}, {"model": model}):
        error = client.post("/v1/chat/completions", json=body).json()["error"]
        assert error["param"] == "messages" and "at least one message" in error["message"]


def test_models_lists_base_and_adapter_cards(client):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert BASE in cards
    assert cards["alpha"]["parent"] == BASE and cards["alpha"]["task"] == "sentiment"
    assert cards["alpha"]["category"] == "classification"
    assert cards["alpha"]["eval"]["score"] == 0.9


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_unknown_model_is_a_404_not_a_base_answer(client):
    error = error_of(client.post("/v1/chat/completions", json=chat_body("nope")), 404)
    assert "'nope' does not exist" in error["message"] and error["param"] == "model"


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(client):
    bad_json = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in error_of(bad_json, 400)["message"]
    missing = error_of(client.post("/v1/chat/completions", json={"model": "alpha"}), 400)
    assert missing["param"] == "messages"
    temp = error_of(
        client.post("/v1/chat/completions", json=chat_body("alpha", temperature=5)), 400
    )
    assert temp["param"] == "temperature"
    n = error_of(client.post("/v1/chat/completions", json=chat_body("alpha", n=17)), 400)
    assert n["param"] == "n"
    long = chat_body("alpha", max_tokens=100_000)
    too_long = error_of(client.post("/v1/chat/completions", json=long), 400)
    assert "maximum context length" in too_long["message"] and too_long["param"] == "max_tokens"
    role = chat_body("alpha", messages=[{"role": "wizard", "content": "x"}])
    assert "role" in error_of(client.post("/v1/chat/completions", json=role), 400)["message"]
    ok = client.post("/v1/chat/completions", json=chat_body("alpha", max_tokens=2))
    assert ok.status_code == 200


def test_hot_load_use_unload(client):
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/adapters", json={"name": "gamma", "path": "gamma"}).status_code == 401
    outside = client.post("/v1/adapters", json={"name": "x", "path": "/etc"}, headers=auth)
    assert "adapter root" in error_of(outside, 403)["message"]
    missing = client.post("/v1/adapters", json={"name": "x", "path": "nothing"}, headers=auth)
    assert "no such directory" in error_of(missing, 422)["message"]
    loaded = client.post("/v1/adapters", json={"name": "gamma", "path": "gamma"}, headers=auth)
    assert loaded.status_code == 200 and "gamma" in loaded.json()["adapters"]
    gamma = client.post("/v1/chat/completions", json=chat_body("gamma")).json()
    beta = client.post("/v1/chat/completions", json=chat_body("beta", prompt_template="raw")).json()
    assert gamma["choices"][0]["message"] == beta["choices"][0]["message"]
    assert "gamma" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.delete("/v1/adapters/gamma", headers=auth).status_code == 200
    error_of(client.post("/v1/chat/completions", json=chat_body("gamma")), 404)
    error_of(client.delete("/v1/adapters/gamma", headers=auth), 404)


def aborted(client) -> float:
    """``loraland_requests_total`` of alpha's chat requests that finished with ``abort``."""
    series = 'loraland_requests_total{adapter="alpha",endpoint="chat",finish="abort"} '
    lines = client.get("/metrics").text.splitlines()
    return next((float(line.removeprefix(series)) for line in lines if line.startswith(series)), 0)


def test_client_disconnect_cancels_the_generation(client, hf_engine):
    body = chat_body("alpha", stream=True, max_tokens=400, ignore_eos=True)
    before, aborted_before = hf_engine.stats()["generated_tokens"], aborted(client)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert wait_for(lambda: hf_engine.stats()["running"] == 0, seconds=30)
    assert hf_engine.stats()["generated_tokens"] - before < 200
    assert wait_for(lambda: aborted(client) == aborted_before + 1, seconds=30)  # as vLLM counts


def test_a_client_leaving_a_non_streamed_request_ends_its_generation(server, client, hf_engine):
    """Its answer is one JSON at the end: nothing is written while it generates, so only the
    connection's close can tell the server (docs/api.md: a client that disconnects ends it)."""
    import socket

    payload = json.dumps(chat_body("alpha", max_tokens=4000, ignore_eos=True)).encode()
    before, aborted_before = hf_engine.stats()["generated_tokens"], aborted(client)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        started = wait_for(lambda: hf_engine.stats()["generated_tokens"] > before, seconds=120)
        assert started, "the request never started"
    assert wait_for(lambda: hf_engine.stats()["running"] == 0, seconds=30)
    assert hf_engine.stats()["generated_tokens"] - before < 4000
    assert wait_for(lambda: aborted(client) == aborted_before + 1, seconds=30)
    assert (
        client.post("/v1/chat/completions", json=chat_body("alpha", max_tokens=2)).status_code
        == 200
    )


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_of_an_answer_that_ends_on_its_end_of_turn_token(client, stream):
    """One entry per token of the text, none for the end-of-turn token that ended it."""
    question = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    body = chat_body("base", stream, messages=question, max_tokens=64, logprobs=True)
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line[6:7] == "{"]
        choices = [e["choices"][0] for e in events]
        content = "".join(c["delta"].get("content") or "" for c in choices)
        entries = [x for c in choices if c.get("logprobs") for x in c["logprobs"]["content"]]
        finish = choices[-1]["finish_reason"]
    else:
        (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
        content, finish = choice["message"]["content"], choice["finish_reason"]
        entries = choice["logprobs"]["content"]
    assert finish == "stop" and content
    assert "".join(e["token"] for e in entries) == content


def test_health_and_per_adapter_metrics(client):
    assert client.get("/health").json()["ok"] is True
    client.post("/v1/chat/completions", json=chat_body("beta", max_tokens=3, prompt_template="raw"))
    client.post("/v1/chat/completions", json=chat_body("no-such-adapter"))
    client.post("/v1/chat/completions", json=chat_body("beta", max_tokens="8"))  # a 400 for beta
    client.post("/v1/chat/completions", json=chat_body("no-such-adapter", max_tokens="8"))
    text = client.get("/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['loraland_requests_total{adapter="beta",endpoint="chat",finish="length"}'] >= 1
    assert samples['loraland_time_to_first_token_seconds_count{adapter="beta"}'] >= 1
    assert samples['loraland_inter_token_latency_seconds_count{adapter="beta"}'] >= 1
    assert samples['loraland_generation_tokens_total{adapter="beta"}'] >= 3
    unknown = 'loraland_request_errors_total{adapter="unknown",status="404",type="not_found_error"}'
    assert samples[unknown] >= 1
    bad_body = (
        'loraland_request_errors_total{adapter="beta",status="400",type="invalid_request_error"}'
    )
    assert samples[bad_body] >= 1  # the served adapter it named, though its body was refused
    assert not any("no-such-adapter" in name for name in samples)
    assert "loraland_adapters_loaded 2.0" in text
    assert samples["loraland_kv_pool_tokens"] == 0  # the CPU backend keeps no KV pool


def test_the_kv_pools_size_is_a_gauge_where_the_engine_has_one():
    from engine.metrics import Metrics

    text = Metrics().render({"running": 3, "kv_pool_tokens": 741_000}).decode()
    assert "loraland_kv_pool_tokens 741000.0" in text


def test_every_collection_is_timed_per_generation():
    import gc

    from engine.metrics import GC_WATCH, Metrics

    Metrics()  # installs the process-wide watch (once, however many servers)
    Metrics()
    before = GC_WATCH.by_generation.get(2, (0, 0.0, 0.0))
    gc.collect()
    count, total, longest = GC_WATCH.by_generation[2]
    assert count == before[0] + 1 and total > before[1] and longest > 0
    assert gc.callbacks.count(GC_WATCH.on_collection) == 1
    with GC_WATCH.paused():
        gc.collect()
    assert GC_WATCH.by_generation[2][0] == count
    assert gc.callbacks.count(GC_WATCH.on_collection) == 1


REVIEW = [{"role": "user", "content": "A joyless slog."}]


@pytest.mark.parametrize("model", [BASE, "alpha"])
def test_tokenize_counts_the_prompt_tokens_a_generation_sees(client, model):
    """vLLM's ``/tokenize``: the adapter's template filled and the chat template applied, as
    for the chat completion; a prompt as ``/v1/completions`` takes it."""
    tokenized = client.post("/tokenize", json={"model": model, "messages": REVIEW})
    assert tokenized.status_code == 200, tokenized.text
    answer = client.post("/v1/chat/completions", json=chat_body(model, messages=REVIEW)).json()
    assert tokenized.json()["count"] == answer["usage"]["prompt_tokens"]
    assert tokenized.json()["count"] == len(tokenized.json()["tokens"])
    assert tokenized.json()["max_model_len"] == 8192
    prompt = {"model": model, "prompt": "The capital of France is"}
    counted = client.post("/v1/tokenize", json=prompt).json()["count"]
    done = client.post("/v1/completions", json=prompt | {"max_tokens": 2}).json()
    assert counted == done["usage"]["prompt_tokens"]


def test_detokenize_gives_the_text_back_and_token_strs_spell_it(client):
    """``token_strs`` spell each token as logprobs do: a part of a character by its bytes."""
    from engine.text import token_bytes

    text = "Ünïcode, emoji 🙂 and spaces  twice."
    tokenized = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert len(tokenized["token_strs"]) == tokenized["count"]
    assert b"".join(map(token_bytes, tokenized["token_strs"])).decode() == text
    assert any(s.startswith("bytes:") for s in tokenized["token_strs"])  # the emoji's parts
    assert client.post("/tokenize", json={"prompt": text}).json()["token_strs"] is None
    back = client.post("/detokenize", json={"tokens": tokenized["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": REVIEW}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": False}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": REVIEW, "add_special_tokens": True}, 400, "add_special_tokens"),
        (
            "/tokenize",
            {"messages": REVIEW, "add_generation_prompt": False},
            400,
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            {"model": "alpha", "messages": [], "template_fields": {"x": "y"}},
            400,
            "template_fields",
        ),
        ("/tokenize", {"prompt": "x", "tools": []}, 400, "tools"),
        ("/detokenize", {"tokens": [49152]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [0] * 8193}, 400, "tokens"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/v1/detokenize", {"tokens": ["1"]}, 400, "tokens.0"),
    ],
)
def test_tokenize_refusals_name_the_field(client, route, body, status, param):
    error = error_of(client.post(route, json=body), status)
    assert error["param"] == param
    assert client.post("/tokenize", json={"prompt": "still here"}).json()["count"] > 0


def test_model_cards_give_the_context_length(client, hf_engine):
    cards = client.get("/v1/models").json()["data"]
    assert {c["max_model_len"] for c in cards} == {hf_engine.context_length} == {8192}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "\0" * 9000, "return_token_strs": True}, "prompt"),
        ({"messages": [{"role": "user", "content": "\0" * 9000}]}, "messages"),
    ],
)
def test_tokenize_refuses_a_prompt_longer_than_the_context(client, body, param):
    """A prompt no generation could take (each NUL is a token: 9000 > 8192, though short enough
    in characters to be tokenized) is the 400 a generation gets, as ``/detokenize`` refuses
    more ids than the context holds: the answer (and its ``token_strs``, spelled on the event
    loop) stays within the context, however cheap the characters."""
    error = error_of(client.post("/tokenize", json=body), 400)
    assert error["param"] == param and "maximum context length is 8192" in error["message"]
    assert client.post("/tokenize", json={"prompt": "\0" * 8192}).json()["count"] == 8192


def test_tokenize_takes_null_as_not_given_as_generation_and_vllm_do(client):
    """``prompt_template: null`` is "not given" for a chat completion (``NULL_IS_DEFAULT``), so
    for the ``/tokenize`` of the same body too; vLLM's ``return_token_strs`` may be null."""
    body = {"model": "alpha", "messages": REVIEW}
    plain = client.post("/tokenize", json=body).json()
    nulls = client.post("/tokenize", json=body | {"prompt_template": None})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json() == plain
    answer = client.post("/v1/chat/completions", json=chat_body("alpha", messages=REVIEW))
    assert answer.json()["usage"]["prompt_tokens"] == plain["count"]
    strs = client.post("/tokenize", json={"prompt": "x", "return_token_strs": None})
    assert strs.status_code == 200, strs.text
    assert strs.json()["token_strs"] is None


def test_the_base_and_an_adapter_without_an_entry_take_the_bases_generation_defaults(
    hf_engine, registry_for, adapter_dirs, tmp_path
):
    """``base.generation`` is the base model's ``generation_config``: a field a request leaves
    out takes it, for the base and for an adapter adapters.yaml has no entry for (hot-loaded)."""
    from conftest import LiveServer

    from engine.registry import Registry

    raw = registry_for.model_dump(mode="json")
    raw["base"]["generation"] = {"max_tokens": 3, "temperature": 0.0}
    registry = Registry.model_validate(raw)
    shutil.copytree(adapter_dirs["beta"], tmp_path / "gamma")
    live = LiveServer(create_api(hf_engine, registry, admin_token=TOKEN, adapter_root=tmp_path))
    auth = {"authorization": f"Bearer {TOKEN}"}
    asked = {"messages": [{"role": "user", "content": "Tell me a long story."}], "ignore_eos": True}
    try:
        with httpx.Client(base_url=live.url, timeout=120) as c:
            loaded = c.post("/v1/adapters", json={"name": "gamma", "path": "gamma"}, headers=auth)
            answers = {m: c.post("/v1/chat/completions", json=asked | {"model": m}).json()
                       for m in ("base", "gamma", "alpha")}  # fmt: skip
            longer = c.post("/v1/chat/completions", json=asked | {"model": "base", "max_tokens": 5})
    finally:
        live.stop()
        if "gamma" in hf_engine.adapters():
            import asyncio

            asyncio.run(hf_engine.unload_adapter("gamma"))
    assert loaded.status_code == 200, loaded.text
    assert answers["base"]["usage"]["completion_tokens"] == 3
    assert answers["gamma"]["usage"]["completion_tokens"] == 3
    assert answers["alpha"]["usage"]["completion_tokens"] == 12  # its own entry's max_tokens
    assert longer.json()["usage"]["completion_tokens"] == 5  # the request's own value wins


def test_the_shipped_base_samples_as_its_model_card_does():
    from pathlib import Path

    from engine.registry import load_registry
    from engine.sampling import resolve

    params = resolve(load_registry(Path(__file__).parents[1] / "adapters.yaml").base)
    assert (params.temperature, params.top_p) == (0.2, 0.9)


def test_a_default_max_tokens_takes_the_room_the_prompt_leaves(client):
    """As OpenAI and vLLM: a request without ``max_tokens`` whose prompt leaves less room than
    the default (256) gets an answer cut at the context, not a 400; an explicit ``max_tokens``
    that does not fit, or a prompt that leaves no room, is still a 400. (Each NUL is a token.)"""

    def messages(nuls):
        return [{"role": "user", "content": "\0" * nuls}]

    counted = client.post("/tokenize", json={"model": "alpha", "messages": messages(8000)})
    overhead = counted.json()["count"] - 8000
    room = 3
    body = {"model": "alpha", "messages": messages(8192 - overhead - room), "temperature": 0}
    answer = client.post("/v1/chat/completions", json=body, timeout=1800)  # an 8k prefill on CPU
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] == 8192 - room and 1 <= usage["completion_tokens"] <= room
    explicit = client.post("/v1/chat/completions", json=body | {"max_tokens": 256})
    assert error_of(explicit, 400)["param"] == "max_tokens"
    full = body | {"messages": messages(8192 - overhead)}
    error = error_of(client.post("/v1/chat/completions", json=full), 400)
    assert error["param"] == "messages" and "leaves 0 for the answer" in error["message"]
