"""The LoRA batch's indices built vectorised: the grouping and segments against their definition,
the settings that turn them on, and (where sglang is installed) against SGLang's own code and
applied by SGLang's plugin loading."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import itertools
import multiprocessing
import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from engine.backends import sglang_hooks, sglang_lora_batch
from engine.backends.sglang import engine_kwargs
from engine.registry import SGLangSettings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where SGLang's forward batch keeps ``extend_seq_lens`` (its code reads the list then)."""
needs_sglang = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None, reason="needs sglang (the GPU machine)"
)


def random_batches(count: int, seed: int = 0):
    """(adapter per request, tokens per request) with runs, repeats and empty-handed adapters."""
    rng = random.Random(seed)
    for _ in range(count):
        requests = rng.choice([1, 2, 7, 64, 256, 300])
        adapters = rng.choice([1, 3, 8, 128])
        weight_indices = [rng.randrange(adapters) for _ in range(requests)]
        tokens = [rng.choice([1, 1, 5, 16, 17, 200]) for _ in range(requests)]
        yield weight_indices, tokens


def grouped_by_adapter(weight_indices: list[int], tokens: list[int]) -> list[int]:
    """The definition: token places, grouped by adapter (lowest first), in order within each."""
    adapter_of = [w for w, n in zip(weight_indices, tokens) for _ in range(n)]
    return sorted(range(len(adapter_of)), key=lambda place: adapter_of[place])


def segments_of(adapter_per_token: list[int], chunk_size: int) -> tuple[list[int], list[int]]:
    """The definition: each run of one adapter cut into pieces of at most ``chunk_size``."""
    adapters, bounds = [], [0]
    for adapter, run in itertools.groupby(adapter_per_token):
        left = len(list(run))
        while left:
            piece = min(left, chunk_size)
            adapters.append(adapter)
            bounds.append(bounds[-1] + piece)
            left -= piece
    return adapters, bounds


@pytest.mark.parametrize("decode", [True, False])
def test_tokens_are_grouped_by_adapter_in_order_within_each(decode):
    for weight_indices, tokens in random_batches(40):
        tokens = [1] * len(tokens) if decode else tokens
        permutation, adapter_per_place = sglang_lora_batch.order_by_adapter(
            weight_indices, None if decode else tokens
        )
        assert permutation.dtype == torch.long and adapter_per_place.dtype == torch.int32
        assert permutation.tolist() == grouped_by_adapter(weight_indices, tokens)
        adapter_of = [w for w, n in zip(weight_indices, tokens) for _ in range(n)]
        assert adapter_per_place.tolist() == [adapter_of[p] for p in permutation.tolist()]


@pytest.mark.parametrize("chunk_size", [1, 16, 32, 128])
def test_each_adapters_run_is_cut_into_chunks(chunk_size):
    for weight_indices, tokens in random_batches(40, seed=chunk_size):
        _, adapter_per_place = sglang_lora_batch.order_by_adapter(weight_indices, tokens)
        adapters, indptr = sglang_lora_batch.adapter_segments(adapter_per_place, chunk_size)
        assert adapters.dtype == torch.int32 and indptr.dtype == torch.int32
        assert (adapters.tolist(), indptr.tolist()) == segments_of(
            adapter_per_place.tolist(), chunk_size
        )


def test_a_batch_of_no_tokens_has_no_segments():
    adapters, indptr = sglang_lora_batch.adapter_segments(torch.tensor([], dtype=torch.int32), 16)
    assert adapters.tolist() == [] and indptr.tolist() == [0]


@pytest.fixture
def an_sglang_that_fits(monkeypatch):
    monkeypatch.setattr(sglang_hooks, "hook_registry_found", lambda: True)
    monkeypatch.setattr(sglang_lora_batch, "hooks_misfit", list)


def test_the_vectorised_indices_are_the_default(clean_environment, an_sglang_that_fits):
    kwargs = engine_kwargs(SGLangSettings(), "/m", {})
    assert sglang_lora_batch.ready(kwargs, SGLangSettings().fast_lora_batch) == (
        False, "LoRA batch indices: vectorised (fast_lora_batch)"
    )  # fmt: skip
    assert os.environ[sglang_lora_batch.FLAG_ENV] == "1"
    assert str(sglang_hooks.PLUGIN_DIR) in sys.path


@pytest.mark.parametrize(
    "settings, said",
    [
        (SGLangSettings(fast_lora_batch=False), "SGLang's own (fast_lora_batch: false)"),
        (SGLangSettings(lora_backend="triton"), "SGLang's own (lora_backend triton)"),
    ],
)
def test_off_or_another_kernel_backend_keeps_sglangs(clean_environment, settings, said):
    os.environ[sglang_lora_batch.FLAG_ENV] = "1"  # an earlier engine of this process had it on
    kwargs = engine_kwargs(settings, "/m", {})
    assert sglang_lora_batch.ready(kwargs, settings.fast_lora_batch) == (
        False, f"LoRA batch indices: {said}"
    )  # fmt: skip
    assert os.environ[sglang_lora_batch.FLAG_ENV] == "0"


