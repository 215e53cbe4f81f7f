"""``python -m engine.cluster``: two CPU replicas (the real SmolLM2 and peft adapters) behind the
real sglang-router, used by the official OpenAI SDK, Locust and plain HTTP."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import make_peft_adapter

from engine.cluster import ROUTING_HEADER, summed_metrics, wait_until_up
from engine.registry import RegistryError, load_registry

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cluster-test-token"
ALPHA_TEMPLATE = "Is this review positive or negative?\n{review}"
pytest.importorskip("sglang_router", reason="sglang-router is in requirements/dev.txt")


CLUSTER_PORTS = (0, 1, 2, 10, 11)
"""Offsets from a cluster's base port: router, control, the router's metrics, replicas."""
BENCHMARK_PORTS = (*CLUSTER_PORTS, 100, 102, 200, 202)
"""``loadtest.router``'s too: its one-replica and round-robin routers and their metrics."""


def free_base_port(offsets=CLUSTER_PORTS) -> int:
    """A port P with P + each offset free, all below Linux's ephemeral range (from 32768): a
    client connection of another test may take a port there at any time (one took a router's
    metrics port on a busy run)."""
    for _ in range(200):
        port = random.randrange(20000, 32768 - max(offsets))
        if all(port_is_free(port + k) for k in offsets):
            return port
    raise RuntimeError("no free ports")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def cluster(base_dir, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    spare = make_peft_adapter(base_dir, root / "adapters" / "gamma", r=4,
                              target_modules=["q_proj", "v_proj"], seed=3)  # fmt: skip
    config = {
        "base": {"model": "smollm2"},
        "engine": {"backend": "hf"},
        "cluster": {"replicas": 2, "policy": "adapter_affinity"},
        "adapters": [{"name": n, "path": p} for n, p in adapter_dirs.items()],
    }
    config["adapters"][0]["template"] = ALPHA_TEMPLATE  # the app's remote mode fills it once
    path = root / "adapters.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_base_port()
    env = dict(os.environ, LORALAND_ADMIN_TOKEN=TOKEN, LORALAND_ADAPTER_ROOT=str(root / "adapters"))
    cmd = [sys.executable, "-m", "engine.cluster", "--config", str(path), "--port", str(port),
           "--backend", "hf"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port + 1}/health", process, timeout_s=900)
        yield {
            "router": f"http://127.0.0.1:{port}",
            "control": f"http://127.0.0.1:{port + 1}",
            "replicas": [f"http://127.0.0.1:{port + 10}", f"http://127.0.0.1:{port + 11}"],
            "spare": spare,
            "process": process,
            "config": path,
        }
    finally:
        process.terminate()
        process.wait(120)
    assert all(port_is_free(port + k) for k in (0, 10, 11)), "a replica or the router outlived it"


def requests_for(replica: str, adapter: str) -> float:
    text = httpx.get(f"{replica}/metrics").text
    prefix = f'loraland_requests_total{{adapter="{adapter}"'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def listed(url: str) -> set[str]:
    return {card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]}


def test_the_openai_sdk_through_the_router(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster['router']}/v1", api_key="unused", max_retries=0,
                    timeout=300)  # fmt: skip
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6)
    assert answer.model == "alpha" and answer.choices[0].message.content
    assert answer.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1


def test_clients_bad_requests_never_shut_the_replicas_off(cluster):
    """sglang-router's circuit breaker counted each replica's 4xx as a failure of the replica:
    after a dozen requests for an unknown model, every request was a 503."""
    url = f"{cluster['router']}/v1/chat/completions"
    bad = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = [httpx.post(url, json=bad, timeout=60).status_code for _ in range(25)]
    good = httpx.post(url, json=bad | {"model": "alpha"}, timeout=300)
    assert set(refused) == {404}
    assert good.status_code == 200, good.text


