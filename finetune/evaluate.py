"""Base model vs each task adapter on the held-out test split, through the engine, greedy.

    python -m finetune.evaluate                          # all tasks, ≤200 test examples each
    python -m finetune.evaluate --tasks spam sql --limit 50
    python -m finetune.evaluate --rescore results/finetune/smollm2 --limit 200   # no engine
    python -m finetune.evaluate --limit 2000 --out results/finetune/smollm2 --update-registry
    python -m finetune.evaluate --tasks sql --split fresh --out results/finetune/sql-fresh
    python -m finetune.evaluate --tasks spam --split fresh --backend hf \
        --out results/finetune/spam-fresh

Writes ``quality.json`` and ``quality.md`` (task, metric, base, fine-tuned, delta) into ``--out``
(default ``out/results/finetune/<config>``; the shipped results are ``results/finetune/smollm2``)
and, with ``--update-registry``, each adapter's ``eval`` into ``--config`` (the app's cards).
Requests go through ``Engine.generate``, the path the API and the app use. Every output (text
and greedy token ids) goes to ``outputs.jsonl`` beside them, which ``scripts/parity.py``
compares across backends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from engine import GenerationRequest, build_engine
from engine.constraints import ResponseFormat
from engine.paths import work_dir
from engine.registry import load_registry, with_overrides
from engine.sampling import resolve

from .data import load_split
from .registry_update import set_eval
from .sources import read_spam_fresh
from .sql_fresh import HAND_WRITTEN, load_fresh
from .tasks import TASKS, Task

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SETS = {("sql", name): partial(load_fresh, name) for name in HAND_WRITTEN}
HELD_OUT_SETS["spam", "fresh"] = read_spam_fresh
"""``--split``: hand-written sets beside a task's test split."""


def examples_of(task: str, split: str) -> list[dict]:
    """The examples a run scores: the task's test split, or a held-out set named by --split."""
    if split == "test":
        return load_split(task, "test")
    if (task, split) not in HELD_OUT_SETS:
        raise SystemExit(f"no {split!r} set for task {task}: {sorted(HELD_OUT_SETS)}")
    return HELD_OUT_SETS[task, split]()


def requests_for(
    task: Task, examples: list[dict], adapter: str | None, spec=None, constrain: bool = False
) -> list[GenerationRequest]:
    """Greedy requests as the API resolves them (the adapter's defaults under the task's length),
    with the task's answer format as a constraint when ``constrain``."""
    shape = task.response_format() if constrain else ResponseFormat(type="text")
    params = resolve(spec, max_tokens=task.max_tokens, temperature=0.0, response_format=shape)
    return [
        GenerationRequest(
            adapter=adapter,
            messages=[{"role": "user", "content": task.prompt(e["input"])}],
            params=params,
        )
        for e in examples
    ]


async def run_batches(
    engine, requests: list[GenerationRequest], batch: int, label: str, timeout: float = 900
):
    outputs = []
    for i in tqdm(range(0, len(requests), batch), desc=label, unit="batch"):
        try:
            outputs += await asyncio.wait_for(engine.generate(requests[i : i + batch]), timeout)
        except TimeoutError:
            raise SystemExit(
                f"{label}: batch {i // batch + 1} (requests {i}-{i + batch - 1}) gave no answer in "
                f"{timeout:.0f} s; the engine is stuck or far too slow for --batch {batch}"
            ) from None
    return outputs


def mean_scores(task: Task, outputs: list[str], examples: list[dict]) -> dict[str, float]:
    scores = [task.score(o, e["target"]) for o, e in zip(outputs, examples, strict=True)]
    return {k: round(sum(s[k] for s in scores) / len(scores), 6) for k in scores[0]}  # shown at 3


