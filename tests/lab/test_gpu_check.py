"""lab/gpu_check.py's verdicts, read from a report shaped as its run writes it: a key it misses
would cost a GPU session's check its summary line."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "lab" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

REPORT = {
    "streamed": {"alpha": {"chunks": 22}, "beta": {"chunks": 19}, "base": {"chunks": 32}},
    "runtime_adapters": {"hot_loaded_equals_beta": True, "unloaded_then_refused": True},
    "cancel": {"running_after_cancel": 0, "unload_after_cut": "ok"},
    "mixed_vs_cpu": {"token_match_rate": 1.0},
    "features": {
        "logprobs": {"one_per_token": True, "all_at_most_0": True},
        "constraints": {
            "choice_answers_in_choices": True,
            "json_answers_parse": True,
            "unconstrained_row_unchanged": True,
        },
        "abort": {
            "ended_with_request_ended_error": True,
            "running_after": 0,
            "next_request_tokens": 22,
        },
        "concurrent": {"every_token_delivered": True},
        "tokens_and_tools": {
            "prompt_as_cpu": True,
            "detokenized_back": True,
            "named_parses": True,
            "required_parses": True,
        },
        "sampling_extensions": {
            "min_tokens_held": True,
            "penalty_changed_the_answer": True,
            "min_p_1_is_greedy": True,
        },
        "context_fit": {"fits": True},
    },
}


def test_a_clean_report_passes_every_check():
    ok = gpu_check.verdicts(REPORT)
    assert ok and all(ok.values()), ok


def test_each_failure_names_its_check():
    cases = {
        ("features", "logprobs", "all_at_most_0"): "logprobs",
        ("features", "constraints", "json_answers_parse"): "json",
        ("features", "abort", "ended_with_request_ended_error"): "abort",
        ("features", "concurrent", "every_token_delivered"): "concurrent",
        ("cancel", "unload_after_cut"): "cancel",
        ("features", "tokens_and_tools", "prompt_as_cpu"): "tokenize",
        ("features", "tokens_and_tools", "required_parses"): "tool_calls",
        ("features", "sampling_extensions", "min_p_1_is_greedy"): "sampling_extensions",
        ("features", "context_fit", "fits"): "context_fit",
    }
    for path, name in cases.items():
        report = copy.deepcopy(REPORT)
        node = report
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = False
        ok = gpu_check.verdicts(report)
        assert [k for k, v in ok.items() if not v] == [name]


def test_a_check_that_raised_counts_as_failed():
    report = copy.deepcopy(REPORT)
    report["features"]["abort"] = {"error": "TimeoutError: "}
    report["features"]["concurrent"] = {"error": "RuntimeError: boom"}
    ok = gpu_check.verdicts(report)
    assert [k for k, v in ok.items() if not v] == ["abort", "concurrent"]