def test_adapter_affinity_keeps_an_adapter_on_one_replica(cluster):
    before = [requests_for(r, "beta") for r in cluster["replicas"]]
    body = {"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for _ in range(6):
        answer = httpx.post(f"{cluster['router']}/v1/chat/completions", json=body,
                            headers={ROUTING_HEADER: "beta"}, timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text
    added = sorted(requests_for(r, "beta") - b for r, b in zip(cluster["replicas"], before))
    assert added == [0, 6]


def test_the_bases_requests_spread_over_every_replica_while_an_adapters_stay(cluster):
    """The app's remote engine over the router sends the routing key for an adapter only: with
    ``adapter_affinity`` the base's requests go to a random replica each (sglang-router's manual
    policy without a key), not all to the one its key would pick."""
    import asyncio

    from engine.interface import GenerationRequest, collect
    from engine.remote import RemoteEngine
    from engine.sampling import resolve

    registry = load_registry(cluster["config"])
    routed = RemoteEngine(cluster["router"], registry)
    replicas = cluster["replicas"]

    async def send(adapter: str | None, count: int) -> None:
        spec = registry.adapter(adapter) if adapter else None
        for _ in range(count):
            params = resolve(spec, temperature=0.0, max_tokens=1)
            messages = [{"role": "user", "content": "Hi"}]
            request = GenerationRequest(adapter, messages=messages, params=params)
            await collect(routed.stream(request), request)

    before = [requests_for(r, "base") for r in replicas]
    asyncio.run(send(None, 20))  # all on one replica at random: 2 in a million
    added = [requests_for(r, "base") - b for r, b in zip(replicas, before)]
    assert sum(added) == 20 and min(added) >= 1, added
    before = [requests_for(r, "beta") for r in replicas]
    asyncio.run(send("beta", 4))
    assert sorted(requests_for(r, "beta") - b for r, b in zip(replicas, before)) == [0, 4]


def test_locust_sends_the_routing_key_for_adapters_only():
    """In a child process: importing Locust patches this one (gevent)."""
    script = """
import locust  # first, as the locust command does
from loadtest.locustfile import ROUTING_HEADER, STATE, routing_headers

STATE["base"] = "SmolLM2-135M-Instruct"
assert routing_headers("beta") == {ROUTING_HEADER: "beta"}
assert routing_headers("SmolLM2-135M-Instruct") == {}
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_router_fields_are_accepted_at_their_defaults_only(cluster):
    """sglang-router writes SGLang's extension fields into each request it forwards."""
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "no_stop_trim": False, "skip_special_tokens": True, "separate_reasoning": True,
            "stream_reasoning": True, "return_hidden_states": False,
            "continue_final_message": False}  # fmt: skip
    replica = cluster["replicas"][0]
    assert httpx.post(f"{replica}/v1/chat/completions", json=body, timeout=300).status_code == 200
    refused = httpx.post(f"{replica}/v1/chat/completions",
                         json=body | {"return_hidden_states": True}, timeout=300)  # fmt: skip
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "return_hidden_states"


def test_the_control_api_lists_the_adapters_and_sums_the_metrics(cluster):
    assert {"alpha", "beta"} <= listed(cluster["control"])
    health = httpx.get(f"{cluster['control']}/health").json()
    assert health["ok"] and len(health["replicas"]) == 2
    per_replica = sum(requests_for(r, "alpha") for r in cluster["replicas"])
    assert requests_for(cluster["control"], "alpha") == per_replica
    elsewhere = httpx.post(f"{cluster['control']}/v1/chat/completions", json={})
    assert (
        elsewhere.status_code == 404 and cluster["router"] in elsewhere.json()["error"]["message"]
    )


def test_the_control_api_tokenizes_as_a_replica_does(cluster):
    """``/tokenize`` on a cluster: the control API asks a replica (which fills the adapter's
    template, as its generations do)."""
    body = {"model": "alpha", "messages": [{"role": "user", "content": "A joyless slog."}]}
    replica = httpx.post(f"{cluster['replicas'][0]}/tokenize", json=body, timeout=60)
    control = httpx.post(f"{cluster['control']}/tokenize", json=body, timeout=60)
    assert control.status_code == 200 and control.json() == replica.json()
    ids = control.json()["tokens"]
    back = httpx.post(f"{cluster['control']}/v1/detokenize", json={"tokens": ids}, timeout=60)
    assert "A joyless slog." in back.json()["prompt"]
    refused = httpx.post(f"{cluster['control']}/detokenize", json={"tokens": [-1]})  # a replica's
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tokens"  # refusal
    plain = {"content-type": "text/plain"}  # a page's cross-origin POST without a preflight
    as_text = httpx.post(f"{cluster['control']}/tokenize", content=json.dumps(body), headers=plain)
    assert as_text.status_code == 415 and "not JSON" in as_text.json()["error"]["message"]
    from test_hostile_inputs import raw_exchange

    raw = json.dumps(body).encode()  # relayed de-chunked, a gzip coding would read as "not JSON"
    gzip_chunked = (b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw))  # fmt: skip
    status, _, answer = raw_exchange(int(cluster["control"].rsplit(":", 1)[1]), gzip_chunked)
    assert status == 415 and "Transfer-Encoding" in json.loads(answer)["error"]["message"]


