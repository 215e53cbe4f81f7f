"""The Locust user's tokens/s window (the web UI's Tokens/s tab): totals, the 10-s window, and
old events leaving it. Run in a child process: importing Locust patches this one (gevent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import locust  # first, as the locust command does: it patches the standard library (gevent)
import time
from loadtest.locustfile import TokenCounter

clock = [1000.0]
time.time = lambda: clock[0]
counter = TokenCounter()
counter.add("a", 50)
clock[0] += 5
counter.add("b", 30)
counter.add("a", 20)
rates = {r["name"]: r["tokens_per_s"] for r in counter.table()}
assert rates == {"a": 7.0, "b": 3.0, "Aggregated": 10.0}, rates
clock[0] += 6  # the first answer is now 11 s old
counter.add("b", 10)
assert len(counter.events) == 3, counter.events
rows = {r["name"]: r for r in counter.table()}
assert rows["a"]["tokens_per_s"] == 2.0 and rows["a"]["tokens"] == 70, rows
assert rows["b"]["tokens_per_s"] == 4.0 and rows["b"]["tokens"] == 40, rows
assert rows["Aggregated"]["tokens"] == 110, rows
clock[0] += 60
counter.add("a", 1)
assert len(counter.events) == 1 and counter.totals == {"a": 71, "b": 40}
print("ok")
"""


def test_the_window_keeps_the_last_ten_seconds_and_the_totals_keep_everything():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
