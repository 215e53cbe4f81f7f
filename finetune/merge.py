"""Merge LoRA adapters into one with peft's ``add_weighted_adapter`` (issue #18).

    python -m finetune.merge --adapters sentiment news spam address sql --method cat
    python -m finetune.merge --adapters sentiment news spam --method ties --density 0.5 \\
        --weights 1 1 1 --out out/adapters/cls-ties --name cls-ties --register adapters.yaml

Names resolve through the registry (``--config``, default adapters.yaml); adapter directories
work too. The result is a standard peft adapter (``adapter_config.json`` +
``adapter_model.safetensors``) plus ``merge.json`` (sources, method, weights, density, rank,
targets, versions), written only under ``--out`` (default ``out/adapters/merged-METHOD``).

What peft 0.21 makes of each method (targets are always the union of the sources' targets;
a module only some sources target is merged from those sources alone):

- ``linear``: weighted sum of the A factors and of the B factors; needs equal ranks; rank kept.
- ``ties`` / ``dare_ties``: TIES / DARE-TIES on the A and B factors (``--density``); equal ranks.
- ``cat``: A and B concatenated; exact sum of the weighted updates; rank = sum of the ranks.
- ``svd``: weighted sum of the full updates (ΔW = B·A·scale), truncated by SVD to ``--svd-rank``
  (default: the largest source rank).

Where ranks differ, ``linear``, ``ties`` and ``dare_ties`` run as peft's SVD variants (``svd``,
``ties_svd``, ``dare_ties_svd``: the same rule on the full ΔW, then SVD); ``--strict`` refuses
instead. See docs/merge.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.base_model import adapter_fit_problems, resolve_base
from engine.paths import work_dir
from engine.registry import SLUG, Registry, adapter_dir_problems, load_registry

from .registry_update import read_entries, write_entries

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("linear", "cat", "ties", "dare_ties", "svd")
DENSITY_METHODS = {"ties", "dare_ties"}
EQUAL_RANK_METHODS = {"linear", "ties", "dare_ties"}
SVD_VARIANT = {"linear": "svd", "ties": "ties_svd", "dare_ties": "dare_ties_svd"}
DEFAULT_DENSITY = 0.5
MERGED = "default"  # peft saves the adapter named "default" at the top of the output folder
LINEAR_CROSS_TERMS = (
    "linear sums the A and the B factors apart, so B·A gains cross terms B_i·A_j between "
    "adapters, which can swamp independently trained updates; cat and svd sum the updates exactly"
)
WRITTEN = ("adapter_config.json", "adapter_model.safetensors", "README.md", "merge.json")


class MergeError(ValueError):
    """These adapters cannot be merged this way; the message says which, how and why."""


@dataclass(frozen=True)
class Source:
    """One adapter to merge, as its adapter_config.json describes it."""

    name: str
    path: Path
    rank: int
    targets: list[str] | str
    lora_alpha: float
    layers: list[int] | None = None
    """``layers_to_transform``: the decoder layers it covers; ``None`` = all."""

    @property
    def label(self) -> str:
        return f"{self.name} (r{self.rank} on {describe_targets(self.targets)})"


@dataclass
class MergePlan:
    """What will be asked of peft and what the merged adapter will be."""

    method: str
    combination_type: str
    weights: list[float]
    density: float | None
    svd_rank: int | None
    rank: int
    targets: list[str] | str
    notes: list[str] = field(default_factory=list)


def describe_targets(targets: list[str] | str) -> str:
    return "/".join(targets) if isinstance(targets, list) else f"regex {targets!r}"


def read_source(name: str, path: str | Path) -> Source:
    """Read one adapter's config; refuse what ``add_weighted_adapter`` cannot merge correctly."""
    path = Path(path).resolve()
    if problems := adapter_dir_problems(path):
        raise MergeError(f"adapter '{name}': {problems[0]}")
    config = json.loads((path / "adapter_config.json").read_text())
    refusal = source_refusal(config)
    if refusal:
        raise MergeError(
            f"adapter '{name}' cannot be merged by peft's add_weighted_adapter: {refusal}"
        )
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    targets = config["target_modules"]
    targets = sorted(targets) if isinstance(targets, list) else targets
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    return Source(name, path, rank, targets, float(config.get("lora_alpha", rank)), layers)


