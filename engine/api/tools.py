"""Tool calls (OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls``) on any model: the
answer is constrained to the call's JSON by the structured-output grammar (both backends).

- ``tool_choice: {"type": "function", "function": {"name": …}}``: the answer is that function's
  arguments, one JSON object matching its ``parameters``;
- ``tool_choice: "required"``: a JSON array of ``{"name", "parameters"}``, one item per call
  (one at most with ``parallel_tool_calls: false``), each matching its function; read as it
  comes (``CallScanner``), so each call streams once its name is written;
- ``"auto"`` (OpenAI's default when tools are given): the model chooses. It is told to answer
  with the same JSON array to call functions, and otherwise in text; no grammar holds it, and
  the answer is calls only if it is, whole, such an array of the listed functions (the parser
  vLLM asks for with ``--tool-call-parser``, for the format this server teaches the model).
  Streamed, an answer that begins with ``[`` is held back until it is whole;
- ``"none"``: no call, the tools are not shown.

The functions are shown to the model in a system message (``instructions``); an answer's calls
sent back in the next request are written as the model wrote them (``text.calls_text``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from ..constraints import JsonSchemaSpec, ResponseFormat, grammar_problem
from ..interface import Chunk, new_id
from .protocol import ChatBody, ChatMessage, Tool, invalid

HELD_KEEPALIVE_S = 10.0
"""While an ``auto`` answer is held back, an SSE comment at least this often as its tokens come
(a proxy cuts a stream that sends nothing for its read timeout, often 60 s)."""
KEEPALIVE = b": held back until whole\n\n"
ANY_OBJECT = {"type": "object"}
"""Every function's arguments (a schema without ``type`` gets this one)."""


@dataclass
class ToolPlan:
    """What one request's tool choice asks of the answer."""

    tools: list[Tool]
    named: str | None
    """The function the answer must call; ``None``: ``required`` or ``auto`` (any of them)."""
    parallel: bool = True
    auto: bool = False
    """``auto``: calls or text, the model's choice (no grammar)."""
    checked: set[str] = field(default_factory=set)
    """The calls' grammar once ``check_grammar`` passed it."""

    def schema(self) -> dict:
        functions = {
            t.function.name: ANY_OBJECT | (t.function.parameters or {}) for t in self.tools
        }
        if self.named is not None:
            return functions[self.named]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": {"$ref": f"#/$defs/{name}"}},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name in functions
        ]
        # each function's schema in $defs, its local refs (#, #/$defs/…) pointing into it
        defs = {name: refs_under(schema, f"#/$defs/{name}") for name, schema in functions.items()}
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, "$defs": defs}
        return array | ({} if self.parallel else {"maxItems": 1})

    def response_format(self) -> ResponseFormat:
        spec = JsonSchemaSpec(name="tool_calls", schema=self.schema())
        return ResponseFormat(type="json_schema", json_schema=spec)

    async def check_grammar(self) -> None:
        """A 400 naming ``tools`` for calls no grammar can make (their schemas), checked off the
        event loop (as ``Api.check_grammar``); under ``auto`` too, though no grammar holds it."""
        constraint = self.response_format().constraint()
        if problem := await asyncio.to_thread(grammar_problem, constraint):
            raise invalid(f"tools: {problem}", "tools")
        self.checked.add(constraint.spec)

    def instructions(self) -> str:
        listed = "\n".join(
            json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False)
            for t in self.tools
        )
        calls = '[{"name": <function name>, "parameters": <its arguments>}]'
        if self.named is not None:
            ask = f'Call the function "{self.named}": answer with its arguments, one JSON object.'
        elif self.auto:
            one = "" if self.parallel else " (one call at most)"
            ask = (
                f"To call functions, answer with only a JSON array of calls{one}, {calls}; "
                "otherwise answer in text."
            )
        else:
            ask = f"Call functions: answer with a JSON array of calls, {calls}."
        return f"You can call these functions (JSON Schema of their parameters):\n{listed}\n{ask}"

    def with_instructions(self, messages: list[dict]) -> list[dict]:
        """The functions shown in the system message (a new first one if there is none)."""
        if messages and messages[0]["role"] == "system":
            first = messages[0] | {"content": f"{messages[0]['content']}\n\n{self.instructions()}"}
            return [first, *messages[1:]]
        return [{"role": "system", "content": self.instructions()}, *messages]

    def calls(self, text: str) -> list[dict] | None:
        """The answer's calls in OpenAI's shape; ``None`` when the text is not whole calls."""
        if self.named is not None:
            return [call(self.named, text)]
        if not self.auto:
            scanner = scanned(text)
            return [call(c.name, c.arguments) for c in scanner.calls] if scanner.done else None
        try:
            listed = json.loads(text)
            calls = [call(item["name"], arguments_json(item["parameters"])) for item in listed]
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        return calls if not self.auto or self.chose_calls(listed) else None

    def chose_calls(self, listed) -> bool:
        """Under ``auto`` no grammar made the answer: it is calls only if it is what the model
        was told to write, calls of the listed functions with object arguments."""
        names = {t.function.name for t in self.tools}
        return (
            isinstance(listed, list)
            and len(listed) >= 1
            and (self.parallel or len(listed) == 1)
            and all(
                isinstance(item, dict)
                and set(item) == {"name", "parameters"}
                and isinstance(item["name"], str)
                and item["name"] in names
                and isinstance(item["parameters"], dict)
                for item in listed
            )
        )

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's for an answer of calls: ``tool_calls`` for calls the model chose
        (``required``, ``auto``), ``stop`` for the named function's, ``length`` for an answer cut
        short."""
        return "tool_calls" if reason == "stop" and self.named is None else reason

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The non-streamed answer's message and finish reason: text as it came when it is not
        whole calls, but for the calls of ``required`` whose names were written before a cut
        (as they stream)."""
        if self.named is None and not self.auto:
            calls = [call(c.name, c.arguments) for c in scanned(text).announced()] or None
        else:
            calls = self.calls(text) if reason != "length" or self.named else None
        if calls is None:  # cut short: the text as it came, no calls
            return {"role": "assistant", "content": text, "refusal": None}, reason
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
        return message, self.finish_reason(reason)


