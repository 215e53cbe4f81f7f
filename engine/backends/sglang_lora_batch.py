"""The LoRA batch's indices for SGLang's csgmv kernels, built without a loop over adapters.

Before each forward pass SGLang 0.5.17's ``ChunkedSgmvLoRABackend`` works out which tokens use
which adapter: a permutation that groups the batch's tokens by adapter, then the groups cut into
segments of at most ``chunk_size`` tokens. It does this on the scheduler's one thread, every
tensor call under a ``torch.device`` context (a Python hook per call), and the segments with a
Python loop over the adapters that calls ``.item()`` twice per adapter; for an extend batch it
also copies the lm_head's segments to the GPU from pageable memory, which waits for the GPU's
queued work. With FP8 weights the scheduler's thread bounds the decode step, and at 256
streams × 128 adapters these indices took 12–14 % of it
(``results/serving/h200-7b-http-profile``).

Here the same tensors come from a few vectorised calls, and the lm_head's through pinned
memory without a wait. SGLang's plugin hook registry applies them as ``AROUND`` hooks (the
permutation of a batch neither decode nor extend, e.g. speculative verification, stays SGLang's)
in each process that loads the plugin ``loraland`` (``sglang_hooks``) while the parent's
environment says so (``engine.sglang.fast_lora_batch``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import os

import torch

from . import sglang_hooks

log = logging.getLogger(__name__)

FLAG_ENV = "LORALAND_FAST_LORA_BATCH"
"""How the parent tells SGLang's processes to apply the hooks ("1") or not."""
BACKEND_CLASS = "sglang.srt.lora.backend.chunked_backend.ChunkedSgmvLoRABackend"
"""SGLang's csgmv backend, whose methods the hooks wrap."""


