"""``process.cpu_seconds``: CPU time of live processes from /proc, as the throughput bench
splits it between the training loop, the readers and the store."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pipeline.stack.process import cpu_seconds, process_tree


def test_cpu_seconds_counts_a_busy_child_and_nothing_for_an_idle_or_gone_one():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\ntime.sleep(60)"])
    idle = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 30
        while cpu_seconds([busy.pid]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        spent = cpu_seconds([busy.pid])
        assert 0.3 <= spent < 5.0
        assert cpu_seconds([idle.pid]) < 0.05
        assert cpu_seconds([busy.pid, idle.pid]) >= spent
        assert {busy.pid, idle.pid} <= set(process_tree(os.getpid()))
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert cpu_seconds([busy.pid, idle.pid]) == 0.0  # reaped: gone from /proc
