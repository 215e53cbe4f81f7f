"""Tuned block sizes for SGLang's csgmv LoRA kernels: one base model, one GPU, once.

    python -m engine.lora_kernels --config adapters.yaml          # ~1 min on the GPU serving it
    python -m engine.lora_kernels --config adapters.yaml --dry-run  # the plan, any machine

SGLang 0.5.17 reads the block sizes of its multi-LoRA kernels (shrink: x·A, expand: ·B) from
``$SGLANG_LORA_CONFIG_DIR/csgmv_configs/triton_<version>/lora_{shrink,expand},K=..,R=..,S=..,
device=<GPU>.json``, keyed by chunk size; it ships files for rank 64 only, so other ranks run on
hard-coded defaults (shrink BLOCK_N 16 / BLOCK_K 256, expand BLOCK_N 64 / BLOCK_K 16). With CUDA
graphs a decode step launches one program row per possible segment (the batch size), so at 256
streams the expand kernel was the largest kernel of the 7B decode step
(``results/serving/h200-7b-decode-profile``).

For each LoRA projection the adapters' ``target_modules`` touch (qkv, o, gate_up, down; shapes
from the base model's config.json) and each kernel, this times SGLang's own kernel under every
config of a small grid, on batches as the engine builds them (decode of 256 and 128 tokens over
``--slots`` adapters and 256 base rows, padded as a CUDA graph pads them; a prefill of 4 × 128
tokens), each as a CUDA graph of ``--calls`` launches on their own weights; checks each config's
output against the default's; re-times the best ``--finalists`` against the default in
alternation; keeps the least median summed time. It writes SGLang's files into ``--configs``
(default ``$LORALAND_CACHE/lora-kernels``, SGLang's shipped files copied beside, as the variable
replaces its folder) and a report (``lora-kernels.md/json/png``) beside them or into ``--out``.

The SGLang backend uses that folder when ``engine.sglang.lora_kernel_configs`` is ``auto`` (the
default) and it exists; SGLang itself picks the file of the GPU and shape it runs, and keeps its
defaults where none matches. On the H200 for the Mistral-7B shape, rank 8 on q/v: the kernels
0.31–0.71× the defaults' time, and the engine at 256 streams × 128 adapters faster in every
figure of 3 alternated pairs (``results/serving/h200-7b-lora-kernels-tuned``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
"""``lora_kernel_configs``' default: the cache's folder when it exists, else SGLang's own."""
ENV = "SGLANG_LORA_CONFIG_DIR"

GROUP_OF_TARGET = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "down_proj": "down",
}
DEFAULTS = {  # SGLang 0.5.17's lora_tuning_config: used when no file matches
    "shrink": {"BLOCK_N": 16, "BLOCK_K": 256},
    "expand": {"BLOCK_N": 64, "BLOCK_K": 16},
}


def cache_folder() -> Path:
    from .base_model import cache_root

    return cache_root() / "lora-kernels"


def config_folder(setting: str | None) -> Path | None:
    """The folder ``engine.sglang.lora_kernel_configs`` names: ``auto`` → the cache's, if tuned
    there; a path → that path, which must hold SGLang's layout; ``None`` → SGLang's own files."""
    if setting is None:
        return None
    if setting == AUTO:
        folder = cache_folder()
        return folder if (folder / "csgmv_configs").is_dir() else None
    folder = Path(setting).expanduser()
    if not (folder / "csgmv_configs").is_dir():
        raise ValueError(
            f"engine.sglang.lora_kernel_configs: {folder} has no csgmv_configs/ folder "
            "(write one with: python -m engine.lora_kernels --config adapters.yaml --configs DIR)"
        )
    return folder


def kernels_note(setting: str | None, folder: Path | None) -> tuple[bool, str]:
    """What the SGLang backend logs at start: (a warning?, the line). ``auto`` without a tuned
    folder is the one case worth a warning: a fresh GPU machine serves on SGLang's defaults
    until the tuner runs once, which is easy to miss."""
    if folder is not None:
        return False, f"csgmv LoRA kernels: block sizes from {folder}"
    if setting == AUTO:
        return True, (
            "csgmv LoRA kernels: SGLang's default block sizes (it ships tuned ones for rank 64 "
            f"only; none in {cache_folder()} yet). Tune them once for this GPU and base model, "
            "about a minute: python -m engine.lora_kernels --config adapters.yaml (docs/gpu.md)"
        )
    return False, "csgmv LoRA kernels: SGLang's own block sizes (lora_kernel_configs: null)"