def check_tool_results(messages: list[ChatMessage]) -> None:
    """OpenAI's rule for a conversation with calls: a tool's message answers a call of the
    assistant's message before it (by ``tool_call_id``), and each such call is answered before
    the conversation goes on; else a 400 naming the message."""
    waiting: dict[str, None] = {}  # the calls not yet answered, in order
    for i, message in enumerate(messages):
        if message.role == "tool":
            call_id = message.tool_call_id
            if call_id not in waiting:
                raise invalid(
                    f"messages[{i}]: tool_call_id {call_id!r} answers no call of the assistant's "
                    "message before it (or one answered already)",
                    f"messages.{i}.tool_call_id",
                )
            del waiting[call_id]
            continue
        if waiting:
            raise invalid(unanswered(waiting, f"messages[{i}] comes"), f"messages.{i}")
        waiting = dict.fromkeys(call.id for call in message.tool_calls or [])
    if waiting:
        raise invalid(unanswered(waiting, "the conversation ends"), "messages")


def unanswered(waiting: dict[str, None], where: str) -> str:
    first, *more = waiting
    others = f" and {len(more)} more" if more else ""
    return (
        f"{where} before a tool's message answers the call {first!r}{others}: send each call's "
        "result right after the assistant's message that made it"
    )


def refs_under(schema: dict, base: str) -> dict:
    """A copy of ``schema`` with its local ``$ref``s (``#``, ``#/...``) made to point below
    ``base``, where it is moved; walked without recursion (a schema may be nested deep)."""
    copy: dict = {}
    stack: list[tuple[dict | list, dict | list]] = [(schema, copy)]
    while stack:
        source, target = stack.pop()
        for key, value in source.items() if isinstance(source, dict) else enumerate(source):
            if key == "$ref" and isinstance(value, str) and (value == "#" or value[:2] == "#/"):
                value = base + value[1:]
            elif isinstance(value, dict | list):
                child = {} if isinstance(value, dict) else [None] * len(value)
                stack.append((value, child))
                value = child
            target[key] = value  # type: ignore[index]
    return copy


