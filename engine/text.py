"""Prompt → token ids, and token ids → streamed text deltas with stop strings (both backends)."""

from __future__ import annotations

import json
import re
import weakref

from .interface import GenerationRequest, InvalidRequestError

TURN_MARKERS = (
    "<|im_end|>", "<|im_start|>", "<|endoftext|>",  # ChatML (SmolLM2, Qwen)
    "<end_of_turn>", "<start_of_turn>", "<eos>",  # Gemma
    "<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>",  # Llama 3
)  # fmt: skip


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end the model's answer: EOS, and any special token that closes a turn or
    opens the next one. A chat model that starts a new turn (``<|im_start|>``) has finished its
    own, so generation stops there instead of running on into an invented next message."""
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
    }
    ids = {tokenizer.convert_tokens_to_ids(t) for t in TURN_MARKERS if t in special}
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte (what byte-level BPE vocabularies spell
    their tokens in)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return chars


BYTE_LEVEL_CHARS = byte_level_chars()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""SentencePiece's spelling of a token that is one raw byte."""
RAW_TOKEN = re.compile(r"bytes:((?:\\x[0-9a-f]{2})+)")


def token_text(tokenizer, token: int) -> str:
    """A token's text for log-probabilities; one that is only part of a character is spelled
    by its bytes, as OpenAI spells it (``bytes:\\xf0\\x9f``), so ``token_bytes`` gives them back
    (its plain decode is a replacement character)."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text or (raw := raw_bytes(tokenizer, token)) is None:
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def raw_bytes(tokenizer, token: int) -> bytes | None:
    """The bytes a token stands for, where its vocabulary spells them (byte-level BPE, or
    SentencePiece's byte fallback), else None."""
    spelled = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(spelled, str):
        return None
    if byte := BYTE_FALLBACK.fullmatch(spelled):
        return bytes([int(byte.group(1), 16)])
    if all(c in BYTE_LEVEL_CHARS for c in spelled):
        return bytes(BYTE_LEVEL_CHARS[c] for c in spelled)
    return None


def token_bytes(text: str) -> bytes:
    """The bytes of a token's text as ``token_text`` spells it."""
    if raw := RAW_TOKEN.fullmatch(text):
        return bytes.fromhex(raw.group(1).replace("\\x", ""))
    return text.encode("utf-8")


VOCABULARY_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary_size(tokenizer) -> int:
    """``len(tokenizer)``, read once per tokenizer (which must not gain tokens afterwards). With
    tokenizers 0.22 (SGLang's runtime) each ``len`` builds the whole vocabulary: ~4 ms for
    SmolLM2's 49k tokens on the 2-core machine, 2–3× that on the H200 host; on the serving
    event loop for every request it cut the 7B engine to a third of its throughput at 256
    streams (``results/serving/h200-7b-throughput-drop``)."""
    try:
        if (size := VOCABULARY_SIZES.get(tokenizer)) is None:
            size = VOCABULARY_SIZES[tokenizer] = len(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed
        return len(tokenizer)
    return size


def prompt_token_ids(tokenizer, request: GenerationRequest, chat_template: bool) -> list[int]:
    """Chat messages go through the tokenizer's chat template; a raw prompt is tokenized as is;
    token ids (the prompt's, ``logit_bias``'s) are checked against the vocabulary."""
    if request.params.logit_bias or request.prompt_ids is not None:
        check_vocabulary(vocabulary_size(tokenizer), request)
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if request.messages is not None:
        messages = template_messages(request.messages)
        if chat_template and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return tokenizer.encode("\n".join(m["content"] for m in messages))
    return tokenizer.encode(request.prompt)


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as the chat template takes them: an assistant's tool calls written after
    its text, as the model writes them under ``tool_choice: required`` (``calls_text``), and the
    tool results that answer them in the calls' order (OpenAI matches results by
    ``tool_call_id``, in any order; the templates here show no ids, so order is the link)."""
    out = []
    for message in in_call_order(messages):
        if message.get("tool_calls"):
            text = "\n".join(
                t for t in (message["content"], calls_text(message["tool_calls"])) if t
            )
            message = {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}
        out.append(message)
    return out


def in_call_order(messages: list[dict]) -> list[dict]:
    """Each run of tool messages sorted by the position of the call it answers among the calls
    of the message before the run (a result of no such call keeps its place among the last)."""
    out, run, order = [], [], {}

    def answered_run() -> list[dict]:
        return sorted(run, key=lambda m: order.get(m.get("tool_call_id"), len(order)))

    for message in messages:
        if message.get("role") == "tool":
            run.append(message)
            continue
        out += answered_run()
        run, order = [], {c.get("id"): i for i, c in enumerate(message.get("tool_calls") or [])}
        out.append(message)
    return out + answered_run()


def calls_text(calls: list[dict]) -> str:
    """Calls (OpenAI's shape) as a JSON array of ``{"name", "parameters"}``; arguments that are
    not JSON a prompt can hold (not JSON, a lone surrogate, nested past the parser's depth) go
    as their text."""
    listed = (
        f'{{"name": {json.dumps(c["function"]["name"], ensure_ascii=False)}, '
        f'"parameters": {parameters_text(c["function"]["arguments"])}}}'
        for c in calls
    )
    return "[" + ", ".join(listed) + "]"


def parameters_text(arguments: str) -> str:
    try:
        text = json.dumps(json.loads(arguments), ensure_ascii=False)
        text.encode("utf-8")
        return text
    except (ValueError, RecursionError, UnicodeEncodeError):
        return json.dumps(arguments, ensure_ascii=False)


def check_vocabulary(vocab: int, request: GenerationRequest) -> None:
    """Every token id of the prompt and of ``logit_bias`` is in 0 … ``vocab`` − 1 (else 400)."""
    check_ids(vocab, request.params.logit_bias or {}, "logit_bias", "logit_bias token")
    check_ids(vocab, request.prompt_ids or [], "prompt", "prompt token")


def check_ids(vocab: int, ids, param: str, what: str = "token") -> None:
    """A 400 naming ``param`` for the first id outside 0 … ``vocab`` − 1."""
    if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
        raise InvalidRequestError(f"{what} {bad} is outside the vocabulary (0..{vocab - 1})", param)


class TextStream:
    """Turns generated token ids into text deltas.

    Holds back an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could be the
    start of a stop string; once a stop string appears the text is cut before it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        cut = self.stop_position(text)
        if cut is not None:
            self.stopped = True
            return self.take(text[:cut])
        return self.take(text[: len(text) - self.held_back(text)])

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self.take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def take(self, text: str) -> str:
        delta = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return delta

    def stop_position(self, text: str) -> int | None:
        hits = [text.find(s, max(0, self.emitted - len(s))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def held_back(self, text: str) -> int:
        """The longest tail of ``text`` that begins a stop string (longest first, and only
        prefixes that end in the text's last character)."""
        longest, last = 0, text[-1:]
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s[n - 1] == last and text.endswith(s[:n]):
                    longest = n
                    break
        return longest
