"""``bench/torch_memory.py``: the profiler's peak, without kineto's stderr lines."""

from __future__ import annotations

import os

import torch

from bench.torch_memory import peak_cpu_bytes, without_profiler_lines


def test_peak_counts_a_live_tensor_and_drops_only_the_profiler_lines(capfd):
    def work() -> None:
        x = torch.ones(1000, 1000)  # 4 MB live at once
        del x
        os.write(2, b"a real warning\n")

    peak = peak_cpu_bytes(work)
    assert 4_000_000 <= peak < 8_000_000
    err = capfd.readouterr().err
    assert "a real warning" in err and "ActivityProfilerHandler" not in err


def test_stderr_is_restored_after_an_error(capfd):
    try:
        with without_profiler_lines():
            os.write(2, b"kept\n")
            raise ValueError("boom")
    except ValueError:
        pass
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"
