"""lab/h200.sh, read as text: every command it runs resolves, and every action it starts in
the background is one it handles. An edit dropped two of its functions twice, unnoticed until
the GPU run (where a failure costs the session's device time)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "lab" / "h200.sh"
ON_THE_GPU_MACHINE_ONLY = {"nvidia-smi"}


def command_words(text: str) -> set[str]:
    """The first word of each simple command (quoted strings, expansions and the embedded
    Python left out)."""
    text = re.sub(r"<<'PY'\n.*?\nPY\n", "\n", text, flags=re.S)
    text = re.sub(r"\\\n\s*", " ", text)  # continued lines are one command
    words = set()
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        line = re.sub(r'"[^"$]*"', '""', line)
        line = re.sub(r"'[^']*'", "''", line)
        line = re.sub(r"\$\{[^}]*\}|\$\(\([^)]*\)\)", "X", line)
        line = re.sub(r"^[\w|*-]+\)\s*", "", line)  # a case arm's label
        for piece in re.split(r";;|;|&&|\|\||\||&|\$\(|\(|\)|\bthen\b|\belse\b|\bdo\b", line):
            piece = re.sub(r"^(\s*[A-Za-z_]\w*=\S*)+\s+", "", piece.strip())  # FOO=x cmd
            if m := re.match(r"([A-Za-z_][\w.-]*)(\s|$)", piece):
                words.add(m.group(1))
    return words


def test_every_command_is_a_function_a_builtin_or_a_program():
    text = SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    defined = set(re.findall(r"^([a-z_][a-z0-9_]*)\(\) \{", text, re.M))
    shell = subprocess.run(["bash", "-c", "compgen -b; compgen -k"], capture_output=True, text=True)
    known = defined | set(shell.stdout.split()) | ON_THE_GPU_MACHINE_ONLY
    words = command_words(text)
    assert {"step", "launch", "stash", "unpack", "collect", "finetune"} <= words  # seen as calls
    assert sorted(w for w in words if w not in known and not shutil.which(w)) == []


def test_every_step_a_job_lists_is_a_function():
    """Steps are called by name (``step NAME`` runs ``NAME`` with - as _): a step whose function
    went missing would fail only on the GPU machine."""
    text = SCRIPT.read_text()
    defined = set(re.findall(r"^([a-z_][a-z0-9_]*)\(\) \{", text, re.M))
    lists = re.findall(r'^STEPS_\w+_DEFAULT="([^"]*)"', text, re.M)
    assert len(lists) == 4
    steps = {s for names in lists for s in names.split()}
    assert {"bench-smoke", "pairs", "peer-smoke", "gpu-check", "parity", "peer", "router"} <= steps
    assert sorted(s for s in steps if s.replace("-", "_") not in defined) == []


def test_the_job_arms_and_gpus():
    """Two GPUs: `ours` on GPU 0 and `check` on GPU 1 in parallel (or the jobs JOBS_X2 names,
    e.g. `router` over both); one GPU: `all` on GPU 0."""
    text = SCRIPT.read_text()
    job = text[text.index("job() {") : text.index("launch() {")]
    assert re.search(r"ours\) export GPU=0 SYNC=1", job)
    assert re.search(r"check\) export GPU=1 SYNC=1", job)
    assert re.search(r"all\) export GPU=0 SYNC=0", job)
    assert "export CUDA_VISIBLE_DEVICES=$GPU" in job
    start = text[text.index("  start)") : text.index("  job) job")]
    assert "${JOBS_X2:-ours check cpu}" in start and "launch all" in start
    assert re.search(r"router\) export GPU=0 SYNC=0", job)


def test_every_background_action_is_handled():
    text = SCRIPT.read_text()
    arms = set(re.findall(r"^  ([\w-]+)\)", text[text.index('case "$ACTION" in') :], re.M))
    started = set(re.findall(r'bash "\$0" ([\w-]+)', text))
    assert started and started <= arms


def decode_flags(name: str) -> list[str]:
    """What decode-settings passes the bench for a setting NAME: its --set and its own flags."""
    text = SCRIPT.read_text()
    functions = "".join(
        text[text.index(f"{f}() {{") : text.index("\n}\n", text.index(f"{f}() {{")) + 3]
        for f in ("decode_setting", "decode_args")
    )
    script = f'{functions}\necho "--set $(decode_setting "${{1%-counted}}")"; decode_args "$1"'
    done = subprocess.run(["bash", "-c", script, "-", name], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    setting, _, flags = done.stdout.partition("\n")
    return ["--set", setting.removeprefix("--set "), *flags.split()]


def test_a_counted_decode_setting_is_that_engine_with_sglangs_pass_counters():
    assert decode_flags("fp8-min-slots-32") == [
        "--set", 'extra={"quantization": "fp8"}', "--set", "prefill_delay_min_slots=32",
    ]  # fmt: skip
    assert decode_flags("fp8-min-slots-32-counted") == [
        "--set", 'extra={"quantization": "fp8"}', "--sglang-counters",
        "--set", "prefill_delay_min_slots=32",
    ]  # fmt: skip
    assert decode_flags("fp8-counted") == [
        "--set", 'extra={"quantization": "fp8"}', "--sglang-counters"
    ]  # fmt: skip


def rounds_of(entry: str, pairs: str | None) -> str:
    text = SCRIPT.read_text()
    start = text.index("setting_rounds() {")
    function = text[start : text.index("\n}\n", start) + 3]
    env = {"PATH": "/usr/bin:/bin"} | ({"DECODE_PAIRS": pairs} if pairs else {})
    done = subprocess.run(
        ["bash", "-c", f'{function}\nsetting_rounds "$1"', "-", entry],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_decode_setting_may_name_its_own_rounds():
    assert rounds_of("fp8-counted@1", "2") == "1"
    assert rounds_of("fp8@3", None) == "3"
    assert rounds_of("fp8", "2") == "2"
    assert rounds_of("fp8", None) == "1"
    assert rounds_of("fp8@", "2") == "2"  # no number: DECODE_PAIRS
