"""Each off-policy algorithm learns: a deterministic evaluation return reaches a bar within a step budget.

The runs evaluate every `every` steps and stop at the first evaluation at or above the bar (a
"reaches X within N steps" test), so a fast learner costs less CI time. Seeds are fixed: a seed fixes
a run on one machine. The continuous-action runs and discrete SAC use [64, 64] networks (SMALL): the same
algorithms learn the same tasks in about a quarter of the CI time of the presets' wider ones (seeds 1-3 reached
every bar below by 10,000 steps, when written); the presets themselves are measured by
benchmarks/preset_reliability.py.
"""

from __future__ import annotations

from tests.helpers import train_until


def _reaches(algo: str, env: str, budget: int, bar: float, every: int, tmp_path, **overrides) -> list[tuple]:
    """Train until an evaluation reaches `bar` (or the budget runs out); returns the evaluations."""
    settings = {"eval_every": every, "eval_episodes": 10, "checkpoint_every": 0, **overrides}
    _, evaluations = train_until(bar, algo, env=env, steps=budget, seed=1, overrides=settings, runs_dir=tmp_path)
    assert evaluations and max(r for _, r in evaluations) >= bar, f"{algo} on {env} within {budget}: {evaluations}"
    return evaluations


SMALL = {"hidden_sizes": [64, 64]}


def test_sac_reaches_minus_250_on_pendulum_within_15k_steps(tmp_path):
    _reaches("sac", "Pendulum-v1", 15_000, -250, 1000, tmp_path, **SMALL)  # the preset's lr 1e-3


def test_sac_with_gsde_reaches_minus_250_on_pendulum_within_15k_steps(tmp_path):
    """use_sde (SB3's defaults: log std -3, a matrix per step at train_freq 1): seeds 1-3 reached -250 at 3k-4k."""
    _reaches("sac", "Pendulum-v1", 15_000, -250, 1000, tmp_path, use_sde=True, **SMALL)


def test_td3_reaches_minus_250_on_pendulum_within_15k_steps(tmp_path):
    _reaches("td3", "Pendulum-v1", 15_000, -250, 1000, tmp_path, learning_starts=1000, **SMALL)


def test_dqn_reaches_450_on_cartpole_within_30k_steps(tmp_path):
    _reaches("dqn", "CartPole-v1", 30_000, 450, 2500, tmp_path)  # the preset (its budget)


def test_discrete_sac_learns_cartpole(tmp_path):
    # an update every second step: seeds 1-3 at 8k, 10k and 5k steps, in half the time of one every step
    _reaches("sac_discrete", "CartPole-v1", 30_000, 300, 2500, tmp_path, learning_starts=1000, train_freq=2, **SMALL)


def test_ddpg_learns_pendulum(tmp_path):
    _reaches("ddpg", "Pendulum-v1", 15_000, -300, 1000, tmp_path, learning_starts=1000, **SMALL)


def test_tqc_learns_pendulum(tmp_path):
    # the preset's lr 1e-3, an update every second step: seeds 1-3 at 5k, 6k and 6k steps (every step: 4k, 6k, 4k)
    _reaches("tqc", "Pendulum-v1", 15_000, -250, 1000, tmp_path, train_freq=2, **SMALL)
