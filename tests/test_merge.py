"""finetune.merge on the real SmolLM2 with real peft: every method loads in HFEngine and answers."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_peft_adapter

from engine import GenerationRequest, SamplingParams
from engine.base_model import adapter_fit_problems
from engine.registry import load_registry
from finetune.merge import MergeError, Source, main, merge_adapters, plan_merge, read_source

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
# Small random adapters on the first four layers (SVD merges take one SVD per module): alpha and
# gamma share rank 8 on different targets, beta has rank 4, so equal-rank methods merge alpha +
# gamma over the union of their targets and cat/svd merge alpha + beta.
LAYERS = [0, 1, 2, 3]
SOURCES = {
    "alpha": {"r": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "beta": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 2},
    "gamma": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 3},
}
MERGES = {
    "linear": (["alpha", "gamma"], {}),
    "ties": (["alpha", "gamma"], {"density": 0.7}),
    "dare_ties": (["alpha", "gamma"], {"density": 0.7}),
    "cat": (["alpha", "beta"], {"weights": [1.0, 0.5]}),
    "svd": (["alpha", "beta"], {}),
}


def source(name: str, rank: int, targets=("q_proj", "v_proj")) -> Source:
    return Source(name, Path("/nowhere") / name, rank, sorted(targets), 2.0 * rank)


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def sources(base_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    return {
        name: make_peft_adapter(base_dir, root / name, layers=LAYERS, **spec)
        for name, spec in SOURCES.items()
    }


@pytest.fixture(scope="module")
def merged(sources, base_dir, tmp_path_factory) -> dict[str, Path]:
    """Each method once, plus alpha alone (linear, weight 1)."""
    root = tmp_path_factory.mktemp("merged")
    outs = {}
    for method, (names, options) in MERGES.items():
        chosen = {n: sources[n] for n in names}
        outs[method] = merge_adapters(
            base_dir, chosen, method, out=root / method, progress=quiet, **options
        )
    outs["alpha-alone"] = merge_adapters(
        base_dir, {"alpha": sources["alpha"]}, "linear", [1.0], out=root / "alone", progress=quiet
    )
    return outs


@pytest.fixture(scope="module")
def engine(base_dir, sources, merged):
    from engine.backends.hf import HFEngine

    adapters = {"alpha": sources["alpha"]} | {f"m-{k}": str(v) for k, v in merged.items()}
    engine = HFEngine(base_dir, "SmolLM2-135M-Instruct", adapters=adapters)
    yield engine
    asyncio.run(engine.shutdown())


def answer(engine, adapter: str | None) -> list[int]:
    request = GenerationRequest(
        adapter=adapter, messages=QUESTION, params=SamplingParams(max_tokens=16, temperature=0.0)
    )
    return asyncio.run(engine.complete(request)).token_ids


def lora_deltas(adapter_dir: Path) -> dict[str, object]:
    """{module: B @ A * lora_alpha / r} of a saved adapter."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {
        key.split(".lora_A.")[0]: tensors[key.replace("lora_A", "lora_B")] @ tensors[key] * scale
        for key in tensors
        if ".lora_A." in key
    }


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


# ----- the plan: peft's rules, no model ----------------------------------------------------------


def test_cat_rank_is_the_sum_and_targets_the_union():
    plan = plan_merge([source("a", 8), source("b", 16, ["q_proj", "k_proj"])], "cat")
    assert (plan.combination_type, plan.rank) == ("cat", 24)
    assert plan.targets == ["k_proj", "q_proj", "v_proj"]


def test_svd_rank_is_the_largest_or_the_one_asked():
    mixed = [source("a", 8), source("b", 16)]
    assert plan_merge(mixed, "svd").rank == 16
    assert plan_merge(mixed, "svd", svd_rank=4).rank == 4


