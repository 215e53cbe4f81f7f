"""Every row of a batch with its own LoRA, in one gathered op per layer (for the CPU backend).

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = BatchedLora(model, {"sql": "adapters/sql"}, base_weights="fp16")
    out = lora(input_ids=ids, attention_mask=mask, adapter_index=lora.index_for(["sql", None]))

Each Linear that some adapter targets becomes a ``LoraSlots`` layer holding every adapter's A
and B stacked (slot 0 is the base model: zeros; ranks padded with zeros to the largest) and
computes, for every row, ``base(x) + scale[s] * (x @ A[s].T) @ B[s].T`` with
``s = adapter_index[row]``: the A matrices of the batch's adapters that this layer holds are
stacked (each at its own rank) and multiplied once for every row, each row's hidden masked to
its own adapter's columns, then multiplied once by their B matrices side by side: two matmuls a
layer for a whole mixed batch, rows of the base or of an adapter not targeting this layer
masked out. (Two ``bmm`` over slots gathered per row and padded to the largest rank made every
row pay for the largest adapter: with a rank-32 all-linear adapter among q/v rank-8 ones, mixed
batches ran at 0.71x a one-adapter batch.) A batch whose rows all use one adapter takes the
same two matmuls without the mask. The stacked weights are contiguous copies, kept for the last
few sets of adapters of each layer.

``base_weights`` (the LoRA terms always stay fp32):

- ``"fp32"`` — exact mode: the base untouched; the same greedy tokens as peft.
- ``"fp16"`` — fast mode: the base Linear layers (``lm_head`` included) stored in fp16 and
  multiplied by fbgemm with fp32 activations and accumulation: half the weight memory to stream
  per decode step. Lossless for SmolLM2 (its weights are bf16 values, which fp16 holds exactly);
  a few 1e-5 of logit difference from the summation order.
- ``"int8"`` — int8 per-channel weights with dynamic int8 activations (fbgemm). Lossy on SmolLM2:
  activations are quantized per tensor and its outlier channels cost accuracy (about half the
  greedy tokens of a prompt change); a row's logits also depend on its batch mates.
- ``"bf16"`` — the whole base in bfloat16 (slow on CPUs without native bf16, e.g. AVX2 only).

Adapters can be added and removed while batches run (a slot is cleared and reused). What it
cannot apply exactly is refused with ``UnsupportedAdapterError``: non-LoRA peft types, DoRA,
trained biases, ``modules_to_save``, rank/alpha patterns, targets that are not Linear layers.
Measured in ``lab/cpu_serving_options.py``; tested in ``tests/test_lora_batched.py``.
"""

from __future__ import annotations

import collections
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..interface import AdapterConflictError, AdapterLoadError

BaseWeights = Literal["fp32", "fp16", "int8", "bf16"]
BASE_WEIGHTS = ("fp32", "fp16", "int8", "bf16")
BASE_SLOT = 0
BASE_NAMES = (None, "__base__")
STACKED_SETS = 8
"""Sets of adapters per layer whose weights ``LoraSlots.side_by_side`` keeps stacked."""
PEFT_PREFIX = "base_model.model."

# peft config fields that change what a LoRA computes; each must be unset (falsy) here.
UNSUPPORTED_FIELDS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)


class UnsupportedAdapterError(AdapterLoadError):
    """The adapter uses a peft feature the batched LoRA op cannot apply exactly."""


@dataclass
class LoraWeights:
    """One adapter from disk: its scale and, per target module, A ``[r, in]`` and B ``[out, r]``."""

    scale: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())


def read_lora(path: str | Path) -> LoraWeights:
    """Read a peft LoRA directory, refusing what the batched op cannot apply."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    check_config(config, path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    pairs = pair_tensors(tensors, path)
    rank = int(config["r"])
    for module, (a, b) in pairs.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise UnsupportedAdapterError(
                f"{path}: {module} has rank {a.shape[0]}, config r={rank}"
            )
    divisor = math.sqrt(rank) if config.get("use_rslora") else rank
    return LoraWeights(float(config["lora_alpha"]) / divisor, pairs)


def check_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"{path}: bias={config['bias']!r} (trained biases)")
    for name in UNSUPPORTED_FIELDS:
        if config.get(name):
            raise UnsupportedAdapterError(
                f"{path}: {name}={config[name]!r} is not supported by the batched LoRA op"
            )


def pair_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple]:
    """``{module path: (A, B)}`` from peft's keys ``base_model.model.<module>.lora_A.weight``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise UnsupportedAdapterError(f"{path}: tensor {key!r} is not a LoRA A/B weight")
        found.setdefault(module, {})[kind[0]] = tensor.float()
    missing = [m for m, ab in found.items() if set(ab) != {"A", "B"}]
    if missing or not found:
        raise UnsupportedAdapterError(f"{path}: no complete A/B pair for {missing or 'any module'}")
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