def test_the_indices_are_host_tensors_whatever_the_default_device():
    with torch.device("meta"):  # a caller inside a device context, as SGLang's own code is
        permutation, adapter_per_place = sglang_lora_batch.order_by_adapter([1, 0, 1], [2, 1, 1])
        adapters, indptr = sglang_lora_batch.adapter_segments(adapter_per_place, 2)
    assert [t.device.type for t in (permutation, adapters, indptr)] == ["cpu"] * 3
    assert (permutation.tolist(), adapters.tolist(), indptr.tolist()) == (
        [2, 0, 1, 3],
        [0, 1, 1],
        [0, 1, 3, 4],
    )


class CsgmvAsInSGLang:
    """The hooked methods' headers as SGLang 0.5.17's ``chunked_backend.py`` defines them."""

    @staticmethod
    def _get_permutation(seq_weight_indices, forward_batch): ...

    def _get_segments_info(self, weights_reordered, chunk_size): ...

    def _build_lm_head_batch_info(
        self, lm_head_segments, batch_info, chunk_size, expected_tokens
    ): ...


def wrapped_as_sglangs_hook_registry_does(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)

    return wrapper


def test_the_hooks_fit_sglangs_methods_before_and_after_its_registry_wraps_them():
    assert sglang_lora_batch.misfits_of(CsgmvAsInSGLang) == []

    class Wrapped(CsgmvAsInSGLang):
        _get_permutation = staticmethod(
            wrapped_as_sglangs_hook_registry_does(CsgmvAsInSGLang._get_permutation)
        )
        _get_segments_info = wrapped_as_sglangs_hook_registry_does(
            CsgmvAsInSGLang._get_segments_info
        )
        _build_lm_head_batch_info = wrapped_as_sglangs_hook_registry_does(
            CsgmvAsInSGLang._build_lm_head_batch_info
        )

    assert sglang_lora_batch.misfits_of(Wrapped) == []


def test_methods_renamed_inherited_or_of_another_kind_do_not_fit():
    class Another(CsgmvAsInSGLang):
        def _get_permutation(self, seq_weight_indices, forward_batch): ...  # no longer static

        def _get_segments_info(self, weights, chunk_size): ...

    class Inheriting(CsgmvAsInSGLang):
        pass

    assert sglang_lora_batch.misfits_of(Another) == [
        "_get_permutation is not a staticmethod here",
        "_get_segments_info takes ['self', 'weights', 'chunk_size'], the hook "
        "['backend', 'weights_reordered', 'chunk_size']",
        "csgmv defines no _build_lm_head_batch_info",
    ]
    assert len(sglang_lora_batch.misfits_of(Inheriting)) == 3


def test_a_csgmv_backend_the_hooks_do_not_fit_keeps_sglangs(
    clean_environment, an_sglang_that_fits, monkeypatch
):
    misfit = "_get_segments_info takes ['weights', 'chunk_size'], the hook [...]"
    monkeypatch.setattr(sglang_lora_batch, "hooks_misfit", lambda: [misfit])
    kwargs = engine_kwargs(SGLangSettings(), "/m", {})
    assert sglang_lora_batch.ready(kwargs, True) == (True, f"fast_lora_batch not applied: {misfit}")
    assert os.environ[sglang_lora_batch.FLAG_ENV] == "0"


def test_an_allow_list_without_the_plugin_keeps_sglangs(clean_environment, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    warn, note = sglang_lora_batch.ready(engine_kwargs(SGLangSettings(), "/m", {}), True)
    assert warn and "leaves out the plugin 'loraland'" in note
    assert os.environ[sglang_lora_batch.FLAG_ENV] == "0"


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is here")
def test_an_sglang_without_the_hook_registry_keeps_its_own(clean_environment):
    warn, note = sglang_lora_batch.ready(engine_kwargs(SGLangSettings(), "/m", {}), True)
    assert warn and "no plugin hook registry" in note
    assert os.environ[sglang_lora_batch.FLAG_ENV] == "0"


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is here")
def test_the_plugin_reaches_for_sglang_only_where_the_parent_asked(clean_environment):
    os.environ[sglang_lora_batch.FLAG_ENV] = "0"
    assert sglang_lora_batch.register() is None
    os.environ[sglang_lora_batch.FLAG_ENV] = "1"
    with pytest.raises(ModuleNotFoundError, match="sglang"):
        sglang_lora_batch.register()


class Mode:
    """A forward mode as SGLang's ``ForwardMode`` answers for it."""

    def __init__(self, *kinds: str):
        self.kinds = kinds

    def is_decode(self):
        return "decode" in self.kinds

    def is_extend(self):
        return "extend" in self.kinds

    def is_target_verify(self):
        return "target_verify" in self.kinds


def sglangs_permutation_recorded(calls: list):
    def original(seq_weight_indices, forward_batch):
        calls.append((seq_weight_indices, forward_batch))
        return "SGLang's"

    return original


@pytest.mark.parametrize(
    "mode, batch_size",
    [(Mode("extend", "target_verify"), 2), (Mode(), 2), (Mode("decode"), 3)],
    ids=["speculative verification", "another mode", "a batch size the indices do not match"],
)
def test_batches_neither_decode_nor_extend_keep_sglangs_permutation(mode, batch_size):
    calls = []
    batch = SimpleNamespace(forward_mode=mode, batch_size=batch_size, extend_seq_lens_cpu=[4, 4])
    original = sglangs_permutation_recorded(calls)
    assert sglang_lora_batch.permutation_hook(original, [0, 1], batch) == "SGLang's"
    assert calls == [([0, 1], batch)]


def test_one_feature_of_the_plugin_failing_leaves_the_other(monkeypatch, caplog):
    from engine.backends import sglang_radix

    done = []
    monkeypatch.setattr(sglang_radix, "register", lambda: 1 / 0)
    monkeypatch.setattr(sglang_lora_batch, "register", lambda: done.append("lora batch"))
    sglang_hooks.register()
    assert done == ["lora batch"]
    assert "sglang_radix not registered" in caplog.text


def forward_batch(mode: str, tokens: list[int]):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND,
        batch_size=len(tokens),
        extend_seq_lens_cpu=tokens,
        extend_seq_lens=torch.tensor(tokens, dtype=torch.int32, device=DEVICE),
        extend_num_tokens=sum(tokens),
    )