SET_HERE = f"_LORALAND_SET_{ENV}"
"""Marks the variable as set by ``use_tuned_kernels`` (not the user's): a later engine of the
same process sets it anew."""


def use_tuned_kernels(setting: str | None, environ=os.environ) -> Path | None:
    """Point SGLang at the tuned folder before it starts (its scheduler inherits the variable);
    a variable the user set wins. Returns the folder SGLang will read, if not its own."""
    if environ.get(ENV) and environ.get(SET_HERE) != environ[ENV]:
        return Path(environ[ENV])
    environ.pop(ENV, None)
    environ.pop(SET_HERE, None)
    folder = config_folder(setting)
    if folder is not None:
        environ[ENV] = environ[SET_HERE] = str(folder)
    return folder


@dataclass(frozen=True)
class Group:
    """One fused LoRA projection as SGLang's csgmv backend runs it."""

    name: str
    slices: int  # S: 3 for qkv, 2 for gate_up, 1 otherwise
    input_dim: int  # shrink's K
    slice_offsets: tuple[int, ...]  # expand's output columns of each slice

    @property
    def output_dim(self) -> int:  # expand's K in the config file name
        return self.slice_offsets[-1]

    @property
    def max_slice(self) -> int:
        return max(b - a for a, b in itertools.pairwise(self.slice_offsets))


@dataclass(frozen=True)
class Case:
    """One batch the kernels see: token rows, their adapter slots, graph-padded or eager."""

    name: str
    tokens_per_request: tuple[int, ...]
    slots: tuple[int, ...]  # adapter slot of each request
    graph: bool  # True: decode under a CUDA graph (segment grid = the batch size)


