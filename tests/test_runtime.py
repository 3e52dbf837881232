"""Process settings of the training loops: denormals flushed to zero (on every torch thread), and the switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import torch
from policylab import runtime
threads = runtime.configure(2, 0)
x = torch.full((1 << 20,), 4e-38)  # large enough to be split over every torch thread
x.mul_(0.5).mul_(0.5).mul_(0.5)  # 2e-38 (still normal), then 1e-38 and 5e-39: denormal, or 0 when flushed
denormal = int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum())
print(threads, denormal, int((x == 0).sum()))
"""


def _run(flush: str) -> tuple[int, int, int]:
    env = {**os.environ, "POLICYLAB_FLUSH_DENORMAL": flush}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    threads, denormal, zeros = map(int, out.stdout.split())
    return threads, denormal, zeros


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="FTZ/DAZ is an x86 setting")
def test_training_flushes_denormals_on_every_thread_unless_switched_off():
    threads, denormal, zeros = _run("1")
    assert denormal == 0 and zeros == 1 << 20, f"{denormal} denormals left with {threads} threads"
    _, denormal, zeros = _run("0")
    assert denormal == 1 << 20 and zeros == 0