def test_a_hot_load_reaches_every_replica_and_unloads_from_every_one(cluster):
    auth = {"authorization": f"Bearer {TOKEN}"}
    loaded = httpx.post(f"{cluster['control']}/v1/adapters", headers=auth, timeout=600,
                        json={"name": "gamma", "path": cluster["spare"]})  # fmt: skip
    assert loaded.status_code == 200, loaded.text
    assert all("gamma" in listed(r) for r in cluster["replicas"])
    body = {"model": "gamma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    served = httpx.post(f"{cluster['router']}/v1/chat/completions", json=body, timeout=300)
    assert served.status_code == 200, served.text
    gone = httpx.delete(f"{cluster['control']}/v1/adapters/gamma", headers=auth, timeout=600)
    assert gone.status_code == 200, gone.text
    assert gone.json()["replicas"] == 2
    assert not any("gamma" in listed(r) for r in cluster["replicas"])


def test_a_hot_load_one_replica_refuses_is_undone_on_the_others(cluster):
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"name": "gamma-2", "path": cluster["spare"]}
    first, second = cluster["replicas"]
    assert httpx.post(f"{second}/v1/adapters", headers=auth, json=body, timeout=600).is_success
    try:
        refused = httpx.post(f"{cluster['control']}/v1/adapters", headers=auth, json=body,
                             timeout=600)  # fmt: skip
        assert refused.status_code == 409, refused.text  # "already loaded" on replica 1
        assert "replica 1; unloaded again on replicas [0]" in refused.json()["error"]["message"]
        assert "gamma-2" not in listed(first)
    finally:
        httpx.delete(f"{second}/v1/adapters/gamma-2", headers=auth, timeout=600)
    no_token = httpx.post(f"{cluster['control']}/v1/adapters", json=body, timeout=600)
    assert no_token.status_code == 401
    assert not any("gamma-2" in listed(r) for r in cluster["replicas"])


def test_locust_runs_against_the_cluster(cluster, tmp_path):
    raw = tmp_path / "raw.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest/", "--headless", "-u", "2", "-r", "2",
           "-t", "6s", "--host", cluster["router"], "--models-from", cluster["control"],
           "--output-tokens", "4", "--prompt-words", "5", "--raw-out", str(raw),
           "--stop-timeout", "120", "--only-summary"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert records and all(r["ok"] for r in records)
    assert {r["model"] for r in records} <= {"alpha", "beta"}


def test_the_routers_own_listing_and_metrics(cluster):
    """The router names the base (from the replicas' SGLang routes); its probes while starting
    left no error in the replicas' metrics. (Its ``/engine_metrics`` is not asserted: sglang-router
    0.3.2 answers it with a 500 in some states, docs/cluster.md.)"""
    listing = httpx.get(f"{cluster['router']}/v1/models").json()["data"]
    assert [card["id"] for card in listing] == ["SmolLM2-135M-Instruct"]
    metrics = httpx.get(f"{cluster['control']}/metrics").text.splitlines()
    no_route = [m for m in metrics if m.startswith('loraland_request_errors_total{adapter="none"')]
    assert [m for m in no_route if 'status="404"' in m] == []  # (unknown models: other tests)


def test_nobody_can_change_the_routers_replicas(cluster):
    added = httpx.post(f"{cluster['router']}/workers", json={"url": "http://127.0.0.1:9"})
    assert added.status_code == 401
    assert httpx.get(f"{cluster['router']}/workers").status_code == 401


def test_the_control_api_with_a_replica_gone(cluster):
    """A dead replica first: /v1/models comes from the next; a hot-load fails in OpenAI's shape
    and is undone on the live replica, saying the dead one could not be reached."""
    from fastapi.testclient import TestClient

    from engine.cluster import create_control

    dead, live = f"http://127.0.0.1:{free_base_port()}", cluster["replicas"][0]
    with TestClient(create_control([dead, live], cluster["router"], TOKEN)) as client:
        assert "alpha" in {c["id"] for c in client.get("/v1/models").json()["data"]}
        auth = {"authorization": f"Bearer {TOKEN}"}
        body = {"name": "gamma-3", "path": cluster["spare"]}
        answer = client.post("/v1/adapters", headers=auth, json=body)
        assert answer.status_code == 502
        message = answer.json()["error"]["message"]
        assert "unloaded again on replicas [1]" in message
        assert "UNREACHABLE on replicas [0]" in message
        assert "gamma-3" not in listed(live)
    with TestClient(create_control([dead], cluster["router"], TOKEN)) as client:
        gone = client.get("/v1/models")
        assert gone.status_code == 502 and gone.json()["error"]["type"] == "server_error"


