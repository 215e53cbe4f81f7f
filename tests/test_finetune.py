"""Task data, parsers and metrics, a smoke QLoRA run and the evaluator, CI-sized."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from finetune.data import READERS, SPLITS, load_split, split_of
from finetune.sql import chinook_db, execution_match
from finetune.tasks import TASKS, field_f1

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", list(READERS))
def test_each_loader_gives_well_formed_examples_and_disjoint_splits(task):
    splits = {s: load_split(task, s) for s in SPLITS}
    assert len(splits["train"]) > 5 * len(splits["test"]) > 0
    for examples in splits.values():
        for ex in examples[:50]:
            assert isinstance(ex["target"], str) and ex["target"]
            assert TASKS[task].prompt(ex["input"])
    keys = {s: {json.dumps(e["input"], sort_keys=True) for e in splits[s]} for s in SPLITS}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_labels_and_splits_are_what_the_tasks_expect():
    assert {e["target"] for e in load_split("sentiment", "test")} == {"fresh", "rotten"}
    assert {e["target"] for e in load_split("spam", "test")} == {"spam", "ham"}
    assert {e["target"] for e in load_split("news", "test")} == set(TASKS["news"].labels)
    assert split_of("same key") == split_of("same key")


def test_the_hand_written_spam_set_is_balanced_and_not_from_the_training_corpus():
    from finetune.evaluate import examples_of
    from finetune.sources import read_spam

    fresh = examples_of("spam", "fresh")
    assert sorted(e["target"] for e in fresh) == ["ham"] * 20 + ["spam"] * 20

    def words(example) -> set[str]:
        return set(re.sub(r"\W+", " ", example["input"]["message"].lower()).split())

    corpus = [words(e) for e in read_spam()]
    for example in fresh:
        mine = words(example)
        overlap = max(len(mine & theirs) / len(mine | theirs) for theirs in corpus)
        assert overlap < 0.6, example  # no near copy of a message the adapter was trained on


def test_the_first_examples_of_a_split_are_a_fair_sample_not_one_class_or_template():
    """The sources come sorted (BBC by topic folder, SQL by template): --limit N must not see
    only business articles or only 'How many albums' questions."""
    assert {e["target"] for e in load_split("news", "test")[:40]} == set(TASKS["news"].labels)
    questions = [e["input"]["question"] for e in load_split("sql", "test")[:20]]
    assert len({q.split()[0] for q in questions}) >= 3


def test_classification_parser_takes_the_first_label_named():
    sentiment = TASKS["sentiment"]
    assert sentiment.parse("Rotten. Not fresh at all.") == "rotten"
    assert sentiment.parse("It is fresh") == "fresh"
    assert sentiment.parse("I cannot tell") == ""
    assert sentiment.score("fresh", "fresh") == {"accuracy": 1.0}
    assert TASKS["news"].score("Topic: sport", "sport") == {"accuracy": 1.0}


def test_address_metrics():
    task = TASKS["address"]
    gold = json.dumps({"AddressNumber": "219", "StreetName": "Dearborn"})
    assert task.score('{"AddressNumber": "219", "StreetName": "Dearborn"}', gold) == {
        "exact_match": 1.0,
        "field_f1": 1.0,
    }
    half = task.score('Here: {"AddressNumber": "219", "StreetName": "Main"} ok', gold)
    assert half == {"exact_match": 0.0, "field_f1": 0.5}
    assert task.score("not json", gold) == {"exact_match": 0.0, "field_f1": 0.0}
    assert field_f1({}, {}) == 1.0


def test_sql_is_scored_by_execution():
    db = chinook_db()
    gold = "SELECT COUNT(*) FROM album WHERE artist_id = 1"
    assert execution_match(db, "select count(id) from album where artist_id=1", gold)
    assert not execution_match(db, "SELECT COUNT(*) FROM album", gold)
    assert not execution_match(db, "SELECT nonsense FROM nowhere", gold)
    task = TASKS["sql"]
    assert task.parse("```sql\nSELECT 1;\n```") == "SELECT 1"
    assert task.score(f"Sure! {gold};", gold) == {"execution_accuracy": 1.0}


def test_smoke_qlora_run_writes_a_loadable_adapter_and_the_evaluator_scores_it(
    base_dir, tmp_path, monkeypatch
):
    import torch

    from engine.base_model import adapter_fit_problems
    from finetune import evaluate, train

    cfg = train.TrainConfig(task="spam", steps=2, batch_size=2, max_train=8, eval_every=1)
    report = train.train(cfg, tmp_path / "adapters" / "spam", torch.device("cpu"))
    out = tmp_path / "adapters" / "spam"
    assert (out / "adapter_model.safetensors").is_file() and report["steps"] == 2
    assert json.loads((out / "training.json").read_text())["final_val_loss"] is not None
    assert adapter_fit_problems(out, base_dir) == []
    config = tmp_path / "adapters.yaml"
    shutil.copy(ROOT / "adapters.yaml", config)
    config.write_text(config.read_text().split("\nadapters:")[0] + "\nadapters: []\n")
    from finetune.registry_update import register_adapter

    register_adapter(config, TASKS["spam"], out)
    argv = ["evaluate", "--config", str(config), "--tasks", "spam", "--limit", "3"]
    argv += ["--out", str(tmp_path / "results"), "--update-registry"]
    monkeypatch.setattr(sys, "argv", argv)
    evaluate.main()
    quality = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert quality["results"][0]["n"] == 3 and "accuracy" in quality["results"][0]["base"]
    assert "| spam | accuracy |" in (tmp_path / "results" / "quality.md").read_text()
    assert "base_score" in config.read_text()
    outputs = (tmp_path / "results" / "outputs.jsonl").read_text().splitlines()
    assert len(outputs) == 6 and json.loads(outputs[0])["ids"]  # 3 base + 3 adapter, token ids

    zero = {"accuracy": 0.0}
    earlier = {"task": "news", "metric": "accuracy", "n": 1, "delta_points": 0.0,
               "base": zero, "finetuned": zero, "adapter": "news"}  # fmt: skip
    quality["results"].append(earlier)
    (tmp_path / "results" / "quality.json").write_text(json.dumps(quality))
    monkeypatch.setattr(sys, "argv", [*argv, "--merge"])
    evaluate.main()
    merged = json.loads((tmp_path / "results" / "quality.json").read_text())["results"]
    assert [r["task"] for r in merged] == ["news", "spam"] and merged[1]["device"] == "cpu"

    rescore = ["evaluate", "--config", str(config), "--tasks", "spam", "--rescore"]
    for limit, out in (("3", "all"), ("2", "first2")):
        argv = [*rescore, str(tmp_path / "results"), "--limit", limit, "--out", str(tmp_path / out)]
        monkeypatch.setattr(sys, "argv", argv)
        evaluate.main()
    again = json.loads((tmp_path / "all" / "quality.json").read_text())["results"][0]
    assert (again["base"], again["finetuned"]) == (merged[1]["base"], merged[1]["finetuned"])
    for kept in ("samples", "seconds", "constrained"):  # what the stored run measured stays
        assert again[kept] == merged[1][kept]
    first2 = json.loads((tmp_path / "first2" / "quality.json").read_text())["results"][0]
    assert first2["n"] == 2 and len((tmp_path / "first2" / "outputs.jsonl").read_text().split()) > 0


def test_gradients_still_reach_every_layer_after_a_validation_pass(base_dir):
    """Regression: bitsandbytes repacks 4-bit weights for CPU inference in eval mode, after which
    no gradient flows back through them; validation must not switch Linear4bit to eval."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from finetune.train import collate, encode, load_model, validation_loss

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = [encode(tokenizer, TASKS["spam"], e, 128) for e in load_split("spam", "val")[:2]]
    model, _ = load_model(base_dir, "auto", torch.device("cpu"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    validation_loss(model, rows, tokenizer.eos_token_id, torch.device("cpu"), 2)
    model(**collate(rows, tokenizer.eos_token_id, torch.device("cpu"))).loss.backward()
    first_layer_b = next(
        p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n
    )
    assert first_layer_b.grad is not None and first_layer_b.grad.abs().sum() > 0


def test_registry_layout_per_base_and_trained_on_check(tmp_path):
    from engine.paths import work_dir
    from engine.registry import RegistryError, load_registry
    from finetune.train import default_layout

    shipped = (ROOT / "adapters" / "smollm2", ROOT / "adapters.yaml")
    assert default_layout("smollm2", publish=True) == shipped
    assert default_layout("gemma3-270m", publish=True)[1] == ROOT / "adapters-gemma3-270m.yaml"
    work = work_dir()
    assert default_layout("smollm2", publish=False) == (
        work / "adapters" / "smollm2",
        work / "adapters.yaml",
    )
    text = (ROOT / "adapters.yaml").read_text().replace("trained_on: smollm2", "trained_on: other")
    (tmp_path / "adapters").symlink_to(ROOT / "adapters")
    (tmp_path / "adapters.yaml").write_text(text)
    with pytest.raises(RegistryError, match=r"'sentiment' → trained_on: 'other'"):
        load_registry(tmp_path / "adapters.yaml")


def test_reregistering_an_adapter_keeps_its_place_and_its_score(tmp_path):
    import yaml

    from finetune.registry_update import register_adapter

    config = tmp_path / "adapters.yaml"
    shutil.copy(ROOT / "adapters.yaml", config)
    before = yaml.safe_load(config.read_text())["adapters"]
    register_adapter(config, TASKS["news"], ROOT / "adapters" / "news", "smollm2")
    after = yaml.safe_load(config.read_text())["adapters"]
    assert [e["name"] for e in after] == [e["name"] for e in before]
    news = next(e for e in after if e["name"] == "news")
    assert news["eval"] == next(e for e in before if e["name"] == "news")["eval"]
    assert (config.parent / news["path"]).resolve() == (ROOT / "adapters" / "news").resolve()


class BosTokenizer:
    """A tokenizer that, like Gemma's, puts <bos> (id 2) before every encode() by default."""

    eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [10 + len(w) for w in text.split()]
        return [2, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [2, 5, *self.encode(messages[0]["content"], add_special_tokens=False), 6]


def test_answer_tokens_carry_no_bos_so_the_model_does_not_learn_to_start_with_one():
    from finetune.train import encode

    example = {"input": {"message": "win a prize"}, "target": "spam"}
    ids, labels = encode(BosTokenizer(), TASKS["spam"], example, 256)
    answer = [t for t in labels if t != -100]
    assert answer == [14, 1]  # "spam" + eos, no <bos> in front
    assert ids[-2:] == answer and ids.count(2) == 1


def test_a_stuck_batch_stops_the_evaluation_with_an_error_naming_it():
    import asyncio

    from engine.interface import GenerationRequest
    from finetune.evaluate import run_batches

    class StuckEngine:
        async def generate(self, requests):
            await asyncio.sleep(60)

    requests = [GenerationRequest(prompt=str(i)) for i in range(5)]
    with pytest.raises(SystemExit, match=r"news base: batch 1 \(requests 0-3\).*0 s"):
        asyncio.run(run_batches(StuckEngine(), requests, 4, "news base", timeout=0.05))


def test_class_recall_counts_each_class_from_stored_outputs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("class_recall", ROOT / "lab/class_recall.py")
    class_recall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(class_recall)
    targets = [e["target"] for e in load_split("spam", "test")[:6]]
    rows = [{"task": "spam", "model": "adapter", "index": i, "text": "ham"} for i in range(6)]
    rows.append({"task": "spam", "model": "base", "index": 0, "text": "spam"})  # not counted
    (tmp_path / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = class_recall.recall(tmp_path, "spam", first=6)
    assert counts["ham"] == (targets.count("ham"), targets.count("ham"))
    assert counts.get("spam", (0, 0)) == (0, targets.count("spam"))


def test_interleaved_evaluation_asks_the_base_once_per_task_for_many_adapters(hf_engine):
    import asyncio

    from finetune.evaluate import TaskRun, evaluate_interleaved

    asked = []

    class Counting:
        async def generate(self, requests):
            asked.extend(r.adapter for r in requests)
            return await hf_engine.generate(requests)

    task = TASKS["sentiment"]
    runs = [TaskRun.build(task, name, None, 3, False) for name in ("alpha", "beta")]
    for request in [r for run in runs for r in run.base + run.tuned]:
        request.params.max_tokens = 4
    results = asyncio.run(evaluate_interleaved(Counting(), runs, batch=8))
    assert sorted(asked, key=str) == sorted([None] * 3 + ["alpha"] * 3 + ["beta"] * 3, key=str)
    assert [r["adapter"] for r in results] == ["alpha", "beta"]
    assert results[0]["base"] == results[1]["base"]
    base_ids = [[o["ids"] for o in r["outputs"] if o["model"] == "base"] for r in results]
    assert base_ids[0] == base_ids[1] and len(base_ids[0]) == 3