def source_refusal(config: dict) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, not LORA"
    if config.get("use_dora"):
        return "it is a DoRA adapter (use_dora), whose magnitude vectors peft does not merge"
    if config.get("use_rslora"):
        return (
            "it uses rsLoRA (use_rslora): peft gives the merged adapter lora_alpha = r, "
            "which rsLoRA would scale by sqrt(r)"
        )
    if config.get("target_parameters"):
        return "it targets nn.Parameter (target_parameters)"
    if config.get("modules_to_save"):
        return "it has modules_to_save (whole trained modules), which a merged LoRA cannot hold"
    return None


def plan_merge(
    sources: list[Source],
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    strict: bool = False,
) -> MergePlan:
    """Check the request against peft's rules and decide peft's ``combination_type``."""
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not sources:
        raise MergeError("name at least one adapter to merge")
    weights = check_weights(sources, weights)
    density = check_density(method, density)
    targets = merged_targets(sources)
    check_layers(sources)
    combination, notes = combination_for(sources, method, strict)
    ranks = [s.rank for s in sources]
    check_svd_rank(combination, svd_rank, sum(ranks))
    if combination == "linear":
        density = None  # one adapter: peft runs linear, which prunes nothing
    if combination == "cat":
        rank = sum(ranks)
    elif combination.endswith("svd"):
        rank = svd_rank or max(ranks)
    else:
        rank = ranks[0]
    return MergePlan(method, combination, weights, density, svd_rank, rank, targets, notes)


def check_weights(sources: list[Source], weights: list[float] | None) -> list[float]:
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        names = ", ".join(s.name for s in sources)
        raise MergeError(f"{len(weights)} weights for {len(sources)} adapters ({names})")
    return weights


def check_density(method: str, density: float | None) -> float | None:
    if method not in DENSITY_METHODS:
        if density is not None:
            raise MergeError(f"--density is used by ties and dare_ties only, not by {method}")
        return None
    density = DEFAULT_DENSITY if density is None else density
    if not 0.0 < density <= 1.0:
        raise MergeError(f"{method}: density must be in (0, 1], got {density}")
    return density


def check_svd_rank(combination: str, svd_rank: int | None, rank_sum: int) -> None:
    if svd_rank is None:
        return
    if not combination.endswith("svd"):
        raise MergeError(f"--svd-rank is used by svd merges only, not by {combination}")
    if not 1 <= svd_rank <= rank_sum:
        raise MergeError(
            f"--svd-rank {svd_rank}: the merged update has rank at most {rank_sum} (the sum of "
            "the source ranks), so pick 1 to that"
        )


def merged_targets(sources: list[Source]) -> list[str] | str:
    """peft's union of the target modules (lists), or the joined regexes (strings)."""
    kinds = {type(s.targets) for s in sources}
    if len(kinds) > 1:
        labels = ", ".join(s.label for s in sources)
        raise MergeError(
            f"peft cannot merge target_modules given as a list with target_modules "
            f"given as a regex string: {labels}"
        )
    if kinds == {str}:
        return "|".join(f"({s.targets})" for s in sources)
    return sorted(set().union(*(s.targets for s in sources)))


def check_layers(sources: list[Source]) -> None:
    """peft gives the merged adapter the first source's ``layers_to_transform``."""
    if len({json.dumps(s.layers) for s in sources}) > 1:
        covered = ", ".join(f"{s.name}: {s.layers or 'all'}" for s in sources)
        raise MergeError(
            f"the adapters cover different layers (layers_to_transform {covered}); peft would "
            "give the merge the first adapter's layers and drop the others' updates elsewhere"
        )


