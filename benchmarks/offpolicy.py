"""policylab's off-policy algorithms vs stable-baselines3's, side by side, identical hyperparameters.

Run from the repository root:

    .venv/bin/python benchmarks/offpolicy.py --seeds 3                               # every case
    .venv/bin/python benchmarks/offpolicy.py --case sac-pendulum --case dqn-cartpole  # some cases
    .venv/bin/python benchmarks/offpolicy.py --quick --seeds 1                        # a smoke run, not a result
    .venv/bin/python benchmarks/offpolicy.py --seeds 10 --first-seed 11 --case dqn-cartpole    # seeds 11-20
    .venv/bin/python benchmarks/offpolicy.py --seeds 10 --case dqn-cartpole --curve-every 5000  # + returns in training

Cases (policylab with `preset="none"` and every hyperparameter set explicitly; SB3 with the same values):

* `sac-pendulum`: SAC, Pendulum-v1, 20k steps, lr 1e-3, otherwise SB3's SAC defaults (buffer 1M,
  learning_starts 100, batch 256, tau 0.005, gamma 0.99, train_freq 1, gradient_steps 1, automatic
  entropy coefficient from 1.0 with target -dim(A), two critics, [256, 256] ReLU).
* `td3-pendulum`: TD3, Pendulum-v1, 20k steps, SB3's TD3 defaults (lr 1e-3, [400, 300] ReLU, batch 256,
  learning_starts 100, buffer 1M, policy_delay 2, target noise 0.2 clipped at 0.5, tau 0.005, train_freq 1,
  gradient_steps 1) plus Gaussian exploration noise of std 0.1 (SB3: NormalActionNoise(0, 0.1)).
* `dqn-cartpole`: DQN, CartPole-v1, 50k steps, rl-zoo's CartPole-v1 entry (lr 2.3e-3, batch 64, buffer
  100k, learning_starts 1000, gamma 0.99, target_update_interval 10, train_freq 256, gradient_steps 128,
  exploration_fraction 0.16, final eps 0.04, [256, 256]) and SB3's DQN defaults otherwise (hard target
  copies, max_grad_norm 10, Huber loss, initial eps 1.0, ReLU).
* `sac-halfcheetah`: SAC, HalfCheetah-v5, SB3's SAC defaults (lr 3e-4) with learning_starts 10000 and
  30k steps: the speed of the first 20k steps with updates.
* `dqn-her-bitflip`: DQN with hindsight experience replay on bit flipping with 15 bits, policylab's
  BitFlipping-v0 preset (20k steps, lr 1e-3, batch 128, buffer 1M, learning_starts 1000, train_freq 1,
  target_update_interval 1000, exploration_fraction 0.2, final eps 0.05, one hidden layer of 256; 4 future
  goals per transition) against SB3's DQN with `HerReplayBuffer` (n_sampled_goal 4, strategy future) on SB3's
  own `BitFlippingEnv(n_bits=15)`, the same values. The evaluation counts successes too (an episode that ends
  by reaching its goal).
* `tqc-pendulum`: TQC against sb3-contrib's TQC, Pendulum-v1, rl-zoo's entry (lr 1e-3, 20k steps) and
  sb3-contrib's defaults otherwise: `sac-pendulum`'s values plus 2 critics of 25 quantiles, the top 2 per critic
  dropped from the pooled target.
* `crossq-pendulum`: CrossQ against sb3-contrib's CrossQ, Pendulum-v1, rl-zoo's entry (20k steps, policy_delay
  2, [256, 256] for the actor and the critics) and sb3-contrib's defaults otherwise: `sac-pendulum`'s values
  without target networks, Adam betas (0.5, 0.999), batch renormalization (momentum 0.01, eps 1e-3, warmup 100k).
* `qrdqn-cartpole`: QR-DQN against sb3-contrib's QRDQN, CartPole-v1, rl-zoo's entry (`dqn-cartpole`'s values
  with 10 quantiles and, as sb3-contrib's QRDQN, no gradient clipping and Adam's epsilon at 0.01 / batch size).

`--precision bf16` runs policylab with `precision=bf16` (its large products in bfloat16 with float32
accumulation, where the CPU has AMX or AVX512-BF16; SB3 stays float32 unless `--sb3-onednn`).

`--sb3-onednn` runs SB3 with `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, which sends every
float32 product it makes to oneDNN (policylab sends only its large ones, see policylab/nets/matmul.py): the
comparison with the fast kernel on both sides.

One env, `--threads` torch threads (default 1) on both sides, device cpu. Each run is a fresh
`python benchmarks/offpolicy.py --worker ours|sb3 --case C ...` subprocess, the two sides alternating
per seed (seeds 1..N, or from `--first-seed`). Per run:

* whole-process wall clock, launch to exit (timed by the parent, common.run_worker);
* training wall clock: from just before `pl.train()` to its return (policylab builds its env and networks,
  trains, saves its final checkpoint and runs its own final evaluation inside it), and for SB3 from just
  before the env and model are built to the return of `learn()`; the training loop alone (first to last
  callback) is recorded too;
* updates (gradient steps) done: policylab's `updates` metric, SB3's `model._n_updates`;
* updates/s after learning starts: the updates and the wall clock between the first callback at an env
  step >= learning_starts rounded up to a multiple of 1000 (policylab calls back once per `log_every` =
  1000 env steps; SB3's callback marks the same env step) and the end of training;
* the final return: the mean over 10 deterministic episodes, env seeds seed+1000+i, one plain Gymnasium
  loop shared by both sides.

Output: a table per case (per seed and median [min-max] over seeds of the ratio ours/SB3), a summary
table, JSON in benchmarks/results/offpolicy-<date>.json.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    Metric,
    config_mismatches,
    curve_record,
    fmt,
    fmt_summary,
    pair_report,
    positive_int,
    print_table,
    provenance,
    require_precision,
    run_alternating,
    write_results,
)

if TYPE_CHECKING:
    from policylab import IterationInfo

LOG_EVERY = 1000  # policylab's off-policy iteration (env steps per callback)
EVAL_EPISODES, EVAL_SEED_OFFSET = 10, 1000
QUICK_FACTOR = 0.1


@dataclass(frozen=True)
class Case:
    algo: str  # policylab's name
    sb3: str  # SB3's class
    env: str
    steps: int
    learning_starts: int
    ours: dict[str, Any]  # policylab overrides (steps, learning_starts and run-level keys are added per run)
    sb3_kwargs: dict[str, Any]  # SB3 constructor keywords (learning_starts, seed and device are added per run)
    action_noise: float | None = None  # SB3: NormalActionNoise(0, action_noise) (policylab: the action_noise key)
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # both sides' env (and the evaluation's)
    her: bool = False  # SB3: HerReplayBuffer with n_sampled_goal 4, future goals, on its BitFlippingEnv
    sb3_module: str = "stable_baselines3"  # or sb3_contrib (TQC, QRDQN)
    adam_eps: float = 1e-8  # SB3's Adam epsilon (checked; QRDQN's is 0.01 / batch size)


def _sac(env: str, steps: int, learning_starts: int, lr: float) -> Case:
    return Case(
        algo="sac",
        sb3="SAC",
        env=env,
        steps=steps,
        learning_starts=learning_starts,
        ours={
            "lr": lr,
            "buffer_size": 1_000_000,
            "batch_size": 256,
            "tau": 0.005,
            "gamma": 0.99,
            "train_freq": 1,
            "gradient_steps": 1,
            "alpha": 1.0,
            "auto_alpha": True,
            "target_entropy": None,
            "n_critics": 2,
            "actor_delay": 1,
            "target_update_interval": 1,
            "critic_layer_norm": False,
            "max_grad_norm": None,
            "hidden_sizes": [256, 256],
            "activation": "relu",
        },
        sb3_kwargs={
            "learning_rate": lr,
            "buffer_size": 1_000_000,
            "batch_size": 256,
            "tau": 0.005,
            "gamma": 0.99,
            "train_freq": 1,
            "gradient_steps": 1,
            "ent_coef": "auto_1.0",
            "target_entropy": "auto",
            "policy_kwargs": {"net_arch": [256, 256], "n_critics": 2},
        },
    )


def _tqc_pendulum() -> Case:
    """rl-zoo's TQC Pendulum-v1 entry (lr 1e-3, 20k steps) on sb3-contrib's defaults: SAC's, plus 2 critics of 25
    quantiles, the top 2 per critic dropped from the pooled target."""
    sac = _sac("Pendulum-v1", 20_000, 100, 1e-3)
    ours = {k: v for k, v in sac.ours.items() if k not in ("actor_delay", "target_update_interval")}
    ours.update({"n_quantiles": 25, "drop_per_critic": 2})
    sb3_kwargs = {**sac.sb3_kwargs, "top_quantiles_to_drop_per_net": 2}
    sb3_kwargs["policy_kwargs"] = {**sac.sb3_kwargs["policy_kwargs"], "n_quantiles": 25}
    return dataclasses.replace(sac, algo="tqc", sb3="TQC", sb3_module="sb3_contrib", ours=ours, sb3_kwargs=sb3_kwargs)


def _crossq_pendulum() -> Case:
    """rl-zoo's CrossQ Pendulum-v1 entry (20k steps, policy_delay 2, net_arch [256, 256] for actor and critics) on
    sb3-contrib's defaults otherwise: `sac-pendulum`'s values without target networks, Adam betas (0.5, 0.999),
    batch renormalization (momentum 0.01, eps 1e-3, 100k warmup passes)."""
    sac = _sac("Pendulum-v1", 20_000, 100, 1e-3)
    dropped = ("tau", "target_update_interval", "critic_layer_norm")
    ours = {k: v for k, v in sac.ours.items() if k not in dropped}
    ours.update(
        {
            "actor_delay": 2,
            "critic_hidden_sizes": [256, 256],
            "adam_beta1": 0.5,
            "renorm_momentum": 0.01,
            "renorm_eps": 1e-3,
            "renorm_warmup": 100_000,
        }
    )
    sb3_kwargs = {k: v for k, v in sac.sb3_kwargs.items() if k != "tau"}
    sb3_kwargs["policy_delay"] = 2
    return dataclasses.replace(
        sac, algo="crossq", sb3="CrossQ", sb3_module="sb3_contrib", ours=ours, sb3_kwargs=sb3_kwargs
    )


def _qrdqn_cartpole() -> Case:
    """rl-zoo's QR-DQN CartPole-v1 entry: its DQN entry's values with 10 quantiles, no gradient clipping
    (sb3-contrib's QRDQN default)."""
    dqn = CASES["dqn-cartpole"]
    ours = {k: v for k, v in dqn.ours.items() if k not in ("double_q", "dueling", "loss")}
    eps = 0.01 / dqn.ours["batch_size"]
    ours.update({"n_quantiles": 10, "max_grad_norm": None, "adam_eps": eps})
    sb3_kwargs = {k: v for k, v in dqn.sb3_kwargs.items() if k != "max_grad_norm"}
    sb3_kwargs["policy_kwargs"] = {"net_arch": [256, 256], "n_quantiles": 10}
    return dataclasses.replace(
        dqn, algo="qrdqn", sb3="QRDQN", sb3_module="sb3_contrib", ours=ours, sb3_kwargs=sb3_kwargs, adam_eps=eps
    )


CASES: dict[str, Case] = {
    "sac-pendulum": _sac("Pendulum-v1", 20_000, 100, 1e-3),
    "td3-pendulum": Case(
        algo="td3",
        sb3="TD3",
        env="Pendulum-v1",
        steps=20_000,
        learning_starts=100,
        ours={
            "lr": 1e-3,
            "buffer_size": 1_000_000,
            "batch_size": 256,
            "tau": 0.005,
            "gamma": 0.99,
            "train_freq": 1,
            "gradient_steps": 1,
            "policy_delay": 2,
            "target_noise": 0.2,
            "target_noise_clip": 0.5,
            "action_noise": 0.1,
            "n_critics": 2,
            "critic_layer_norm": False,
            "max_grad_norm": None,
            "hidden_sizes": [400, 300],
            "activation": "relu",
        },
        sb3_kwargs={
            "learning_rate": 1e-3,
            "buffer_size": 1_000_000,
            "batch_size": 256,
            "tau": 0.005,
            "gamma": 0.99,
            "train_freq": 1,
            "gradient_steps": 1,
            "policy_delay": 2,
            "target_policy_noise": 0.2,
            "target_noise_clip": 0.5,
            "policy_kwargs": {"net_arch": [400, 300], "n_critics": 2},
        },
        action_noise=0.1,
    ),
    "dqn-cartpole": Case(
        algo="dqn",
        sb3="DQN",
        env="CartPole-v1",
        steps=50_000,
        learning_starts=1000,
        ours={
            "lr": 2.3e-3,
            "batch_size": 64,
            "buffer_size": 100_000,
            "gamma": 0.99,
            "target_update_interval": 10,
            "train_freq": 256,
            "gradient_steps": 128,
            "exploration_fraction": 0.16,
            "eps_start": 1.0,
            "eps_final": 0.04,
            "tau": 1.0,
            "max_grad_norm": 10.0,
            "double_q": False,
            "dueling": False,
            "loss": "huber",
            "hidden_sizes": [256, 256],
            "activation": "relu",
        },
        sb3_kwargs={
            "learning_rate": 2.3e-3,
            "batch_size": 64,
            "buffer_size": 100_000,
            "gamma": 0.99,
            "target_update_interval": 10,
            "train_freq": 256,
            "gradient_steps": 128,
            "exploration_fraction": 0.16,
            "exploration_initial_eps": 1.0,
            "exploration_final_eps": 0.04,
            "tau": 1.0,
            "max_grad_norm": 10.0,
            "policy_kwargs": {"net_arch": [256, 256]},
        },
    ),
    "sac-halfcheetah": _sac("HalfCheetah-v5", 30_000, 10_000, 3e-4),
    "dqn-her-bitflip": Case(
        algo="dqn",
        sb3="DQN",
        env="BitFlipping-v0",
        steps=20_000,
        learning_starts=1000,
        ours={
            "her": True,
            "her_strategy": "future",
            "her_goals": 4,
            "lr": 1e-3,
            "batch_size": 128,
            "buffer_size": 1_000_000,
            "gamma": 0.99,
            "target_update_interval": 1000,
            "train_freq": 1,
            "gradient_steps": 1,
            "exploration_fraction": 0.2,
            "eps_start": 1.0,
            "eps_final": 0.05,
            "tau": 1.0,
            "max_grad_norm": 10.0,
            "double_q": False,
            "dueling": False,
            "loss": "huber",
            "hidden_sizes": [256],
            "activation": "relu",
            "env_kwargs": {"n_bits": 15},
        },
        sb3_kwargs={
            "learning_rate": 1e-3,
            "batch_size": 128,
            "buffer_size": 1_000_000,
            "gamma": 0.99,
            "target_update_interval": 1000,
            "train_freq": 1,
            "gradient_steps": 1,
            "exploration_fraction": 0.2,
            "exploration_initial_eps": 1.0,
            "exploration_final_eps": 0.05,
            "tau": 1.0,
            "max_grad_norm": 10.0,
            "policy_kwargs": {"net_arch": [256]},
        },
        env_kwargs={"n_bits": 15},
        her=True,
    ),
}
CASES["tqc-pendulum"] = _tqc_pendulum()
CASES["qrdqn-cartpole"] = _qrdqn_cartpole()
CASES["crossq-pendulum"] = _crossq_pendulum()


def run_settings(case: Case, a: argparse.Namespace) -> tuple[int, int]:
    """(steps, learning_starts) for this invocation: the case's, `--steps`, or --quick (10% of the steps,
    learning_starts capped at a third of them so that every case still has updates to time)."""
    steps, starts = case.steps, case.learning_starts
    if a.quick:
        steps = max(LOG_EVERY, int(steps * QUICK_FACTOR))
        starts = min(starts, steps // 3)
    if a.steps is not None:
        steps = a.steps
    return steps, starts


def mark_step(learning_starts: int) -> int:
    """The env step where both sides start the updates/s clock: the first policylab callback at or after
    learning_starts (callbacks come every LOG_EVERY env steps)."""
    return max(LOG_EVERY, math.ceil(learning_starts / LOG_EVERY) * LOG_EVERY)


# --- the worker ----------------------------------------------------------------------------------


class Clock:
    """Training-loop timing fed by either side's callback: loop start, the updates/s mark, the end."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.loop_start: float | None = None
        self.mark_time: float | None = None
        self.mark_updates: int | None = None
        self.end_time = 0.0
        self.end_step = 0
        self.end_updates = 0

    def observe(self, now: float, step: int, updates: int) -> None:
        if self.mark_time is None and step >= self.mark:
            self.mark_time, self.mark_updates = now, updates
        self.end_time, self.end_step, self.end_updates = now, step, updates

    def record(self, t_call: float, t_returned: float) -> dict[str, Any]:
        assert self.loop_start is not None
        phase_s = None if self.mark_time is None else self.end_time - self.mark_time
        phase_updates = None if self.mark_updates is None else self.end_updates - self.mark_updates
        per_s = phase_updates / phase_s if phase_s and phase_updates is not None else None
        return {
            "train_wall_s": t_returned - t_call,
            "setup_s": self.loop_start - t_call,
            "loop_s": self.end_time - self.loop_start,
            "post_loop_s": t_returned - self.end_time,
            "steps": self.end_step,
            "updates": self.end_updates,
            "mark_step": self.mark,
            "phase_s": phase_s,
            "phase_updates": phase_updates,
            "updates_per_s": per_s,
            "phase_steps_per_s": (self.end_step - self.mark) / phase_s if phase_s else None,
        }


def shared_eval(case: Case, act: Callable[[Any], Any], seed: int) -> dict[str, Any]:
    """The same plain Gymnasium loop for both sides: EVAL_EPISODES deterministic episodes, seeds seed+1000+i."""
    import gymnasium as gym

    import policylab.envs  # noqa: F401  (registers BitFlipping-v0)

    start, env, returns, successes = time.perf_counter(), gym.make(case.env, **case.env_kwargs), [], 0
    for i in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=seed + EVAL_SEED_OFFSET + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
        successes += int(terminated)
    env.close()
    return {
        "eval_return_mean": sum(returns) / len(returns),
        "eval_returns": returns,
        "eval_successes": successes,
        "eval_s": time.perf_counter() - start,
    }


def ours_overrides(case: Case, a: argparse.Namespace) -> dict[str, Any]:
    _, starts = run_settings(case, a)
    run_level = {
        "num_envs": 1,
        "learning_starts": starts,
        "n_step": 1,
        "prioritized": False,
        "log_every": LOG_EVERY,
        "eval_every": a.curve_every,
        "checkpoint_every": 0,
        "eval_episodes": EVAL_EPISODES,
        "threads": a.threads,
        "device": "cpu",
        "precision": a.precision,
    }
    return {**case.ours, **run_level}


def worker_ours(case: Case, a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch

    import policylab as pl

    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    steps, starts = run_settings(case, a)
    clock = Clock(mark_step(starts))

    curve: list[list[float]] = []

    def callback(info: "IterationInfo") -> None:
        now = time.perf_counter()
        if clock.loop_start is None:
            clock.loop_start = now - info.elapsed
        clock.observe(now, info.step, int(info.metrics["updates"]))
        if info.eval_return is not None and info.step < steps:
            curve.append([info.step, info.eval_return])

    overrides = ours_overrides(case, a)
    t_call = time.perf_counter()
    run = pl.train(
        case.algo,
        env=case.env,
        steps=steps,
        seed=a.seed,
        overrides=overrides,
        preset="none",
        progress=False,
        verbose=False,
        runs_dir=Path(a.out).parent / f"runs-ours-{a.case}-s{a.seed}",
        callback=callback,
    )
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, overrides)
    if wrong or run.steps != steps:
        raise SystemExit(f"policylab's resolved config differs from the benchmark's: {wrong}, steps {run.steps}")
    policy = pl.load(run.dir)
    ev = shared_eval(case, lambda obs: policy.act(obs, deterministic=True), a.seed)
    final = run.final_eval or {}
    return {
        "imports_s": imports_s,
        **clock.record(t_call, t_returned),
        **ev,
        **curve_record(curve, steps, ev["eval_return_mean"]),
        "own_final_eval_return_mean": final.get("return_mean"),
        "config": dataclasses.asdict(run.config),
    }


def worker_sb3(case: Case, a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import importlib

    import numpy as np
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise

    sb3 = importlib.import_module(case.sb3_module)  # stable_baselines3 or sb3_contrib
    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    if a.sb3_onednn:  # every float32 product through oneDNN (float32 on this CPU; with AMX it may be bfloat16)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    steps, starts = run_settings(case, a)
    clock = Clock(mark_step(starts))

    curve: list[list[float]] = []

    def act(obs: Any) -> Any:
        action = model.predict(obs, deterministic=True)[0]
        return int(action) if case.sb3 in ("DQN", "QRDQN") else action

    class Callback(BaseCallback):
        def _on_training_start(self) -> None:
            clock.loop_start = time.perf_counter()

        def _on_step(self) -> bool:  # after every env step, before that step's update
            if clock.mark_time is None and self.num_timesteps >= clock.mark:
                clock.observe(time.perf_counter(), self.num_timesteps, self.model._n_updates)
            n = self.num_timesteps
            if a.curve_every and n % a.curve_every == 0 and n < steps:
                curve.append([n, shared_eval(case, act, a.seed)["eval_return_mean"]])
            return True

        def _on_training_end(self) -> None:
            clock.observe(time.perf_counter(), self.model.num_timesteps, self.model._n_updates)

    t_call = time.perf_counter()
    kwargs = dict(case.sb3_kwargs)
    policy_kind = "MlpPolicy"
    if case.her:
        from stable_baselines3 import HerReplayBuffer
        from stable_baselines3.common.envs import BitFlippingEnv

        env = make_vec_env(lambda: BitFlippingEnv(continuous=False, **case.env_kwargs), n_envs=1, seed=a.seed)
        kwargs["replay_buffer_class"] = HerReplayBuffer
        kwargs["replay_buffer_kwargs"] = {"n_sampled_goal": 4, "goal_selection_strategy": "future"}
        policy_kind = "MultiInputPolicy"
    else:
        env = make_vec_env(case.env, n_envs=1, seed=a.seed)
    if case.action_noise is not None:
        dim = env.action_space.shape[0]
        kwargs["action_noise"] = NormalActionNoise(np.zeros(dim), case.action_noise * np.ones(dim))
    algo_cls = getattr(sb3, case.sb3)
    model = algo_cls(policy_kind, env, learning_starts=starts, seed=a.seed, device="cpu", verbose=0, **kwargs)
    check_sb3(case, model, torch)
    model.learn(steps, callback=Callback())
    t_returned = time.perf_counter()
    ev = shared_eval(case, act, a.seed)
    return {
        "imports_s": imports_s,
        **clock.record(t_call, t_returned),
        **ev,
        **curve_record(curve, steps, ev["eval_return_mean"]),
    }


def check_sb3(case: Case, model: Any, torch: Any) -> None:
    """SB3's defaults that the benchmark relies on but does not pass (it stops if one has changed)."""
    pol = model.policy
    want_arch = case.sb3_kwargs["policy_kwargs"]["net_arch"]
    bad = []
    if pol.net_arch != want_arch or pol.activation_fn is not torch.nn.ReLU:
        bad.append(f"net {pol.net_arch} {pol.activation_fn}")
    if case.sb3 == "CrossQ":
        renorms = [m for m in pol.modules() if type(m).__name__ == "BatchRenorm1d"]
        settings = {(m.momentum, m.eps, m.warmup_steps) for m in renorms}
        betas = {o.optimizer.defaults["betas"] for o in (pol.actor, pol.critic)}
        if not renorms or settings != {(0.01, 1e-3, 100_000)} or betas != {(0.5, 0.999)}:
            bad.append(f"batch renorm {settings} / Adam betas {betas}")
    if case.sb3 in ("SAC", "TQC", "CrossQ"):
        dim = model.action_space.shape[0]
        if float(model.log_ent_coef.exp()) != 1.0 or model.target_entropy != -dim or pol.share_features_extractor:
            bad.append("entropy coefficient / target / shared extractor")
    owners = [getattr(pol, name, None) for name in ("actor", "critic")] + [pol]  # SAC/TD3: actor, critic; DQN: policy
    for optimizer in [getattr(o, "optimizer", None) for o in owners if o is not None]:
        if optimizer is None:
            continue
        if not isinstance(optimizer, torch.optim.Adam) or optimizer.defaults["eps"] != case.adam_eps:
            bad.append(f"optimizer {optimizer}")
    if model.n_envs != 1:
        bad.append(f"n_envs {model.n_envs}")
    if bad:
        raise SystemExit(f"SB3's {case.sb3} is not configured as this benchmark states: {bad}")


def main_worker(a: argparse.Namespace) -> None:
    os.chdir(Path(a.out).parent)  # the parent's temporary folder: MuJoCo writes MUJOCO_LOG.TXT into the cwd
    case = CASES[a.case]
    fn = worker_ours if a.worker == "ours" else worker_sb3
    record = {"side": a.worker, "seed": a.seed, "case": a.case, "t0_abs": T0, **fn(case, a)}
    record["worker_end_s"] = time.perf_counter() - T0
    Path(a.out).write_text(json.dumps(record))


# --- the parent ----------------------------------------------------------------------------------

METRICS: dict[str, Metric] = {
    "train_wall_s": ("training wall clock, train()/build+learn() (s); ratio <1: ours faster", ".2f", True),
    "process_wall_s": ("process wall clock, launch to exit (s); ratio <1: ours faster", ".2f", True),
    "updates_per_s": ("updates/s after learning starts; ratio >1: ours faster", ",.1f", True),
    "eval_return_mean": (f"final return, shared deterministic eval ({EVAL_EPISODES} episodes)", ".1f", False),
    "eval_successes": (f"episodes of the {EVAL_EPISODES} that end at their goal (goal-conditioned envs)", ".0f", False),
    "late_return_mean": ("with --curve-every: mean return over the last 40% of the run", ".1f", False),
}
DETAIL: dict[str, Metric] = {
    "loop_s": ("training loop alone, first to last callback (s)", ".2f", True),
    "process_wall_minus_eval_s": ("process wall clock less shared eval (s)", ".2f", True),
    "updates": ("updates done", ",.0f", True),
    "steps": ("env steps done", ",.0f", False),
    "phase_steps_per_s": ("env steps/s after learning starts", ",.1f", True),
    "startup_s": ("interpreter start-up (s)", ".3f", False),
    "imports_s": ("imports (s)", ".3f", False),
    "setup_s": ("set-up: env, networks, run dir (s)", ".3f", False),
    "post_loop_s": ("after the loop, in train()/learn(): checkpoint, own eval (s)", ".3f", False),
    "eval_s": ("shared eval (s)", ".3f", False),
    "exit_s": ("interpreter exit (s)", ".3f", False),
}


def main_parent(a: argparse.Namespace) -> None:
    require_precision(a.precision)  # before any run: bf16 needs AMX or AVX512-BF16
    names = a.case or list(CASES)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    header = provenance(["policylab", "torch", "stable-baselines3", "gymnasium", "numpy", "mujoco"])
    settings, summaries, all_runs, overview = {}, {}, [], []

    def show(rec: dict[str, Any]) -> None:
        rec["process_wall_minus_eval_s"] = rec["process_wall_s"] - rec["eval_s"]
        print(
            f"  {rec['case']} {rec['side']:4s} seed {rec['seed']}: "
            + ", ".join(
                f"{k} {fmt(rec.get(k), f)}"
                for k, f in (
                    ("process_wall_s", ".1f"),
                    ("train_wall_s", ".1f"),
                    ("updates", ",.0f"),
                    ("updates_per_s", ",.1f"),
                    ("eval_return_mean", ".1f"),
                    ("eval_successes", ".0f"),
                )
            ),
            flush=True,
        )

    for name in names:
        case = CASES[name]
        steps, starts = run_settings(case, a)
        if mark_step(starts) >= steps:
            print(f"warning: {name}: {steps:,} steps end before env step {mark_step(starts):,}: no updates/s")
        print(f"\n== {name}: {case.algo} {case.env}, {steps:,} steps, learning_starts {starts:,}", flush=True)
        args = ["--case", name, "--threads", str(a.threads)]
        args += (["--quick"] if a.quick else []) + (["--steps", str(a.steps)] if a.steps is not None else [])
        args += ["--sb3-onednn"] if a.sb3_onednn else []
        args += ["--precision", a.precision]
        args += ["--curve-every", str(a.curve_every)] if a.curve_every else []
        runs = run_alternating(__file__, ["ours", "sb3"], seeds, args, show)
        print(f"\n{name}: {a.seeds} seed(s) per side, torch threads {a.threads}, alternating runs (ours, SB3)")
        summary = pair_report(runs, seeds, METRICS, DETAIL, "ours", "sb3", ("ours", "SB3"))
        summaries[name], all_runs = summary, all_runs + runs
        settings[name] = {
            "algo": case.algo,
            "sb3_class": case.sb3,
            "env": case.env,
            "steps": steps,
            "learning_starts": starts,
            "updates_per_s_from_step": mark_step(starts),
            "ours_overrides": ours_overrides(case, a),
            "sb3_kwargs": {**case.sb3_kwargs, "learning_starts": starts, "device": "cpu"},
            "sb3_action_noise_std": case.action_noise,
        }
        overview.append(
            [
                name,
                fmt_summary(summary["train_wall_s"]["ratio"]),
                fmt_summary(summary["process_wall_s"]["ratio"]),
                fmt_summary(summary["updates_per_s"]["ratio"]),
                fmt_summary(summary["updates_per_s"]["ours"], ",.0f")
                + " / "
                + fmt_summary(summary["updates_per_s"]["sb3"], ",.0f"),
                fmt_summary(summary["eval_return_mean"]["ours"], ".1f")
                + " / "
                + fmt_summary(summary["eval_return_mean"]["sb3"], ".1f"),
            ]
        )

    print(f"\nsummary: median [min-max] over {a.seeds} seed(s); torch threads {a.threads}")
    print_table(
        [
            "case",
            "train wall ours/SB3 (<1 ours faster)",
            "process wall ours/SB3",
            "updates/s ours/SB3 (>1 ours faster)",
            "updates/s ours / SB3",
            "final return ours / SB3",
        ],
        overview,
    )
    payload = {
        "benchmark": "offpolicy",
        **header,
        "settings": {
            "cases": settings,
            "seeds": seeds,
            "threads": a.threads,
            "sb3_onednn": a.sb3_onednn,
            "precision": a.precision,
            "curve_every": a.curve_every,
            "quick": a.quick,
            "steps_override": a.steps,
            "log_every": LOG_EVERY,
            "eval": f"{EVAL_EPISODES} deterministic episodes, env seeds seed+{EVAL_SEED_OFFSET}+i, shared loop",
            "order": "per case, per seed: ours, sb3",
        },
        "summary": summaries,
        "runs": all_runs,
    }
    print(f"\nresults: {write_results('offpolicy', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (first_seed..first_seed+N-1)")
    p.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1): more seeds in a second run")
    p.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="evaluate every N env steps during training as well (a return measure: the wall clock then "
        "includes the evaluations)",
    )
    p.add_argument("--case", action="append", choices=list(CASES), help="a case to run (repeatable; default all)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--steps", type=positive_int, help="env steps per run, overriding every selected case's")
    p.add_argument("--quick", action="store_true", help="10%% of each case's steps (a smoke test, not a result)")
    p.add_argument(
        "--sb3-onednn",
        action="store_true",
        help="SB3 with torch.backends.mkldnn.matmul.fp32_precision='bf16' (every float32 product on oneDNN)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="policylab's precision (bf16: opt-in, AMX or AVX512-BF16)",
    )
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.case = a.case[0]
        main_worker(a)
    else:
        main_parent(a)


if __name__ == "__main__":
    main()