@pytest.mark.parametrize(
    ("method", "variant"), [("linear", "svd"), ("ties", "ties_svd"), ("dare_ties", "dare_ties_svd")]
)
def test_equal_rank_methods_on_mixed_ranks_run_their_svd_variant_and_say_so(method, variant):
    plan = plan_merge([source("a", 8), source("b", 16)], method)
    assert (plan.method, plan.combination_type, plan.rank) == (method, variant, 16)
    assert "ranks [8, 16]" in plan.notes[0] and variant in plan.notes[0]


def test_linear_of_several_adapters_warns_of_cross_terms():
    assert "cross terms" in plan_merge([source("a", 8), source("b", 8)], "linear").notes[0]
    assert plan_merge([source("a", 8)], "linear").notes == []


def test_strict_refuses_mixed_ranks_naming_the_method_the_adapters_and_why():
    with pytest.raises(MergeError) as err:
        plan_merge([source("sentiment", 8), source("address", 16)], "ties", strict=True)
    message = str(err.value)
    assert "ties" in message and "sentiment (r8" in message and "address (r16" in message
    assert "one rank" in message and "cat or svd" in message


def test_bad_weights_density_and_svd_rank_are_refused_clearly():
    two = [source("a", 8), source("b", 8)]
    with pytest.raises(MergeError, match="1 weights for 2 adapters"):
        plan_merge(two, "linear", weights=[1.0])
    with pytest.raises(MergeError, match="--density is used by ties and dare_ties only"):
        plan_merge(two, "cat", density=0.5)
    with pytest.raises(MergeError, match="density must be in"):
        plan_merge(two, "ties", density=1.5)
    with pytest.raises(MergeError, match="--svd-rank is used by svd merges only"):
        plan_merge(two, "cat", svd_rank=4)
    with pytest.raises(MergeError, match="rank at most 16"):
        plan_merge(two, "svd", svd_rank=17)
    assert plan_merge(two, "ties").density == 0.5


def test_regex_and_list_targets_cannot_be_merged(sources, tmp_path):
    regex = tmp_path / "regex"
    shutil.copytree(sources["alpha"], regex)
    config = json.loads((regex / "adapter_config.json").read_text())
    (regex / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": r".*\.(q_proj|v_proj)"})
    )
    with pytest.raises(MergeError, match="regex string"):
        plan_merge([read_source("alpha", sources["alpha"]), read_source("rx", regex)], "svd")


def test_adapters_on_different_layers_are_refused():
    first, second = source("a", 8), source("b", 8)
    second = Source(**{**second.__dict__, "layers": [0, 1]})
    with pytest.raises(
        MergeError, match=r"different layers \(layers_to_transform a: all, b: \[0, 1\]"
    ):
        plan_merge([first, second], "cat")


def test_dora_and_rslora_sources_are_refused(sources, tmp_path):
    for flag in ("use_dora", "use_rslora"):
        folder = tmp_path / flag
        shutil.copytree(sources["alpha"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, flag: True}))
        with pytest.raises(MergeError, match=rf"adapter '{flag}' cannot be merged.*{flag}"):
            read_source(flag, folder)


