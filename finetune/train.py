"""QLoRA fine-tuning of one task adapter (or all five) on the base model.

    python -m finetune.train --task sentiment         # → out/adapters/smollm2/sentiment
    python -m finetune.train --task all --steps 300   # every task, registered in out/adapters.yaml
    python -m finetune.train --task spam --resume     # continue from the last checkpoint
    python -m finetune.train --task all --publish     # into adapters/smollm2/ and adapters.yaml

Without ``--publish`` nothing in the repository is overwritten: adapters and their registry go
to the working directory (``$LORALAND_WORK``, default ``out/``), served with
``python app.py --config out/adapters.yaml``. A checkpoint is saved every ``--save-every`` steps
or ``--save-minutes`` minutes, whichever comes first, so a stopped run resumes.

The base is loaded 4-bit NF4 with bitsandbytes (compute in bf16 on GPU, fp32 on CPU) and a peft
LoRA is trained on the answer tokens only. Defaults follow the LoRA Land report: rank 8 on
q_proj/v_proj, lr 2e-4, cosine schedule with 3% warmup. Where bitsandbytes cannot load 4-bit, it
falls back to plain LoRA and says so in training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from engine.base_model import PACKAGED, display_name, resolve_base
from engine.paths import work_dir

from .data import load_split
from .registry_update import register_adapter
from .tasks import TASKS, Task

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    task: str
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-4
    warmup: float = 0.03
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_len: int = 256
    max_train: int = 4000
    quant: str = "auto"
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100
    save_minutes: float = 2.0
    base: str = "smollm2"


def encode(tokenizer, task: Task, example: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt + answer + end-of-turn; loss only on the answer."""
    messages = [{"role": "user", "content": task.prompt(example["input"])}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    target = tokenizer.encode(example["target"], add_special_tokens=False)  # no <bos> (Gemma)
    answer = [*target, tokenizer.eos_token_id]
    prompt = prompt[-(max_len - len(answer)) :] if len(prompt) + len(answer) > max_len else prompt
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    width = max(len(ids) for ids, _ in rows)
    ids = [i + [pad] * (width - len(i)) for i, _ in rows]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in rows]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return {
        "input_ids": as_tensor(ids),
        "labels": as_tensor(labels),
        "attention_mask": as_tensor(mask),
    }


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Causal-LM loss on the answer tokens, with the LM head applied to those positions only.

    Equal to ``model(**batch).loss`` but never builds logits for the prompt: with Gemma's 262k
    vocabulary a batch's full logits take gigabytes."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def load_model(base_dir: str, quant: str, device: torch.device):
    """4-bit NF4 base (QLoRA) when bitsandbytes can, else the plain base; returns (model, note)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quant in {"auto", "nf4"}:
        try:
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            )
            model = AutoModelForCausalLM.from_pretrained(
                base_dir, quantization_config=config, dtype=compute, device_map={"": device}
            )
            return model, f"4-bit NF4 (bitsandbytes), compute {str(compute).removeprefix('torch.')}"
        except Exception as err:
            if quant == "nf4":
                raise
            note = f"plain LoRA: bitsandbytes 4-bit unavailable ({type(err).__name__}: {err})"
    else:
        note = "plain LoRA (--quant none)"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=compute).to(device)
    return model, note


def lr_lambda(cfg: TrainConfig):
    warm = max(1, int(cfg.steps * cfg.warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    return factor


@torch.no_grad()
def validation_loss(model, rows, pad, device, batch_size) -> float:
    """Mean loss with dropout off. The model stays in train mode: on CPU, bitsandbytes repacks
    4-bit weights for inference the first time a Linear4bit runs in eval mode, and from then on
    its kernel passes no gradient back, which silently stops training."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    losses = [
        answer_loss(model, collate(rows[i : i + batch_size], pad, device)).item()
        for i in range(0, len(rows), batch_size)
    ]
    for m in dropouts:
        m.train()
    return sum(losses) / max(1, len(losses))


