"""Locust load test of the OpenAI-compatible API with many adapters in play.

    locust -f loadtest/ --host http://127.0.0.1:7860                          # web UI
    locust -f loadtest/ --host http://127.0.0.1:7860 --headless -u 32 -r 32 -t 60s \
        --adapters 8 --distribution zipf --prompt-words 90-110 --output-tokens 90-110
    locust -f loadtest/ --host ... --headless --steps 1,8,32,64,128,256 --step-seconds 30
    locust -f loadtest/ --host ... --headless -u 1 -t 60s --arrival-rate 20     # open loop
    locust -f loadtest/ --host ... --headless -u 256 -r 256 -t 60s --think-time 1  # LoRA Land's k6
    locust -f loadtest/ --host http://127.0.0.1:30000 ... --model-format '{base}:{adapter}'
                                               # SGLang's own server (0.5.17): base:adapter

Each request streams a chat completion (SSE, read line by line) and fires Locust custom metrics:
``TTFT``, ``ITL`` (mean gap between tokens of the request), ``E2E`` (response_length = output
tokens, with the failure's exception), a row per model (``--rows kind``: lora and base). Raw
per-request measurements go to ``--raw-out`` (JSONL), unrounded. Closed loop by default (a user
sends its next request when the last ends; ``--think-time S``: S seconds after it, as the LoRA
Land report's k6 users sleep 1 s); ``--arrival-rate R``: open loop, Poisson arrivals.
The web UI gains a Tokens/s tab. With ``LORALAND_API_KEY`` set, every request carries it.

The adapters in play are the first N of ``/v1/models`` (cards with a ``parent``; ``--models``
names them instead). ``--model-format`` says how a request names one: ``{adapter}`` (our API,
the default) or ``{base}:{adapter}`` (SGLang's own OpenAI server, which reads an adapter from
``model`` only after a colon and serves the base for any other name).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `-f loadtest/locustfile.py` anywhere

import gevent
import requests
from locust import HttpUser, LoadTestShape, constant, events, task
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner
from urllib3 import PoolManager

from loadtest.stats import WORDS, parse_range
from loadtest.targets import SetupError, api_key_header, pick_models

STATE: dict = {"adapters": [], "base": None, "weights": None, "lock": threading.Lock()}
OPEN_LOOP_CONNECTIONS = 1024
ROUTING_HEADER = "X-SMG-Routing-Key"
"""Set to the adapter's name on its requests: behind ``python -m engine.cluster`` with
``adapter_affinity``, sglang-router keeps one adapter's requests on one replica. The base's
requests carry none, so the router spreads them over every replica."""


def routing_headers(model: str) -> dict[str, str]:
    return {} if model == STATE["base"] else {ROUTING_HEADER: model}


OPTIONS = [
    (
        "--adapters",
        int,
        -1,
        "distinct adapters in play (first N of /v1/models); -1 = all, 0 = base",
    ),
    ("--distribution", str, "uniform", "uniform | zipf | base: how requests spread"),
    ("--zipf-s", float, 1.1, "Zipf skew: adapter k gets weight 1/k^s"),
    ("--prompt-words", str, "90-110", "prompt length in words: N or LOW-HIGH"),
    ("--output-tokens", str, "90-110", "max_tokens per request: N or LOW-HIGH"),
    ("--ignore-eos", str, "true", "true | false: generate exactly max_tokens"),
    ("--raw-out", str, "out/locust-raw.jsonl", "JSONL file of raw per-request measurements"),
    ("--steps", str, "", "step the users through these counts, e.g. 1,8,32,64,128,256"),
    ("--step-seconds", float, 30.0, "how long each step holds"),
    ("--seed", int, 0, "seed of prompts and adapter choice"),
    (
        "--prompt-template",
        str,
        "raw",
        "our API's extension: raw (the words as they are), apply (each adapter's template), "
        "or '' to send no such field (another server)",
    ),
    (
        "--model-format",
        str,
        "{adapter}",
        "a request's model for an adapter: {adapter} (ours) or {base}:{adapter} (SGLang's server)",
    ),
    ("--models", str, "", "comma list of adapters to use instead of /v1/models' (in this order)"),
    (
        "--models-from",
        str,
        "",
        "a server whose /v1/models lists the adapters (default: --host); behind "
        "python -m engine.cluster: its control API, the router's port + 1",
    ),
    ("--rows", str, "model", "model (a row per model) | kind (rows lora and base)"),
    ("--arrival-rate", float, 0.0, "open loop: requests per second arriving (Poisson); 0 = closed"),
    ("--think-time", float, 0.0, "closed loop: seconds a user waits after each answer (k6: 1)"),
]


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    for flag, kind, default, help_text in OPTIONS:
        parser.add_argument(
            flag, type=kind, default=default, help=help_text, include_in_web_ui=True
        )


@events.test_start.add_listener
def discover_models(environment, **_):
    """Pick the adapters in play from the server's /v1/models. A setup problem (no server, a bad
    option) stops the run with one clear message instead of thousands of failed requests."""
    try:
        STATE.update(choose_models(environment.parsed_options, environment.host or ""))
    except (SetupError, OSError, ValueError) as err:
        logging.error("load test not started: %s", err)
        environment.process_exit_code = 2
        STATE["ready"] = False
        gevent.spawn_later(0.1, environment.runner.quit)
        return
    STATE["ready"] = True
    STATE["started"] = time.time()
    TOKENS.reset()  # a web-UI run after another counts its own tokens
    raw = Path(environment.parsed_options.raw_out)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.touch()
    if not isinstance(environment.runner, MasterRunner):  # the master sends no request
        STATE["hub_lag"] = HubLag()
        STATE["hub_lag"].greenlet = gevent.spawn(STATE["hub_lag"].run)


class HubLag:
    """How late gevent's hub wakes a sleeping greenlet in this Locust process: every user's next
    read waits that long, so a stream's first event is timed that much late. Written beside the
    raw records (``<raw-out>.hub-lag.jsonl``, a line per process: [wall time, seconds late])."""

    KEPT = 120_000
    """Samples kept: the last 10 minutes at the 5-ms interval (a web-UI run may last hours)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.KEPT)
        self.greenlet = None

    def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            gevent.sleep(self.interval)
            self.samples.append((time.time(), time.perf_counter() - t0 - self.interval))


