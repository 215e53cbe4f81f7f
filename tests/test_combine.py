"""Adapters that combine, over real HTTP on the CPU default: one input fanned out to several
adapters and the base in one batch, and adapters loaded on first use."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine.api import create_api

FANOUT = {
    "model": "fanout",
    "models": ["alpha", "beta", "base"],
    "template_fields": None,
    "messages": [{"role": "user", "content": "A joyless slog."}],
    "prompt_template": "raw",
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server(hf_engine, registry_for):
    from conftest import LiveServer

    live = LiveServer(create_api(hf_engine, registry_for))
    yield live
    live.stop()


def chat(url: str, body: dict) -> httpx.Response:
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def test_fanout_answers_once_per_model_each_as_that_model_alone(server):
    fanned = chat(server.url, FANOUT)
    assert fanned.status_code == 200, fanned.text
    choices = fanned.json()["choices"]
    assert [(c["index"], c["model"]) for c in choices] == [(0, "alpha"), (1, "beta"), (2, "base")]
    for choice in choices:
        alone = chat(server.url, {**FANOUT, "model": choice["model"], "models": None}).json()
        assert choice["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_fanout_streams_each_chunk_tagged_with_its_model(server):
    body = {**FANOUT, "stream": True}
    by_model: dict[str, str] = {}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    delta = choice["delta"].get("content") or ""
                    by_model[chunk["model"]] = by_model.get(chunk["model"], "") + delta
    whole = {
        c["model"]: c["message"]["content"] for c in chat(server.url, FANOUT).json()["choices"]
    }
    assert by_model == whole


def test_fanout_mistakes_are_400s(server):
    assert chat(server.url, {**FANOUT, "model": "alpha"}).status_code == 400
    assert chat(server.url, {**FANOUT, "models": None}).status_code == 400
    assert chat(server.url, {**FANOUT, "models": ["alpha", "alpha"]}).status_code == 400
    assert chat(server.url, {**FANOUT, "models": ["alpha", "nope"]}).status_code == 404


def test_an_adapter_under_the_root_loads_on_first_use_once_for_many_requests(
    hf_engine, registry_for, adapter_dirs, tmp_path
):
    from conftest import LiveServer

    shutil.copytree(adapter_dirs["beta"], tmp_path / "omega")
    registry = registry_for.model_copy(deep=True)
    registry.engine.load_on_demand = True
    loads = []
    load = hf_engine.load_adapter

    async def counted(name, path, **kwargs):
        loads.append(name)
        await asyncio.sleep(0.5)  # a slow load: the other requests arrive while it runs
        return await load(name, path, **kwargs)

    hf_engine.load_adapter = counted
    live = LiveServer(create_api(hf_engine, registry, adapter_root=tmp_path))
    body = {"model": "omega", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0}  # fmt: skip
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: chat(live.url, body), range(4)))
        missing = chat(live.url, {**body, "model": "nowhere"})
        beta = chat(live.url, {**body, "model": "beta", "prompt_template": "raw"})
    finally:
        live.stop()
        del hf_engine.load_adapter
        asyncio.run(hf_engine.unload_adapter("omega"))
    assert [a.status_code for a in answers] == [200] * 4
    assert loads == ["omega"]
    texts = {a.json()["choices"][0]["message"]["content"] for a in answers}
    assert texts == {beta.json()["choices"][0]["message"]["content"]}  # omega is beta's copy
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "admin_path, on_disk, admin_status, loads",
    [
        ("omega", "omega", 200, ["omega"]),  # the admin's load, shared
        ("elsewhere/omega", "elsewhere/omega", 200, ["omega"]),  # nothing at <root>/omega
        ("broken", "omega", 422, ["omega", "omega"]),  # the admin's fails: theirs, after
    ],
)
def test_requests_during_an_admin_load_of_their_adapter_wait_for_it(
    hf_engine, registry_for, adapter_dirs, tmp_path, admin_path, on_disk, admin_status, loads
):
    """A chat request for a name an admin is loading meanwhile waits for that load: its own
    load on first use would meet the engine's 409 ("being loaded or unloaded"). If the admin's
    load fails, the request loads the adapter from under the root itself."""
    from conftest import LiveServer

    shutil.copytree(adapter_dirs["beta"], tmp_path / on_disk)
    (tmp_path / "broken").mkdir()  # no adapter_config.json: the engine refuses it
    registry = registry_for.model_copy(deep=True)
    registry.engine.load_on_demand = True
    started, asked, release = [], [], threading.Event()
    load, discover = hf_engine.load_adapter, hf_engine.discover_adapter

    async def held(name, path, **kwargs):
        started.append(name)
        while not release.is_set():  # until the chat requests are waiting
            await asyncio.sleep(0.01)
        return await load(name, path, **kwargs)

    async def counted(name):
        asked.append(name)
        if len(asked) == 3:
            release.set()
        return await discover(name)

    hf_engine.load_adapter, hf_engine.discover_adapter = held, counted
    app = create_api(hf_engine, registry, admin_token="t", adapter_root=tmp_path)
    live = LiveServer(app)
    body = {"model": "omega", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    admin = {"name": "omega", "path": admin_path}
    try:
        with ThreadPoolExecutor(4) as pool:
            loaded = pool.submit(httpx.post, f"{live.url}/v1/adapters", json=admin,
                                 headers={"authorization": "Bearer t"}, timeout=600)  # fmt: skip
            while not started:  # the admin's load holds the name first
                time.sleep(0.01)
            answers = list(pool.map(lambda _: chat(live.url, body), range(3)))
    finally:
        release.set()
        live.stop()
        del hf_engine.load_adapter, hf_engine.discover_adapter
        if "omega" in hf_engine.adapters():
            asyncio.run(hf_engine.unload_adapter("omega"))
    assert loaded.result().status_code == admin_status, loaded.result().text
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert started == loads  # the admin's load, and after a failed one a single shared load


def test_without_the_setting_an_adapter_on_disk_is_not_loaded(
    hf_engine, registry_for, adapter_dirs, tmp_path
):
    from conftest import LiveServer

    shutil.copytree(adapter_dirs["beta"], tmp_path / "omega")
    live = LiveServer(create_api(hf_engine, registry_for, adapter_root=tmp_path))
    try:
        answer = chat(live.url, {"model": "omega", "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        live.stop()
    assert answer.status_code == 404 and "omega" not in hf_engine.adapters()


def test_merging_served_adapters_through_the_api_makes_a_new_served_adapter(
    hf_engine, registry_for, tmp_path
):
    from conftest import LiveServer

    from finetune.merge import merge_adapters

    app = create_api(hf_engine, registry_for, admin_token="t", adapter_root=tmp_path,
                     merger=merge_adapters)  # fmt: skip
    live = LiveServer(app)
    auth = {"authorization": "Bearer t"}
    body = {"name": "alpha-beta", "adapters": ["alpha", "beta"], "method": "cat"}
    try:
        refused = httpx.post(f"{live.url}/v1/adapters/merge", json=body, timeout=600)
        merged = httpx.post(f"{live.url}/v1/adapters/merge", json=body, headers=auth, timeout=600)
        again = httpx.post(f"{live.url}/v1/adapters/merge", json=body, headers=auth, timeout=60)
        answer = chat(live.url, {"model": "alpha-beta", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        gone = httpx.delete(f"{live.url}/v1/adapters/alpha-beta", headers=auth, timeout=60)
        left = httpx.post(f"{live.url}/v1/adapters/merge", json=body, headers=auth, timeout=60)
    finally:
        live.stop()
        if "alpha-beta" in hf_engine.adapters():
            asyncio.run(hf_engine.unload_adapter("alpha-beta"))
    assert refused.status_code == 401
    assert merged.status_code == 200, merged.text
    assert merged.json()["merge"]["rank"] == 12  # cat: the ranks add up (8 + 4)
    assert (tmp_path / "alpha-beta" / "merge.json").is_file()
    assert again.status_code == 409 and "served already" in again.json()["error"]["message"]
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert gone.status_code == 200, gone.text
    # unloaded, its files stay: the 409 says where they are
    assert left.status_code == 409
    assert str((tmp_path / "alpha-beta").resolve()) in left.json()["error"]["message"]


def test_a_failed_or_misnamed_merge_leaves_nothing_behind_whoever_asks(
    hf_engine, registry_for, tmp_path
):
    """The app's Merge tab and the route share ``Api.merge``: a name outside the adapter root is
    refused before any work, and a merge that cannot be served (here: rank 12 over the limit
    of 8) leaves no folder, so the name stays free."""
    from engine.api.protocol import MergeBody, OpenAIError
    from finetune.merge import merge_adapters

    registry = registry_for.model_copy(deep=True)
    registry.server.max_adapter_rank = 8
    api = create_api(hf_engine, registry, admin_token="t", adapter_root=tmp_path / "root",
                     merger=merge_adapters).state.api  # fmt: skip
    (tmp_path / "root").mkdir()

    def merge(name: str):
        body = MergeBody(name=name, adapters=["alpha", "beta"], method="cat")
        with pytest.raises(OpenAIError) as refused:
            asyncio.run(api.merge(body, merge_adapters))
        return refused.value

    for outside in ("../evil", "/tmp/evil", "base"):
        assert merge(outside).status == 422
    too_big = merge("alpha-beta")
    assert too_big.status == 422 and "rank" in too_big.message
    assert list((tmp_path / "root").iterdir()) == [] and not (tmp_path / "evil").exists()
    assert "alpha-beta" not in hf_engine.adapters() and not api.merging


def test_a_merge_whose_name_is_taken_while_it_runs_is_a_409_and_leaves_nothing(
    hf_engine, registry_for, tmp_path
):
    from engine.api.protocol import MergeBody, OpenAIError
    from engine.interface import AdapterConflictError
    from finetune.merge import merge_adapters

    api = create_api(hf_engine, registry_for, admin_token="t", adapter_root=tmp_path,
                     merger=merge_adapters).state.api  # fmt: skip

    async def taken(name, path, max_rank=None):
        raise AdapterConflictError(f"adapter {name!r} is being loaded or unloaded")

    hf_engine.load_adapter = taken
    try:
        with pytest.raises(OpenAIError) as refused:
            body = MergeBody(name="alpha-beta", adapters=["alpha", "beta"], method="cat")
            asyncio.run(api.merge(body, merge_adapters))
    finally:
        del hf_engine.load_adapter
    assert (refused.value.status, refused.value.param) == (409, "name")
    assert list(tmp_path.iterdir()) == [] and not api.merging


def test_a_merge_named_like_an_adapter_being_loaded_is_refused_before_it_runs(
    hf_engine, registry_for, tmp_path
):
    from engine.api.protocol import MergeBody, OpenAIError

    api = create_api(hf_engine, registry_for, admin_token="t", adapter_root=tmp_path).state.api
    merged = []

    async def merge_while_loading():
        api.loading["alpha-beta"] = asyncio.get_running_loop().create_future()
        try:
            body = MergeBody(name="alpha-beta", adapters=["alpha", "beta"], method="cat")
            await api.merge(body, lambda *args, **kwargs: merged.append(args))
        finally:
            api.loading.pop("alpha-beta").cancel()

    with pytest.raises(OpenAIError, match="being loaded") as refused:
        asyncio.run(merge_while_loading())
    assert (refused.value.status, refused.value.param) == (409, "name") and merged == []