def sglangs_own(name: str):
    from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend

    method = getattr(ChunkedSgmvLoRABackend, name)
    return getattr(method, "__wrapped__", method)  # SGLang's hook wrappers keep the original


@needs_sglang
@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_the_indices_are_sglangs_own(mode):
    from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend

    backend = object.__new__(ChunkedSgmvLoRABackend)  # the two methods read no state
    for weight_indices, tokens in random_batches(40, seed=7):
        tokens = [1] * len(tokens) if mode == "decode" else tokens
        batch = forward_batch(mode, tokens)
        theirs = sglangs_own("_get_permutation")(weight_indices, batch)
        ours = sglang_lora_batch.permutation_hook(None, weight_indices, batch)
        assert same_tensors(ours, theirs)
        for chunk_size in (16, 32, 128):
            theirs = sglangs_own("_get_segments_info")(backend, ours[1], chunk_size)
            mine = sglang_lora_batch.segments_hook(None, backend, ours[1], chunk_size)
            assert same_tensors(mine, theirs)


def same_tensors(ours, theirs) -> bool:
    """Values, dtypes, devices and page-locking alike (SGLang copies pinned ones without a wait)."""

    def looks(t):
        return t.tolist(), t.dtype, t.device, t.is_pinned()

    return [looks(t) for t in ours] == [looks(t) for t in theirs]


@needs_sglang
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_lm_heads_indices_are_sglangs_own():
    from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend
    from sglang.srt.lora.utils import LoRABatchInfo, merge_and_chunk_segments

    backend = object.__new__(ChunkedSgmvLoRABackend)
    backend.device = torch.device("cuda")
    base = LoRABatchInfo(
        use_cuda_graph=True, bs=4, num_segments=2, seg_indptr=None, weight_indices=None,
        lora_ranks=torch.ones(4), scalings=torch.ones(4), max_len=16, seg_lens=None,
        permutation=None,
    )  # fmt: skip
    for weight_indices, tokens in random_batches(20, seed=3):
        segments = merge_and_chunk_segments(weight_indices, tokens, chunk_size=32)
        theirs = sglangs_own("_build_lm_head_batch_info")(backend, segments, base, 32, sum(tokens))
        ours = sglang_lora_batch.lm_head_hook(None, backend, segments, base, 32, sum(tokens))
        torch.cuda.synchronize()
        for field in ("seg_indptr", "weight_indices", "permutation"):
            assert same_tensors([getattr(ours, field)], [getattr(theirs, field)]), field
        for field in ("use_cuda_graph", "num_segments", "max_len", "expected_tokens", "bs"):
            assert getattr(ours, field) == getattr(theirs, field), field


def hooks_applied() -> list[str]:
    """The csgmv methods that call our hooks in this process (SGLang's wrappers hold them)."""
    from sglang.srt.lora.backend.chunked_backend import ChunkedSgmvLoRABackend

    def calls(method, hook) -> bool:
        return any(cell.cell_contents is hook for cell in method.__closure__ or ())

    hooks = sglang_lora_batch.HOOKS.items()
    return [name for name, hook in hooks if calls(getattr(ChunkedSgmvLoRABackend, name), hook)]


def hooks_after_sglangs_plugin_loading() -> list[str]:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # what SGLang's scheduler process does first
    return hooks_applied()


@needs_sglang
def test_the_hooks_fit_this_sglangs_csgmv_backend():
    assert sglang_lora_batch.hooks_misfit() == []


@needs_sglang
def test_sglangs_plugin_loading_applies_the_hooks_in_a_spawned_process(clean_environment):
    sglang_lora_batch.ready(engine_kwargs(SGLangSettings(), "/m", {}), True)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
        applied = child.submit(hooks_after_sglangs_plugin_loading).result(timeout=600)
    assert applied == list(sglang_lora_batch.HOOKS)