@events.test_stop.add_listener
def write_hub_lag(environment, **_):
    lag = STATE.pop("hub_lag", None)
    if lag is None:
        return
    lag.greenlet.kill(block=False)
    path = Path(environment.parsed_options.raw_out).with_suffix(".hub-lag.jsonl")
    with STATE["lock"], open(path, "a") as f:
        f.write(json.dumps([[round(at, 4), round(late, 6)] for at, late in lag.samples]) + "\n")


def choose_models(options, host: str) -> dict:
    if options.distribution not in {"uniform", "zipf", "base"}:
        raise SetupError(
            f"--distribution must be uniform, zipf or base, not {options.distribution}"
        )
    if not host:
        raise SetupError("no --host: the server's address, e.g. http://127.0.0.1:7860")
    listing = (options.models_from or host).rstrip("/") + "/v1/models"
    response = requests.get(listing, headers=api_key_header(), timeout=30)
    if response.status_code != 200:
        raise SetupError(f"GET {listing} answered {response.status_code}")
    return pick_models(options, response.json()["data"])


def request_sizes(options, rng: random.Random) -> tuple[str, int]:
    words = rng.randint(*parse_range(options.prompt_words))
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Continue this text: {text}", rng.randint(*parse_range(options.output_tokens))


class Streaming:
    """What both users do per request: pick a model, stream a chat completion, time it, report
    it to Locust (per model rows, failures with their exception) and to the raw file."""

    def on_start(self):
        options = self.environment.parsed_options
        self.rng = random.Random(options.seed * 100_003 + id(self))
        self.client.headers.update(api_key_header())

    def pick_model(self) -> str:
        adapters = STATE["adapters"]
        if not adapters:
            return STATE["base"]
        return self.rng.choices(adapters, weights=STATE["weights"])[0]

    def one_request(self) -> None:
        options = self.environment.parsed_options
        model = self.pick_model()
        prompt, max_tokens = request_sizes(options, self.rng)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": options.ignore_eos == "true",
        }
        if options.prompt_template:
            body["prompt_template"] = options.prompt_template
        kind = "base" if model == STATE["base"] else "lora"
        record = self.stream(body, model if options.rows == "model" else kind, model)
        record["model"] = model
        with STATE["lock"], open(options.raw_out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def stream(self, body: dict, label: str, model: str) -> dict:
        start = time.time()
        t0 = time.perf_counter()
        token_times, usage, error, first_event, chat_id = [], None, None, None, None
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=routing_headers(model),
            stream=True,
            catch_response=True,
            name=label,
        ) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                response.failure(error)
            else:
                for line in response.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    if first_event is None:  # the server's first event: its first token is out
                        first_event = time.perf_counter() - t0
                    event = json.loads(line[6:])
                    chat_id = chat_id or event.get("id")
                    if "error" in event:
                        error = event["error"].get("message", "stream error")
                        break
                    usage = event.get("usage") or usage
                    choices = event.get("choices") or []
                    if choices and choices[0].get("delta", {}).get("content"):
                        token_times.append(time.perf_counter() - t0)
                if error:
                    response.failure(error)
                else:
                    response.success()
        record = self.report(start, t0, token_times, usage, error, label, model)
        return record | {"first_event": first_event, "id": chat_id}

    def report(self, start, t0, token_times, usage, error, label, model) -> dict:
        e2e = time.perf_counter() - t0
        ttft = token_times[0] if token_times else None
        itl = [b - a for a, b in itertools.pairwise(token_times)]
        output_tokens = usage["completion_tokens"] if usage else len(token_times)
        fire = self.environment.events.request.fire
        context = {"model": model}
        if error is None and ttft is not None:
            fire(request_type="TTFT", name=label, response_time=ttft * 1000, response_length=0,
                 context=context)  # fmt: skip
            if itl:
                mean_itl = sum(itl) / len(itl) * 1000
                fire(request_type="ITL", name=label, response_time=mean_itl, response_length=0,
                     context=context)  # fmt: skip
        failure = None if error is None and ttft is not None else RuntimeError(error or "no token")
        fire(request_type="E2E", name=label, response_time=e2e * 1000,
             response_length=output_tokens, exception=failure, context=context)  # fmt: skip
        TOKENS.add(label, output_tokens)
        return {
            "start": start,
            "ttft": ttft,
            "e2e": e2e,
            "itl": itl,
            "token_times": token_times,
            "output_tokens": output_tokens,
            "ok": failure is None,
            "error": error,
        }


