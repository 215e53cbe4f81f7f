"""The CPU default's choice of one row's next token, as OpenAI defines the knobs (and SGLang the
extensions): log-probabilities of the model's own distribution; then presence, frequency and
repetition penalties, ``min_tokens``' bar on the end of turn, the structured-output grammar's
mask and the logit bias; then greedy, or temperature with top-k, top-p and min-p."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection

import torch

from ..constraints import Constraint, grammar_problem
from ..interface import InvalidRequestError, SamplingParams, TokenLogprob


class Grammar:
    """One row's structured-output state: which tokens may come next (llguidance)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def mask(self, logits: torch.Tensor) -> None:
        import llguidance.torch

        bitmask = llguidance.torch.allocate_token_bitmask(1, logits.shape[-1])
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, 0)
        if self.matcher.is_error():  # a limit hit while masking leaves only the end token
            self.failed()
        llguidance.torch.apply_token_bitmask_inplace(logits.view(1, -1), bitmask)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self.failed()

    def failed(self) -> None:
        """The matcher's error (a limit of llguidance's, say) as the request's: its first line."""
        why = (self.matcher.get_error() or "no reason given").splitlines()[0][:300]
        raise InvalidRequestError(
            f"response_format: the grammar failed during generation: {why}", "response_format"
        )

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Compiles constraints for one tokenizer; llguidance's view of the vocabulary is built once,
    on first use (~2 s)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.lock = threading.Lock()
        self.llg_tokenizer = None

    def compile(self, constraint: Constraint) -> Grammar:
        import llguidance
        import llguidance.hf

        with self.lock:
            if self.llg_tokenizer is None:
                self.llg_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size
                )
        if problem := grammar_problem(constraint):  # the API checked it; the app and CLI not
            raise InvalidRequestError(f"response_format: {problem}", "response_format")
        matcher = llguidance.LLMatcher(self.llg_tokenizer, constraint.grammar())
        if matcher.is_error():
            raise InvalidRequestError(
                f"response_format cannot be compiled: {matcher.get_error()}", "response_format"
            )
        first = matcher.deep_copy()
        first.compute_bitmask()
        if first.is_error():  # no first token: a schema that only refers to itself, say
            raise InvalidRequestError("response_format admits no answer at all", "response_format")
        return Grammar(matcher)


def logprob_entry(logits: torch.Tensor, token: int, top: int, decode) -> TokenLogprob:
    """The chosen token's log-probability under the model, and the ``top`` most likely."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = (
        [(int(i), decode(int(i)), float(v)) for v, i in zip(best.values, best.indices)]
        if best is not None
        else []
    )
    return TokenLogprob(token, decode(token), float(logprobs[token]), alternatives)


def adjusted(
    logits: torch.Tensor,
    params: SamplingParams,
    generated: list[int],
    grammar: Grammar | None,
    end_ids: Collection[int] = (),
) -> torch.Tensor:
    """Logits after penalties, ``min_tokens``' bar on ``end_ids``, the grammar's mask and the
    bias, in SGLang's order (a copy when any applies)."""
    if not (params.adjusts_logits or grammar):
        return logits
    logits = logits.clone()
    if generated and (params.penalised or params.rescales):
        counts = Counter(generated)
        ids = torch.tensor(list(counts), device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * n
        seen = logits[ids]
        penalty = params.repetition_penalty
        logits[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    if len(generated) < params.min_tokens and not params.ignore_eos:
        logits[[t for t in end_ids if t < logits.shape[-1]]] = float("-inf")
    if grammar is not None:
        grammar.mask(logits)
    for token, bias in params.logit_bias.items():
        if token < logits.shape[-1]:
            logits[token] += bias
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> int:
    if params.greedy:
        return int(torch.argmax(logits))
    # in float64 (where 1e-300 is not 0) and from the largest logit down: a tiny temperature
    # sends the others to -inf and leaves the largest at 0, its limit (greedy), instead of NaNs
    logits = (logits.double() - logits.max()) / params.temperature
    if params.top_k:
        cutoff = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs.cpu(), 1, generator=rng))