def groups_of(model_config: dict, targets: list[str]) -> list[Group]:
    hidden = model_config["hidden_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    inter = model_config["intermediate_size"]
    every = {
        "qkv": Group("qkv", 3, hidden, (0, q, q + kv, q + 2 * kv)),
        "o": Group("o", 1, q, (0, hidden)),
        "gate_up": Group("gate_up", 2, hidden, (0, inter, 2 * inter)),
        "down": Group("down", 1, inter, (0, hidden)),
    }
    unknown = sorted(set(targets) - set(GROUP_OF_TARGET))
    if unknown:
        raise SystemExit(f"no csgmv group for target modules {unknown}")
    wanted = {GROUP_OF_TARGET[t] for t in targets}
    return [g for name, g in every.items() if name in wanted]


def cases_of(slots: int, seed: int = 0) -> list[Case]:
    import random

    rng = random.Random(seed)
    spread = lambda n: tuple(rng.randrange(1, slots + 1) for _ in range(n))  # noqa: E731
    return [
        Case("decode-256-adapters", (1,) * 256, spread(256), graph=True),
        Case("decode-128-adapters", (1,) * 128, spread(128), graph=True),
        Case("decode-256-base", (1,) * 256, (0,) * 256, graph=True),
        Case("prefill-4x128-adapters", (128,) * 4, spread(4), graph=False),
    ]


def segments(case: Case, chunk: int) -> tuple[list[int], list[int], list[int]]:
    """(permutation, segment start offsets with the end, segment slots) as SGLang's csgmv backend
    builds them: token rows grouped by slot (stable), each run cut into chunks of ≤ chunk rows."""
    rows = [s for s, n in zip(case.slots, case.tokens_per_request, strict=True) for _ in range(n)]
    permutation = sorted(range(len(rows)), key=lambda i: rows[i])
    indptr, seg_slots = [0], []
    start = 0
    while start < len(permutation):
        slot = rows[permutation[start]]
        end = start
        while end < len(permutation) and rows[permutation[end]] == slot and end - start < chunk:
            end += 1
        indptr.append(end)
        seg_slots.append(slot)
        start = end
    return permutation, indptr, seg_slots


def lora_rows(case: Case) -> list[int]:
    """Token rows with an adapter: the only rows shrink writes (base rows keep what was there)."""
    rows = [s for s, n in zip(case.slots, case.tokens_per_request, strict=True) for _ in range(n)]
    return [i for i, slot in enumerate(rows) if slot != 0]


def config_grid(kernel: str, rank: int, slices: int) -> list[dict]:
    warps, stages = (2, 4, 8), (1, 2, 3)
    if kernel == "expand":
        blocks_n = (32, 64, 128, 256)
        blocks_k = tuple(k for k in (16, 32, 64) if k <= max(16, rank))
        if rank <= min(blocks_k):
            stages = (3,)  # one K step: nothing to pipeline
    else:
        blocks_n = tuple(n for n in (16, 32, 64) if n <= max(16, 2 * rank * slices))
        blocks_k = (128, 256, 512)
    return [
        {"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        for n, k, w, s in itertools.product(blocks_n, blocks_k, warps, stages)
    ]


def file_name(kernel: str, group: Group, rank: int, device: str) -> str:
    k = group.input_dim if kernel == "shrink" else group.output_dim
    return f"lora_{kernel},K={k},R={rank},S={group.slices},device={device.replace(' ', '_')}.json"


def pick(timings: dict[str, dict[str, float | None]]) -> str | None:
    """The config (key) with the least summed time over every case; None if none ran them all."""
    complete = {k: sum(v.values()) for k, v in timings.items() if None not in v.values()}
    return min(complete, key=complete.get) if complete else None


def config_key(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


# --- the GPU part ---------------------------------------------------------------------------


class KernelBench:
    """Times SGLang's csgmv shrink/expand under a given config, on batches as the engine builds.

    Each of the `copies` launches of a timing graph reads its own weights (a layer each, as in
    the engine), so no config is timed on weights the L2 cache still holds from the launch before.
    """

    def __init__(self, group: Group, rank: int, args):
        import torch

        self.torch, self.group, self.rank = torch, group, rank
        self.chunk, self.graph_bs, copies = args.chunk, args.graph_bs, args.calls
        self.dtype = getattr(torch, args.dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        n_slots = args.slots + 1  # slot 0: the base, rank 0
        a_shape = (n_slots, group.slices * rank, group.input_dim)
        b_shape = (n_slots, group.output_dim, rank)
        scale = group.input_dim**-0.5
        self.lora_a = [
            (torch.randn(a_shape, generator=g, device="cuda") * scale).to(self.dtype)
            for _ in range(copies)
        ]
        self.lora_b = [
            (torch.randn(b_shape, generator=g, device="cuda") * 0.1).to(self.dtype)
            for _ in range(copies)
        ]
        self.ranks = torch.full((n_slots,), rank, dtype=torch.int32, device="cuda")
        self.ranks[0] = 0
        self.scalings = torch.full((n_slots,), 2.0, dtype=torch.float32, device="cuda")
        self.offsets = torch.tensor(group.slice_offsets, dtype=torch.int32, device="cuda")

    def batch(self, case: Case):
        from sglang.srt.lora.utils import LoRABatchInfo

        torch = self.torch
        permutation, indptr, seg_slots = segments(case, self.chunk)
        tokens = len(permutation)
        # a decode graph's segment grid is sized once, for the largest captured batch
        grid_rows = self.graph_bs if case.graph else len(seg_slots)
        assert len(seg_slots) <= grid_rows, f"{case.name}: more segments than --graph-bs"
        weight_indices = seg_slots + [0] * (grid_rows - len(seg_slots))
        indptr = indptr + [indptr[-1]] * (grid_rows + 1 - len(indptr))
        on_gpu = lambda v: torch.tensor(v, dtype=torch.int32, device="cuda")  # noqa: E731
        info = LoRABatchInfo(
            use_cuda_graph=case.graph,
            bs=len(case.tokens_per_request),
            num_segments=len(seg_slots),
            seg_indptr=on_gpu(indptr),
            weight_indices=on_gpu(weight_indices),
            lora_ranks=self.ranks,
            scalings=self.scalings,
            max_len=self.chunk,
            seg_lens=None,
            permutation=on_gpu(permutation),
        )
        x = torch.randn(tokens, self.group.input_dim, device="cuda").to(self.dtype)
        return info, x

    def call(self, kernel: str, config: dict, info, x, out=None, copy: int = 0):
        import sglang.kernels.ops.gemm.chunked_sgmv_expand as expand_mod
        import sglang.kernels.ops.gemm.chunked_sgmv_shrink as shrink_mod

        if kernel == "shrink":
            shrink_mod.get_lora_shrink_config = lambda **_: dict(config)
            return shrink_mod.chunked_sgmv_lora_shrink_forward(
                x=x, weights=self.lora_a[copy], batch_info=info, num_slices=self.group.slices
            )
        expand_mod.get_lora_expand_config = lambda **_: dict(config)
        return expand_mod.chunked_sgmv_lora_expand_forward(
            x=x,
            weights=self.lora_b[copy],
            batch_info=info,
            slice_offsets=self.offsets,
            max_slice_size=self.group.max_slice,
            base_output=out,
        )

    def inputs(self, kernel: str, info, x):
        """The kernel's input: x for shrink; for expand, the shrink's output (default config)."""
        if kernel == "shrink":
            return x
        return self.call("shrink", DEFAULTS["shrink"], info, x).contiguous()

    def result(self, kernel: str, config: dict, info, x):
        torch = self.torch
        inp = self.inputs(kernel, info, x)
        if kernel == "shrink":
            return self.call(kernel, config, info, inp)
        out = torch.zeros(x.shape[0], self.group.output_dim, device="cuda", dtype=self.dtype)
        return self.call(kernel, config, info, inp, out)

    def time_us(self, kernel: str, config: dict, info, x, replays: int) -> float:
        """µs per launch: one launch per weight copy captured in a CUDA graph, replayed."""
        torch = self.torch
        inp = self.inputs(kernel, info, x)
        out = torch.zeros(x.shape[0], self.group.output_dim, device="cuda", dtype=self.dtype)
        self.call(kernel, config, info, inp, out)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for copy in range(len(self.lora_a)):
                self.call(kernel, config, info, inp, out, copy)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (len(self.lora_a) * replays)

    def recover(self) -> None:
        """After a failed config: back on the default stream; a sticky CUDA error raises here."""
        torch = self.torch
        torch.cuda.set_stream(torch.cuda.default_stream())
        torch.cuda.synchronize()


def same_output(kernel: str, got, want, rows) -> bool:
    """Shrink writes adapter rows only (the rest stay as allocated); expand leaves base rows 0."""
    import torch

    if kernel == "shrink":
        got, want = got[rows], want[rows]
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))


def time_config(bench: KernelBench, kernel: str, config: dict, batches: dict, reference: dict,
                rows: dict, replays: int) -> dict[str, float | None]:  # fmt: skip
    timed: dict[str, float | None] = {}
    for name, (info, x) in batches.items():
        try:
            same = same_output(kernel, bench.result(kernel, config, info, x), reference[name],
                               rows[name])  # fmt: skip
            timed[name] = bench.time_us(kernel, config, info, x, replays) if same else None
            if not same:
                print(f"    {config_key(config)} {name}: output differs from the default's")
        except Exception as error:  # out of resources, an invalid tile: not a candidate
            print(f"    {config_key(config)} {name}: {type(error).__name__}: "
                  f"{str(error)[:120]}", flush=True)  # fmt: skip
            timed[name] = None
            bench.recover()
    return timed


def tune_group(bench: KernelBench, kernel: str, cases: list[Case], args) -> dict:
    """Every config of the grid once, then the `--finalists` best and the default again, in
    alternation, `--rounds` times: the pick is the least median summed time."""
    import torch

    batches = {c.name: bench.batch(c) for c in cases}
    reference = {n: bench.result(kernel, DEFAULTS[kernel], *b) for n, b in batches.items()}
    rows = {c.name: torch.tensor(lora_rows(c), dtype=torch.long, device="cuda") for c in cases}
    default = config_key(DEFAULTS[kernel])
    configs = {default: DEFAULTS[kernel]}
    configs |= {config_key(c): c for c in config_grid(kernel, bench.rank, bench.group.slices)}
    screen: dict[str, dict[str, float | None]] = {}
    t0 = time.perf_counter()
    for i, (key, config) in enumerate(configs.items()):
        screen[key] = time_config(bench, kernel, config, batches, reference, rows, args.replays)
        if i % 10 == 0 or i == len(configs) - 1:
            print(f"  {bench.group.name} {kernel}: {i + 1}/{len(configs)} configs, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    ranked = sorted((k for k in screen if None not in screen[k].values()),
                    key=lambda k: sum(screen[k].values()))  # fmt: skip
    finalists = list(dict.fromkeys([default, *ranked[: args.finalists]]))
    rounds: dict[str, list[dict[str, float | None]]] = {k: [] for k in finalists}
    for _ in range(args.rounds):
        for key in finalists:
            rounds[key].append(
                time_config(bench, kernel, configs[key], batches, reference, rows, args.replays)
            )
    timings = {k: median_row(v) for k, v in rounds.items()}
    return {"timings": timings, "screen": screen, "configs": configs, "best": pick(timings),
            "default": default}  # fmt: skip


def median_row(rounds: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each case's median over the rounds (None if any round failed it)."""
    out = {}
    for case in rounds[0]:
        values = [r[case] for r in rounds]
        out[case] = None if None in values else statistics.median(values)
    return out


def sglang_config_root():
    import sglang.kernels.ops.gemm.lora_tuning_config as cfg

    return Path(cfg.__file__).parent / "csgmv_configs"


def write_configs(
    configs_dir: Path, tuned: list[dict], triton_version: str, shipped: Path | None
) -> list[Path]:
    """SGLang's layout under configs_dir, its shipped files first (the variable replaces it)."""
    root = configs_dir / "csgmv_configs"
    if shipped is not None and shipped.is_dir() and not root.exists():
        shutil.copytree(shipped, root)
    folder = root / f"triton_{triton_version.replace('.', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in tuned:
        if entry["best"] is None:
            continue
        path = folder / entry["file"]
        best = entry["configs"][entry["best"]]
        path.write_text(json.dumps({str(entry["chunk"]): best}, indent=2))
        written.append(path)
    return written


def report_rows(tuned: list[dict]) -> list[dict]:
    rows = []
    for entry in tuned:
        best, default = entry["best"], entry["default"]
        for case, default_us in entry["timings"][default].items():
            best_us = entry["timings"][best][case] if best else None
            ratio = best_us / default_us if best_us and default_us else None
            rows.append({"group": entry["group"], "kernel": entry["kernel"], "case": case,
                         "default_us": default_us, "tuned_us": best_us, "tuned_config": best,
                         "ratio": ratio})  # fmt: skip
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    fmt = lambda v, spec=".1f": "—" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# csgmv LoRA kernels: SGLang's default block sizes against the tuned ones",
        "",
        f"`{meta['command']}`",
        "",
        f"GPU {meta['device']}, SGLang {meta['sglang']}, Triton {meta['triton']}, rank "
        f"{meta['rank']}, chunk {meta['chunk']}, {meta['slots']} adapter slots. µs per launch: "
        f"{meta['calls']} launches in one CUDA graph, replayed {meta['replays']} times. tuned ÷ "
        "default is within one run on one GPU.",
        "",
        "| group | kernel | case | default µs | tuned µs | tuned ÷ default | tuned config |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['group']} | {r['kernel']} | {r['case']} | {fmt(r['default_us'])} | "
                     f"{fmt(r['tuned_us'])} | {fmt(r['ratio'], '.2f')} | "
                     f"`{r['tuned_config']}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["default_us"] and r["tuned_us"]]
    if not shown:
        return
    labels = [f"{r['group']} {r['kernel']}\n{r['case']}" for r in shown]
    xs = range(len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(shown)), 4))
    ax.bar([x - 0.2 for x in xs], [r["default_us"] for r in shown], 0.4, label="SGLang default")
    ax.bar([x + 0.2 for x in xs], [r["tuned_us"] for r in shown], 0.4, label="tuned")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("µs per launch")
    ax.set_title("csgmv LoRA kernels, one layer's launch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_shape(config_path: str) -> tuple[dict, int, list[str], int]:
    """The base model's config.json and, as the engine will run: the max LoRA rank (the setting,
    else the adapters' largest), the target modules, the adapter slots (max_loras_per_batch)."""
    from transformers import AutoConfig

    from .base_model import resolve_base
    from .registry import RegistryError, load_registry

    try:
        registry = load_registry(config_path)
    except RegistryError as error:
        raise SystemExit(str(error)) from None
    settings = registry.engine.sglang
    model_config = AutoConfig.from_pretrained(resolve_base(registry.base.model)).to_dict()
    ranks, targets = [], set()
    for adapter in registry.adapters:
        peft = json.loads((Path(adapter.path) / "adapter_config.json").read_text())
        ranks.append(int(peft["r"]))
        listed = peft["target_modules"]
        targets |= {listed} if isinstance(listed, str) else set(listed)
    rank = settings.max_lora_rank or max(ranks, default=0)
    targets = set(settings.lora_target_modules or targets)
    if targets & {"all", "all-linear"}:
        targets = set(GROUP_OF_TARGET)
    if not rank or not targets:
        raise SystemExit(f"{config_path}: no adapters, and no max_lora_rank/lora_target_modules")
    return model_config, rank, sorted(targets), settings.max_loras_per_batch


def plan(args) -> tuple[list[Group], int, list[Case]]:
    model_config, rank, targets, slots = model_shape(args.config)
    rank = args.rank or rank
    args.slots = args.slots or slots
    groups = groups_of(model_config, targets)
    print(f"rank {rank}, targets {targets}, {args.slots} adapter slots: groups "
          f"{[g.name for g in groups]}", flush=True)  # fmt: skip
    return groups, rank, cases_of(args.slots)


def run(args) -> None:
    os.environ["SGLANG_USE_CUSTOM_TRITON_KERNEL_CACHE"] = "0"  # compiled per config, not per shape
    try:
        import sglang
        import torch
    except ImportError as error:
        raise SystemExit(f"{error}: tuning runs SGLang's kernels on a GPU (requirements/gpu.txt); "
                         "--dry-run shows the plan anywhere") from None  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the block sizes are tuned on the GPU that will serve")
    import sglang.kernels.ops.gemm.chunked_sgmv_shrink as shrink_mod
    import triton

    if not isinstance(shrink_mod._chunked_lora_shrink_kernel, triton.runtime.JITFunction):
        raise SystemExit("SGLang's kernel cache would reuse one binary for every config")

    groups, rank, cases = plan(args)
    device = torch.cuda.get_device_name(0)
    meta = {"command": "python -m engine.lora_kernels " + " ".join(sys.argv[1:]),
            "device": device, "sglang": sglang.__version__, "triton": triton.__version__,
            "rank": rank, "chunk": args.chunk, "slots": args.slots, "calls": args.calls,
            "replays": args.replays, "graph_bs": args.graph_bs, "rounds": args.rounds,
            "finalists": args.finalists}  # fmt: skip
    tuned, files = [], set()
    for group in groups:
        bench = KernelBench(group, rank, args)
        for kernel in ("shrink", "expand"):
            name = file_name(kernel, group, rank, device)
            if name in files:  # o and down share their expand's shape
                continue
            files.add(name)
            entry = tune_group(bench, kernel, cases, args)
            entry |= {"group": group.name, "kernel": kernel, "chunk": args.chunk, "file": name}
            tuned.append(entry)
            save(tuned, meta, args)  # what is done survives a timeout
        del bench
        torch.cuda.empty_cache()


def save(tuned: list[dict], meta: dict, args) -> None:
    import triton

    written = write_configs(Path(args.configs), tuned, triton.__version__, sglang_config_root())
    meta = meta | {"written": [str(p) for p in written]}
    rows = report_rows(tuned)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "rows": rows, "tuned": tuned}
    (out / "lora-kernels.json").write_text(json.dumps(report, indent=1))
    (out / "lora-kernels.md").write_text(markdown(rows, meta))
    plot(rows, out / "lora-kernels.png")
    print((out / "lora-kernels.md").read_text(), flush=True)
    print("written:", *written, sep="\n  ", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="adapters.yaml: base model and adapters")
    parser.add_argument("--configs", type=Path, default=None,
                        help="the folder to write (default $LORALAND_CACHE/lora-kernels, which "
                        "engine.sglang.lora_kernel_configs: auto reads)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="the report's folder (default: --configs)")
    parser.add_argument("--rank", type=int, help="max LoRA rank (default: the adapters' largest)")
    parser.add_argument("--slots", type=int, help="default: the registry's max_loras_per_batch")
    parser.add_argument("--chunk", type=int, default=16, help="max_lora_chunk_size (SGLang: 16)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--calls",
        type=int,
        default=32,
        help="launches per timing graph, each on its own weights (layers)",
    )
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument(
        "--graph-bs",
        type=int,
        default=256,
        help="the engine's largest decode graph: its segment grid",
    )
    parser.add_argument("--finalists", type=int, default=3, help="re-timed against the default")
    parser.add_argument("--rounds", type=int, default=3, help="alternating re-timings")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, no GPU")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.configs = args.configs or cache_folder()
    args.out = args.out or args.configs
    if args.dry_run:
        groups, rank, cases = plan(args)
        for group in groups:
            for kernel in ("shrink", "expand"):
                grid = config_grid(kernel, rank, group.slices)
                print(f"{group.name} {kernel}: {len(grid)} configs × {len(cases)} cases -> "
                      f"{file_name(kernel, group, rank, 'GPU')}")  # fmt: skip
        return
    run(args)


if __name__ == "__main__":
    main()
