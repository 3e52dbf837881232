"""policylab's recurrent PPO against SB3-contrib's RecurrentPPO on CartPoleNoVel (CartPole-v1 without velocities).

    .venv/bin/python benchmarks/recurrent.py --seeds 3                 # the benchmark (100k steps per run)
    .venv/bin/python benchmarks/recurrent.py --seeds 1 --steps 20000   # a quick smoke run

Both sides: rl-zoo's `ppo_lstm` entry for CartPoleNoVel-v1 (hyperparams/ppo_lstm.yml): 8 envs x n_steps 32, one
minibatch of 256 (all 8 sequences) x 20 epochs, gamma 0.98, GAE lambda 0.8, lr 1e-3 and clip 0.2 annealed linearly
to 0, ent_coef 0, observations normalized (running mean/std, rewards not), an LSTM of 64 units for the actor and
another for the critic, then one ReLU layer of 64 each, no orthogonal init; `--steps` env steps, `--threads` torch
threads (default 1) on both sides. The env is benchmarks/memory_envs.py's, stepped by each side's own vector env.

Each run is a fresh subprocess, run alternately (ours, sb3, ours, sb3 ...), seeds 1..N. Per run: whole-process
wall clock; training time and env steps/s; when the mean of the last 20 training returns first reaches 475; a
deterministic evaluation of 20 episodes in the same plain Gymnasium loop for both (LSTM states reset at each
episode's start). Output: tables on stdout, JSON in benchmarks/results/recurrent-<date>.json.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    ThresholdTracker,
    config_mismatches,
    index_runs,
    linear_schedule,
    pair_report,
    positive_int,
    provenance,
    run_alternating,
    show_run,
    threshold_metrics,
    write_results,
    write_worker_record,
)

ENV, N_ENVS, THRESHOLD, WINDOW, EVAL_EPISODES, EVAL_SEED = "memory_envs:make", 8, 475.0, 20, 20, 1_000_000
OURS: dict[str, Any] = {  # rl-zoo's ppo_lstm CartPoleNoVel-v1 entry in policylab's names
    "recurrent": True,
    "lstm_hidden": 64,
    "shared_net": False,
    "hidden_sizes": [64],
    "activation": "relu",
    "ortho_init": False,
    "num_envs": N_ENVS,
    "n_steps": 32,
    "batch_size": 256,
    "epochs": 20,
    "gamma": 0.98,
    "gae_lambda": 0.8,
    "lr": 1e-3,
    "anneal_lr": True,
    "clip_eps": 0.2,
    "anneal_clip": True,
    "ent_coef": 0.0,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "normalize_obs": True,
    "normalize_reward": False,
}


def shared_eval(act: Callable[[Any, bool], int], seed: int) -> dict[str, Any]:
    """The same plain Gymnasium loop for both sides: EVAL_EPISODES episodes, deterministic actions; `act(obs,
    episode_start)` resets its LSTM states when `episode_start`."""
    from memory_envs import make

    start, env, returns = time.perf_counter(), make(), []
    for i in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=EVAL_SEED + 1000 * seed + i)
        total, done, first = 0.0, False, True
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs, first))
            total, done, first = total + float(reward), terminated or truncated, False
        returns.append(total)
    env.close()
    return {"eval_return_mean": sum(returns) / len(returns), "eval_returns": returns,
            "eval_s": time.perf_counter() - start}  # fmt: skip


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl

    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)
    callback = track.policylab_callback()

    overrides = {**OURS, "eval_every": 0, "checkpoint_every": 0, "threads": a.threads, "eval_episodes": 1}
    t_setup = time.perf_counter()
    run = pl.train("ppo", env=ENV, steps=a.steps, seed=a.seed, overrides=overrides, preset="none", progress=False,
                   verbose=False, runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}", callback=callback)  # fmt: skip
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, OURS)
    if wrong:
        raise SystemExit(f"policylab's config differs from rl-zoo's entry: {wrong}")
    policy = pl.load(run.dir)

    def act(obs: Any, first: bool) -> int:
        if first:
            policy.reset()
        return int(policy.act(obs, deterministic=True))

    return {**track.record(t_setup, t_returned), **shared_eval(act, a.seed)}


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from memory_envs import make
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)

    t_setup = time.perf_counter()
    env = VecNormalize(make_vec_env(make, n_envs=N_ENVS, seed=a.seed), norm_obs=True, norm_reward=False)
    model = RecurrentPPO(
        "MlpLstmPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
        learning_rate=linear_schedule(1e-3), clip_range=linear_schedule(0.2), seed=a.seed, device="cpu", verbose=0,
        policy_kwargs={"ortho_init": False, "activation_fn": torch.nn.ReLU, "lstm_hidden_size": 64,
                       "enable_critic_lstm": True, "net_arch": {"pi": [64], "vf": [64]}},
    )  # fmt: skip
    model.learn(a.steps, callback=track.sb3_callback(WINDOW))
    t_returned = time.perf_counter()
    env.training = False
    state: Any = None

    def act(obs: Any, first: bool) -> int:
        nonlocal state
        action, state = model.predict(env.normalize_obs(obs[None]), state=None if first else state,
                                      episode_start=np.array([first]), deterministic=True)  # fmt: skip
        return int(action[0])

    return {**track.record(t_setup, t_returned), **shared_eval(act, a.seed)}


METRICS, DETAIL = threshold_metrics("475", EVAL_EPISODES)


def main_parent(a: argparse.Namespace) -> None:
    seeds = list(range(1, a.seeds + 1))
    header = provenance(["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium", "numpy"])
    runs = run_alternating(__file__, ["ours", "sb3"], seeds, ["--steps", str(a.steps), "--threads", str(a.threads)],
                           show_run)  # fmt: skip
    print(f"\nrecurrent PPO, CartPoleNoVel, {a.steps:,} steps, {a.seeds} seed(s) per side, torch threads {a.threads}")
    summary = pair_report(runs, seeds, METRICS, DETAIL, "ours", "sb3", ("ours", "SB3-contrib"))
    by = index_runs(runs)
    never = {side: [s for s in seeds if by[(side, s)]["time_to_threshold_s"] is None] for side in ("ours", "sb3")}
    payload = {
        "benchmark": "recurrent",
        **header,
        "settings": {
            "env": "CartPoleNoVel (benchmarks/memory_envs.py)",
            "steps": a.steps,
            "seeds": seeds,
            "threads": a.threads,
            "hyperparameters": OURS,
            "order": "per seed: ours, sb3",
        },
        "summary": summary,
        "never_reached": never,
        "runs": runs,
    }
    print(f"\nresults: {write_results('recurrent', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (1..N)")
    p.add_argument("--steps", type=positive_int, default=100_000, help="env steps per run")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    write_worker_record(a, {"ours": worker_ours, "sb3": worker_sb3}) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