def task_result(task: Task, adapter: str, examples: list[dict], base_out, tuned_out) -> dict:
    """Base vs fine-tuned scores of one task from the two models' answers."""
    base, tuned = mean_scores(task, base_out, examples), mean_scores(task, tuned_out, examples)
    return {
        "task": task.name,
        "adapter": adapter,
        "metric": task.metric,
        "n": len(examples),
        "base": base,
        "finetuned": tuned,
        "delta_points": round((tuned[task.metric] - base[task.metric]) * 100, 1),
    }


def samples(examples: list[dict], base_out: list[str], tuned_out: list[str]) -> list[dict]:
    """The first three examples with both models' answers, for reading beside the scores."""
    rows = list(zip(examples, base_out, tuned_out, strict=True))[:3]
    return [{"input": e["input"], "target": e["target"], "base": b, "finetuned": t}
            for e, b, t in rows]  # fmt: skip


@dataclass
class TaskRun:
    """One task's test examples and the base's and the adapter's requests for them."""

    task: Task
    adapter: str
    examples: list[dict]
    base: list[GenerationRequest]
    tuned: list[GenerationRequest]
    constrained: bool

    @classmethod
    def build(
        cls, task: Task, adapter: str, spec, limit: int, constrain: bool, split: str = "test"
    ) -> TaskRun:
        examples = examples_of(task.name, split)[:limit]
        base = requests_for(task, examples, None, None, constrain)
        tuned = requests_for(task, examples, adapter, spec, constrain)
        return cls(task, adapter, examples, base, tuned, constrain and bool(task.response_format()))

    def report(self, base_done: list, tuned_done: list, seconds: float) -> dict:
        base_out, tuned_out = [c.text for c in base_done], [c.text for c in tuned_done]
        name = self.task.name
        return {
            **task_result(self.task, self.adapter, self.examples, base_out, tuned_out),
            "constrained": self.constrained,
            "seconds": round(seconds, 1),
            "samples": samples(self.examples, base_out, tuned_out),
            "outputs": [
                {
                    "task": name,
                    "adapter": self.adapter,
                    "index": i,
                    "model": model,
                    "text": c.text,
                    "ids": c.token_ids,
                }
                for model, done in (("base", base_done), ("adapter", tuned_done))
                for i, c in enumerate(done)
            ],
        }


async def evaluate_task(engine, run: TaskRun, batch: int, timeout: float = 900) -> dict:
    """The base's requests, then the adapter's, in batches of ``batch``."""
    started, name = time.perf_counter(), run.task.name
    base_done = await run_batches(engine, run.base, batch, f"{name} base", timeout)
    tuned_done = await run_batches(engine, run.tuned, batch, f"{name} adapter", timeout)
    return run.report(base_done, tuned_done, time.perf_counter() - started)


async def evaluate_interleaved(
    engine, runs: list[TaskRun], batch: int, timeout: float = 900
) -> list[dict]:
    """Every task's base and adapter requests dealt out in turn, so each batch mixes all the
    adapters and the base (the shipped serving case: many adapters in one batch). The base
    answers a task once, however many adapters are scored on it."""
    started = time.perf_counter()
    base_of: dict[str, int] = {}
    for run in runs:
        base_of.setdefault(run.task.name, len(base_of))
    firsts = {run.task.name: run for run in reversed(runs)}
    lists = [firsts[name].base for name in base_of] + [r.tuned for r in runs]
    dealt = [
        (i, j) for j in range(max(map(len, lists))) for i in range(len(lists)) if j < len(lists[i])
    ]
    done = await run_batches(engine, [lists[i][j] for i, j in dealt], batch, "interleaved", timeout)
    answers = [[None] * len(x) for x in lists]
    for (i, j), completion in zip(dealt, done, strict=True):
        answers[i][j] = completion
    seconds = time.perf_counter() - started
    return [
        run.report(answers[base_of[run.task.name]], answers[len(base_of) + k], seconds)
        for k, run in enumerate(runs)
    ]