def train(cfg: TrainConfig, out: Path, device: torch.device, resume: bool = False) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = TASKS[cfg.task]
    base_dir = resolve_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows = [encode(tokenizer, task, e, cfg.max_len) for e in load_split(cfg.task, "train")]
    random.Random(cfg.seed).shuffle(train_rows)
    train_rows = train_rows[: cfg.max_train]
    val_rows = [encode(tokenizer, task, e, cfg.max_len) for e in load_split(cfg.task, "val")[:64]]
    model, quant_note = load_model(base_dir, cfg.quant, device)
    checkpoint = out / "checkpoint"
    if resume and checkpoint.is_dir():
        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=cfg.targets, task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start, history = 0, []
    if resume and (checkpoint / "state.pt").is_file():
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
    order = random.Random(cfg.seed + start)
    model.train()
    began = last_save = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.task}", initial=start, total=cfg.steps)
    for step in bar:
        batch = collate(order.sample(train_rows, cfg.batch_size), pad, device)
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": round(loss.item(), 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history[-1]["val_loss"] = round(validation_loss(model, val_rows, pad, device, 16), 4)
            bar.write(f"step {step + 1}: val loss {history[-1]['val_loss']}")
        due = (
            step + 1
        ) % cfg.save_every == 0 or time.perf_counter() > last_save + 60 * cfg.save_minutes
        if due and step + 1 < cfg.steps:
            save_checkpoint(model, optimizer, scheduler, step + 1, history, checkpoint)
            last_save = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    save_adapter(model, out, display_name(cfg.base, base_dir))
    if cfg.base in PACKAGED and PACKAGED[cfg.base].notice:
        (out / "NOTICE").write_text(PACKAGED[cfg.base].notice)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run finished: resume state is not needed
    report = {
        "config": asdict(cfg),
        "quantization": quant_note,
        "device": device_name(device),
        "steps": cfg.steps,
        "train_examples": len(train_rows),
        "wall_seconds": round(wall, 1),
        "final_train_loss": history[-1]["loss"] if history else None,
        "final_val_loss": next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1))
    return report


def save_checkpoint(model, optimizer, scheduler, step, history, folder: Path) -> None:
    model.save_pretrained(str(folder))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save({**state, "step": step, "history": history}, folder / "state.pt")


def save_adapter(model, out: Path, base_name: str) -> None:
    """Adapter weights as bf16 safetensors (small enough to ship in the repo)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, str(weights))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "README.md").unlink(missing_ok=True)


def default_layout(base: str, publish: bool) -> tuple[Path, Path]:
    """Where adapters of this base go and which registry serves them: the repository's shipped
    ones with ``publish``, else the working directory's."""
    root = ROOT if publish else work_dir()
    slug = Path(base).name
    registry = "adapters.yaml" if base == "smollm2" else f"adapters-{slug}.yaml"
    return root / "adapters" / slug, root / registry


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=[*TASKS, "all"])
    parser.add_argument("--out-dir", type=Path, help="default: out/adapters/BASE/")
    parser.add_argument("--config", type=Path, help="default: out/adapters.yaml (smollm2)")
    publish_help = "write into the repository: adapters/BASE/ and adapters.yaml"
    parser.add_argument("--publish", action="store_true", help=publish_help)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-register", action="store_true", help="leave adapters.yaml alone")
    parser.add_argument(
        "--register-only", action="store_true", help="register trained adapters only"
    )
    defaults = TrainConfig(task="sentiment")
    tunable = ("steps", "batch_size", "lr", "rank", "alpha", "max_len", "max_train", "seed")
    for name in (*tunable, "save_every", "save_minutes"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--targets", nargs="+", default=defaults.targets)
    parser.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto")
    parser.add_argument("--base", default=defaults.base)
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    out_dir, config = default_layout(args.base, args.publish)
    args.out_dir, args.config = args.out_dir or out_dir, args.config or config
    names = list(TASKS) if args.task == "all" else [args.task]
    for name in names:
        if args.register_only:
            register_adapter(args.config, TASKS[name], args.out_dir / name, args.base)
            continue
        cfg = TrainConfig(
            task=name, steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
            alpha=args.alpha, max_len=args.max_len, max_train=args.max_train, seed=args.seed,
            targets=args.targets, quant=args.quant, base=args.base, save_every=args.save_every,
            save_minutes=args.save_minutes,
        )  # fmt: skip
        out = args.out_dir / name
        report = train(cfg, out, device, resume=args.resume)
        print(f"{name}: {report['wall_seconds']}s on {report['device']}, {report['quantization']}")
        if not args.no_register:
            register_adapter(args.config, TASKS[name], out, args.base)


if __name__ == "__main__":
    main()
