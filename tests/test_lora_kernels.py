"""engine/lora_kernels.py's CPU side: the projection shapes, the segments as SGLang's csgmv
backend cuts them, the config files in SGLang's layout, the report, and which folder the SGLang
backend hands SGLang (the kernels need a GPU: results/serving/h200-7b-lora-kernels-tuned)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import lora_kernels as tune

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336}  # fmt: skip


def test_q_and_v_targets_give_the_fused_qkv_projection_of_the_mistral_shape():
    (qkv,) = tune.groups_of(MISTRAL, ["q_proj", "v_proj"])
    assert (qkv.name, qkv.slices, qkv.input_dim) == ("qkv", 3, 4096)
    assert qkv.slice_offsets == (0, 4096, 5120, 6144)
    assert (qkv.output_dim, qkv.max_slice) == (6144, 4096)


def test_every_linear_target_gives_four_groups_and_an_unknown_one_stops():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    groups = {g.name: g for g in tune.groups_of(MISTRAL, targets)}
    assert list(groups) == ["qkv", "o", "gate_up", "down"]
    assert groups["gate_up"].slice_offsets == (0, 14336, 28672)
    assert (groups["down"].input_dim, groups["down"].output_dim) == (14336, 4096)
    with pytest.raises(SystemExit, match="lm_head"):
        tune.groups_of(MISTRAL, ["q_proj", "lm_head"])


def test_segments_group_rows_by_slot_stably_and_cut_each_run_at_the_chunk_size():
    case = tune.Case("c", (1,) * 6 + (20,), (2, 0, 2, 5, 0, 2, 2), graph=False)
    permutation, indptr, slots = tune.segments(case, chunk=16)
    rows = [2, 0, 2, 5, 0, 2] + [2] * 20
    assert sorted(permutation) == list(range(26))
    assert [rows[i] for i in permutation] == sorted(rows)
    assert [i for i in permutation if rows[i] == 2][:4] == [0, 2, 5, 6]  # stable
    lengths = [b - a for a, b in itertools.pairwise(indptr)]
    assert slots == [0, 2, 2, 5] and lengths == [2, 16, 7, 1]
    assert tune.lora_rows(case) == [i for i, slot in enumerate(rows) if slot != 0]


def test_the_cases_are_the_engines_batches_decode_graph_padded_and_one_eager_prefill():
    cases = {c.name: c for c in tune.cases_of(slots=128)}
    decode = cases["decode-256-adapters"]
    assert decode.graph and len(decode.slots) == 256 and set(decode.tokens_per_request) == {1}
    assert min(decode.slots) >= 1 and max(decode.slots) <= 128
    assert set(cases["decode-256-base"].slots) == {0}
    assert not cases["prefill-4x128-adapters"].graph


def test_the_grids_hold_the_defaults_neighbours_and_valid_tiles():
    expand = tune.config_grid("expand", rank=8, slices=3)
    shrink = tune.config_grid("shrink", rank=8, slices=3)
    assert {c["BLOCK_K"] for c in expand} == {16}  # rank 8: one K tile of tl.dot's minimum
    assert {c["BLOCK_N"] for c in expand} == {32, 64, 128, 256}
    assert {c["BLOCK_N"] for c in shrink} == {16, 32}  # N = 3 × 8
    assert all(c["num_warps"] in (2, 4, 8) and c["num_stages"] in (1, 2, 3) for c in shrink)
    assert {c["num_stages"] for c in expand} == {3}  # one K step: stages change nothing
    assert {c["num_stages"] for c in tune.config_grid("expand", rank=64, slices=1)} == {1, 2, 3}


def test_a_case_takes_the_median_of_its_rounds_and_fails_with_any_of_them():
    rounds = [{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": None}, {"a": 2.0, "b": 2.0}]
    assert tune.median_row(rounds) == {"a": 2.0, "b": None}


def test_file_names_follow_sglangs_config_loader():
    (qkv,) = tune.groups_of(MISTRAL, ["q_proj", "v_proj"])
    assert tune.file_name("expand", qkv, 8, "NVIDIA H200") == (
        "lora_expand,K=6144,R=8,S=3,device=NVIDIA_H200.json"
    )
    assert tune.file_name("shrink", qkv, 8, "NVIDIA H200") == (
        "lora_shrink,K=4096,R=8,S=3,device=NVIDIA_H200.json"
    )


def entry(kernel: str, timings: dict) -> dict:
    configs = {k: {"BLOCK_N": int(k.split("=")[-1])} for k in timings}
    return {"group": "qkv", "kernel": kernel, "chunk": 16, "timings": timings,
            "configs": configs, "best": tune.pick(timings), "default": "BLOCK_N=64",
            "file": f"lora_{kernel},K=1,R=8,S=3,device=G.json"}  # fmt: skip


def test_the_pick_is_the_least_summed_time_among_configs_that_ran_every_case():
    timings = {
        "BLOCK_N=64": {"a": 80.0, "b": 10.0},
        "BLOCK_N=256": {"a": 20.0, "b": 12.0},
        "BLOCK_N=32": {"a": 5.0, "b": None},  # failed one case: not a candidate
    }
    assert tune.pick(timings) == "BLOCK_N=256"
    assert tune.pick({"BLOCK_N=32": {"a": None}}) is None


def test_configs_are_written_in_sglangs_layout_beside_its_shipped_files(tmp_path):
    shipped = tmp_path / "sglang" / "csgmv_configs" / "triton_3_5_1"
    shipped.mkdir(parents=True)
    (shipped / "lora_expand,K=4096,R=64,S=3,device=G.json").write_text("{}")
    tuned = [entry("expand", {"BLOCK_N=64": {"a": 80.0}, "BLOCK_N=256": {"a": 20.0}}),
             entry("shrink", {"BLOCK_N=64": {"a": None}})]  # fmt: skip
    written = tune.write_configs(tmp_path / "out", tuned, "3.5.1", shipped.parent)
    folder = tmp_path / "out" / "csgmv_configs" / "triton_3_5_1"
    assert written == [folder / "lora_expand,K=1,R=8,S=3,device=G.json"]
    assert json.loads(written[0].read_text()) == {"16": {"BLOCK_N": 256}}
    assert (folder / "lora_expand,K=4096,R=64,S=3,device=G.json").exists()


def test_the_report_gives_each_cases_ratio_and_a_figure(tmp_path):
    tuned = [entry("expand", {"BLOCK_N=64": {"a": 80.0, "b": 10.0},
                              "BLOCK_N=256": {"a": 20.0, "b": 12.0}})]  # fmt: skip
    rows = tune.report_rows(tuned)
    assert [(r["case"], r["ratio"]) for r in rows] == [("a", 0.25), ("b", 1.2)]
    meta = {"command": "c", "device": "G", "sglang": "0.5.17", "triton": "3.5.1", "rank": 8,
            "chunk": 16, "slots": 128, "calls": 32, "replays": 20}  # fmt: skip
    text = tune.markdown(rows, meta)
    assert "| qkv | expand | a | 80.0 | 20.0 | 0.25 | `BLOCK_N=256` |" in text
    tune.plot(rows, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 0


def test_the_dry_run_reads_the_registry_and_plans_without_a_gpu(tmp_path):
    synth = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", "2",
                    "--out", str(synth)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "engine.lora_kernels", "--config", str(synth / "adapters.yaml"),
         "--dry-run"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "groups ['qkv']" in done.stdout
    assert "qkv expand: 12 configs × 4 cases" in done.stdout


def tuned_folder(path: Path) -> Path:
    (path / "csgmv_configs" / "triton_3_6_0").mkdir(parents=True)
    return path


def test_auto_uses_the_cache_folder_once_the_tuner_wrote_there(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAND_CACHE", str(tmp_path))
    assert tune.config_folder("auto") is None  # never tuned: SGLang's own files
    tuned_folder(tmp_path / "lora-kernels")
    assert tune.config_folder("auto") == tmp_path / "lora-kernels"
    assert tune.config_folder(None) is None


def test_a_named_folder_must_hold_sglangs_layout(tmp_path):
    assert tune.config_folder(str(tuned_folder(tmp_path / "k"))) == tmp_path / "k"
    with pytest.raises(ValueError, match="no csgmv_configs"):
        tune.config_folder(str(tmp_path / "missing"))


def test_the_backend_sets_sglangs_variable_and_a_users_own_wins(tmp_path):
    environ = {}
    folder = tuned_folder(tmp_path / "k")
    assert tune.use_tuned_kernels(str(folder), environ) == folder
    assert environ["SGLANG_LORA_CONFIG_DIR"] == str(folder)
    mine = {"SGLANG_LORA_CONFIG_DIR": "/mine"}
    assert tune.use_tuned_kernels(str(folder), mine) == Path("/mine")
    assert mine == {"SGLANG_LORA_CONFIG_DIR": "/mine"}
    untouched = {}
    assert tune.use_tuned_kernels(None, untouched) is None and untouched == {}


def test_a_later_engine_of_the_process_is_not_held_to_an_earlier_ones_folder(tmp_path):
    environ = {}
    first = tune.use_tuned_kernels(str(tuned_folder(tmp_path / "a")), environ)
    assert environ["SGLANG_LORA_CONFIG_DIR"] == str(first)
    second = tuned_folder(tmp_path / "b")
    assert tune.use_tuned_kernels(str(second), environ) == second
    assert tune.use_tuned_kernels(None, environ) is None
    assert "SGLANG_LORA_CONFIG_DIR" not in environ  # SGLang's own files again


def test_the_shipped_registry_plans_every_projection_its_adapters_touch(base_dir):
    """The packaged base (converted once, as the server does) and its five adapters: two of
    them train every linear layer at rank 16 and 32."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.lora_kernels", "--config", "adapters.yaml", "--dry-run"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "rank 32" in done.stdout and "groups ['qkv', 'o', 'gate_up', 'down']" in done.stdout
    assert "lora_expand,K=576,R=32,S=1" in done.stdout  # o and down share it


