"""Which CPU serving path is fastest for many LoRAs on SmolLM2-135M? One run, ratios, alternated.

    python lab/cpu_serving_options.py --out results/cpu/serving-options
    python lab/cpu_serving_options.py --out /tmp/smoke --reps 1 --steps 4 --no-threads  # smoke

Options, all on the real SmolLM2-135M-Instruct base with random peft adapters (two rank-8 q/v,
two rank-16 all-linear like the shipped ``address`` adapter), driven like ``engine/backends/hf.py``
drives its model (left-padded prefill into a DynamicCache, then one token per row per step):

- ``peft-fp32``: today's path: fp32 PeftModel, ``adapter_names`` per row, logits of every position.
- ``peft-fp32-last``: the same, asking only the last position's logits (``logits_to_keep=1``);
  prefill only.
- ``batched-fp32``: ``engine/backends/lora_batched.py`` in exact mode (fp32 base, one gathered
  LoRA op per layer), last logits only.
- ``batched-fp16`` / ``batched-int8`` / ``batched-bf16``: the same with the base Linear layers
  stored in fp16 (fbgemm, fp32 activations), int8 (fbgemm dynamic), or the whole base in bf16.

Metrics: prefill of one ~100-token prompt (TTFT proxy), decode tokens/s of one stream, total decode
tokens/s of 8 streams on one adapter and of 8 mixed streams (4 adapters + base), and the share of
mixed-batch rows whose greedy tokens equal ``peft-fp32``'s. Each repetition measures every option
once in turn (A, B, C, A, B, C, ...); ratios to ``peft-fp32`` are taken within a repetition, then
the median and range over repetitions are reported. A second part measures one stream with 1, 2
and torch's default threads for today's path and the recommended one, quiet and with a busy
neighbour (``python -c "while True: pass"``). Writes results.json, results.md and options.png
to --out (and the raw repetitions as raw-options.json, raw-threads.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.lora_batched import BatchedLora
from engine.base_model import resolve_base
from tests.helpers import make_peft_adapter

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qv8-a": {"r": 8, "target_modules": ["q_proj", "v_proj"], "seed": 11},
    "qv8-b": {"r": 8, "target_modules": ["q_proj", "v_proj"], "seed": 12},
    "all16-a": {"r": 16, "target_modules": ALL_LINEAR, "seed": 13},
    "all16-b": {"r": 16, "target_modules": ALL_LINEAR, "seed": 14},
}
SAME = ["all16-a"] * 8
MIXED = [None, "qv8-a", "qv8-b", "all16-a", "all16-b", None, "qv8-a", "all16-a"]
TOPICS = ["the sea", "a city at night", "autumn", "a mountain", "a library", "rain", "bread", "a"]
PROMPT = (
    "Read the notes below and answer briefly. "
    "Notes: the water cycle moves water between the oceans, the air and the land. Water "
    "evaporates from the sea, condenses into clouds, falls as rain or snow, and flows back "
    "through rivers and ground water. "
    "Question: in two sentences, explain how {topic} takes part in the water cycle."
)
TODAY = "peft-fp32"
CHOSEN = "batched-fp16"


@dataclass
class Option:
    """One way to run the model: how it is built and how a forward names the adapters."""

    name: str
    model: torch.nn.Module
    batched: bool
    last_logits_only: bool
    level: str = "all"
    """What it is measured on: "prefill" only, "one" stream (prefill + decode), or "all"."""

    def forward(self, ids, mask, positions, cache, names: list[str | None]):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        kwargs |= {"past_key_values": cache, "use_cache": True}
        if self.last_logits_only:
            kwargs["logits_to_keep"] = 1
        if self.batched:
            kwargs["adapter_index"] = self.model.index_for(names)
        else:
            kwargs["adapter_names"] = [n or "__base__" for n in names]
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values


def load_base(base_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def peft_model(base_dir: str, adapters: dict[str, str]):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_base(base_dir), adapters[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def build_options(base_dir: str, adapters: dict[str, str]) -> list[Option]:
    peft = peft_model(base_dir, adapters)
    options = [
        Option(TODAY, peft, batched=False, last_logits_only=False),
        Option("peft-fp32-last", peft, batched=False, last_logits_only=True, level="prefill"),
    ]
    for weights in ("fp32", "fp16", "int8", "bf16"):
        model = BatchedLora(load_base(base_dir), adapters, base_weights=weights)
        level = "one" if weights == "bf16" else "all"  # bf16 matmuls of 8 rows are slow on AVX2
        options.append(Option(f"batched-{weights}", model, True, True, level))
    return options


def make_adapters(base_dir: str, root: Path) -> dict[str, str]:
    return {
        name: make_peft_adapter(base_dir, root / name, **spec) for name, spec in ADAPTERS.items()
    }


def prompt_ids(tokenizer, topic: str) -> list[int]:
    messages = [{"role": "user", "content": PROMPT.format(topic=topic)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ----- one measurement: prefill, then decode, as hf.py does ---------------------------------


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = [[pad] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids), torch.tensor(mask)


def generate(option: Option, prompts, names, steps: int, pad: int) -> dict:
    """Prefill the rows together, then decode ``steps`` greedy tokens per row; time both."""
    from transformers import DynamicCache

    ids, mask = left_padded(prompts, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        start = time.perf_counter()
        logits, cache = option.forward(ids, mask, positions, DynamicCache(), names)
        tokens = logits.argmax(-1, keepdim=True)
        prefilled = time.perf_counter()
        generated = [tokens]
        for _ in range(steps):
            positions = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(positions)], dim=-1)
            logits, cache = option.forward(tokens, mask, positions, cache, names)
            tokens = logits.argmax(-1, keepdim=True)
            generated.append(tokens)
        done = time.perf_counter()
    return {
        "prefill_s": prefilled - start,
        "decode_tok_s": len(prompts) * steps / (done - prefilled) if steps else None,
        "tokens": torch.cat(generated, dim=-1).tolist(),
    }


def measure(option: Option, prompts, steps: int, pad: int) -> dict:
    one = generate(option, prompts[:1], ["all16-a"], 0 if option.level == "prefill" else steps, pad)
    result = {"prefill_ms": 1000 * one["prefill_s"]}
    if option.level == "prefill":
        return result
    result["decode_1_tok_s"] = one["decode_tok_s"]
    if option.level == "one":
        return result
    same = generate(option, prompts, SAME, steps, pad)
    mixed = generate(option, prompts, MIXED, steps, pad)
    return result | {
        "decode_8_same_tok_s": same["decode_tok_s"],
        "decode_8_mixed_tok_s": mixed["decode_tok_s"],
        "mixed_over_same": mixed["decode_tok_s"] / same["decode_tok_s"],
        "prefill_8_ms": 1000 * mixed["prefill_s"],
    }


# ----- part 1: the options, alternated --------------------------------------------------------


def run_options(options: list[Option], prompts, args, pad: int) -> list[dict]:
    reps = []
    for rep in range(args.reps):
        row = {}
        for option in options:
            row[option.name] = measure(option, prompts, args.steps, pad)
            print(f"rep {rep + 1}/{args.reps} {option.name}: {brief(row[option.name])}", flush=True)
        reps.append(row)
    return reps


def brief(result: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in result.items() if isinstance(v, float))


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


METRICS = {
    "prefill_ms": "prefill 1×~100 tok (ms)",
    "decode_1_tok_s": "decode 1 stream (tok/s)",
    "decode_8_same_tok_s": "8 streams, 1 adapter (tok/s)",
    "decode_8_mixed_tok_s": "8 streams, mixed (tok/s)",
    "prefill_8_ms": "prefill 8×~100 tok (ms)",
    "mixed_over_same": "mixed / same (within option)",
}


def summarize_options(reps: list[dict]) -> dict:
    """Per option and metric: the values, and their ratio to today's path within each rep."""
    summary: dict = {}
    for name in reps[0]:
        summary[name] = {}
        for metric in METRICS:
            if metric not in reps[0][name]:
                continue
            values = [rep[name][metric] for rep in reps]
            ratios = [rep[name][metric] / rep[TODAY][metric] for rep in reps]
            summary[name][metric] = {"value": spread(values), "vs_today": spread(ratios)}
    return summary