class ChatUser(Streaming, HttpUser):
    """Closed loop: one client streaming chat completions back to back, or ``--think-time``
    seconds apart."""

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        return options.think_time if options is not None else 0.0

    @task
    def chat(self):
        if not STATE.get("ready"):
            raise StopUser()
        self.one_request()


class OpenLoopUser(Streaming, HttpUser):
    """Open loop (``--arrival-rate R``): requests arrive as a Poisson process, R a second in all,
    whatever the server's speed — each in its own greenlet. With ``-u N`` each user sends R/N a
    second (``-u 1`` is enough)."""

    abstract = True  # chosen by --arrival-rate (the init listener), not by default
    wait_time = constant(0)
    pool_manager = PoolManager(maxsize=OPEN_LOOP_CONNECTIONS)  # one per request in flight

    @task
    def arrive(self):
        if not STATE.get("ready"):
            raise StopUser()
        users = max(1, self.environment.runner.user_count if self.environment.runner else 1)
        gevent.sleep(self.rng.expovariate(self.environment.parsed_options.arrival_rate / users))
        gevent.spawn(self.one_request)


class TokenCounter:
    """Output tokens per row, for the web UI's tokens/s tab (a sliding 10-s window)."""

    WINDOW = 10.0

    def __init__(self):
        self.lock = threading.Lock()
        self.events: collections.deque[tuple[float, str, int]] = collections.deque()
        self.totals: dict[str, int] = {}

    def add(self, label: str, tokens: int) -> None:
        """One answer's tokens; events older than the window leave from the front (O(1) an
        answer: rebuilding the window's list on each answer took a fifth of Locust's CPU)."""
        now = time.time()
        with self.lock:
            self.events.append((now, label, tokens))
            self.totals[label] = self.totals.get(label, 0) + tokens
            while self.events[0][0] <= now - self.WINDOW:
                self.events.popleft()

    def table(self) -> list[dict]:
        now = time.time()
        with self.lock:
            recent: dict[str, int] = {}
            for at, label, tokens in self.events:
                if at > now - self.WINDOW:
                    recent[label] = recent.get(label, 0) + tokens
            rows = [
                {
                    "name": label,
                    "tokens_per_s": round(recent.get(label, 0) / self.WINDOW, 1),
                    "tokens": total,
                }
                for label, total in sorted(self.totals.items())
            ]
        total = {
            "name": "Aggregated",
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in rows), 1),
            "tokens": sum(r["tokens"] for r in rows),
        }
        return [*rows, total]

    def reset(self) -> None:
        with self.lock:
            self.events.clear()
            self.totals.clear()

    def summary(self, seconds: float) -> str:
        """Each row's output tokens and tokens/s over ``seconds``, as a text table."""
        with self.lock:
            totals = dict(sorted(self.totals.items()))
        totals["Aggregated"] = sum(totals.values())
        width = max(len(name) for name in totals) + 2
        lines = [f"Output tokens over the run ({seconds:.0f} s)", "-" * (width + 30)]
        lines.append(f"{'Name':<{width}}{'tokens/s':>14}{'tokens':>16}")
        for name, tokens in totals.items():
            lines.append(f"{name:<{width}}{tokens / seconds:>14.1f}{tokens:>16}")
        return "\n".join(lines)


