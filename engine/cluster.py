"""Several engine replicas behind sglang-router, and one control API over them.

    python -m engine.cluster --config adapters.yaml --port 8000

``cluster.replicas`` in adapters.yaml says how many replicas and ``cluster.gpus_per_replica`` /
``cluster.gpus`` on which GPUs. This starts, on one host:

- each replica: ``python -m engine.api`` on port ``--port + 10 + i``, on its own GPUs;
- sglang-router on ``--port``, the address clients use for ``/v1/chat/completions`` and
  ``/v1/completions`` (policy ``cluster.policy``; ``/engine_metrics`` there is every replica's
  ``/metrics`` labelled by replica);
- the control API on ``--port + 1``: ``GET /v1/models``, ``GET /metrics`` (the replicas' series
  summed), ``GET /health`` (every replica's), and, behind the admin token, ``POST /v1/adapters``
  / ``DELETE /v1/adapters/{name}``, which reach every replica or none.

With ``cluster.hosts`` the replicas run elsewhere (``python -m engine.api`` on each host) and
only the router and the control API start here.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .registry import SLUG, ClusterSettings, Registry, load_registry

log = logging.getLogger("loraland.cluster")
ROUTING_HEADER = "X-SMG-Routing-Key"
"""sglang-router's header for its ``manual`` policy: requests with the same key stay on one
replica. Clients set it to the adapter's name for ``adapter_affinity``."""
ROUTER_POLICY = {"adapter_affinity": "manual"}
"""``cluster.policy`` → sglang-router's ``--policy``; the others keep their names."""
REPLICA_PORT_OFFSET = 10
HEALTH_PROBE = "/get_model_info"
"""What the router polls: a replica's ``/health`` runs a generation, which waits behind a busy
batch for longer than the router's probe timeout (seen on the H200 at 256 streams a replica),
and a replica marked unhealthy gets no traffic."""
START_TIMEOUT_S = 1800.0
MAX_ADMIN_BODY = 65_536
"""An admin body is a name and a path; anything larger is refused before it is read whole."""


def replica_urls(cluster: ClusterSettings, port: int) -> list[str]:
    if cluster.hosts is not None:
        return [h.rstrip("/") for h in cluster.hosts]
    return [f"http://127.0.0.1:{port + REPLICA_PORT_OFFSET + i}" for i in range(cluster.replicas)]


def replica_command(config: str, port: int, backend: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "engine.api", "--config", config, "--port", str(port)]
    return cmd + (["--backend", backend] if backend else [])


def replica_env(cluster: ClusterSettings, index: int, on_gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cluster.replica_gpus(index)))
    return env


def router_command(urls: list[str], host: str, port: int, policy: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
        "--worker-urls", *urls, "--policy", ROUTER_POLICY.get(policy, policy),
        "--prometheus-host", host, "--prometheus-port", str(port + 2), "--log-level", "warn",
        "--health-check-endpoint", HEALTH_PROBE,
    ]  # fmt: skip
    if policy == "adapter_affinity":
        cmd += ["--assignment-mode", "min_group"]  # a new adapter goes to the emptiest replica
    return cmd


def wait_until_up(url: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({process.returncode}) before serving")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def start_replicas(
    registry: Registry,
    config: str,
    port: int,
    backend: str | None,
    on_gpu: bool,
    started: list[subprocess.Popen],
) -> None:
    """Start every replica at once, then wait for each; ``started`` holds them as they start
    (the caller stops them whatever happens)."""
    cluster = registry.cluster
    for i, url in enumerate(replica_urls(cluster, port)):
        cmd = replica_command(config, int(url.rsplit(":", 1)[1]), backend)
        log.info("replica %d on %s: %s", i, url, " ".join(cmd[1:]))
        started.append(subprocess.Popen(cmd, env=replica_env(cluster, i, on_gpu)))
    for url, process in zip(replica_urls(cluster, port), started, strict=True):
        wait_until_up(f"{url}/health", process, START_TIMEOUT_S)


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to all (replicas drain their streams), then wait; SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


# ----- the control API ------------------------------------------------------------------------


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def summed_metrics(texts: list[str]) -> str:
    """Prometheus text of several replicas → one, each series' values summed (counters,
    histogram buckets and gauges of running requests alike; ``_created`` times: the earliest),
    in the order first seen."""
    totals: dict[str, float] = {}
    comments: dict[str, None] = {}
    order: list[str] = []
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in comments:
                    comments[line] = None
                    order.append(line)
                continue
            series, _, value = line.rpartition(" ")
            if series not in totals:
                totals[series] = float(value)
                order.append(series)
            elif series.split("{")[0].endswith("_created"):  # a start time, not a count
                totals[series] = min(totals[series], float(value))
            else:
                totals[series] += float(value)
    lines = [item if item in comments else f"{item} {totals[item]:g}" for item in order]
    return "\n".join(lines) + "\n"