def greedy_check(options: list[Option], prompts, steps: int, pad: int) -> dict[str, float]:
    """Share of the 8 mixed rows whose greedy tokens equal today's path (also the warm-up)."""
    tokens = {}
    for option in options:
        if option.level == "all":
            tokens[option.name] = generate(option, prompts, MIXED, steps, pad)["tokens"]
            print(f"greedy check {option.name} done", flush=True)
    today = tokens[TODAY]
    return {n: sum(a == b for a, b in zip(t, today)) / len(today) for n, t in tokens.items()}


# ----- part 2: threads, quiet and with a busy neighbour ------------------------------------


class BusyNeighbour:
    """A process spinning one core, like another user's job, while the block runs."""

    def __init__(self, on: bool):
        self.on = on
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        if self.on:
            self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.process:
            self.process.kill()
            self.process.wait()


def run_threads(options: list[Option], prompts, args, pad: int, counts: list[int]) -> list[dict]:
    reps = []
    for rep in range(args.reps):
        row: dict = {}
        for busy in (False, True):
            with BusyNeighbour(busy):
                for threads in counts:
                    torch.set_num_threads(threads)
                    for option in options:
                        key = f"{option.name}|threads={threads}|{'busy' if busy else 'quiet'}"
                        row[key] = thread_measure(option, prompts, args.steps, pad)
                        print(f"rep {rep + 1}/{args.reps} {key}: {brief(row[key])}", flush=True)
        reps.append(row)
    return reps


