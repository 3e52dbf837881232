"""policylab's TRPO vs SB3-contrib's TRPO, side by side, identical hyperparameters.

Run from the repository root (SB3-contrib is in the `bench` extra):

    .venv/bin/python benchmarks/trpo.py --seeds 5                       # every case
    .venv/bin/python benchmarks/trpo.py --case trpo-pendulum --seeds 3  # one case
    .venv/bin/python benchmarks/trpo.py --quick --seeds 1               # a smoke run, not a result

Cases (policylab with `preset="none"` and every hyperparameter set explicitly; SB3-contrib with the same values;
both: separate 64x64 tanh actor and critic, orthogonal init, log-std 0, Gaussian actions clipped to the bounds,
normalized advantages, no gradient clipping):

* `trpo-pendulum`: Pendulum-v1, 100k steps, rl-zoo's trpo.yml Pendulum-v1 entry without gSDE (2 envs, n_steps
  1024, gamma 0.9, n_critic_updates 15) and SB3-contrib's defaults otherwise (lr 1e-3, batch_size 128,
  gae_lambda 0.95, cg_max_steps 15, cg_damping 0.1, line search 0.8 x 10, target_kl 0.01, sub_sampling 1).
* `trpo-hopper`: Hopper-v5, 200k steps of rl-zoo's Hopper-v4 entry (1M steps there): observation and reward
  normalization (SB3: VecNormalize), 2 envs, n_steps 1024, batch_size 128, gamma 0.99, gae_lambda 0.95,
  cg_max_steps 25, cg_damping 0.1, n_critic_updates 20, lr 1e-3.

One thread on both sides, device cpu. Each run is a fresh `python benchmarks/trpo.py --worker ours|sb3 ...`
subprocess, the two sides alternating per seed. Per run: whole-process wall clock (timed by the parent), the
training wall clock (from just before the env and model are built to the return of `pl.train()` / `learn()`),
and the final return: the mean over 10 deterministic episodes, env seeds seed+1000+i, one plain Gymnasium loop
shared by both sides. The target (issue 17) is at most 0.5x SB3-contrib's wall clock at equal return.

Output: per-seed values and median [min-max] of the per-seed ratios, the ratio of the medians, and JSON in
benchmarks/results/trpo-<date>.json.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    Metric,
    fmt,
    gym_eval,
    pair_report,
    positive_int,
    provenance,
    ratio,
    run_alternating,
    write_results,
)

EVAL_EPISODES, EVAL_SEED_OFFSET = 10, 1000
QUICK_FACTOR = 0.05


@dataclass(frozen=True)
class Case:
    env: str
    steps: int
    num_envs: int
    n_steps: int
    gamma: float
    n_critic_updates: int
    cg_max_steps: int = 15
    normalize: bool = False


CASES: dict[str, Case] = {
    "trpo-pendulum": Case("Pendulum-v1", 100_000, 2, 1024, 0.9, 15),
    "trpo-hopper": Case("Hopper-v5", 200_000, 2, 1024, 0.99, 20, cg_max_steps=25, normalize=True),
}
SHARED = {  # SB3-contrib's TRPO defaults, under both libraries' names (policylab, SB3-contrib)
    "lr": ("learning_rate", 1e-3),
    "batch_size": ("batch_size", 128),
    "gae_lambda": ("gae_lambda", 0.95),
    "cg_damping": ("cg_damping", 0.1),
    "line_search_shrinking_factor": ("line_search_shrinking_factor", 0.8),
    "line_search_max_iter": ("line_search_max_iter", 10),
    "target_kl": ("target_kl", 0.01),
    "sub_sampling_factor": ("sub_sampling_factor", 1),
    "normalize_advantage": ("normalize_advantage", True),
}


def steps_of(case: Case, a: argparse.Namespace) -> int:
    if a.steps is not None:
        return a.steps
    return max(case.num_envs * case.n_steps, int(case.steps * QUICK_FACTOR)) if a.quick else case.steps


def per_case(case: Case) -> dict[str, tuple[str, Any]]:
    return {
        "num_envs": ("n_envs", case.num_envs),
        "n_steps": ("n_steps", case.n_steps),
        "gamma": ("gamma", case.gamma),
        "n_critic_updates": ("n_critic_updates", case.n_critic_updates),
        "cg_max_steps": ("cg_max_steps", case.cg_max_steps),
    }


def worker_ours(case: Case, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl

    torch.set_num_threads(1)
    values = {k: v for k, (_, v) in {**SHARED, **per_case(case)}.items()}
    overrides = {
        **values,
        "hidden_sizes": [64, 64], "activation": "tanh", "ortho_init": True, "log_std_init": 0.0,
        "squash_actions": False, "shared_net": False, "max_grad_norm": None, "anneal_lr": False,
        "normalize_obs": case.normalize, "normalize_reward": case.normalize,
        "eval_every": 0, "checkpoint_every": 0, "eval_episodes": 1, "threads": 1, "device": "cpu",
    }  # fmt: skip
    t_call = time.perf_counter()
    run = pl.train("trpo", env=case.env, steps=steps_of(case, a), seed=a.seed, overrides=overrides, preset="none",
                   progress=False, verbose=False, runs_dir=Path(a.out).parent / f"runs-{a.case}-s{a.seed}")  # fmt: skip
    t_returned = time.perf_counter()
    cfg = dataclasses.asdict(run.config)
    wrong = {k: {"got": cfg.get(k), "want": v} for k, v in overrides.items() if cfg.get(k) != v}
    if wrong:
        raise SystemExit(f"policylab's resolved config differs from the benchmark's: {wrong}")
    policy = pl.load(run.dir)
    first = a.seed + EVAL_SEED_OFFSET
    ev = gym_eval(case.env, lambda obs: policy.act(obs, deterministic=True), first, EVAL_EPISODES)
    return {"train_wall_s": t_returned - t_call, "steps": run.steps, **ev}


def worker_sb3(case: Case, a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    kwargs = {name: v for name, v in {**SHARED, **per_case(case)}.values() if name != "n_envs"}
    t_call = time.perf_counter()
    env = make_vec_env(case.env, n_envs=case.num_envs, seed=a.seed)
    if case.normalize:
        env = VecNormalize(env, gamma=case.gamma)
    model = TRPO("MlpPolicy", env, seed=a.seed, device="cpu", verbose=0, **kwargs)
    model.learn(steps_of(case, a))
    t_returned = time.perf_counter()

    def act(obs: Any) -> Any:
        if case.normalize:
            obs = env.normalize_obs(obs)  # type: ignore[union-attr]
        return model.predict(obs, deterministic=True)[0]

    ev = gym_eval(case.env, act, a.seed + EVAL_SEED_OFFSET, EVAL_EPISODES)
    return {"train_wall_s": t_returned - t_call, "steps": model.num_timesteps, **ev}


def main_worker(a: argparse.Namespace) -> None:
    os.chdir(Path(a.out).parent)  # MuJoCo writes MUJOCO_LOG.TXT into the cwd
    fn = worker_ours if a.worker == "ours" else worker_sb3
    record = {"side": a.worker, "seed": a.seed, "case": a.case, **fn(CASES[a.case], a)}
    Path(a.out).write_text(json.dumps(record))


METRICS: dict[str, Metric] = {
    "train_wall_s": ("training wall clock, build + train()/learn() (s); ratio <1: ours faster", ".2f", True),
    "process_wall_s": ("process wall clock, launch to exit (s); ratio <1: ours faster", ".2f", True),
    "eval_return_mean": (f"final return, shared deterministic eval ({EVAL_EPISODES} episodes)", ".1f", False),
}


def main_parent(a: argparse.Namespace) -> None:
    names = a.case or list(CASES)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    payload: dict[str, Any] = {
        **provenance(["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium", "numpy", "mujoco"]),
        "cases": {},
    }
    for name in names:
        case = CASES[name]
        print(f"\n== {name}: TRPO {case.env}, {steps_of(case, a):,} steps", flush=True)
        args = ["--case", name] + (["--quick"] if a.quick else []) + (["--steps", str(a.steps)] if a.steps else [])
        runs = run_alternating(
            Path(__file__).resolve(), ["ours", "sb3"], seeds, args,
            on_record=lambda r: print(f"  {r['side']:4s} seed {r['seed']}: train {r['train_wall_s']:.1f}s, "
                                      f"return {r['eval_return_mean']:.1f}", flush=True),
        )  # fmt: skip
        summary = pair_report(runs, seeds, METRICS, {}, "ours", "sb3", ("policylab", "sb3-contrib"))
        medians = {
            key: {side: statistics.median(r[key] for r in runs if r["side"] == side) for side in ("ours", "sb3")}
            for key in METRICS
        }
        wall = medians["train_wall_s"]
        print(f"ratio of the medians, training wall clock: {fmt(ratio(wall['ours'], wall['sb3']))} (target <= 0.5)")
        payload["cases"][name] = {
            "settings": dataclasses.asdict(case) | {"steps": steps_of(case, a), "shared": SHARED},
            "runs": runs,
            "summary": summary,
            "medians": medians,
            "ratio_of_medians": {k: ratio(v["ours"], v["sb3"]) for k, v in medians.items()},
        }
    payload["quick"] = bool(a.quick or a.steps)
    print(f"\nresults: {write_results('trpo', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (first_seed..first_seed+N-1)")
    p.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1)")
    p.add_argument("--case", action="append", choices=list(CASES), help="a case to run (repeatable; default all)")
    p.add_argument("--steps", type=positive_int, help="env steps per run, overriding every selected case's")
    p.add_argument("--quick", action="store_true", help="5%% of each case's steps (a smoke test, not a result)")
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