def order_by_adapter(
    weight_indices: list[int], tokens_per_request: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's tokens grouped by adapter, in order within each: (each place's token as a
    permutation, each place's adapter). ``tokens_per_request`` None: one token each (decode)."""
    per_request = torch.tensor(weight_indices, dtype=torch.int32, device="cpu")
    per_token = per_request
    if tokens_per_request is not None:
        repeats = torch.tensor(tokens_per_request, dtype=torch.int32, device="cpu")
        per_token = torch.repeat_interleave(per_request, repeats)
    permutation = torch.empty(
        (len(per_token),), dtype=torch.long, device="cpu", pin_memory=pinned()
    )
    torch.argsort(per_token, stable=True, out=permutation)
    return permutation, per_token[permutation]


def adapter_segments(
    adapter_per_token: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each run of one adapter cut into segments of at most ``chunk_size`` tokens: (each
    segment's adapter, the segments' bounds as an indptr)."""
    adapters, run_lengths = torch.unique_consecutive(adapter_per_token, return_counts=True)
    pieces = (run_lengths + chunk_size - 1) // chunk_size
    segment_adapters = torch.repeat_interleave(adapters, pieces)
    lengths = torch.full((len(segment_adapters),), chunk_size, dtype=torch.int32, device="cpu")
    lengths[torch.cumsum(pieces, 0) - 1] = (run_lengths - (pieces - 1) * chunk_size).int()
    weight_indices = host_int32(len(lengths))
    weight_indices.copy_(segment_adapters)
    indptr = host_int32(len(lengths) + 1)
    indptr[0] = 0
    indptr[1:] = torch.cumsum(lengths, 0)
    return weight_indices, indptr


def host_int32(size: int) -> torch.Tensor:
    return torch.empty((size,), dtype=torch.int32, device="cpu", pin_memory=pinned())


@functools.cache
def pinned() -> bool:
    """Host tensors bound for the GPU in page-locked memory (where there is a GPU)."""
    return torch.cuda.is_available()


def to_device_without_wait(values: list[int], device) -> torch.Tensor:
    """``values`` as int32 on ``device``, copied from pinned memory: queued, not waited for."""
    host = torch.tensor(values, dtype=torch.int32, device="cpu", pin_memory=pinned())
    return host.to(device, non_blocking=True)


def permutation_hook(original, seq_weight_indices, forward_batch):
    """``ChunkedSgmvLoRABackend._get_permutation``: decode and extend batches vectorised."""
    mode = forward_batch.forward_mode
    if mode.is_decode() and len(seq_weight_indices) == forward_batch.batch_size:
        return order_by_adapter(seq_weight_indices, None)
    if mode.is_extend() and not mode.is_target_verify():
        return order_by_adapter(seq_weight_indices, forward_batch.extend_seq_lens_cpu)
    return original(seq_weight_indices=seq_weight_indices, forward_batch=forward_batch)


def segments_hook(original, backend, weights_reordered, chunk_size):
    """``ChunkedSgmvLoRABackend._get_segments_info``, vectorised."""
    return adapter_segments(weights_reordered, chunk_size)


def lm_head_hook(original, backend, lm_head_segments, batch_info, chunk_size, expected_tokens):
    """``ChunkedSgmvLoRABackend._build_lm_head_batch_info`` with copies that do not wait."""
    adapters, lengths = lm_head_segments
    return dataclasses.replace(
        batch_info,
        use_cuda_graph=False,  # the lm_head's LoRA runs outside any captured graph
        num_segments=len(adapters),
        max_len=chunk_size,
        seg_indptr=to_device_without_wait([0, *itertools.accumulate(lengths)], backend.device),
        weight_indices=to_device_without_wait(list(adapters), backend.device),
        permutation=torch.arange(sum(lengths), dtype=torch.int32, device=backend.device),
        expected_tokens=expected_tokens,
    )


HOOKS = {
    "_get_permutation": permutation_hook,
    "_get_segments_info": segments_hook,
    "_build_lm_head_batch_info": lm_head_hook,
}


def register() -> None:
    """Registers the hooks in SGLang's hook registry where the parent asked for them (the plugin
    ``loraland`` calls this in each process that loads plugins; SGLang applies them next)."""
    if os.environ.get(FLAG_ENV) != "1":
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if misfits := hooks_misfit():
        log.warning("fast_lora_batch not applied: %s", "; ".join(misfits))
        return
    for name, hook in HOOKS.items():
        HookRegistry.register(f"{BACKEND_CLASS}.{name}", hook, HookType.AROUND)


def hooks_misfit() -> list[str]:
    """Where this SGLang's csgmv backend differs from what the hooks wrap (none: they fit)."""
    try:
        from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend
    except Exception as error:  # whatever keeps it from loading keeps SGLang's own indices
        return [f"csgmv's backend does not load ({type(error).__name__}: {error})"]
    return misfits_of(ChunkedSgmvLoRABackend)


def misfits_of(backend_class: type) -> list[str]:
    """Each hooked method ``backend_class`` does not define itself, defines as a method of
    another kind (static or not), or with parameters named otherwise."""
    misfits = []
    for name, hook in HOOKS.items():
        method = backend_class.__dict__.get(name)
        if method is None:
            misfits.append(f"csgmv defines no {name}")
            continue
        static = isinstance(method, staticmethod)
        theirs = list(inspect.signature(method.__func__ if static else method).parameters)
        ours = [p for p in inspect.signature(hook).parameters if p != "original"]
        if static != ("backend" not in ours):
            misfits.append(f"{name} is {'' if static else 'not '}a staticmethod here")
        elif [p for p in theirs if p != "self"] != [p for p in ours if p != "backend"]:
            misfits.append(f"{name} takes {theirs}, the hook {ours}")
    return misfits


def ready(kwargs: dict, fast: bool) -> tuple[bool, str]:
    """Tell SGLang's processes whether to apply the hooks: (a warning?, what to log)."""
    os.environ[FLAG_ENV] = "0"
    if not fast:
        return False, "LoRA batch indices: SGLang's own (fast_lora_batch: false)"
    if not kwargs.get("enable_lora"):
        return False, "LoRA batch indices: none (LoRA off)"
    if (backend := kwargs.get("lora_backend")) != "csgmv":
        return False, f"LoRA batch indices: SGLang's own (lora_backend {backend})"
    if blocked := sglang_hooks.why_hooks_cannot_apply(lambda: "; ".join(hooks_misfit()) or None):
        return True, f"fast_lora_batch not applied: {blocked}"
    os.environ[FLAG_ENV] = "1"
    sglang_hooks.expose_plugin()
    return False, "LoRA batch indices: vectorised (fast_lora_batch)"