# ----- real merges -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*MERGES, "alpha-alone"])
def test_every_method_saves_a_plain_peft_adapter_that_fits_the_base(merged, base_dir, method):
    out = merged[method]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "merge.json",
    ]
    assert adapter_fit_problems(out, base_dir) == []
    manifest = json.loads((out / "merge.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == manifest["rank"]
    assert sorted(config["target_modules"]) == manifest["targets"]


def test_merged_ranks_and_targets_follow_peft(merged):
    def summary(method):
        manifest = json.loads((merged[method] / "merge.json").read_text())
        return manifest["combination_type"], manifest["rank"], manifest["targets"]

    qkvo = ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert summary("linear") == ("linear", 8, qkvo)
    assert summary("ties") == ("ties", 8, qkvo)
    assert summary("dare_ties") == ("dare_ties", 8, qkvo)
    assert summary("cat") == ("cat", 8 + 4, qkvo)
    assert summary("svd") == ("svd", 8, qkvo)


def test_every_merged_adapter_loads_in_hf_engine_and_changes_the_answer(engine):
    base = answer(engine, None)
    for method in MERGES:
        tokens = answer(engine, f"m-{method}")
        assert tokens and tokens != base, method


def test_linear_of_one_adapter_at_weight_one_reproduces_it(engine, merged, sources):
    original, alone = lora_deltas(Path(sources["alpha"])), lora_deltas(merged["alpha-alone"])
    assert original.keys() == alone.keys()
    for module, delta in original.items():
        assert (alone[module] - delta).abs().max() <= 1e-5 * delta.abs().max(), module
    assert answer(engine, "m-alpha-alone") == answer(engine, "alpha")


def test_cat_is_the_exact_weighted_sum_of_the_updates(merged, sources):
    alpha, beta = lora_deltas(Path(sources["alpha"])), lora_deltas(Path(sources["beta"]))
    cat = lora_deltas(merged["cat"])
    for module, delta in cat.items():
        want = alpha.get(module, 0) + 0.5 * beta[module]
        assert (delta - want).abs().max() <= 1e-5 * want.abs().max(), module


def test_mixed_ranks_merge_with_ties_svd(sources, base_dir, tmp_path):
    chosen = {"alpha": sources["alpha"], "beta": sources["beta"]}
    out = merge_adapters(base_dir, chosen, "ties", density=0.5, out=tmp_path / "m", progress=quiet)
    manifest = json.loads((out / "merge.json").read_text())
    assert (manifest["method"], manifest["combination_type"], manifest["rank"]) == (
        "ties",
        "ties_svd",
        8,
    )
    assert adapter_fit_problems(out, base_dir) == []


# ----- command line and registry ----------------------------------------------------------------


@pytest.fixture
def registry_file(tmp_path, sources) -> Path:
    """A registry naming alpha and beta, written as adapters.yaml is: ``adapters:`` last."""
    config = tmp_path / "registry" / "adapters.yaml"
    config.parent.mkdir()
    entry = {"template": "Review: {review}", "examples": [{"review": "A joyless slog."}]}
    adapters = [{"name": n, "path": sources[n], **copy.deepcopy(entry)} for n in ("alpha", "beta")]
    registry = {"base": {"model": "smollm2"}, "adapters": adapters}
    config.write_text(yaml.safe_dump(registry, sort_keys=False))
    return config


def cli(config: Path, *args: str) -> None:
    main(["--config", str(config), *args])


def repo_files() -> dict[str, str]:
    """The repository's adapters and registry, which a merge must not touch."""
    registry = (ROOT / "adapters.yaml").read_bytes()
    return tree(ROOT / "adapters") | {"adapters.yaml": hashlib.sha256(registry).hexdigest()}


def test_cli_writes_only_under_out_and_leaves_the_registry_alone(registry_file, tmp_path, capsys):
    repo_before, around_before = repo_files(), tree(tmp_path)
    out = tmp_path / "work" / "ab"
    cli(registry_file, "--adapters", "alpha", "beta", "--method", "cat", "--out", str(out))
    after = tree(tmp_path)
    written = {k for k in after if around_before.get(k) != after[k]}
    files = ("adapter_config.json", "adapter_model.safetensors", "merge.json")
    assert written == {f"work/ab/{f}" for f in files}
    assert repo_files() == repo_before
    printed = capsys.readouterr().out
    assert "loading adapter 2/2: beta (r4" in printed
    assert "r12 on k_proj/o_proj/q_proj/v_proj" in printed
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["command"].startswith("python -m finetune.merge --config")
    with pytest.raises(SystemExit, match="is not empty"):
        cli(registry_file, "--adapters", "alpha", "beta", "--method", "cat", "--out", str(out))


def test_register_adds_a_valid_entry_with_the_sources_examples(registry_file, tmp_path):
    out = registry_file.parent / "merged" / "ab-cat"
    ab = ("--adapters", "alpha", "beta", "--method", "cat", "--register", str(registry_file))
    cli(registry_file, *ab, "--out", str(out), "--name", "ab-cat")
    spec = load_registry(registry_file).adapter("ab-cat")
    assert spec.path == out.resolve() and spec.template == "{input}"
    assert spec.examples == [{"input": "Review: A joyless slog."}] * 2
    assert "alpha, beta" in spec.description and spec.category == "merged"
    with pytest.raises(SystemExit, match="'alpha' that is not a merge"):
        cli(registry_file, *ab, "--out", str(tmp_path / "other"), "--name", "alpha")
    assert not (tmp_path / "other").exists()


def test_unknown_adapter_names_are_refused_before_any_work(registry_file, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown adapter 'nope'.*alpha, beta"):
        cli(
            registry_file,
            "--adapters",
            "alpha",
            "nope",
            "--method",
            "cat",
            "--out",
            str(tmp_path / "x"),
        )
    assert not (tmp_path / "x").exists()


def run_dir(root: Path, name: str, rows: list[tuple]) -> Path:
    """An evaluate output folder: (task, adapter, n, base accuracy, adapter accuracy) rows."""
    results = [
        {"task": t, "adapter": a, "metric": "accuracy", "n": n,
         "base": {"accuracy": b}, "finetuned": {"accuracy": f}}
        for t, a, n, b, f in rows
    ]  # fmt: skip
    (root / name).mkdir()
    (root / name / "quality.json").write_text(json.dumps({"results": results}))
    return root / name


def test_merge_report_gives_each_merge_the_share_of_each_tasks_lift_it_keeps(tmp_path):
    from finetune import merge_report

    own = run_dir(tmp_path, "own", [("spam", "spam", 50, 0.5, 0.9), ("news", "news", 50, 0.2, 0.6)])
    merged = run_dir(
        tmp_path,
        "merged",
        [("spam", "m-a", 50, 0.5, 0.86), ("news", "m-a", 50, 0.2, 0.54),
         ("spam", "m-b", 50, 0.5, 0.3), ("news", "m-b", 50, 0.25, 0.6)],
    )  # fmt: skip
    merge_report.main(["--own", str(own), "--merged", str(merged), "--out", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "merges.json").read_text())
    kept = {
        m: {t: round(c["kept"], 3) for t, c in cells.items()}
        for m, cells in report["merged"].items()
    }
    assert kept == {"m-a": {"spam": 0.9, "news": 0.85}, "m-b": {"spam": -0.5, "news": 1.0}}
    text = (tmp_path / "r" / "merges.md").read_text()
    assert "| m-a | 0.860 (90%) | 0.540 (85%) | 85% |" in text
    assert "keep ≥ 80% of the lift on every task: m-a." in text
    assert "news (0.200, 0.250)" in text  # the base moved in the merged run: said
    assert (tmp_path / "r" / "lift_kept.png").stat().st_size > 10_000


def test_merge_report_gives_no_share_of_a_tiny_lift_and_no_verdict_on_a_partial_row(tmp_path):
    from finetune import merge_report

    own = run_dir(
        tmp_path, "own", [("spam", "spam", 50, 0.5, 0.54), ("news", "news", 50, 0.2, 0.6)]
    )
    merged = run_dir(tmp_path, "merged", [("spam", "m-a", 50, 0.5, 0.9)])
    merge_report.main(["--own", str(own), "--merged", str(merged), "--out", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "merges.json").read_text())
    assert report["merged"]["m-a"]["spam"]["kept"] is None  # a lift of 2 examples of 50
    assert "| m-a | 0.900 | — | — |" in (tmp_path / "r" / "merges.md").read_text()


def test_merge_report_refuses_runs_over_different_examples(tmp_path):
    from finetune import merge_report

    own = run_dir(tmp_path, "own", [("spam", "spam", 50, 0.5, 0.9)])
    merged = run_dir(tmp_path, "merged", [("spam", "m-a", 40, 0.5, 0.8)])
    with pytest.raises(SystemExit, match="spam: 40 examples here, 50 in --own"):
        merge_report.main(
            ["--own", str(own), "--merged", str(merged), "--out", str(tmp_path / "r")]
        )