def test_the_router_benchmark_runs_end_to_end(cluster, tmp_path):
    """``loadtest.router`` on the CPU, at toy sizes: its own cluster and routers, every arm,
    the hot-load check; nothing left listening."""
    config = yaml.safe_load(cluster["config"].read_text())
    config["adapters"].append({"name": "gamma", "path": cluster["spare"]})
    path = cluster["config"].with_name("router-adapters.yaml")  # the spare under its root
    path.write_text(yaml.safe_dump(config))
    port, out = free_base_port(BENCHMARK_PORTS), tmp_path / "router"
    cmd = [sys.executable, "-m", "loadtest.router", "--config", str(path), "--backend", "hf",
           "--users", "2", "--adapters", "1", "--many", "2", "--pairs", "1", "--duration", "4",
           "--warmup", "1", "--output-tokens", "4", "--prompt-words", "5",
           "--locust-processes", "1", "--port", str(port), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["comparison"] for r in results["rounds"]] == ["scale", "scale-base", "affinity"]
    assert [r["adapters"] for r in results["rounds"]] == [1, 0, 2]
    assert all(p["completed"] and not p["failures"] for r in results["rounds"]
               for p in r["points"].values())  # fmt: skip
    assert results["hot_load"]["ok"], results["hot_load"]
    assert (out / "rounds.png").exists()
    assert all(port_is_free(port + k) for k in (0, 1, 10, 11, 100, 200))


