"""policylab PPO vs stable-baselines3 PPO on CartPole-v1 with rl-zoo's tuned hyperparameters.

Run from the repository root (`make bench` runs the first line):

    .venv/bin/python benchmarks/ppo_cartpole.py --seeds 3                  # the benchmark
    .venv/bin/python benchmarks/ppo_cartpole.py --seeds 1 --steps 20000    # a quick smoke run

Both sides: 8 envs x n_steps 32, one 256-sample minibatch x 20 epochs, gamma 0.98, GAE lambda 0.8,
lr 1e-3 and clip 0.2 both annealed linearly to 0, ent_coef 0, vf_coef 0.5, max_grad_norm 0.5,
advantage normalization, separate 64x64 tanh actor and critic, orthogonal init, Adam eps 1e-5;
`--steps` env steps (default 100k), `--threads` torch threads (default 1) on both sides.
policylab gets these from its CartPole-v1 preset (checked against EXPECTED after each run).

Each run is a fresh `python benchmarks/ppo_cartpole.py --worker ours|sb3 ...` subprocess, run
alternately (ours, sb3, ours, sb3 ...), seeds 1..N. Per run: whole-process wall clock, launch to
exit (timed by the parent); interpreter start-up, imports, set-up; the time from process start
until the mean of the last 20 finished training episodes first reaches 475, and at which env step
(checked by both sides after each update, once per 256-step iteration); training time and env
steps/s; the final mean of the last 20 training returns; a deterministic evaluation of 20 episodes
(the same plain Gymnasium loop for both). The limit: random actions through each side's own vector
env. Output: tables on stdout, JSON in benchmarks/results/ppo_cartpole-<date>.json.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    Metric,
    ThresholdTracker,
    config_mismatches,
    fmt,
    fmt_summary,
    gym_eval,
    index_runs,
    linear_schedule,
    pair_report,
    positive_int,
    provenance,
    ratio,
    run_alternating,
    summarize,
    write_results,
)

ENV_ID, N_ENVS, THRESHOLD, WINDOW, EVAL_EPISODES, EVAL_SEED = "CartPole-v1", 8, 475.0, 20, 20, 1_000_000
EXPECTED: dict[str, Any] = {  # policylab's resolved config must equal rl-zoo's / SB3's values
    "num_envs": 8,
    "n_steps": 32,
    "batch_size": 256,
    "epochs": 20,
    "gae_lambda": 0.8,
    "gamma": 0.98,
    "lr": 1e-3,
    "anneal_lr": True,
    "anneal_clip": True,
    "clip_eps": 0.2,
    "clip_eps_high": None,
    "ent_coef": 0.0,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "normalize_advantage": True,
    "clip_value": None,
    "target_kl": None,
    "dual_clip": None,
    "hidden_sizes": [64, 64],
    "activation": "tanh",
    "shared_net": False,
    "ortho_init": True,
    "normalize_obs": False,
    "normalize_reward": False,
}


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch

    import policylab as pl

    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)
    callback = track.policylab_callback()

    overrides = {"eval_every": 0, "checkpoint_every": 0, "threads": a.threads, "eval_episodes": EVAL_EPISODES}
    t_setup = time.perf_counter()
    run = pl.train(
        "ppo",
        env=ENV_ID,
        steps=a.steps,
        seed=a.seed,
        overrides=overrides,
        progress=False,
        verbose=False,
        runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}",
        callback=callback,
    )
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, EXPECTED)
    if wrong:
        raise SystemExit(f"policylab's CartPole-v1 config differs from rl-zoo's: {wrong}")
    policy = pl.load(run.dir)
    first = EVAL_SEED + 1000 * a.seed
    ev = gym_eval(ENV_ID, lambda obs: policy.act(obs, deterministic=True), first, EVAL_EPISODES)
    final = run.final_eval or {}
    return {
        "imports_s": imports_s,
        **track.record(t_setup, t_returned),
        **ev,
        "own_final_eval_return_mean": final.get("return_mean"),
        "config": dataclasses.asdict(run.config),
    }


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)

    t_setup = time.perf_counter()
    model = PPO(
        "MlpPolicy",
        make_vec_env(ENV_ID, n_envs=N_ENVS, seed=a.seed),
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear_schedule(1e-3),
        clip_range=linear_schedule(0.2),
        seed=a.seed,
        device="cpu",
        verbose=0,
    )
    pol = model.policy
    same = pol.ortho_init and pol.optimizer.defaults["eps"] == 1e-5 and pol.activation_fn is torch.nn.Tanh
    same &= model.max_grad_norm == 0.5 and model.vf_coef == 0.5 and model.normalize_advantage
    if not (same and pol.net_arch == {"pi": [64, 64], "vf": [64, 64]}):  # separate 64x64 actor and critic
        raise SystemExit("SB3's PPO defaults are not the ones this benchmark states")
    model.learn(a.steps, callback=track.sb3_callback(WINDOW))
    t_returned = time.perf_counter()
    first = EVAL_SEED + 1000 * a.seed
    ev = gym_eval(ENV_ID, lambda obs: int(model.predict(obs, deterministic=True)[0]), first, EVAL_EPISODES)
    return {"imports_s": imports_s, **track.record(t_setup, t_returned), **ev}


def worker_env(a: argparse.Namespace) -> dict[str, Any]:
    """Random actions through the vector env each side trains on: the speed limit for training."""
    import numpy as np

    if a.worker == "env-ours":
        from policylab.envs import make_vec_env

        env: Any = make_vec_env(ENV_ID, N_ENVS)
        env.reset(seed=a.seed)
    else:
        from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env

        env = sb3_make_vec_env(ENV_ID, n_envs=N_ENVS, seed=a.seed)
        env.reset()
    np.random.seed(a.seed)
    for _ in range(200):  # warm-up
        env.step(np.random.randint(0, 2, N_ENVS))
    start = time.perf_counter()
    for _ in range(a.env_steps):
        env.step(np.random.randint(0, 2, N_ENVS))
    return {"vector_steps": a.env_steps, "env_steps_per_s": a.env_steps * N_ENVS / (time.perf_counter() - start)}


def main_worker(a: argparse.Namespace) -> None:
    workers = {"ours": worker_ours, "sb3": worker_sb3, "env-ours": worker_env, "env-sb3": worker_env}
    record = {"side": a.worker, "seed": a.seed, "t0_abs": T0, **workers[a.worker](a)}
    record["worker_end_s"] = time.perf_counter() - T0
    Path(a.out).write_text(json.dumps(record))


METRICS: dict[str, Metric] = {
    "time_to_threshold_s": ("time-to-475 (s since process start)", ".2f", True),
    "process_wall_s": ("process wall clock, launch to exit (s)", ".2f", True),
    "process_wall_minus_eval_s": ("process wall clock less shared eval (s)", ".2f", True),
    "train_steps_per_s": ("training env steps/s", ",.0f", True),
    "steps_to_threshold": ("env steps to reach 475", ",.0f", True),
    "final_train_return": ("final return, last 20 train episodes", ".1f", True),
    "eval_return_mean": (f"shared deterministic eval, {EVAL_EPISODES} episodes", ".1f", True),
}
DETAIL: dict[str, Metric] = {
    "startup_s": ("interpreter start-up (s)", ".3f", False),
    "imports_s": ("imports (s)", ".3f", False),
    "setup_s": ("set-up before training (s)", ".3f", False),
    "post_train_s": ("in train()/learn() after training (s)", ".3f", False),
    "eval_s": ("shared eval (s)", ".3f", False),
    "exit_s": ("interpreter exit (s)", ".3f", False),
    "env_raw_steps_per_s": ("raw env, random actions (env steps/s)", ",.0f", True),
    "share_of_env_raw": ("training steps/s / raw env steps/s", ".1%", False),
}


def main_parent(a: argparse.Namespace) -> None:
    def show(rec: dict[str, Any]) -> None:
        if "eval_s" in rec:
            rec["process_wall_minus_eval_s"] = rec["process_wall_s"] - rec["eval_s"]
        print(
            f"  {rec['side']:8s} seed {rec['seed']}: "
            + ", ".join(
                f"{k} {fmt(rec.get(k), f)}"
                for k, f in (
                    ("process_wall_s", ".1f"),
                    ("time_to_threshold_s", ".1f"),
                    ("train_steps_per_s", ",.0f"),
                    ("eval_return_mean", ".1f"),
                    ("env_steps_per_s", ",.0f"),
                )
                if k in rec
            ),
            flush=True,
        )

    seeds, order = list(range(1, a.seeds + 1)), ["ours", "sb3", "env-ours", "env-sb3"]
    header = provenance(["policylab", "torch", "stable-baselines3", "gymnasium", "numpy"])  # before the runs
    args = ["--steps", str(a.steps), "--threads", str(a.threads), "--env-steps", str(a.env_steps)]
    runs = run_alternating(__file__, order, seeds, args, show)
    by = index_runs(runs)
    for (side, seed), rec in by.items():
        if not side.startswith("env-"):
            rec["env_raw_steps_per_s"] = by[(f"env-{side}", seed)]["env_steps_per_s"]
            rec["share_of_env_raw"] = ratio(rec["train_steps_per_s"], rec["env_raw_steps_per_s"])
    print(f"\nPPO {ENV_ID}, {a.steps:,} steps, {a.seeds} seed(s) per side, torch threads {a.threads}, alternating runs")
    summary = pair_report(runs, seeds, METRICS, DETAIL, "ours", "sb3", ("ours", "SB3"))
    own = summarize([by[("ours", s)]["own_final_eval_return_mean"] for s in seeds])
    summary["own_final_eval_return_mean"] = {"ours": own}
    print(f"policylab's own final evaluation inside train() ({EVAL_EPISODES} episodes): {fmt_summary(own, '.1f')}")
    never = {side: [s for s in seeds if by[(side, s)]["time_to_threshold_s"] is None] for side in ("ours", "sb3")}
    print(
        f"never reached {THRESHOLD:g} (left out of the medians): ours seeds {never['ours'] or 'none'}, "
        f"SB3 seeds {never['sb3'] or 'none'}"
    )
    payload = {
        "benchmark": "ppo_cartpole",
        **header,
        "settings": {
            "env": ENV_ID,
            "steps": a.steps,
            "seeds": seeds,
            "threads": a.threads,
            "threshold": THRESHOLD,
            "window": WINDOW,
            "eval_episodes": EVAL_EPISODES,
            "env_vector_steps": a.env_steps,
            "hyperparameters": EXPECTED,
            "order": f"per seed: {', '.join(order)}",
        },
        "summary": summary,
        "never_reached": never,
        "runs": runs,
    }
    print(f"\nresults: {write_results('ppo_cartpole', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (1..N)")
    p.add_argument("--steps", type=positive_int, default=100_000, help="env steps per run")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--env-steps", type=positive_int, default=20_000, help="vector steps for the raw env throughput")
    p.add_argument("--worker", choices=["ours", "sb3", "env-ours", "env-sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    main_worker(a) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
