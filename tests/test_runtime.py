"""Process settings of the training loops: denormals flushed to zero (on every torch thread), and the switch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

SCRIPT = """
import torch
from policylab import runtime
threads = runtime.configure(2, 0).count
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


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.alone  # "more once it stops" needs the other cores idle: not beside another test worker
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="threads=auto reads /proc/stat (Linux)")
def test_auto_threads_use_one_thread_while_another_process_keeps_a_core_busy_and_more_once_it_stops():
    from policylab import runtime

    cores = runtime.usable_cores()
    if cores < 2:
        pytest.skip("needs 2 usable cores")
    threads = runtime.Threads("auto", preferred=2, interval=0.3)
    assert threads.count == 1, "an auto run starts on one thread until it has measured the cores"
    assert _reaches(threads, 2), "free cores: the preferred count"
    spinning = _spinners(cores - 1)  # every core but one busy, as with another run beside this one
    try:
        time.sleep(0.35)
        threads.update()  # this window saw the spinners start
        time.sleep(0.35)
        assert threads.update() == 1
        assert torch.get_num_threads() == 1
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()
    assert _reaches(threads, 2) and torch.get_num_threads() == 2


def _reaches(threads, count: int, windows: int = 10) -> bool:
    """Whether `threads` settles on `count` within a few measuring windows (a shared machine's background
    work may fill one window)."""
    for _ in range(windows):
        time.sleep(threads.interval + 0.05)
        if threads.update() == count:
            return True
    return False


def test_a_number_of_threads_is_used_as_given_capped_at_the_cores():
    from policylab import runtime

    assert runtime.Threads(1, preferred=2).update() == 1
    assert runtime.Threads(10_000, preferred=1).count == runtime.usable_cores()
    assert runtime.Threads("auto", preferred=1).count == 1  # on-policy auto: never more than its preferred 1


@pytest.mark.parametrize("value", ["0", "-1", "fast", "true"])
def test_bad_threads_values_are_refused_with_the_fix(value):
    from policylab.algos import get_algo
    from policylab.errors import ConfigError
    from policylab.train import resolve_config

    with pytest.raises(ConfigError, match="overrides={'threads': 'auto'}"):
        resolve_config(get_algo("sac"), env="Pendulum-v1", overrides={"threads": value}, preset="none")


def test_a_cgroup_cpu_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    from policylab import runtime

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert runtime._cgroup_cpu_quota(cpu_max) is None
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    assert runtime._cgroup_cpu_quota(cpu_max) == 1.5
    assert runtime._cgroup_cpu_quota(tmp_path / "missing") is None
    monkeypatch.setattr(runtime, "_cgroup_cpu_quota", lambda: 0.5)
    assert runtime.usable_cores() == 1


def test_available_memory_is_the_machines_or_its_cgroups_whichever_is_lower(tmp_path):
    from policylab import runtime

    meminfo, group = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    2000000 kB\nSwapFree:        1000000 kB\n")
    group.mkdir()
    assert runtime.memory_available(meminfo, group) == 3_000_000 * 1024  # no cgroup files: the machine's
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text("123\n")
    assert runtime.memory_available(meminfo, group) == 3_000_000 * 1024
    (group / "memory.max").write_text(f"{2 << 30}\n")  # docker --memory=2g, 123 bytes used
    assert runtime.memory_available(meminfo, group) == (2 << 30) - 123
    assert runtime.memory_available(tmp_path / "missing", tmp_path / "missing") is None


@pytest.mark.parametrize("kind", ["replay", "rollout", "dataset"])
def test_storage_that_cannot_fit_is_refused_before_it_is_allocated(tmp_path, monkeypatch, capsys, kind):
    """torch writes every page of a new tensor: a buffer larger than the free memory would end the process at once
    (the OOM killer, no message). One error naming the size and the most that fits, and no run directory."""
    from policylab import runtime
    from policylab.cli import main

    monkeypatch.setattr(runtime, "memory_available", lambda: 100 << 20)  # 100 MiB free
    argv = {
        "replay": ["train", "sac", "--env", "Pendulum-v1", "--set", "buffer_size=10_000_000"],
        "rollout": ["train", "ppo", "--env", "CartPole-v1", "--set", "n_steps=1_000_000", "--set", "num_envs=8"],
        "dataset": ["train", "td3_bc", "--dataset", "DATA"],
    }[kind]
    if kind == "dataset":
        from policylab.collect import collect

        collect("Pendulum-v1", "random", episodes=2, out=tmp_path / "data", ref_episodes=1)
        argv[-1] = str(tmp_path / "data")
        monkeypatch.setattr(runtime, "memory_available", lambda: 4000)  # the 402 transitions take 8 KiB
    runs = tmp_path / "runs"
    assert main([*argv, "--steps", "1000", "--runs-dir", str(runs), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "of memory, and" in err and "is available here" in err, err
    fix = {"replay": "lower buffer_size to at most about", "rollout": "lower n_steps x num_envs to at most about",
           "dataset": "use a dataset of at most about"}[kind]  # fmt: skip
    assert f"fix: {fix}" in err, err
    assert not runs.exists() or not any(runs.iterdir())


def test_training_puts_numpys_blas_on_one_thread_and_leaves_torchs_openmp_alone():
    script = """
import torch, numpy
from threadpoolctl import threadpool_info
from policylab import runtime
runtime.configure(2, 0, preferred=2)
blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(blas, torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("]")
    blas, torch_threads = out[0].strip("[ ").split(","), int(out[1])
    assert blas != [""] and all(int(n) == 1 for n in blas)  # numpy's OpenBLAS was found and limited
    assert torch_threads == min(2, len(os.sched_getaffinity(0)))
