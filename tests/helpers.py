"""Shared test helpers."""

from __future__ import annotations

import numpy as np
import torch

import policylab as pl


def params_of(run_dir) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pl.load(run_dir).net.state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def resumed_and_full_runs(algo: str, stop: int, **kwargs) -> tuple[pl.Run, pl.Run, pl.Run]:
    """(full, part, resumed): one uninterrupted run, one stopped once `step` reaches `stop`, and that one resumed;
    asserts the resumed run ends at the full run's step with the same policy parameters. The runs use one thread
    unless told otherwise: with threads=auto the count follows the machine's load, and on some machines a
    changed count changes the last bits of the products (runtime.Threads)."""
    kwargs["overrides"] = {"threads": 1, **(kwargs.get("overrides") or {})}
    full = pl.train(algo, name="full", **kwargs)
    part = pl.train(algo, name="part", callback=lambda info: info.step < stop, **kwargs)
    assert part.interrupted
    resumed = pl.train(algo, resume=part.dir, verbose=False)
    assert resumed.steps == full.steps
    assert_same_params(params_of(full.dir), params_of(resumed.dir))
    return full, part, resumed


def train_until(bar: float, algo: str, score=None, **train_kwargs) -> tuple[pl.Run, list[tuple[int, float]]]:
    """`pl.train(algo, **train_kwargs)` stopped at the first evaluation whose score (`score(return)`, the return
    itself by default) reaches `bar`: (the run, every evaluation's (step, score)). A learning test asserts on them."""
    evaluations: list[tuple[int, float]] = []

    def stop_at_bar(info: pl.IterationInfo) -> bool:
        if info.eval_return is not None:
            evaluations.append((info.step, info.eval_return if score is None else score(info.eval_return)))
        return not (evaluations and evaluations[-1][1] >= bar)

    run = pl.train(algo, callback=stop_at_bar, verbose=False, **train_kwargs)
    return run, evaluations


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """A swing-up controller for Pendulum-v1 (about -170 per episode): pump energy, then hold with PD control."""
    cos, sin, vel = obs[:, 0], obs[:, 1], obs[:, 2]
    energy = 0.5 * vel**2 + 10.0 * (cos - 1.0)  # 0 at rest at the top
    swing = np.where(energy < 0, 2.0 * np.sign(vel + 1e-6), -0.5 * vel)
    hold = np.clip(-10.0 * np.arctan2(sin, cos) - 2.0 * vel, -2.0, 2.0)
    return np.where(cos > 0.85, hold, swing)[:, None]


def cartpole_expert(obs: np.ndarray) -> np.ndarray:
    """Push towards where the pole falls (CartPole-v1: 500 in most episodes)."""
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)


def ray_process_pids(title: str) -> list[int]:
    """This process's descendants whose command line holds `title` (Ray names its workers ray::<function or
    class>); another test run's Ray workers on the same machine are not ours to kill."""
    import os
    from pathlib import Path

    parents: dict[int, int] = {}
    titled = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if title.encode() in (entry / "cmdline").read_bytes():
                titled.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    me = os.getpid()

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == me:
                return True
        return False

    return [pid for pid in titled if descends(pid)]


def assert_synced_every_second_step(trainer, moving: torch.nn.Module, train_step, rate: float) -> None:
    """Two steps of `train_step` (the trainer's own), each followed by `after_step`: `moving` (a reference or
    teacher synced every 2 steps) is untouched after the first and rate * model + (1 - rate) * itself after the
    second."""
    start = [p.detach().clone() for p in moving.parameters()]
    for step in (1, 2):
        trainer.step = step
        train_step()
        trainer.after_step(step)
        if step == 1:  # not yet a multiple of 2
            assert all(torch.equal(a, b) for a, b in zip(start, moving.parameters()))
    for synced, old, model in zip(moving.parameters(), start, trainer.model.parameters()):
        torch.testing.assert_close(synced, rate * model.detach() + (1 - rate) * old)