class Control:
    """What the control API asks of the replicas. Admin calls are checked here first (the same
    ``LORALAND_ADMIN_TOKEN`` as the replicas'), so a refused one reaches no replica."""

    def __init__(self, urls: list[str], router_url: str, admin_token: str | None):
        self.urls, self.router_url, self.admin_token = urls, router_url, admin_token or None
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))

    async def each(self, method: str, path: str, **kwargs) -> list[httpx.Response | Exception]:
        calls = [self.client.request(method, url + path, **kwargs) for url in self.urls]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def load(self, body: bytes, headers: dict) -> JSONResponse:
        """Every replica loads the adapter, or none keeps it: the replicas that loaded it unload
        it again when another refused."""
        answers = await self.each("POST", "/v1/adapters", content=body, headers=headers)
        failed = [(i, a) for i, a in enumerate(answers) if not ok(a)]
        if not failed:
            loaded = answers[0].json()
            return JSONResponse(loaded | {"replicas": len(self.urls)})
        name = adapter_name(body)  # every replica accepted it: a slug
        undone = [i for i, a in enumerate(answers) if ok(a)]
        for i in undone:
            await self.client.delete(f"{self.urls[i]}/v1/adapters/{name}", headers=headers)
        index, answer = failed[0]
        note = f"unloaded again on replicas {undone}" if undone else ""
        return relayed(answer, f"replica {index}", note)

    async def unload(self, name: str, headers: dict) -> JSONResponse:
        answers = await self.each("DELETE", f"/v1/adapters/{name}", headers=headers)  # a slug
        failed = [(i, a) for i, a in enumerate(answers) if not ok(a)]
        if not failed:
            ended = sum(a.json().get("streams_ended", 0) for a in answers)
            return JSONResponse(answers[0].json() | {"streams_ended": ended})
        index, answer = failed[0]
        done = [i for i, a in enumerate(answers) if ok(a)]
        return relayed(answer, f"replica {index}", f"unloaded on replicas {done}" if done else "")

    def refuse_admin(self, authorization: str) -> JSONResponse | None:
        if self.admin_token is None:
            message = "admin routes are off: start the cluster with LORALAND_ADMIN_TOKEN set"
            return error(403, message, "permission_error")
        if not hmac.compare_digest(authorization.encode(), f"Bearer {self.admin_token}".encode()):
            return error(401, "admin token required", "authentication_error")
        return None


def ok(answer) -> bool:
    return isinstance(answer, httpx.Response) and answer.status_code == 200


def adapter_name(body: bytes) -> str:
    try:
        return str(json.loads(body).get("name", ""))
    except (ValueError, AttributeError):
        return ""


def relayed(answer, where: str, note: str) -> JSONResponse:
    """A replica's refusal passed on in OpenAI's shape, saying which replica and what was done."""
    suffix = f" ({where}{'; ' + note if note else ''})"
    if isinstance(answer, Exception):
        return error(502, f"replica unreachable: {answer}{suffix}", "server_error")
    try:
        body = answer.json()
        body["error"]["message"] += suffix
        return JSONResponse(body, status_code=answer.status_code)
    except (ValueError, KeyError, TypeError):
        return error(answer.status_code, f"{answer.text[:300]}{suffix}", "server_error")


def forward_headers(request: Request) -> dict:
    wanted = ("authorization", "content-type")
    return {k: v for k, v in request.headers.items() if k.lower() in wanted}


async def admin_body(request: Request) -> bytes | JSONResponse:
    """The body of an admin call, up to ``MAX_ADMIN_BODY`` bytes, else a 413."""
    message = f"an admin body is at most {MAX_ADMIN_BODY} bytes"
    too_large = error(413, message, "invalid_request_error")
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_ADMIN_BODY:
        return too_large
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_ADMIN_BODY:
            return too_large
    return body


def create_control(urls: list[str], router_url: str, admin_token: str | None = None) -> FastAPI:
    control = Control(urls, router_url, admin_token)
    app = FastAPI(title="LoRA Land cluster control")

    async def from_first(path: str) -> Response:
        answer = await control.client.get(urls[0] + path)
        return Response(answer.content, answer.status_code, media_type="application/json")

    @app.get("/v1/models")
    async def models():
        return await from_first("/v1/models")

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        return await from_first(f"/v1/models/{model}")

    @app.get("/health")
    async def health():
        answers = await control.each("GET", "/health")
        replicas = [a.json() if ok(a) else {"ok": False, "error": str(a)} for a in answers]
        body = {"ok": all(map(ok, answers)), "router": router_url, "replicas": replicas}
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics")
    async def metrics():
        answers = await control.each("GET", "/metrics")
        texts = [a.text for a in answers if ok(a)]
        if len(texts) < len(answers):
            return error(503, "a replica did not answer /metrics", "server_error")
        return Response(summed_metrics(texts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        if refused := control.refuse_admin(request.headers.get("authorization", "")):
            return refused
        body = await admin_body(request)
        if isinstance(body, JSONResponse):
            return body
        return await control.load(body, forward_headers(request))

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        if refused := control.refuse_admin(request.headers.get("authorization", "")):
            return refused
        if not SLUG.match(name):
            return error(404, f"adapter {name!r} is not loaded", "not_found_error", "name")
        return await control.unload(name, forward_headers(request))

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def elsewhere(rest: str):
        return error(404, f"no route /{rest} here: requests go to the router, {router_url}",
                     "not_found_error")  # fmt: skip

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="adapters.yaml")
    parser.add_argument("--host", default="127.0.0.1", help="where the router and control listen")
    parser.add_argument("--port", type=int, default=8000, help="the router's; control: +1")
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    registry = load_registry(args.config)
    cluster = registry.cluster
    urls = replica_urls(cluster, args.port)
    router_url = f"http://{args.host}:{args.port}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop while starting stops all
    started: list[subprocess.Popen] = []
    try:
        if cluster.hosts is None:
            config = str(Path(args.config).resolve())
            on_gpu = args.backend != "hf" and has_gpu()
            start_replicas(registry, config, args.port, args.backend, on_gpu, started)
        router = subprocess.Popen(router_command(urls, args.host, args.port, cluster.policy))
        started.insert(0, router)
        wait_until_up(f"{router_url}/readiness", router, 120)
        log.info("router on %s over %d replicas (%s)", router_url, len(urls), cluster.policy)
        app = create_control(urls, router_url, os.environ.get("LORALAND_ADMIN_TOKEN"))
        uvicorn.run(app, host=args.host, port=args.port + 1, log_level="warning")
    finally:
        stop_all(started)


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