def test_the_router_benchmark_refuses_a_comparison_it_does_not_have(tmp_path):
    cmd = [sys.executable, "-m", "loadtest.router", "--config", "adapters.yaml",
           "--comparisons", "scale,scal", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--comparisons: no scal (there are scale," in done.stderr
    assert not list(tmp_path.iterdir())


def test_summed_metrics_add_series_and_keep_the_earliest_start():
    one = '# TYPE x counter\nx_total{a="1"} 12345678\nx_created{a="1"} 100\nadapters_loaded 5\n'
    two = '# TYPE x counter\nx_total{a="1"} 3\nx_total{a="2"} 0.25\nx_created{a="1"} 90\n'
    two += "adapters_loaded 5\n"
    assert summed_metrics([one, two]).splitlines() == [
        "# TYPE x counter", 'x_total{a="1"} 12345681', 'x_created{a="1"} 90',
        "adapters_loaded 5", 'x_total{a="2"} 0.25',
    ]  # fmt: skip


@pytest.mark.parametrize(
    "cluster_section, engine_section, problem",
    [
        ({"replicas": 2, "gpus": [0]}, {}, "need 2 GPUs"),
        ({"replicas": 2, "hosts": ["http://a:1"]}, {}, "hosts lists 1"),
        ({"replicas": 2}, {"sglang": {"tp_size": 2}}, "gpus_per_replica"),
        ({"replicas": 2, "gpus": [0, 0]}, {}, "replicas on GPU 0: set .*max_total_tokens"),
        ({"replicas": 1, "gpus_per_replica": 2, "gpus": [0, 0]}, {}, "one GPU twice"),
        ({"replicas": 1, "hosts": ["http://a:1"], "gpus": [0]}, {}, "each host places"),
    ],
)
def test_cluster_settings_check_their_rules(tmp_path, cluster_section, engine_section, problem):
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump({"cluster": cluster_section, "engine": engine_section}))
    with pytest.raises(RegistryError, match=problem):
        load_registry(path)


def test_replicas_share_a_gpu_with_their_pools_sized(tmp_path):
    path = tmp_path / "adapters.yaml"
    engine = {"sglang": {"extra": {"max_total_tokens": 160_000}}}
    cluster = {"replicas": 3, "gpus": [0, 0, 1]}
    path.write_text(yaml.safe_dump({"cluster": cluster, "engine": engine}))
    settings = load_registry(path).cluster
    assert [settings.replica_gpus(i) for i in range(3)] == [[0], [0], [1]]
    assert settings.shared_gpus() == [0]


def test_the_control_api_refuses_bad_admin_calls_before_any_replica(cluster):
    control, auth = cluster["control"], {"authorization": f"Bearer {TOKEN}"}
    wrong = httpx.delete(f"{control}/v1/adapters/alpha", headers={"authorization": "Bearer x"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert "(replica" not in wrong.json()["error"]["message"]  # refused here, not by a replica
    huge = httpx.post(f"{control}/v1/adapters", headers=auth, content=b"{" + b" " * 100_000 + b"}")
    assert huge.status_code == 413
    for sneaky in ("alpha%3Fx", "alpha%0A"):  # 'alpha?x', 'alpha\n'
        assert httpx.delete(f"{control}/v1/adapters/{sneaky}", headers=auth).status_code == 404
    card = httpx.get(f"{control}/v1/models/..%2F..%2Fmetrics")
    assert card.status_code == 404 and card.json()["error"]["type"] == "not_found_error"
    assert all("alpha" in listed(r) for r in cluster["replicas"])


def test_the_apps_remote_engine_over_the_cluster(cluster):
    """``python app.py --remote ROUTER``: the control API is found at port + 1; through the
    router (which drops ``prompt_template``) alpha's template is filled once, as a replica
    asked directly with ``prompt_template: raw`` fills it; admin without the token is refused."""
    import asyncio

    from engine.interface import GenerationRequest, collect
    from engine.remote import AdminRefusedError, RemoteEngine
    from engine.sampling import resolve

    registry = load_registry(cluster["config"])
    routed = RemoteEngine(cluster["router"], registry)
    direct = RemoteEngine(cluster["replicas"][0], registry)
    assert routed.settings.cluster and routed.control_url == cluster["control"]
    assert not direct.settings.cluster
    alpha = registry.adapter("alpha")

    def answer(engine: RemoteEngine) -> tuple[str, int]:
        messages = [{"role": "user", "content": alpha.fill("A joyless slog.")}]
        params = resolve(alpha, temperature=0.0, max_tokens=8)
        request = GenerationRequest("alpha", messages=messages, params=params)
        done = asyncio.run(collect(engine.stream(request), request))
        return done.text, done.usage.prompt_tokens

    assert answer(routed) == answer(direct)
    health = asyncio.run(routed.health())
    assert health["server_health"]["ok"] and "router_readiness" in health
    assert "router_readiness" not in asyncio.run(direct.health())
    with pytest.raises(AdminRefusedError) as refused:
        asyncio.run(routed.unload_adapter("alpha"))
    assert refused.value.status_code == 401


def test_the_cluster_stops_when_a_replica_dies(cluster):
    """Last: the control API must not go on answering for a cluster that lost a replica."""
    os.kill(replica_pid(cluster["replicas"][1]), 9)
    cluster["process"].wait(120)
    assert port_is_free(int(cluster["control"].rsplit(":", 1)[1]))


def replica_pid(url: str) -> int:
    import psutil  # Locust's dependency

    port = int(url.rsplit(":", 1)[1])
    listening = psutil.net_connections(kind="tcp")
    return next(c.pid for c in listening if c.laddr.port == port and c.status == "LISTEN")


def test_a_cluster_with_an_api_key_asks_for_it_and_passes_it_on(adapter_dirs, tmp_path):
    """``LORALAND_API_KEY``: the replica inherits it, the router passes the client's key on (and
    the replica's 401 back), the control API asks for it and sends it; the app's remote engine
    sends it to both."""
    import asyncio

    from openai import OpenAI

    from engine.interface import GenerationRequest, collect
    from engine.remote import RemoteEngine
    from engine.sampling import resolve

    key = "cluster-api-key"
    config = {
        "base": {"model": "smollm2"},
        "engine": {"backend": "hf"},
        "cluster": {"replicas": 1},
        "adapters": [{"name": n, "path": p} for n, p in adapter_dirs.items()],
    }
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_base_port()
    router, control = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    cmd = [sys.executable, "-m", "engine.cluster", "--config", str(path), "--port", str(port),
           "--backend", "hf"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, LORALAND_API_KEY=key))
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    try:
        wait_until_up(f"{control}/health", process, timeout_s=900)
        refused = httpx.post(f"{router}/v1/chat/completions", json=chat, timeout=300)
        sdk = OpenAI(base_url=f"{router}/v1", api_key=key, max_retries=0, timeout=300)
        answer = sdk.chat.completions.create(**chat)
        unlisted = httpx.get(f"{control}/v1/models")
        remote = RemoteEngine(router, load_registry(path), api_key=key)
        params = resolve(None, max_tokens=3)
        request = GenerationRequest("alpha", messages=chat["messages"], params=params)
        done = asyncio.run(collect(remote.stream(request), request))
    finally:
        process.terminate()
        process.wait(120)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
    assert answer.choices[0].message.content
    assert unlisted.status_code == 401
    assert {"alpha", "beta"} <= set(remote.adapters()) and done.usage.completion_tokens >= 1
