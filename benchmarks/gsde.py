"""policylab's PPO, A2C and SAC with gSDE (`use_sde`) against Stable-Baselines3's on Pendulum-v1.

    .venv/bin/python benchmarks/gsde.py --seeds 3                           # PPO, 100k steps per run
    .venv/bin/python benchmarks/gsde.py --algo a2c --seeds 3                # A2C, 1M steps per run
    .venv/bin/python benchmarks/gsde.py --algo sac --seeds 3                # SAC, 20k steps per run
    .venv/bin/python benchmarks/gsde.py --seeds 1 --steps 20000             # a quick smoke run

Both sides run rl-zoo's Pendulum-v1 entry with its gSDE settings (policylab's preset for the env, checked against
OURS after each run). PPO (hyperparams/ppo.yml): 4 envs x n_steps 1024, minibatches of 64 x 10 epochs, gamma 0.9,
GAE lambda 0.95, lr 1e-3, clip 0.2, ent_coef 0, use_sde with sde_sample_freq 4; SB3's defaults otherwise (64x64
tanh actor and critic, orthogonal init, log_std_init 0, Adam eps 1e-5, max_grad_norm 0.5). A2C (hyperparams/a2c.yml):
8 envs x n_steps 8, gamma 0.9, GAE lambda 0.9, vf_coef 0.4, lr 7e-4 annealed linearly to 0, RMSprop, no advantage
normalization, observations and rewards normalized, use_sde (matrices redrawn once per rollout), log_std_init -2,
no orthogonal init. SAC: rl-zoo's Pendulum-v1 entry (hyperparams/sac.yml: 20k steps, lr 1e-3) with use_sde added on
both sides (rl-zoo uses gSDE for SAC only on PyBullet envs), SB3's SAC defaults otherwise ([256, 256] ReLU networks,
batch 256, learning_starts 100, tau 0.005, automatic entropy, log_std_init -3, a new matrix at every step with
train_freq 1). `--threads` torch threads (default 1) on both sides.

Each run is a fresh subprocess, run alternately (ours, sb3, ours, sb3 ...), seeds 1..N. Per run: whole-process wall
clock; training time and env steps/s; when the mean of the last 20 training returns first reaches -200; a
deterministic evaluation of 20 episodes in the same plain Gymnasium loop for both. Output: tables on stdout, JSON in
benchmarks/results/gsde-<date>.json.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    ThresholdTracker,
    config_mismatches,
    gym_eval,
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

ENV, THRESHOLD, WINDOW, EVAL_EPISODES, EVAL_SEED = "Pendulum-v1", -200.0, 20, 20, 1_000_000
OURS: dict[str, dict[str, Any]] = {  # rl-zoo's entries in policylab's names (what the presets must resolve to)
    "ppo": {"num_envs": 4, "n_steps": 1024, "batch_size": 64, "epochs": 10, "gamma": 0.9, "gae_lambda": 0.95,
            "lr": 1e-3, "clip_eps": 0.2, "ent_coef": 0.0, "use_sde": True, "sde_sample_freq": 4,
            "log_std_init": 0.0, "normalize_obs": False, "normalize_reward": False},
    "a2c": {"num_envs": 8, "n_steps": 8, "gamma": 0.9, "gae_lambda": 0.9, "vf_coef": 0.4, "lr": 7e-4,
            "anneal_lr": True, "optimizer": "rmsprop", "normalize_advantage": False, "normalize_obs": True,
            "normalize_reward": True, "use_sde": True, "sde_sample_freq": -1, "log_std_init": -2.0,
            "ortho_init": False, "ent_coef": 0.0, "max_grad_norm": 0.5},
    "sac": {"lr": 1e-3, "use_sde": True, "sde_sample_freq": -1, "log_std_init": -3.0, "use_sde_at_warmup": False,
            "hidden_sizes": [256, 256], "batch_size": 256, "learning_starts": 100, "tau": 0.005, "gamma": 0.99,
            "train_freq": 1, "gradient_steps": 1, "auto_alpha": True},
}  # fmt: skip
STEPS = {"ppo": 100_000, "a2c": 1_000_000, "sac": 20_000}
ADDED = {"sac": {"use_sde": True}}
"""Settings passed on top of policylab's preset (rl-zoo's SAC Pendulum entry has no gSDE)."""


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl

    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)
    overrides = {"eval_every": 0, "checkpoint_every": 0, "threads": a.threads, "eval_episodes": 1}
    overrides.update(ADDED.get(a.algo, {}))
    t_setup = time.perf_counter()
    run = pl.train(a.algo, env=ENV, steps=a.steps, seed=a.seed, overrides=overrides, progress=False, verbose=False,
                   runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}",
                   callback=track.policylab_callback())  # fmt: skip
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, OURS[a.algo])
    if wrong:
        raise SystemExit(f"policylab's preset differs from rl-zoo's entry: {wrong}")
    policy = pl.load(run.dir)
    evaluation = gym_eval(ENV, lambda obs: policy.act(obs), EVAL_SEED + 1000 * a.seed, EVAL_EPISODES)
    return {**track.record(t_setup, t_returned), **evaluation}


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from stable_baselines3 import A2C, PPO, SAC
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(a.threads)
    track = ThresholdTracker(THRESHOLD, T0)
    t_setup = time.perf_counter()
    if a.algo == "ppo":
        env: Any = make_vec_env(ENV, n_envs=4, seed=a.seed)
        model: Any = PPO(
            "MlpPolicy", env, n_steps=1024, gae_lambda=0.95, gamma=0.9, n_epochs=10, ent_coef=0.0, learning_rate=1e-3,
            clip_range=0.2, use_sde=True, sde_sample_freq=4, seed=a.seed, device="cpu", verbose=0,
        )  # fmt: skip
    elif a.algo == "sac":
        env = make_vec_env(ENV, n_envs=1, seed=a.seed)
        model = SAC("MlpPolicy", env, learning_rate=1e-3, use_sde=True, seed=a.seed, device="cpu", verbose=0)
    else:
        env = VecNormalize(make_vec_env(ENV, n_envs=8, seed=a.seed), norm_obs=True, norm_reward=True, gamma=0.9)
        model = A2C(
            "MlpPolicy", env, ent_coef=0.0, max_grad_norm=0.5, n_steps=8, gae_lambda=0.9, vf_coef=0.4, gamma=0.9,
            use_rms_prop=True, normalize_advantage=False, learning_rate=linear_schedule(7e-4), use_sde=True,
            policy_kwargs={"log_std_init": -2, "ortho_init": False}, seed=a.seed, device="cpu", verbose=0,
        )  # fmt: skip
    model.learn(a.steps, callback=track.sb3_callback(WINDOW))
    t_returned = time.perf_counter()
    normalize = env.normalize_obs if isinstance(env, VecNormalize) else (lambda obs: obs)
    if isinstance(env, VecNormalize):
        env.training = False

    def act(obs: Any) -> Any:
        return model.predict(normalize(obs[None]), deterministic=True)[0][0]

    return {**track.record(t_setup, t_returned), **gym_eval(ENV, act, EVAL_SEED + 1000 * a.seed, EVAL_EPISODES)}


METRICS, DETAIL = threshold_metrics("-200", EVAL_EPISODES)


def main_parent(a: argparse.Namespace) -> None:
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    header = provenance(["policylab", "torch", "stable-baselines3", "gymnasium", "numpy"])
    args = ["--algo", a.algo, "--steps", str(a.steps), "--threads", str(a.threads)]
    runs = run_alternating(__file__, ["ours", "sb3"], seeds, args, show_run)
    print(f"\n{a.algo} with gSDE, {ENV}, {a.steps:,} steps, {a.seeds} seed(s) per side, torch threads {a.threads}")
    summary = pair_report(runs, seeds, METRICS, DETAIL, "ours", "sb3", ("ours", "SB3"))
    by = index_runs(runs)
    never = {side: [s for s in seeds if by[(side, s)]["time_to_threshold_s"] is None] for side in ("ours", "sb3")}
    payload = {
        "benchmark": "gsde",
        **header,
        "settings": {
            "algo": a.algo,
            "env": ENV,
            "steps": a.steps,
            "seeds": seeds,
            "threads": a.threads,
            "hyperparameters": OURS[a.algo],
            "order": "per seed: ours, sb3",
        },  # fmt: skip
        "summary": summary,
        "never_reached": never,
        "runs": runs,
    }
    print(f"\nresults: {write_results('gsde', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--algo", choices=sorted(OURS), default="ppo", help="the algorithm on both sides")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side")
    p.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument(
        "--steps", type=positive_int, help="env steps per run (default: the entry's, PPO 100k, A2C 1M, SAC 20k)"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or STEPS[a.algo]
    write_worker_record(a, {"ours": worker_ours, "sb3": worker_sb3}) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
