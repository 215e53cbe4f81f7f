"""The front end's reliability, measured on a real server process (``python -m engine.api``, the
CPU default, the shipped adapters): the hostile-input table, the stall scenario, SIGTERM's
drain and an unload's deadline. Writes ``reliability.json`` and ``reliability.md``.

    python -m loadtest.reliability --out results/reliability

- **hostile**: every case of ``tests/test_hostile_inputs.py`` (status, error shape, ``/health``
  after each) — here against a separate process, with its real admin token and adapter root.
- **stall**: one stream runs while 8 requests announce 5 MiB bodies and 2 send 600 KB prompts
  (under the body limit, over the context): the stream's largest gap between chunks, and
  ``/health``'s latency meanwhile.
- **drain**: a long stream runs, the server gets SIGTERM: when the stream ends (error chunk and
  ``[DONE]``), when the process exits, and whether a new request is refused meanwhile.
- **unload**: a hot-loaded adapter with a long stream is unloaded: when DELETE returns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from engine.base_model import resolve_base
from engine.paths import work_dir
from loadtest.procs import start_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"  # the hostile table's admin token
MIB = 1 << 20
ERROR_FIELDS = ("message", "type", "param", "code")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped_registry(folder: Path, drain: float, unload: float) -> Path:
    """adapters.yaml with its paths made absolute and the server limits under test."""
    config = yaml.safe_load((ROOT / "adapters.yaml").read_text())
    for entry in config["adapters"]:
        entry["path"] = str(ROOT / entry["path"])
    config["server"] = {"drain_seconds": drain, "unload_seconds": unload}
    path = folder / "adapters.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def hostile_registry(folder: Path, root: Path) -> Path:
    """The hostile table's world, as its test builds it: adapters alpha and beta (random peft
    LoRAs), and under the adapter root a copy of beta, a DoRA adapter and a rank-16 one."""
    from tests.helpers import make_peft_adapter

    base = resolve_base("smollm2")
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    dirs = {
        "alpha": make_peft_adapter(base, folder / "alpha", 8, ["q_proj", "v_proj"], seed=1),
        "beta": make_peft_adapter(base, folder / "beta", 4, attention, seed=2),
    }
    shutil.copytree(dirs["beta"], root / "gamma", dirs_exist_ok=True)
    make_peft_adapter(base, root / "dora", r=4, target_modules=["q_proj"], seed=3, use_dora=True)
    make_peft_adapter(base, root / "big", r=16, target_modules=["q_proj"], seed=4)
    config = {
        "server": {"max_body_bytes": 65_536, "max_adapter_rank": 8},
        "adapters": [
            {"name": "alpha", "path": dirs["alpha"], "generation": {"max_tokens": 12},
             "template": "Is this review positive or negative?\n{review}"},
            {"name": "beta", "path": dirs["beta"], "generation": {"max_tokens": 12},
             "template": "Context: {context}\nQuestion: {question}"},
        ],
    }  # fmt: skip
    path = folder / "hostile.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def server(config: Path, root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"LORALAND_ADMIN_TOKEN": TOKEN, "LORALAND_ADAPTER_ROOT": str(root)}
    env["PYTHONPATH"] = str(ROOT)
    env.pop("LORALAND_API_KEY", None)  # its cases are the answers of a server without a key
    cmd = [sys.executable, "-m", "engine.api", "--config", str(config), "--port", str(port),
           "--backend", "hf"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    return start_server(cmd, f"{url}/health", timeout_s=600, env=env), url


def stream(url: str, body: dict) -> dict:
    """One SSE stream: its events, the gaps between them, when it ended."""
    events, gaps, last = [], [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                now = time.perf_counter()
                gaps.append(now - last) if last else None
                last = now
                events.append(line[6:])
    return {"events": events, "max_gap_s": max(gaps, default=0.0), "ended": time.perf_counter()}


def hostile(url: str) -> list[dict]:
    from tests.test_hostile_inputs import CASES, send

    rows = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, method, path, body, headers, status, _ in CASES:
            response = send(client, method, path, body, headers)
            error = response.json().get("error", {}) if response.status_code != 200 else {}
            shape = response.status_code == 200 or set(error) == {
                "message",
                "type",
                "param",
                "code",
            }
            health = client.get("/health").status_code
            rows.append({"case": name, "want": status, "got": response.status_code,
                         "openai_shape": shape, "health_after": health})  # fmt: skip
            print(f"  {name}: {response.status_code} (want {status}), health {health}", flush=True)
    return rows


def headers_only(url: str, size: int) -> int:
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: "
            f"application/json\r\ncontent-length: {size}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode())
        return int(s.recv(4096).split(b" ")[1])


def stall(url: str) -> dict:
    body = {"model": "base", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 120, "ignore_eos": True, "stream": True}  # fmt: skip
    long = {"model": "base", "messages": [{"role": "user", "content": "word " * 120_000}]}
    with ThreadPoolExecutor(16) as pool:
        watched = pool.submit(stream, url, body)
        time.sleep(2)
        door = [pool.submit(headers_only, url, 5 * MIB) for _ in range(8)]
        inside = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=long, timeout=300)
                  for _ in range(2)]  # fmt: skip
        health = []
        for _ in range(5):
            t0 = time.perf_counter()
            httpx.get(f"{url}/health", timeout=60)
            health.append(round(time.perf_counter() - t0, 3))
        result = watched.result()
    return {
        "five_mib_statuses": [f.result() for f in door],
        "six_hundred_kb_statuses": [f.result().status_code for f in inside],
        "other_stream_max_gap_s": round(result["max_gap_s"], 3),
        "other_stream_done": result["events"][-1] == "[DONE]",
        "health_latency_s": health,
    }


def drain(config: Path, root: Path) -> dict:
    process, url = server(config, root)
    body = {"model": "base", "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream, url, body)
        time.sleep(3)
        t0 = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            refused = httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.HTTPError as err:
            refused = type(err).__name__
        result = running.result()
        process.wait(120)
        exited = time.perf_counter() - t0
    last = result["events"][-2] if len(result["events"]) > 1 else ""
    return {
        "stream_ended_after_s": round(result["ended"] - t0, 2),
        "process_exited_after_s": round(exited, 2),
        "new_request_during_drain": refused,
        "stream_ended_with": "error chunk + [DONE]" if '"error"' in last else last[:80],
    }


def unload(url: str, root: Path) -> dict:
    shutil.copytree(ROOT / "adapters" / "smollm2" / "spam", root / "spam-copy", dirs_exist_ok=True)
    auth = {"authorization": f"Bearer {TOKEN}"}
    httpx.post(f"{url}/v1/adapters", json={"name": "spam-copy", "path": "spam-copy"},
               headers=auth, timeout=300).raise_for_status()  # fmt: skip
    body = {"model": "spam-copy", "prompt_template": "raw", "max_tokens": 4000, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": "Go on."}]}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream, url, body)
        time.sleep(3)
        t0 = time.perf_counter()
        answer = httpx.delete(f"{url}/v1/adapters/spam-copy", headers=auth, timeout=600)
        returned = time.perf_counter() - t0
        result = running.result()
    return {
        "delete_returned_after_s": round(returned, 2),
        "status": answer.status_code,
        "streams_ended": answer.json().get("streams_ended"),
        "stream_ended_with_error_chunk": '"error"' in result["events"][-2],
    }


def markdown(report: dict) -> str:
    rows = report["hostile"]
    good = sum(r["got"] == r["want"] and r["openai_shape"] and r["health_after"] == 200
               for r in rows)  # fmt: skip
    s, d, u = report["stall"], report["drain"], report["unload"]
    lines = [
        f"### Front-end reliability (`{report['command']}`)",
        "",
        f"CPU default, shipped adapters, `python -m engine.api` as a separate process; "
        f"drain {report['drain_seconds']} s, unload deadline {report['unload_seconds']} s.",
        "",
        "| check | result |",
        "|---|---|",
        f"| hostile requests: expected status, OpenAI shape, `/health` after | {good}/{len(rows)} "
        "|",
        f"| 8 × 5 MiB bodies (by Content-Length) | {s['five_mib_statuses']} |",
        f"| 2 × 600 KB prompts (under the limit, over the context) | "
        f"{s['six_hundred_kb_statuses']} |",
        f"| the other stream's largest gap between chunks | {s['other_stream_max_gap_s']} s |",
        f"| `/health` meanwhile | {max(s['health_latency_s'])} s at most |",
        f"| SIGTERM → the running stream ended ({d['stream_ended_with']}) | "
        f"{d['stream_ended_after_s']} s |",
        f"| SIGTERM → the process exited | {d['process_exited_after_s']} s |",
        f"| a new request during the drain | {d['new_request_during_drain']} |",
        f"| unload with a running stream → DELETE returned | {u['delete_returned_after_s']} s "
        f"({u['streams_ended']} stream ended with an error chunk) |",
        "",
        "| case | want | got | shape | health |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['want']} | {r['got']} | {r['openai_shape']} | "
              f"{r['health_after']} |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=work_dir() / "reliability")
    parser.add_argument("--drain-seconds", type=float, default=30.0)
    parser.add_argument("--unload-seconds", type=float, default=30.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = work_dir() / "reliability-scratch"
    root = scratch / "adapter-root"
    root.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m loadtest.reliability " + " ".join(sys.argv[1:]),
        "drain_seconds": args.drain_seconds,
        "unload_seconds": args.unload_seconds,
    }
    print("hostile inputs...", flush=True)
    process, url = server(hostile_registry(scratch, root), root)
    try:
        report["hostile"] = hostile(url)
    finally:
        process.terminate()
        process.wait(120)
    shipped = shipped_registry(scratch, args.drain_seconds, args.unload_seconds)
    process, url = server(shipped, root)
    try:
        print("stall...", flush=True)
        report["stall"] = stall(url)
        print("unload...", flush=True)
        report["unload"] = unload(url, root)
    finally:
        process.terminate()
        process.wait(120)
    print("drain...", flush=True)
    report["drain"] = drain(shipped, root)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=1))
    (args.out / "reliability.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