def arguments_json(value) -> str:
    """A call's arguments as JSON text any client parses: no NaN or infinities (a ValueError:
    not a call), and ASCII escapes where the text would hold a lone surrogate."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False)
    return text


def new_call_id() -> str:
    return f"call_{new_id()[:24]}"


def call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}  # fmt: skip


def tool_plan(body: ChatBody) -> ToolPlan | None:
    """The request's tool choice checked against its tools and other fields; ``None``: no
    calls. Sets ``body.response_format`` to the calls' grammar."""
    tools, choice = body.tools or [], body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise invalid("tool_choice needs tools", "tool_choice")
        if body.parallel_tool_calls is not None:
            raise invalid("parallel_tool_calls needs tools", "parallel_tool_calls")
        return None
    names = [t.function.name for t in tools]
    for tool in tools:
        if (tool.function.parameters or ANY_OBJECT).get("type", "object") != "object":
            raise invalid(
                f"tools: function '{tool.function.name}' has parameters that are not of type "
                "'object' (its arguments are one JSON object)",
                "tools",
            )
    if len(set(names)) != len(names):
        raise invalid("tools: each function's name once", "tools")
    if choice == "none":
        return None
    auto = choice in (None, "auto")
    named = None if auto or choice == "required" else choice.function.name
    if named is not None and named not in names:
        raise invalid(f"tool_choice names '{named}', which is not among the tools", "tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid("response_format cannot be combined with tool calls", "response_format")
    if body.stops():
        raise invalid("stop cannot be combined with tool calls: it would cut their JSON", "stop")
    plan = ToolPlan(tools, named, body.parallel_tool_calls is not False, auto)
    # auto: no grammar, and none of an adapter's defaults either (its calls must be writable)
    body.response_format = ResponseFormat(type="text") if auto else plan.response_format()
    return plan


WHITESPACE = " \t\n\r"


@dataclass
class ScannedCall:
    name: str | None = None
    arguments: str = ""
    announced: bool = False
    """Its name went out (streamed: the call's first delta)."""


@dataclass
class CallScanner:
    """A ``required`` answer, the JSON array ``[{"name": …, "parameters": {…}}, …]`` its grammar
    writes, read as its text comes: each call once its name is whole, then its arguments' text
    as the model writes it (the raw text, as a named function's arguments are; a call whose
    arguments come before its name is told whole once the name is). ``feed`` answers with what
    a piece of text added: ``(call index, its name or None, arguments text)``."""

    text: str = ""
    at: int = 0
    state: str = "open"
    """What the text at ``at`` must be: ``open`` ``[``; ``item`` ``{``; ``key`` a key or ``}``;
    ``colon``; ``name`` or ``parameters`` the key's value; ``after`` ``,`` or ``}`` in an item;
    ``next`` ``,`` or ``]``; then ``done``, or ``broken`` (not the grammar's shape)."""
    key: str | None = None
    calls: list[ScannedCall] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    @property
    def done(self) -> bool:
        return self.state == "done"

    def announced(self) -> list[ScannedCall]:
        return [c for c in self.calls if c.announced]

    def feed(self, text: str) -> list[tuple[int, str | None, str]]:
        self.text += text
        told: list[tuple[int, str | None, str]] = []
        while self.at < len(self.text) and self.state not in ("done", "broken"):
            if not self.step(told):
                break
        return told

    def step(self, told: list) -> bool:
        """Read one token of the array (or the arguments so far); False: more text needed."""
        char = self.text[self.at]
        if self.state == "parameters" and (self.depth or char == "{"):
            return self.read_arguments(told)
        if char in WHITESPACE:
            self.at += 1
            return True
        if self.state in ("key", "name") and char == '"':
            return self.read_string(told)
        expected = {"open": "[", "item": "{", "colon": ":", "after": ",}", "next": ",]"}
        whole = self.calls and self.calls[-1].name is not None and self.calls[-1].arguments
        if char not in expected.get(self.state, "") or (char == "}" and not whole):
            self.state = "broken"
            return False
        self.at += 1
        if self.state == "open" or char == ",":
            self.state = "item" if self.state in ("open", "next") else "key"
        elif char == "{":
            self.calls.append(ScannedCall())
            self.state = "key"
        elif char == ":":
            self.state = self.key
        else:  # "}" ends an item, "]" the array
            self.state = "next" if char == "}" else "done"
        return True

    def read_string(self, told: list) -> bool:
        try:
            value, end = json.JSONDecoder().raw_decode(self.text, self.at)
        except json.JSONDecodeError:
            return False  # the string is not whole yet
        call = self.calls[-1]
        seen = {"name": call.name is not None, "parameters": bool(call.arguments)}
        if self.state == "key" and (value not in KEYS or seen[value]):
            self.state = "broken"  # not a key of a call's, or one written twice
            return False
        self.at = end
        if self.state == "key":
            self.key, self.state = value, "colon"
            return True
        call.name, call.announced, self.state = value, True, "after"
        told.append((len(self.calls) - 1, value, call.arguments))
        return True

    def read_arguments(self, told: list) -> bool:
        """The arguments' text up to where their object closes, or all there is so far."""
        start, text = self.at, self.text
        for at in range(start, len(text)):
            char = text[at]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.tell(text[start : at + 1], told)
                    self.at, self.state = at + 1, "after"
                    return True
        self.tell(text[start:], told)
        self.at = len(text)
        return False

    def tell(self, piece: str, told: list) -> None:
        call = self.calls[-1]
        call.arguments += piece
        if call.announced and piece:
            told.append((len(self.calls) - 1, None, piece))


KEYS = ("name", "parameters")


def scanned(text: str) -> CallScanner:
    scanner = CallScanner()
    scanner.feed(text)
    return scanner


@dataclass
class ToolStream:
    """One streamed choice's tool calls: a named function's arguments as they come; each call
    of ``required`` once its name is written, then its arguments as they come
    (``CallScanner``); under ``auto``, text as it comes unless the answer begins with ``[``
    (held back until whole: calls or text)."""

    plan: ToolPlan
    text: str = ""
    call_id: str = field(default_factory=new_call_id)
    scanner: CallScanner = field(default_factory=CallScanner)
    call_ids: list[str] = field(default_factory=list)
    started: bool = False
    texting: bool = False
    """``auto``: the answer began as text, and streams as content."""
    bracketed: bool = False
    """``auto``: the answer began with ``[`` (held back until whole)."""
    called: bool = False
    held_logprobs: list = field(default_factory=list)
    """Logprobs of tokens whose text is held back: they go out with it."""
    sent_at: float = field(default_factory=time.monotonic)

    def keepalive(self, sending: bool) -> bytes | None:
        """An SSE comment when nothing went out for ``HELD_KEEPALIVE_S`` (clients skip it)."""
        now = time.monotonic()
        if sending or now - self.sent_at < HELD_KEEPALIVE_S:
            self.sent_at = now if sending else self.sent_at
            return None
        self.sent_at = now
        return KEEPALIVE

    def logprobs_to_send(self, chunk: Chunk, sending: bool) -> list | None:
        """The logprobs to send with this chunk's deltas (``sending``), held ones first; None
        when the request asked for none or everything is still held back."""
        if chunk.logprobs is None and not self.held_logprobs:
            return None
        self.held_logprobs += chunk.logprobs or []
        if not sending and not chunk.finish_reason:
            return None
        entries, self.held_logprobs = self.held_logprobs, []
        return entries

    def deltas(self, chunk: Chunk) -> list[dict]:
        if self.plan.named is not None:
            deltas = []
            if not self.started:
                self.started = True
                head = {"name": self.plan.named, "arguments": ""}
                deltas.append(
                    one_call(0, {"id": self.call_id, "type": "function", "function": head})
                )
            if chunk.text:
                deltas.append(one_call(0, {"function": {"arguments": chunk.text}}))
            return deltas
        if not self.plan.auto:
            return self.required_deltas(chunk)
        if self.texting:
            return [{"content": chunk.text}] if chunk.text else []
        self.text += chunk.text
        if not self.bracketed:  # until the first character that is not a space
            opening = self.text.lstrip()
            if opening and not opening.startswith("["):
                self.texting = True  # not a call: what was held back goes out, the rest as it comes
                return [{"content": self.text}]
            self.bracketed = bool(opening)
        if not chunk.finish_reason:
            return []
        calls = self.plan.calls(self.text) if chunk.finish_reason != "length" else None
        if calls is None:
            return [{"content": self.text}] if self.text else []
        self.called = True
        return [one_call(i, c) for i, c in enumerate(calls)]

    def required_deltas(self, chunk: Chunk) -> list[dict]:
        """Each call's first delta (id, name) once its name is written, then its arguments as
        they come; the text as content, at the end, if no call was (cut short)."""
        deltas = []
        for index, name, arguments in self.scanner.feed(chunk.text):
            if name is None:
                deltas.append(one_call(index, {"function": {"arguments": arguments}}))
                continue
            self.call_ids.append(new_call_id())
            head = {"name": name, "arguments": arguments}
            deltas.append(one_call(index, {"id": self.call_ids[-1], "type": "function",
                                           "function": head}))  # fmt: skip
        self.called = bool(self.call_ids)
        if chunk.finish_reason and not self.called and self.scanner.text:
            deltas.append({"content": self.scanner.text})
        return deltas

    def finish_reason(self, reason: str | None) -> str | None:
        if self.plan.named is None and (reason == "length" or not self.called):
            return reason
        return self.plan.finish_reason(reason)


def one_call(index: int, fields: dict) -> dict:
    return {"tool_calls": [{"index": index, **fields}]}
