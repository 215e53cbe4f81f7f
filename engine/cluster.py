"""Several engine replicas behind sglang-router, and one control API over them.

    python -m engine.cluster --config adapters.yaml --port 8000

``cluster.replicas`` in adapters.yaml says how many replicas and ``cluster.gpus_per_replica`` /
``cluster.gpus`` on which GPUs. This starts, on one host:

- each replica: ``python -m engine.api`` on port ``--port + 10 + i``, on its own GPUs;
- sglang-router on ``--port``, the address clients use for ``/v1/chat/completions`` and
  ``/v1/completions`` (policy ``cluster.policy``; ``/engine_metrics`` there is every replica's
  ``/metrics`` labelled by replica, without an API key set: the router sends none);
- the control API on ``--port + 1``: ``GET /v1/models``, ``GET /metrics`` (the replicas' series
  summed), ``GET /health`` (every replica's), ``POST /tokenize`` / ``/detokenize`` (a replica's),
  and, behind the admin token, ``POST /v1/adapters``
  / ``DELETE /v1/adapters/{name}``, which reach every replica or none.

With ``cluster.hosts`` the replicas run elsewhere (``python -m engine.api`` on each host) and
only the router and the control API start here.

With ``LORALAND_API_KEY`` set, the replicas (which inherit it) and the control API ask every
``/v1`` request for it; sglang-router passes a client's ``Authorization`` header on unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .api.limits import RefuseWebSockets, bearer, guard_v1, shows_details
from .api.protocol import OpenAIError
from .api.routes import admin_refusal, error_response, refuse_transfer_codings
from .api.server import http_protocol
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
STOPPING = threading.Event()
"""Set once the cluster is being stopped: the watchdog then lets processes exit."""
MAX_ADMIN_BODY = 65_536
"""An admin body is a name and a path; anything larger is refused before it is read whole."""
MAX_TOKENS_BODY = 8 * 2**20
"""A ``/tokenize`` body relayed to a replica (whose own ``server.max_body_bytes`` applies too)."""


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


def router_command(
    urls: list[str], host: str, port: int, policy: str, max_body_bytes: int = 1_048_576
) -> list[str]:
    """sglang-router over the replicas. Its own worker-management routes (``/workers``) take a
    key made here and told to no one: nobody can add or remove a replica through the router. No
    retries: a generation that failed is not run again behind the client's back. No circuit
    breaker: it counts a replica's 4xx (a client's bad request) as the replica failing, so a
    dozen requests for an unknown model shut every replica off; a dead replica still leaves by
    the health checks."""
    locked = f"cluster:cluster:admin:{secrets.token_hex(16)}"
    cmd = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
        "--worker-urls", *urls, "--policy", ROUTER_POLICY.get(policy, policy),
        "--prometheus-host", host, "--prometheus-port", str(port + 2), "--log-level", "warn",
        "--health-check-endpoint", HEALTH_PROBE, "--control-plane-api-keys", locked,
        "--max-payload-size", str(max_body_bytes), "--disable-retries", "--disable-circuit-breaker",
        "--history-backend", "none",  # its own /v1/conversations store would answer unkeyed
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


def check_port_free(host: str, port: int) -> None:
    """A port already answering would pass for the new process's (a leftover from a run that
    was killed): refuse to start instead."""
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise RuntimeError(f"port {port} is in use: stop what listens there first")


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """In its own process group, so that stopping it also stops what it started (SGLang's
    scheduler and detokenizer)."""
    return subprocess.Popen(cmd, env=env, start_new_session=True)


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
        replica_port = int(url.rsplit(":", 1)[1])
        check_port_free("127.0.0.1", replica_port)
        cmd = replica_command(config, replica_port, backend)
        log.info("replica %d on %s: %s", i, url, " ".join(cmd[1:]))
        started.append(start(cmd, replica_env(cluster, i, on_gpu)))
    for url, process in zip(replica_urls(cluster, port), started, strict=True):
        wait_until_up(f"{url}/health", process, START_TIMEOUT_S)


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each (replicas drain their streams), wait, then SIGKILL each one's process
    group: what it started goes with it."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def watch(processes: list[subprocess.Popen]) -> None:
    """In the background: when a replica or the router exits, stop the cluster (the control API
    would otherwise answer for a cluster that is gone)."""

    def loop() -> None:
        while all(p.poll() is None for p in processes) and not STOPPING.is_set():
            time.sleep(2)
        if STOPPING.is_set():
            return
        gone = next(p for p in processes if p.poll() is not None)
        log.error("%s exited (%s): stopping the cluster", " ".join(gone.args[1:4]), gone.returncode)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, daemon=True).start()


# ----- the control API ------------------------------------------------------------------------


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return error_response(OpenAIError(status, message, kind, param))


def summed_metrics(texts: list[str]) -> str:
    """Prometheus text of several replicas → one, each series' values summed (counters,
    histogram buckets, running and queued requests), in the order first seen; start times
    (``_created``) take the earliest and the count of loaded adapters the largest (each replica
    holds every adapter)."""
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
            elif series.split("{")[0].endswith("_created"):
                totals[series] = min(totals[series], float(value))
            elif series.split("{")[0].endswith("adapters_loaded"):
                totals[series] = max(totals[series], float(value))
            else:
                totals[series] += float(value)
    lines = [item if item in comments else f"{item} {exact(totals[item])}" for item in order]
    return "\n".join(lines) + "\n"


def exact(value: float) -> str:
    """A sample value with every digit: 12345678 stays 12345678 (``%g`` would round it)."""
    return str(int(value)) if value.is_integer() else repr(value)


class Control:
    """What the control API asks of the replicas. Admin calls are checked here first (the same
    ``LORALAND_ADMIN_TOKEN`` as the replicas'), so a refused one reaches no replica. Its own
    calls carry the replicas' ``LORALAND_API_KEY``; an admin call, its caller's admin token."""

    def __init__(
        self, urls: list[str], router_url: str, admin_token: str | None, api_key: str | None
    ):
        self.urls, self.router_url, self.admin_token = urls, router_url, admin_token or None
        timeout = httpx.Timeout(600.0, connect=10.0)
        self.client = httpx.AsyncClient(timeout=timeout, headers=bearer(api_key))
        self.admin_lock = asyncio.Lock()
        """One hot-load or unload at a time: two on one name must not interleave."""

    async def each(self, method: str, path: str, **kwargs) -> list[httpx.Response | Exception]:
        calls = [self.client.request(method, url + path, **kwargs) for url in self.urls]
        return await asyncio.gather(*calls, return_exceptions=True)

    async def load(self, body: bytes, headers: dict) -> JSONResponse:
        """Every replica loads the adapter, or none keeps it: when one refused, it is unloaded
        again from the replicas that loaded it and from those that did not answer (which may
        have loaded it); the answer says what that undoing did."""
        async with self.admin_lock:
            answers = await self.each("POST", "/v1/adapters", content=body, headers=headers)
            failed = [(i, a) for i, a in enumerate(answers) if not ok(a)]
            if not failed:
                return JSONResponse(answers[0].json() | {"replicas": len(self.urls)})
            name = adapter_name(body)
            unsure = [i for i, a in enumerate(answers) if ok(a) or isinstance(a, Exception)]
            note = await self.undo_load(name, unsure, headers) if SLUG.match(name) else ""
        index, answer = failed[0]
        return relayed(answer, f"replica {index}", note)

    async def undo_load(self, name: str, replicas: list[int], headers: dict) -> str:
        calls = [self.client.delete(f"{self.urls[i]}/v1/adapters/{name}", headers=headers)
                 for i in replicas]  # fmt: skip
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        undone = [i for i, o in zip(replicas, outcomes, strict=True) if ok(o)]
        absent = [i for i, o in zip(replicas, outcomes, strict=True) if status_of(o) == 404]
        stuck = [i for i in replicas if i not in undone and i not in absent]
        note = f"unloaded again on replicas {undone}" if undone else ""
        if stuck:
            note += f"{'; ' if note else ''}STILL LOADED OR UNREACHABLE on replicas {stuck}"
        return note

    async def unload(self, name: str, headers: dict) -> JSONResponse:
        async with self.admin_lock:
            return await self.unload_everywhere(name, headers)

    async def unload_everywhere(self, name: str, headers: dict) -> JSONResponse:
        answers = await self.each("DELETE", f"/v1/adapters/{name}", headers=headers)  # a slug
        failed = [(i, a) for i, a in enumerate(answers) if not ok(a)]
        if not failed:
            ended = sum(a.json().get("streams_ended", 0) for a in answers)
            summary = {"streams_ended": ended, "replicas": len(self.urls)}
            return JSONResponse(answers[0].json() | summary)
        index, answer = failed[0]
        done = [i for i, a in enumerate(answers) if ok(a)]
        return relayed(answer, f"replica {index}", f"unloaded on replicas {done}" if done else "")

    def refuse_admin(self, authorization: str) -> JSONResponse | None:
        refused = admin_refusal(self.admin_token, authorization)
        return error_response(refused) if refused else None


def status_of(answer) -> int | None:
    return answer.status_code if isinstance(answer, httpx.Response) else None


def ok(answer) -> bool:
    return status_of(answer) == 200


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


async def bounded_body(request: Request, limit: int = MAX_ADMIN_BODY) -> bytes | JSONResponse:
    """A relayed body (an admin call's, a token route's), up to ``limit`` bytes, else a 413."""
    message = f"this route's body is at most {limit} bytes"
    too_large = error(413, message, "invalid_request_error")
    try:  # relayed de-chunked: a compressed body would reach the replica as "not valid JSON"
        refuse_transfer_codings(", ".join(request.headers.getlist("transfer-encoding")))
    except OpenAIError as err:
        return error_response(err)
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > limit:
        return too_large
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            return too_large
    return body


def create_control(
    urls: list[str],
    router_url: str,
    admin_token: str | None = None,
    api_key: str | None = None,
    open_metrics: bool = False,
) -> FastAPI:
    """The control API; with an ``api_key`` its ``/v1`` routes and ``/metrics`` (unless
    ``open_metrics``) need it, as the replicas' do."""
    control = Control(urls, router_url, admin_token, api_key)
    app = FastAPI(title="LoRA Land cluster control")
    app.add_middleware(RefuseWebSockets, router=app.router, metrics=None)
    guard_v1(app, api_key, control.admin_token, open_metrics=open_metrics)

    async def from_a_replica(
        path: str, body: bytes | None = None, headers: dict | None = None
    ) -> Response:
        """The first replica that answers (they serve the same adapters and tokenizer): a GET,
        or a POST of ``body`` with the client's ``headers`` about it (the replica refuses a body
        that is not JSON, as it would the client's own)."""
        for url in urls:
            try:
                if body is None:
                    answer = await control.client.get(url + path)
                else:
                    answer = await control.client.post(url + path, content=body, headers=headers)
            except httpx.HTTPError:
                continue
            if answer.status_code < 500:
                return Response(answer.content, answer.status_code, media_type="application/json")
        return error(502, "no replica answered", "server_error")

    @app.get("/v1/models")
    async def models():
        return await from_a_replica("/v1/models")

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        return await from_a_replica(f"/v1/models/{quote(model, safe='')}")

    async def tokens(request: Request) -> Response:
        """``/tokenize`` and ``/detokenize``, answered by a replica, which fills an adapter's
        template as its generations do (sglang-router's own ``/v1/tokenize`` would not)."""
        body = await bounded_body(request, MAX_TOKENS_BODY)
        if isinstance(body, JSONResponse):
            return body
        about_body = ("content-type", "content-encoding")
        headers = {k: v for k, v in request.headers.items() if k.lower() in about_body}
        return await from_a_replica(request.url.path, body, headers)

    for path in ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"):
        app.add_api_route(path, tokens, methods=["POST"])

    @app.get("/health")
    async def health(request: Request):
        answers = await control.each("GET", "/health")
        replicas = [a.json() if ok(a) else {"ok": False, "error": str(a)} for a in answers]
        body = {"ok": all(map(ok, answers)), "router": router_url, "replicas": replicas}
        if not shows_details(request.scope, api_key):
            body = {"ok": body["ok"]}
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
        body = await bounded_body(request)
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
        for port in (args.port, args.port + 1, args.port + 2):
            check_port_free(args.host, port)
        limit = registry.server.max_body_bytes
        router = start(router_command(urls, args.host, args.port, cluster.policy, limit))
        started.insert(0, router)
        wait_until_up(f"{router_url}/readiness", router, 120)
        watch(started)
        log.info("router on %s over %d replicas (%s); control API on http://%s:%d",
                 router_url, len(urls), cluster.policy, args.host, args.port + 1)  # fmt: skip
        app = create_control(
            urls,
            router_url,
            os.environ.get("LORALAND_ADMIN_TOKEN"),
            os.environ.get("LORALAND_API_KEY"),
            registry.server.open_metrics,
        )
        uvicorn.run(
            app, host=args.host, port=args.port + 1, log_level="warning", http=http_protocol()
        )
    finally:
        STOPPING.set()
        stop_all(started)


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