def markdown_table(results: list[dict], training: dict[str, dict]) -> str:
    lines = [
        "| task | metric | base | fine-tuned | delta (points) | n | training | evaluated on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["metric"]
        t = training.get(r["adapter"], {})
        cost = (
            f"{t.get('steps')} steps, {t.get('wall_seconds')} s on {t.get('device')}" if t else "—"
        )
        task = r["task"] if r["adapter"] == r["task"] else f"{r['task']} (`{r['adapter']}`)"
        lines.append(
            f"| {task} | {m} | {r['base'][m]:.3f} | {r['finetuned'][m]:.3f} | "
            f"{r['delta_points']:+.1f} | {r['n']} | {cost} | {evaluated_on(r)} |"
        )
    mean = sum(r["delta_points"] for r in results) / max(1, len(results))
    tasks = len({r["task"] for r in results})
    named = f"{tasks} task" + ("s" if tasks != 1 else "")
    over = named if tasks == len(results) else f"{len(results)} adapters, {named}"
    lines.append(f"\nMean lift over the base: **{mean:+.1f} points** on {over}.")
    return "\n".join(lines) + "\n"


def evaluated_on(result: dict) -> str:
    if not result.get("backend"):
        return "—"
    return f"{result['backend']} {result.get('dtype')}, {result.get('device')}"


def merge_previous(out: Path, results: list[dict], outputs: list[dict]):
    """Results of this run replace the same tasks' in ``out``; other tasks are kept."""
    if not (out / "quality.json").exists():
        return results, outputs
    done = {r["task"] for r in results}
    old = json.loads((out / "quality.json").read_text())
    kept = [r for r in old["results"] if r["task"] not in done]
    for r in kept:  # runs written before results carried their own engine fields
        for key in ("backend", "dtype", "device"):
            r.setdefault(key, old.get(key))
    order = list(TASKS)
    merged = sorted(kept + results, key=lambda r: order.index(r["task"]))
    old_outputs = []
    if (out / "outputs.jsonl").exists():
        rows = (json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines())
        old_outputs = [o for o in rows if o["task"] not in done]
    return merged, old_outputs + outputs


def rescore(
    source: Path, limit: int, tasks: list[str], split: str = "test"
) -> tuple[list[dict], list[dict]]:
    """Score the outputs stored in ``source`` again, on each task's first ``limit`` examples."""
    quality = json.loads((source / "quality.json").read_text())
    rows = [json.loads(line) for line in (source / "outputs.jsonl").read_text().splitlines()]
    results, kept = [], []
    for old in (r for r in quality["results"] if r["task"] in tasks):
        task = TASKS[old["task"]]
        examples = examples_of(task.name, split)[: min(limit, old["n"])]
        mine = sorted(
            (o for o in rows if o["task"] == task.name and o["index"] < len(examples)),
            key=lambda o: o["index"],
        )
        base = [o["text"] for o in mine if o["model"] == "base"]
        tuned = [o["text"] for o in mine if o["model"] == "adapter"]
        engine = {k: old.get(k, quality.get(k)) for k in ("backend", "dtype", "device")}
        result = task_result(task, old["adapter"], examples, base, tuned)
        generated = {k: old[k] for k in ("constrained", "seconds") if k in old}  # the run's own
        results.append({**result, **generated, "samples": samples(examples, base, tuned),
                        "rescored_from": str(source), **engine})  # fmt: skip
        kept += mine
    return results, kept


def run_engine(registry, args) -> tuple[list[dict], list[dict], dict]:
    if args.backend == "hf":  # the CPU default's exact mode unless --set says otherwise
        registry.engine.hf = with_overrides(registry.engine.hf, ["base_weights=fp32", *args.set])
    else:
        registry.engine.sglang = with_overrides(registry.engine.sglang, args.set)
    registry.base.dtype = args.dtype
    registry.engine.hf.max_batch_size = args.batch
    engine = build_engine(registry, backend=args.backend)
    by_task = {a.task: [a.name] for a in registry.adapters}
    if args.adapter:  # these adapters (merged ones, say) on every task
        unknown = sorted(set(args.adapter) - {a.name for a in registry.adapters})
        if unknown:
            raise SystemExit(f"--adapter {unknown}: not in {args.config}")
        by_task = dict.fromkeys(args.tasks, args.adapter)
    missing = [t for t in args.tasks if t not in by_task]
    if missing:
        raise SystemExit(f"no adapter in {args.config} for tasks {missing}: train them first")

    specs = {a.name: a for a in registry.adapters}
    runs = [
        TaskRun.build(TASKS[t], name, specs[name], args.limit, args.constrain, args.split)
        for t in args.tasks
        for name in by_task[t]
    ]

    async def every_task() -> list[dict]:  # one event loop: SGLang binds to the first one
        if args.interleave:
            return await evaluate_interleaved(engine, runs, args.batch, args.batch_timeout)
        return [await evaluate_task(engine, r, args.batch, args.batch_timeout) for r in runs]

    results = asyncio.run(every_task())
    run = {"backend": engine.backend, "dtype": args.dtype, "device": engine.device}
    if engine.backend == "hf":
        run["base_weights"] = registry.engine.hf.base_weights
    outputs = [o for r in results for o in r.pop("outputs")]
    for r in results:
        r.update(run)
    return results, outputs, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "adapters.yaml")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=900,
                        help="seconds one batch may take before the run stops")  # fmt: skip
    parser.add_argument("--backend", choices=["auto", "hf", "sglang"], default="hf")
    parser.add_argument("--dtype", default="float32", help="float32 = the CPU default's numbers")
    parser.add_argument("--out", type=Path, help="default: out/results/finetune/<config name>")
    parser.add_argument("--update-registry", action="store_true")
    constrain = "constrain answers to each task's format (its labels, the address schema)"
    parser.add_argument("--constrain", action="store_true", help=constrain)
    parser.add_argument("--adapter", nargs="+", help="evaluate these adapters on every task")
    interleave = "deal every task's base and adapter requests out in turn: mixed batches"
    parser.add_argument("--interleave", action="store_true", help=interleave)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tasks' results already in --out")  # fmt: skip
    setting = "a backend setting: mem_fraction_static=0.1 (SGLang), base_weights=fp16 (CPU)"
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help=setting)
    parser.add_argument("--rescore", type=Path, metavar="DIR",
                        help="no engine: score DIR's outputs, first --limit examples")  # fmt: skip
    split_help = "test, or a hand-written set: fresh, fresh2 (sql), fresh (spam)"
    parser.add_argument("--split", default="test", help=split_help)
    args = parser.parse_args()
    if args.adapter and args.update_registry:
        raise SystemExit("--update-registry records each task's own adapter: not with --adapter")
    if args.split != "test" and args.update_registry:
        parser.error("--update-registry takes test-split scores only")
    registry = load_registry(args.config)
    args.out = args.out or work_dir() / "results" / "finetune" / args.config.stem
    if args.rescore:
        results, outputs = rescore(args.rescore, args.limit, args.tasks, args.split)
        run = {k: results[0][k] for k in ("backend", "dtype", "device")} if results else {}
    else:
        results, outputs, run = run_engine(registry, args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results, outputs = merge_previous(args.out, results, outputs)
    paths = {a.name: a.path for a in registry.adapters}
    training = {  # by adapter: a run with --adapter scores several adapters of one task
        r["adapter"]: json.loads(p.read_text())
        for r in results
        if r["adapter"] in paths and (p := paths[r["adapter"]] / "training.json").exists()
    }
    with (args.out / "outputs.jsonl").open("w") as f:
        f.writelines(json.dumps(o) + "\n" for o in outputs)
    meta = {"limit": args.limit, "split": args.split, **run}
    (args.out / "quality.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    (args.out / "quality.md").write_text(markdown_table(results, training))
    print(markdown_table(results, training))
    if args.update_registry:
        for r in results:
            m = r["metric"]
            set_eval(args.config, r["adapter"], m, r["finetuned"][m], r["base"][m], r["n"])


if __name__ == "__main__":
    main()
