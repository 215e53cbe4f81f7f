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
pytest.importorskip("sglang_router", reason="sglang-router is in requirements/dev.txt")


def free_base_port() -> int:
    """A port P with P, P+1, P+2, P+10 and P+11 free (router, control, its metrics, replicas)."""
    for _ in range(200):
        port = random.randrange(20000, 40000)
        if all(port_is_free(port + k) for k in (0, 1, 2, 10, 11)):
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


def test_adapter_affinity_keeps_an_adapter_on_one_replica(cluster):
    before = [requests_for(r, "beta") for r in cluster["replicas"]]
    body = {"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for _ in range(6):
        answer = httpx.post(f"{cluster['router']}/v1/chat/completions", json=body,
                            headers={ROUTING_HEADER: "beta"}, timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text
    added = sorted(requests_for(r, "beta") - b for r, b in zip(cluster["replicas"], before))
    assert added == [0, 6]


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
    assert not any("gamma" in listed(r) for r in cluster["replicas"])


def test_a_hot_load_one_replica_refuses_is_undone_on_the_others(cluster):
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"name": "gamma-2", "path": cluster["spare"]}
    first, second = cluster["replicas"]
    assert httpx.post(f"{second}/v1/adapters", headers=auth, json=body, timeout=600).is_success
    try:
        refused = httpx.post(f"{cluster['control']}/v1/adapters", headers=auth, json=body,
                             timeout=600)  # fmt: skip
        assert refused.status_code == 422, refused.text  # "already loaded" on replica 1
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


def test_summed_metrics_add_series_and_keep_the_earliest_start():
    one = '# TYPE x counter\nx_total{a="1"} 2\nx_created{a="1"} 100\n'
    two = '# TYPE x counter\nx_total{a="1"} 3\nx_total{a="2"} 1\nx_created{a="1"} 90\n'
    assert summed_metrics([one, two]).splitlines() == [
        "# TYPE x counter", 'x_total{a="1"} 5', 'x_created{a="1"} 90', 'x_total{a="2"} 1'
    ]  # fmt: skip


@pytest.mark.parametrize(
    "cluster_section, engine_section, problem",
    [
        ({"replicas": 2, "gpus": [0]}, {}, "need 2 GPUs"),
        ({"replicas": 2, "hosts": ["http://a:1"]}, {}, "hosts lists 1"),
        ({"replicas": 2}, {"sglang": {"tp_size": 2}}, "gpus_per_replica"),
    ],
)
def test_cluster_settings_check_their_rules(tmp_path, cluster_section, engine_section, problem):
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump({"cluster": cluster_section, "engine": engine_section}))
    with pytest.raises(RegistryError, match=problem):
        load_registry(path)


def test_the_control_api_refuses_bad_admin_calls_before_any_replica(cluster):
    control, auth = cluster["control"], {"authorization": f"Bearer {TOKEN}"}
    wrong = httpx.delete(f"{control}/v1/adapters/alpha", headers={"authorization": "Bearer x"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    huge = httpx.post(f"{control}/v1/adapters", headers=auth, content=b"{" + b" " * 100_000 + b"}")
    assert huge.status_code == 413
    sneaky = httpx.delete(f"{control}/v1/adapters/alpha%3Fx", headers=auth)  # 'alpha?x'
    assert sneaky.status_code == 404
    assert all("alpha" in listed(r) for r in cluster["replicas"])