@dataclass
class RowAdapters:
    """The adapter slot of every row of the forward pass in flight, shared by all layers."""

    index: torch.Tensor | None = None
    present: frozenset[int] = field(default_factory=frozenset)
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    """Per layout of stacked columns, this pass's ``column_mask`` (layers share them)."""

    def set(self, index: torch.Tensor | None) -> None:
        self.index = index
        self.present = frozenset(index.tolist()) if index is not None else frozenset()
        self.masks = {}

    def column_mask(self, layout: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """``(rows, 1, columns)``: 1 where a column of ``layout`` (``(slot, rank)`` blocks, in
        order) belongs to the row's own slot, else 0."""
        mask = self.masks.get(layout)
        if mask is None:
            owner = torch.cat([self.index.new_full((rank,), slot) for slot, rank in layout])
            mask = (self.index.view(-1, 1) == owner.view(1, -1)).unsqueeze(1).float()
            self.masks[layout] = mask
        return mask


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a plain or dynamically quantized Linear; ``None`` for anything else."""
    quantized = torch.ao.nn.quantized.dynamic.Linear
    if isinstance(module, (nn.Linear, quantized)):
        return module.in_features, module.out_features
    return None


class LoraSlots(nn.Module):
    """A base Linear plus every adapter's LoRA, stacked by slot and gathered per row."""

    def __init__(self, base: nn.Module, rows: RowAdapters, slots: int, device: torch.device):
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_features, self.out_features = linear_features(base)
        self.register_buffer("a", torch.zeros(slots, 1, self.in_features, device=device))
        self.register_buffer("b", torch.zeros(slots, self.out_features, 1, device=device))
        self.register_buffer("scale", torch.zeros(slots, device=device))
        self.filled: set[int] = set()
        self.ranks: dict[int, int] = {}
        """Each filled slot's own rank (the stacks are padded to the largest)."""
        self.stacked: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        """``side_by_side``'s weights for the last few sets of slots (cleared on any change)."""

    def resize(self, slots: int, rank: int) -> None:
        """Grow to at least ``slots`` slots and ``rank`` columns, padding with zeros."""
        old_slots, old_rank = self.a.shape[0], self.a.shape[1]
        slots, rank = max(slots, old_slots), max(rank, old_rank)
        if (slots, rank) == (old_slots, old_rank):
            return
        a = self.a.new_zeros(slots, rank, self.in_features)
        b = self.b.new_zeros(slots, self.out_features, rank)
        a[:old_slots, :old_rank] = self.a
        b[:old_slots, :, :old_rank] = self.b
        self.a, self.b = a, b
        self.scale = torch.cat([self.scale, self.scale.new_zeros(slots - old_slots)])
        self.stacked.clear()

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.resize(slot + 1, a.shape[0])
        self.clear(slot)
        a, b = a.to(self.a.device), b.to(self.b.device)
        self.a[slot, : a.shape[0]] = a
        self.b[slot, :, : b.shape[1]] = b
        self.scale[slot] = scale
        self.filled.add(slot)
        self.ranks[slot] = a.shape[0]
        self.stacked.clear()

    def clear(self, slot: int) -> None:
        self.a[slot] = 0
        self.b[slot] = 0
        self.scale[slot] = 0
        self.filled.discard(slot)
        self.ranks.pop(slot, None)
        self.stacked.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.rows.present & self.filled
        if not slots:
            return y
        lora_x = x if x.dtype == self.a.dtype else x.to(self.a.dtype)
        a, b, layout = self.side_by_side(tuple(sorted(slots)))
        hidden = F.linear(lora_x, a)
        if len(self.rows.present) > 1:
            hidden = hidden * self.rows.column_mask(layout)
        return y + F.linear(hidden, b).to(y.dtype)

    def side_by_side(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The ``slots``' A matrices one under the other and their B matrices (scaled) side by
        side, each at its own rank, with their ``(slot, rank)`` layout: one matmul each for a
        whole mixed batch, every row masked to its own adapter's columns in between."""
        if slots in self.stacked:
            self.stacked.move_to_end(slots)
            return self.stacked[slots]
        layout = tuple((slot, self.ranks[slot]) for slot in slots)
        a = torch.cat([self.a[slot, :rank] for slot, rank in layout])
        b = torch.cat([self.b[slot, :, :rank] * self.scale[slot] for slot, rank in layout], dim=1)
        self.stacked[slots] = (a, b, layout)
        if len(self.stacked) > STACKED_SETS:
            self.stacked.popitem(last=False)
        return self.stacked[slots]


def quantize_base(model: nn.Module, base_weights: BaseWeights) -> nn.Module:
    """Store the base's Linear layers in fp16 or int8 (or the whole model in bf16), in place."""
    if base_weights == "bf16":
        return model.to(torch.bfloat16)
    if base_weights in QCONFIGS:
        from torch.ao.quantization import quantize_dynamic

        if base_weights == "fp16":
            check_fits_fp16(model)
        qconfig, dtype = QCONFIGS[base_weights]()
        with warnings.catch_warnings():  # torch.ao eager quantization is deprecated, still fast
            warnings.simplefilter("ignore")
            quantize_dynamic(model, {nn.Linear: qconfig}, dtype=dtype, inplace=True)
    elif base_weights != "fp32":
        raise ValueError(f"base_weights must be one of {BASE_WEIGHTS}, got {base_weights!r}")
    return model


def check_fits_fp16(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Linear)
            and module.weight.abs().max() > torch.finfo(torch.float16).max
        ):
            raise ValueError(f"{name} has weights beyond the fp16 range: use fp32 or int8")


def fp16_qconfig():
    from torch.ao.quantization import float16_dynamic_qconfig

    return float16_dynamic_qconfig, torch.float16


def int8_qconfig():
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig, torch.qint8


QCONFIGS = {"fp16": fp16_qconfig, "int8": int8_qconfig}


class BatchedLora(nn.Module):
    """A transformers causal LM whose forward applies a per-row LoRA, named by slot index."""

    def __init__(
        self,
        model: nn.Module,
        adapters: dict[str, str | Path] | None = None,
        base_weights: BaseWeights = "fp32",
    ) -> None:
        super().__init__()
        self.model = quantize_base(model.eval(), base_weights)
        self.base_weights = base_weights
        self.device = model.get_input_embeddings().weight.device
        self.rows = RowAdapters()
        self.slots: dict[str, int] = {}
        self.capacity = 1  # slots in every LoraSlots layer (slot 0: the base)
        self.layers: dict[str, LoraSlots] = {}
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    # ----- adapters -------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return sorted(self.slots)

    def load_adapter(self, name: str, path: str | Path) -> int:
        """Add an adapter in a free slot (reusing a removed one's) and return the slot."""
        if name in self.slots or name in BASE_NAMES:
            raise AdapterConflictError(f"adapter '{name}' is already loaded")
        weights = read_lora(path)
        targets = {module: self.target(module, path) for module in weights.pairs}
        slot = self.free_slot()
        self.capacity = max(self.capacity, slot + 1)
        for layer in self.layers.values():
            layer.resize(self.capacity, 1)
        for module, (a, b) in weights.pairs.items():
            targets[module].put(slot, a, b, weights.scale)
        self.slots[name] = slot
        return slot

    def delete_adapter(self, name: str) -> None:
        """Clear its slot everywhere; rows still naming that slot then get the base model."""
        slot = self.slots.pop(name)
        for layer in self.layers.values():
            layer.clear(slot)

    def free_slot(self) -> int:
        used = set(self.slots.values()) | {BASE_SLOT}
        return min(set(range(len(used) + 1)) - used)

    def target(self, module: str, path: str | Path) -> LoraSlots:
        """The ``LoraSlots`` layer at ``module``, wrapping the base Linear there on first use."""
        if module in self.layers:
            return self.layers[module]
        try:
            base = self.model.get_submodule(module)
        except AttributeError as err:
            raise UnsupportedAdapterError(f"{path}: the base has no module {module!r}") from err
        if linear_features(base) is None:
            raise UnsupportedAdapterError(
                f"{path}: target {module!r} is a {type(base).__name__}, not a Linear layer"
            )
        layer = LoraSlots(base, self.rows, self.capacity, self.device)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent), child, layer)
        self.layers[module] = layer
        return layer

    def index_for(self, names: list[str | None]) -> torch.Tensor:
        """Slot index per row; ``None`` or ``"__base__"`` is the base model."""
        unknown = [n for n in names if n not in BASE_NAMES and n not in self.slots]
        if unknown:
            raise KeyError(f"adapters not loaded: {sorted(set(unknown))}")
        slots = [BASE_SLOT if n in BASE_NAMES else self.slots[n] for n in names]
        return torch.tensor(slots, device=self.device)

    # ----- forward --------------------------------------------------------------------------

    def forward(self, adapter_index: torch.Tensor | None = None, **kwargs):
        """The wrapped model's forward; row ``i`` uses slot ``adapter_index[i]`` (None: base)."""
        self.rows.set(adapter_index)
        try:
            return self.model(**kwargs)
        finally:
            self.rows.set(None)
