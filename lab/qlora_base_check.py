"""Does a QLoRA adapter score better on the 4-bit base it was trained against than on the
full-precision base the engine serves? Greedy peft ``generate`` on the first N test examples.

    python lab/qlora_base_check.py --task address --adapter adapters/smollm2/address --n 16 \
        --out results/finetune/checks/address-4bit/result.json

Prints (and with ``--out`` writes) the task metrics for both bases (CPU: bitsandbytes' 4-bit
path, float32 compute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.base_model import resolve_base
from finetune.data import load_split
from finetune.tasks import TASKS


def load(base_dir: str, adapter: str, four_bit: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if four_bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quant, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(model, adapter)
    model.train()  # bitsandbytes repacks 4-bit weights on CPU in eval mode; dropout is off below
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return model


@torch.no_grad()
def scores(model, tokenizer, task, examples, max_tokens: int) -> dict[str, float]:
    chats = [[{"role": "user", "content": task.prompt(e["input"])}] for e in examples]
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    rows = [task.score(t, e["target"]) for t, e in zip(texts, examples, strict=True)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=list(TASKS))
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    task, base_dir = TASKS[args.task], resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = load_split(args.task, "test")[: args.n]
    bases = (("float32 base (as served)", False), ("4-bit NF4 base (as trained)", True))
    results = {"command": " ".join(sys.argv), "n": len(examples)}
    for label, four_bit in bases:
        model = load(base_dir, args.adapter, four_bit)
        results[label] = scores(model, tokenizer, task, examples, task.max_tokens)
        print(f"{label}: {results[label]}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