def combination_for(sources: list[Source], method: str, strict: bool) -> tuple[str, list[str]]:
    """peft's ``combination_type``: the method, or its SVD variant where ranks differ."""
    if len(sources) == 1:
        note = f"one adapter: peft runs linear, not {method}"
        return "linear", [] if method == "linear" else [note]
    ranks = {s.rank for s in sources}
    if method not in EQUAL_RANK_METHODS or len(ranks) == 1:
        return method, [LINEAR_CROSS_TERMS] if method == "linear" else []
    labels = ", ".join(s.label for s in sources)
    why = f"peft's {method} needs adapters of one rank, and these have ranks {sorted(ranks)}"
    if strict:
        raise MergeError(
            f"cannot merge {labels} with {method}: {why}; use cat or svd, or run "
            "without --strict to merge with the SVD variant"
        )
    variant = SVD_VARIANT[method]
    return variant, [
        f"{why}: merged with {variant} instead ({method} on the full update of each "
        "module, then SVD to one rank)"
    ]


def say(message: str) -> None:
    print(message, flush=True)


def merge_adapters(
    base_dir: str,
    sources: dict[str, str | Path],
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    out: str | Path | None = None,
    svd_rank: int | None = None,
    strict: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> Path:
    """Merge ``sources`` ({name: adapter dir}) on ``base_dir`` into a peft adapter at ``out``.

    Returns ``out``; raises ``MergeError`` (before any model is loaded where peft's rules or the
    arguments forbid the merge). Blocking and CPU-bound: minutes for SVD merges. ``progress``
    gets each step (default: print); ``command`` is recorded in merge.json.
    """
    out = Path(out or work_dir() / "adapters" / f"merged-{method}").resolve()
    progress = progress or say
    read = [read_source(name, path) for name, path in sources.items()]
    plan = plan_merge(read, method, weights, density, svd_rank, strict)
    if out in {s.path for s in read}:
        raise MergeError(f"--out {out} is one of the adapters being merged")
    prepare_out(out, overwrite)
    for note in plan.notes:
        progress(f"note: {note}")
    model = load_sources(base_dir, read, progress)
    run_peft_merge(model, read, plan, seed, progress)
    progress(f"saving the merged adapter (r{plan.rank}) to {out}")
    save_merged(model, out, source_dtype(read))
    if problems := adapter_fit_problems(out, base_dir):
        raise MergeError(f"the merged adapter in {out} does not fit the base: {problems[0]}")
    write_manifest(out, base_dir, read, plan, seed, command)
    return out


def prepare_out(out: Path, overwrite: bool) -> None:
    """``out`` must be new or empty; ``overwrite`` removes only the files a merge writes there.

    The folder itself is made by the save: a merge refused or failing before it leaves none."""
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    if existing and not overwrite:
        raise MergeError(
            f"{out} is not empty ({', '.join(sorted(existing)[:4])}); choose another "
            "--out or pass --force to replace a previous merge there"
        )
    for name in WRITTEN:
        (out / name).unlink(missing_ok=True)


def load_sources(base_dir: str, sources: list[Source], progress: Callable[[str], None]):
    """The base in float32 with every source adapter loaded under ``source_<i>``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    progress(f"loading the base model from {base_dir}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for i, source in enumerate(sources):
        progress(f"loading adapter {i + 1}/{len(sources)}: {source.label} from {source.path}")
        if i == 0:
            model = PeftModel.from_pretrained(model, str(source.path), adapter_name="source_0")
        else:
            model.load_adapter(str(source.path), adapter_name=f"source_{i}")
    return model


def run_peft_merge(model, sources: list[Source], plan: MergePlan, seed: int, progress) -> None:
    import torch

    names = ", ".join(f"{s.name}×{w:g}" for s, w in zip(sources, plan.weights))
    density = f", density {plan.density}" if plan.density is not None else ""
    progress(f"merging {names} with {plan.combination_type}{density}")
    torch.manual_seed(seed)  # dare_* prunes at random
    try:
        model.add_weighted_adapter(
            adapters=[f"source_{i}" for i in range(len(sources))],
            weights=plan.weights,
            adapter_name=MERGED,
            combination_type=plan.combination_type,
            svd_rank=plan.svd_rank,
            density=plan.density,
            svd_full_matrices=False,
        )
    except (ValueError, TypeError) as err:
        labels = ", ".join(s.label for s in sources)
        raise MergeError(
            f"peft could not merge {labels} with {plan.combination_type}: {err}"
        ) from err


def source_dtype(sources: list[Source]):
    """The sources' weight dtype if they share one (bf16 adapters stay bf16), else float32."""
    import torch
    from safetensors import safe_open

    dtypes = set()
    for source in sources:
        with safe_open(str(source.path / "adapter_model.safetensors"), framework="pt") as f:
            dtypes |= {f.get_tensor(key).dtype for key in list(f.keys())[:1]}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def save_merged(model, out: Path, dtype) -> None:
    """Save only the merged adapter, in ``dtype``, as ``out/adapter_*``."""
    for name, param in model.named_parameters():
        if f".{MERGED}." in name:
            param.data = param.data.to(dtype)
    model.save_pretrained(str(out), selected_adapters=[MERGED], save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card, as finetune.train does


def write_manifest(out, base_dir, sources: list[Source], plan: MergePlan, seed, command) -> None:
    import peft
    import torch

    manifest = {
        "command": command,
        "sources": [{**asdict(s), "path": str(s.path)} for s in sources],
        **asdict(plan),
        "seed": seed,
        "size_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "base": base_dir,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
    }
    (out / "merge.json").write_text(json.dumps(manifest, indent=2) + "\n")


# ----- registry --------------------------------------------------------------------------------


def resolve_sources(names: list[str], registry: Registry | None) -> dict[str, Path]:
    """Registry names → their paths; an existing directory stands for itself (named by folder)."""
    sources = {}
    for item in names:
        known = {spec.name: spec.path for spec in registry.adapters} if registry else {}
        if item in known:
            sources[item] = known[item]
        elif Path(item).is_dir():
            sources[Path(item).resolve().name] = Path(item)
        else:
            raise MergeError(
                f"unknown adapter {item!r}: not in the registry "
                f"({', '.join(known) or 'none'}) and not a directory"
            )
    if len(sources) != len(names):
        raise MergeError(f"the adapters {names} name one adapter twice")
    return sources


def read_manifest(out: Path) -> dict:
    return json.loads((Path(out) / "merge.json").read_text())


def registry_entry(name: str, out: Path, config: Path, registry: Registry | None) -> dict:
    """A registry entry for a merged adapter: free-form prompt, the sources' examples."""
    manifest = read_manifest(out)
    source_names = [s["name"] for s in manifest["sources"]]
    specs = [s for s in (registry.adapters if registry else []) if s.name in source_names]
    entry = {
        "name": name,
        "path": os.path.relpath(Path(out).resolve(), config.resolve().parent),
        "task": "merge",
        "category": "merged",
        "description": f"Merge ({manifest['combination_type']}) of {', '.join(source_names)}.",
        "template": "{input}",
        "examples": [{"input": s.render(s.examples[0])} for s in specs if s.examples],
        "generation": {"temperature": 0.0},
    }
    source_max_tokens = [s.generation.max_tokens for s in specs if s.generation.max_tokens]
    if source_max_tokens:
        entry["generation"]["max_tokens"] = max(source_max_tokens)
    trained_on = {s.trained_on for s in specs}
    if len(specs) == len(source_names) and len(trained_on) == 1 and None not in trained_on:
        entry["trained_on"] = trained_on.pop()
    return entry


def check_registrable(config: Path, name: str) -> None:
    """``config`` exists and ``name`` is free there or names a previous merge (checked first)."""
    if not config.is_file():
        raise MergeError(f"--register {config}: no such registry file")
    _, entries = read_entries(config)
    clash = [e for e in entries if e.get("name") == name and e.get("task") != "merge"]
    if clash:
        raise MergeError(
            f"{config} already has an adapter '{name}' that is not a merge; pick another --name"
        )


def register_merged(config: Path, name: str, out: Path, registry: Registry | None) -> None:
    """Add (or replace a previous merge's) entry in ``config``; never replace a trained one."""
    check_registrable(config, name)
    head, entries = read_entries(config)
    names = [e.get("name") for e in entries]
    entry = registry_entry(name, out, config, registry)
    if name in names:
        entries[names.index(name)] = entry
    else:
        entries.append(entry)
    write_entries(config, head, entries)


# ----- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="+", required=True, help="registry names or dirs")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--weights", nargs="+", type=float, help="one per adapter; default 1.0")
    parser.add_argument("--density", type=float, help=f"ties, dare_ties; default {DEFAULT_DENSITY}")
    parser.add_argument("--svd-rank", type=int, help="svd merges; default the largest rank")
    parser.add_argument("--out", type=Path, help="default: out/adapters/NAME")
    parser.add_argument("--name", help="default: merged-METHOD")
    parser.add_argument("--config", type=Path, default=ROOT / "adapters.yaml")
    parser.add_argument("--base", help="base model; default: the registry's base.model")
    parser.add_argument("--register", type=Path, metavar="CONFIG", help="add to this registry")
    parser.add_argument("--strict", action="store_true", help="refuse instead of SVD variants")
    parser.add_argument("--seed", type=int, default=0, help="dare_ties prunes at random")
    parser.add_argument("--force", action="store_true", help="replace a previous merge in --out")
    return parser.parse_args(argv)


def sglang_notes(registry: Registry | None, rank: int, targets: list[str] | str) -> list[str]:
    """Why a server started from ``registry`` on SGLang would refuse to hot-load the merge."""
    if registry is None or not registry.adapters or isinstance(targets, str):
        return []
    served = [read_source(s.name, s.path) for s in registry.adapters]
    settings = registry.engine.sglang
    max_rank = settings.max_lora_rank or max(s.rank for s in served)
    allowed = set(settings.lora_target_modules or set().union(*(s.targets for s in served)))
    notes = []
    if rank > max_rank:
        notes.append(
            f"rank {rank} > max_lora_rank {max_rank} of the served set: list the merge "
            f"in the registry before start or set engine.sglang.max_lora_rank: {rank}"
        )
    if "all" not in allowed and (extra := sorted(set(targets) - allowed)):
        notes.append(
            f"targets {extra} are outside the served set {sorted(allowed)}: list the "
            "merge in the registry before start or set engine.sglang.lora_target_modules"
        )
    return notes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = args.name or f"merged-{args.method}"
    if not SLUG.match(name):
        raise SystemExit(f"--name {name!r} must be a slug (a-z, 0-9, -, _)")
    registry = load_registry(args.config) if args.config.is_file() else None
    base = args.base or (registry.base.model if registry else "smollm2")
    command = shlex.join(["python", "-m", "finetune.merge", *(argv or sys.argv[1:])])
    try:
        sources = resolve_sources(args.adapters, registry)
        if args.register:
            check_registrable(args.register, name)
        out = merge_adapters(
            resolve_base(base),
            sources,
            args.method,
            args.weights,
            args.density,
            args.out or work_dir() / "adapters" / name,
            args.svd_rank,
            args.strict,
            args.seed,
            args.force,
            command=command,
        )
        if args.register:
            register_merged(args.register, name, out, registry)
            print(f"registered '{name}' in {args.register}")
    except MergeError as err:
        raise SystemExit(f"merge: {err}") from None
    manifest = read_manifest(out)
    for note in sglang_notes(registry, manifest["rank"], manifest["targets"]):
        print(f"SGLang: {note}")
    size = manifest["size_bytes"] / 1e6
    print(
        f"{out}: r{manifest['rank']} on {describe_targets(manifest['targets'])}, {size:.1f} MB "
        f"({manifest['combination_type']})"
    )


if __name__ == "__main__":
    main()