TOKENS = TokenCounter()


@events.test_stop.add_listener
def print_tokens(environment, **_):
    """Tokens/s per row where the web UI's tab is not seen: printed when the test stops (by one
    local runner; with ``--processes`` the web UI or ``loadtest.sweep`` sums the workers)."""
    started = STATE.pop("started", None)
    if started is not None and isinstance(environment.runner, LocalRunner):
        print(TOKENS.summary(max(time.time() - started, 1e-9)), flush=True)


@events.init.add_listener
def on_init(environment, **_):
    """``--arrival-rate``: the open-loop user instead of the closed-loop one; the web UI gets a
    tokens/s tab (per row, the last 10 s)."""
    options = environment.parsed_options
    if options is not None and options.arrival_rate > 0:
        environment.user_classes[:] = [OpenLoopUser]
    if environment.web_ui:
        add_tokens_tab(environment.web_ui)


def add_tokens_tab(web_ui) -> None:
    from flask import request as flask_request

    web_ui.template_args["extendedTabs"] = [{"title": "Tokens/s", "key": "tokens"}]
    web_ui.template_args["extendedTables"] = [{"key": "tokens", "structure": [
        {"key": "name", "title": "Name"}, {"key": "tokens_per_s", "title": "Output tokens/s"},
        {"key": "tokens", "title": "Output tokens"}]}]  # fmt: skip

    @web_ui.app.after_request
    def with_tokens(response):
        if flask_request.path != "/stats/requests" or not response.is_json:
            return response
        extended = [{"key": "tokens", "data": TOKENS.table()}]
        response.set_data(json.dumps({**response.json, "extended_stats": extended}))
        return response


class StepShape(LoadTestShape):
    """``--steps 1,8,32`` holds each user count for ``--step-seconds``; without ``--steps`` it
    is a plain run with ``-u``/``-r``/``-t`` (or the web UI's numbers)."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        if options.steps:
            counts = [int(n) for n in options.steps.split(",")]
            index = int(elapsed // options.step_seconds)
            return (counts[index], counts[index]) if index < len(counts) else None
        if options.run_time and elapsed > options.run_time:
            return None
        return options.num_users or 1, options.spawn_rate or 1
