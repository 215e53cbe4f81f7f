"""adapters.yaml: every shipped registry validates; each kind of bad entry names entry and field."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from engine.base_model import adapter_fit_problems
from engine.factory import check_fit
from engine.registry import RegistryError, load_registry

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("*.yaml")) + sorted((ROOT / "examples").glob("**/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_registry_validates(path, base_dir):
    registry = load_registry(path)
    if registry.base.model == "smollm2":
        check_fit(registry, base_dir, "hf")
    else:  # another packaged base: its adapters are checked against it where it is installed
        from engine.base_model import resolve_base

        # CI lacks the 238 MB Gemma packages: there only trained_on is checked
        with contextlib.suppress(FileNotFoundError):
            check_fit(registry, resolve_base(registry.base.model), "hf")
        assert all(spec.trained_on == registry.base.model for spec in registry.adapters)
    for spec in registry.adapters:
        assert spec.path.is_dir()
        for example in spec.examples:
            assert spec.render(example)


def write(tmp_path, data) -> Path:
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def adapter_copy(tmp_path, adapter_dirs) -> str:
    shutil.copytree(adapter_dirs["alpha"], tmp_path / "alpha")
    return "alpha"


def entry(name="alpha", path="alpha", **extra) -> dict:
    return {"name": name, "path": path, "template": "Review: {review}", **extra}


def error_of(tmp_path, data) -> str:
    with pytest.raises(RegistryError) as err:
        load_registry(write(tmp_path, data))
    return str(err.value)


def test_a_good_file_resolves_paths_against_its_folder(tmp_path, adapter_copy):
    registry = load_registry(write(tmp_path, {"adapters": [entry()]}))
    assert registry.adapters[0].path == (tmp_path / "alpha").resolve()
    assert registry.engine.backend == "auto" and registry.base.model == "smollm2"


def test_a_kernel_config_folder_resolves_beside_the_file_and_auto_or_null_stay(tmp_path):
    def kernels(value):
        path = write(tmp_path, {"engine": {"sglang": {"lora_kernel_configs": value}}})
        return load_registry(path).engine.sglang.lora_kernel_configs

    assert kernels("kernels") == str((tmp_path / "kernels").resolve())
    assert kernels("/abs/kernels") == "/abs/kernels"
    assert kernels("auto") == "auto" and kernels(None) is None
    assert "lora_kernel_configs" in error_of(
        tmp_path, {"engine": {"sglang": {"lora_kernel_configs": ""}}}
    )
    assert "lora_kernel_configs" in error_of(
        tmp_path, {"engine": {"sglang": {"lora_kernel_configs": 5}}}
    )


def test_duplicate_name(tmp_path, adapter_copy):
    message = error_of(tmp_path, {"adapters": [entry(), entry()]})
    assert "adapters[1] 'alpha' → name: duplicate of adapters[0]" in message


def test_missing_path(tmp_path):
    message = error_of(tmp_path, {"adapters": [entry("spam", "nowhere")]})
    assert "adapters[0] 'spam' → path: no such directory" in message


def test_unknown_key_in_an_entry_and_at_top_level(tmp_path, adapter_copy):
    message = error_of(tmp_path, {"adapters": [entry(colour="red")], "extra": 1})
    assert "adapters[0] 'alpha' → colour: unknown key" in message
    assert "extra: unknown key" in message


def test_bad_slug_and_template_without_fields(tmp_path, adapter_copy):
    bad = entry("Not A Slug", template="no fields here")
    message = error_of(tmp_path, {"adapters": [bad]})
    assert "adapters[0] 'Not A Slug' → name: Value error, must be a slug" in message
    assert "→ template: Value error, needs at least one {field}" in message


def test_the_base_and_fanout_model_names_are_not_adapter_names(tmp_path, adapter_copy):
    message = error_of(tmp_path, {"adapters": [entry("base"), entry("fanout")]})
    assert "'base' is reserved for the base model" in message
    assert "'fanout' is reserved for fan-out requests" in message


def test_a_default_stop_string_follows_a_requests_rules(tmp_path, adapter_copy):
    message = error_of(tmp_path, {"adapters": [entry(generation={"stop": ["x" * 1001]})]})
    assert "generation.stop: Value error, each stop string non-empty and at most 1000" in message


def test_example_missing_a_template_field(tmp_path, adapter_copy):
    message = error_of(tmp_path, {"adapters": [entry(examples=[{"text": "x"}])]})
    assert "adapters[0] 'alpha' → examples[0]: missing fields ['review']" in message


def test_bad_engine_setting_names_the_field(tmp_path):
    message = error_of(
        tmp_path, {"engine": {"backend": "vllm", "sglang": {"max_loras_per_batch": 0}}}
    )
    assert "engine.backend: Input should be 'auto', 'sglang' or 'hf'" in message
    assert "engine.sglang.max_loras_per_batch" in message


@pytest.mark.parametrize(
    "origin, why",
    [("localhost:3000", "is not an origin"), ("http://ui.example/app", "is not an origin"),
     ("http://UI.example", "would never match"), ("https://ui.example:443", "would never match")],
)  # fmt: skip
def test_a_cors_origin_a_browser_never_sends_is_refused(tmp_path, origin, why):
    """(``https://ui.example:80`` is one a browser sends: 80 is not https's default port.)"""
    message = error_of(tmp_path, {"server": {"cors_origins": ["https://ui.example:80", origin]}})
    assert "server.cors_origins" in message and why in message


def test_dir_without_adapter_config(tmp_path):
    (tmp_path / "empty").mkdir()
    message = error_of(tmp_path, {"adapters": [entry("empty", "empty")]})
    assert "adapters[0] 'empty' → path: no adapter_config.json" in message


def lora_dir(tmp_path, name, tensors: dict, r=8) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapter_for_another_base_does_not_fit(tmp_path, base_dir):
    import torch

    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    wrong_width = {f"{prefix}.lora_A.weight": torch.zeros(8, 4096)}
    wrong_rank = {f"{prefix}.lora_A.weight": torch.zeros(4, 576)}
    no_module = {"base_model.model.model.layers.0.mlp.w9.lora_A.weight": torch.zeros(8, 576)}
    width = adapter_fit_problems(lora_dir(tmp_path, "w", wrong_width), base_dir)
    rank = adapter_fit_problems(lora_dir(tmp_path, "r", wrong_rank), base_dir)
    module = adapter_fit_problems(lora_dir(tmp_path, "m", no_module), base_dir)
    assert "shape [8, 4096], the base needs [8, 576]" in width[0]
    assert "shape [4, 576], the base needs [8, 576] (rank 8)" in rank[0]
    assert "targets 'model.layers.0.mlp.w9', which the base model does not have" in module[0]


def test_misfit_adapter_fails_the_registry_check_naming_the_entry(tmp_path, base_dir):
    import torch

    lora_dir(tmp_path, "big", {"base_model.model.lm_head.lora_B.weight": torch.zeros(10, 8)})
    registry = load_registry(write(tmp_path, {"adapters": [entry("big", "big")]}))
    with pytest.raises(RegistryError, match=r"adapters\[0\] 'big' → path: .*lm_head"):
        check_fit(registry, base_dir, "hf")


def test_set_overrides_are_validated_and_name_the_key():
    from engine.registry import SGLangSettings, with_overrides

    settings = with_overrides(
        SGLangSettings(), ["max_loras_per_batch=128", "lora_backend=triton", "cuda_graph=false"]
    )
    assert settings.max_loras_per_batch == 128 and settings.lora_backend == "triton"
    assert settings.cuda_graph is False
    with pytest.raises(RegistryError, match="max_loras_per_batch"):
        with_overrides(SGLangSettings(), ["max_loras_per_batch=0"])
    with pytest.raises(RegistryError, match="nonsense"):
        with_overrides(SGLangSettings(), ["nonsense=1"])
    with pytest.raises(RegistryError) as refused:
        with_overrides(SGLangSettings(), ["max_loaded_loras=2", "max_loras_per_batch=4"])
    assert str(refused.value).startswith(
        "--set the settings together: max_loaded_loras (2) must be >= max_loras_per_batch (4)"
    )  # pydantic's "Value error, " prefix left out


def test_a_gguf_tokenizer_converted_character_by_character_is_refused(base_dir):
    """transformers 5.12 read Gemma 3's GGUF tokenizer without merges: one token per character."""
    from transformers import AutoTokenizer

    from engine.base_model import tokenizer_problem

    class CharacterTokenizer:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    assert "into 44 tokens" in tokenizer_problem(CharacterTokenizer())
    assert tokenizer_problem(AutoTokenizer.from_pretrained(base_dir)) is None