def thread_measure(option: Option, prompts, steps: int, pad: int) -> dict:
    """One stream only: 8 rows at 2 threads beside other busy processes take minutes a cell."""
    one = generate(option, prompts[:1], ["all16-a"], steps, pad)
    return {"prefill_ms": 1000 * one["prefill_s"], "decode_1_tok_s": one["decode_tok_s"]}


def summarize_threads(reps: list[dict], default_threads: int) -> dict:
    """Each cell's values, plus busy/quiet slowdown and the ratio to today's default, per rep."""
    summary: dict = {}
    for key in reps[0]:
        name, threads, state = key.split("|")
        quiet = f"{name}|{threads}|quiet"
        today = f"{TODAY}|threads={default_threads}|{state}"
        cell = {}
        for metric in reps[0][key]:
            slower = [rep[quiet][metric] / rep[key][metric] for rep in reps]
            if metric == "prefill_ms":
                slower = [1 / s for s in slower]
            cell[metric] = {
                "value": spread([rep[key][metric] for rep in reps]),
                "slowdown_vs_quiet": spread(slower),
                "vs_today_default": spread([rep[key][metric] / rep[today][metric] for rep in reps]),
            }
        summary[key] = cell
    return summary


# ----- report ------------------------------------------------------------------------------


def fmt(cell: dict, digits: int = 1) -> str:
    v = cell["value"]["median"]
    r = cell["vs_today"]
    return f"{v:.{digits}f} ({r['median']:.2f}× [{r['min']:.2f}–{r['max']:.2f}])"