def test_a_registry_that_does_not_load_stops_the_tuner_with_its_reason(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "engine.lora_kernels", "--config", str(tmp_path / "no.yaml"),
         "--dry-run"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "cannot read" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_engines_rank_targets_and_slots_come_from_the_registry_settings(tmp_path):
    synth = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", "2",
                    "--out", str(synth)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    config = synth / "adapters.yaml"
    _, rank, targets, slots = tune.model_shape(str(config))
    assert (rank, targets) == (8, ["q_proj", "v_proj"])
    settings = "sglang: {max_lora_rank: 32, lora_target_modules: [all], max_loras_per_batch: 64}"
    config.write_text(config.read_text().replace("engine:", f"engine:\n  {settings}", 1))
    _, rank, targets, slots = tune.model_shape(str(config))
    assert (rank, slots) == (32, 64)
    assert set(targets) == set(tune.GROUP_OF_TARGET)


def test_without_sglang_or_a_gpu_the_tuner_says_what_it_needs(tmp_path):
    pytest.importorskip("torch")
    try:
        import sglang  # noqa: F401

        pytest.skip("SGLang is installed here")
    except ImportError:
        pass
    synth = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "loadtest.synth", "--shape", "tiny", "--adapters", "1",
                    "--out", str(synth)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "engine.lora_kernels", "--config", str(synth / "adapters.yaml"),
         "--configs", str(tmp_path / "k")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert "requirements/gpu.txt" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "k").exists()


def test_the_start_log_asks_for_the_tuner_only_where_auto_found_no_tuned_folder(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LORALAND_CACHE", str(tmp_path))
    warn, note = tune.kernels_note("auto", tune.config_folder("auto"))
    assert warn and "python -m engine.lora_kernels --config" in note
    assert str(tmp_path / "lora-kernels") in note
    folder = tuned_folder(tmp_path / "lora-kernels")
    assert tune.kernels_note("auto", tune.config_folder("auto")) == (
        False,
        f"csgmv LoRA kernels: block sizes from {folder}",
    )
    warn, note = tune.kernels_note(None, None)
    assert not warn and "lora_kernel_configs: null" in note