def options_table(summary: dict, greedy: dict[str, float]) -> list[str]:
    metrics = [m for m in METRICS if m != "mixed_over_same"]
    lines = [
        "| option | "
        + " | ".join(METRICS[m] for m in metrics)
        + " | mixed / same | greedy = today |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for name, cells in summary.items():
        row = [fmt(cells[m]) if m in cells else "—" for m in metrics]
        if "mixed_over_same" in cells:
            s = cells["mixed_over_same"]["value"]
            row.append(f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]")
            row.append(f"{greedy[name]:.0%} of rows")
        else:
            row += ["—", "—"]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def threads_table(summary: dict) -> list[str]:
    lines = [
        "| option, threads, neighbour | prefill ms (slowdown vs quiet) | decode 1 stream tok/s "
        "(slowdown vs quiet) | decode vs today at default threads, same neighbour |",
        "|---|---|---|---|",
    ]
    for key, cells in summary.items():
        parts = []
        for metric in ("prefill_ms", "decode_1_tok_s"):
            v, s = cells[metric]["value"]["median"], cells[metric]["slowdown_vs_quiet"]
            parts.append(f"{v:.1f} ({s['median']:.2f}× [{s['min']:.2f}–{s['max']:.2f}])")
        t = cells["decode_1_tok_s"]["vs_today_default"]
        parts.append(f"{t['median']:.2f}× [{t['min']:.2f}–{t['max']:.2f}]")
        lines.append(f"| {key.replace('|', ', ')} | " + " | ".join(parts) + " |")
    return lines


def write_markdown(out: Path, results: dict) -> None:
    command = results["command"]
    lines = [
        "# CPU serving options (SmolLM2-135M, many LoRAs)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}",
        "",
        f"## Options (torch threads: {results['default_threads']})",
        "",
        f"Each figure: median over {results['reps']} alternated repetitions of `{command}`; in "
        f"brackets the ratio to `{TODAY}` (today's path) within each repetition: median "
        "[min–max]. "
        + (
            "Part 1 read from raw-options.json, written by this command without --reuse-options. "
            if results.get("reused_options")
            else ""
        )
        + "Decode: "
        f"{results['steps']} greedy steps after the prefill. 8 mixed = {MIXED}.",
        "",
        *options_table(results["options"], results["greedy_rows_equal_today"]),
    ]
    if results.get("threads"):
        lines += [
            "",
            "## Threads, quiet and with a busy neighbour",
            "",
            f"Same command. Torch's default here is {results['torch_default_threads']} threads. "
            "Slowdown = quiet / busy throughput within a repetition; the last column compares with "
            f"`{TODAY}` at the default threads under the same neighbour.",
            "",
            *threads_table(results["threads"]),
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["options"]
    metrics = ["prefill_ms", "decode_1_tok_s", "decode_8_same_tok_s", "decode_8_mixed_tok_s"]
    names = [n for n in summary if n != TODAY]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, metric in enumerate(metrics):
            if metric not in summary[name]:
                continue
            r = summary[name][metric]["vs_today"]
            speedup = (lambda v: 1 / v) if metric == "prefill_ms" else (lambda v: v)
            y = speedup(r["median"])
            ends = sorted([speedup(r["min"]), speedup(r["max"])])
            xs.append(j + i * width)
            ys.append(y)
            lo.append(y - ends[0])
            hi.append(ends[1] - y)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels(["prefill speed", "decode 1 stream", "8 streams same", "8 streams mixed"])
    ax.set_ylabel(f"speed-up vs {TODAY} (median, range)")
    ax.set_title("SmolLM2-135M + LoRAs on this CPU: speed-up over today's path, one run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "options.png", dpi=120)


# ----- main ----------------------------------------------------------------------------------


def save_raw(out: Path, part: str, reps: list[dict]) -> None:
    """Every repetition's measurements, as soon as a part is done."""
    (out / f"raw-{part}.json").write_text(json.dumps(reps, indent=1))


def machine() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average at start {load[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/cpu/serving-options"))
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per measurement")
    parser.add_argument("--threads", type=int, help="torch threads of part 1 (default: torch's)")
    parser.add_argument("--no-threads", action="store_true", help="skip the threads part")
    parser.add_argument(
        "--reuse-options", action="store_true", help="take part 1 from --out/raw-options.json"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch_default = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python lab/cpu_serving_options.py " + " ".join(argv or sys.argv[1:])
    default_threads = torch.get_num_threads()  # torch's default, or --threads
    results = {"command": command.strip(), "machine": machine(), "reps": args.reps}
    results |= {"steps": args.steps, "default_threads": default_threads}
    results["torch_default_threads"] = torch_default

    from transformers import AutoTokenizer

    base_dir = resolve_base("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = [prompt_ids(tokenizer, topic) for topic in TOPICS]
    results["prompt_tokens"] = [len(p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp:
        print("making adapters and loading the options ...", flush=True)
        options = build_options(base_dir, make_adapters(base_dir, Path(tmp)))
    print(f"prompt tokens {results['prompt_tokens']}; {machine()}", flush=True)
    results["greedy_rows_equal_today"] = greedy_check(options, prompts, args.steps, pad)
    raw_options = args.out / "raw-options.json"
    if args.reuse_options:
        option_reps = json.loads(raw_options.read_text())
        print(f"part 1 taken from {raw_options}", flush=True)
        results["reused_options"] = True
    else:
        option_reps = run_options(options, prompts, args, pad)
        save_raw(args.out, "options", option_reps)
    results["options"] = summarize_options(option_reps)
    if not args.no_threads:
        pair = [o for o in options if o.name in (TODAY, CHOSEN)]
        counts = sorted({1, 2, torch_default})
        thread_reps = run_threads(pair, prompts, args, pad, counts)
        save_raw(args.out, "threads", thread_reps)
        results["threads"] = summarize_threads(thread_reps, torch_default)
        torch.set_num_threads(default_threads)
    results["load_average_at_end"] = os.getloadavg()[0]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(args.out, results)
    plot(args.out, results)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
