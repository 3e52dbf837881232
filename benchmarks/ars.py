"""policylab's ARS against sb3-contrib's ARS, side by side.

    .venv/bin/python benchmarks/ars.py --case cartpole --seeds 3     # rl-zoo's CartPole-v1 entry, 200k steps
    .venv/bin/python benchmarks/ars.py --case swimmer --seeds 3      # rl-zoo's Swimmer entry, 300k of its 2M steps
    .venv/bin/python benchmarks/ars.py --case hopper --seeds 3       # rl-zoo's Hopper entry (V2), 300k of its 7M
    .venv/bin/python benchmarks/ars.py --case cartpole --seeds 20 --stop-at-threshold   # env steps to 475, 20 seeds
    .venv/bin/python benchmarks/ars.py --case cartpole --seeds 1 --steps 20000   # a quick smoke run

Cases (`--case`), rl-zoo's ars.yml entries (commit 0103d98), the same on both sides:

* `cartpole`: CartPole-v1, the linear policy (no bias; actions: argmax), n_delta 8, all directions kept, lr 0.02,
  delta_std 0.05, one episode per candidate, zero initial policy; 200,000 env steps; threshold 475.
* `swimmer`: Swimmer-v5 (rl-zoo: Swimmer-v3), the linear policy (actions clipped to the bounds), n_delta 1,
  n_top 1, lr 0.02, delta_std 0.01; 300,000 env steps (rl-zoo trains 2M); threshold 200.
* `hopper`: Hopper-v5 (rl-zoo: Hopper-v3), the linear policy, n_delta 8, n_top 4, lr 0.01, delta_std 0.025,
  alive_bonus_offset -1 (the healthy reward taken out of the scores), observations normalized (ARS V2);
  300,000 env steps (rl-zoo trains 7M); threshold 1000.

CartPole and Swimmer do not normalize observations (rl-zoo's entries do not). Hopper does, each side its own way:
sb3-contrib through rl-zoo's VecNormalize(norm_obs=True, norm_reward=False), whose statistics move at every step
of every candidate's episode; policylab as the paper does, with statistics frozen during an iteration and updated
after it. The shared evaluation normalizes with each side's final statistics.

sb3-contrib evaluates its candidates one after another, each in `evaluate_policy` on a one-env DummyVecEnv (its
synchronous mode); policylab runs an iteration's 2 n_delta candidate episodes on its env rows at once, acting for
all rows in one batched product (num_envs 16 for cartpole and hopper, 2 for swimmer). Both count every env
step of the candidates' episodes and stop after the iteration that reaches `--steps`.

Each run is a fresh subprocess, alternately (ours, sb3, ours, sb3 ...), seeds 1..N, `--threads` torch threads
(default 1) on both sides. Per run: whole-process wall clock; training time and env steps/s; when the mean of the
last 20 candidate episodes' returns first reaches the case's threshold (looked at after each iteration on both
sides); a deterministic evaluation of 20 episodes
of the final policy in the same plain Gymnasium loop for both. Output: tables on stdout, JSON in
benchmarks/results/ars-<date>.json. With `--stop-at-threshold`, each run ends after the iteration whose
running mean first reaches the threshold (how many env steps each side needs, cheaply over many seeds); its
evaluation is then of that policy.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import (  # noqa: E402
    HelpFormatter,
    ThresholdTracker,
    config_mismatches,
    gym_eval,
    pair_report,
    positive_int,
    provenance,
    run_alternating,
    show_run,
    threshold_metrics,
    write_results,
    write_worker_record,
)

WINDOW, EVAL_EPISODES, EVAL_SEED = 20, 20, 1_000_000
STOPPED = 10**12
"""Added to sb3-contrib's step count to end learn() after the iteration that reached the threshold."""
CASES: dict[str, dict[str, Any]] = {
    "cartpole": {"env": "CartPole-v1", "steps": 200_000, "threshold": 475.0, "num_envs": 16,
                 "search": {"n_delta": 8, "n_top": None, "lr": 0.02, "delta_std": 0.05}},
    "swimmer": {"env": "Swimmer-v5", "steps": 300_000, "threshold": 200.0, "num_envs": 2,
                "search": {"n_delta": 1, "n_top": 1, "lr": 0.02, "delta_std": 0.01}},
    "hopper": {"env": "Hopper-v5", "steps": 300_000, "threshold": 1000.0, "num_envs": 16,
               "search": {"n_delta": 8, "n_top": 4, "lr": 0.01, "delta_std": 0.025, "alive_bonus_offset": -1.0,
                          "normalize_obs": True}},
}  # fmt: skip
SHARED = {"policy": "linear", "n_eval_episodes": 1, "alive_bonus_offset": 0.0, "zero_policy": True,
          "normalize_obs": False}  # fmt: skip
"""The values of every case unless its "search" says otherwise."""


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import policylab as pl

    case = CASES[a.case]
    expected = {**SHARED, **case["search"]}
    track = ThresholdTracker(case["threshold"], T0)
    observe = track.policylab_callback()

    def callback(info: Any) -> bool:
        observe(info)
        return not (a.stop_at_threshold and track.hit_step is not None)

    overrides = {**expected, "num_envs": case["num_envs"], "eval_every": 0, "checkpoint_every": 0,
                 "threads": a.threads, "eval_episodes": 1}  # fmt: skip
    t_setup = time.perf_counter()
    run = pl.train("ars", env=case["env"], steps=a.steps, seed=a.seed, overrides=overrides, preset="none",
                   progress=False, verbose=False, runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}",
                   callback=callback)  # fmt: skip
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, expected)
    if wrong:
        raise SystemExit(f"policylab's config differs from the benchmark's: {wrong}")
    policy = pl.load(run.dir)
    return {**track.record(t_setup, t_returned), **gym_eval(case["env"], policy.act, EVAL_SEED, EVAL_EPISODES)}


def iteration_callback(track: ThresholdTracker, stop_at_threshold: bool) -> Any:
    """An sb3-contrib callback feeding `track` as policylab's iteration callback does: after each iteration's
    candidate episodes, the mean return of the last WINDOW of them. (sb3-contrib empties its episode buffer at each
    iteration's start, before `on_rollout_start`: the common SB3 callback would see it empty.) `stop_at_threshold`:
    learn() ends after the iteration that reached it (ARS's loop reads no callback's answer: its step count is
    moved past the budget)."""
    from stable_baselines3.common.callbacks import BaseCallback

    recent: deque[float] = deque(maxlen=WINDOW)

    class Callback(BaseCallback):  # type: ignore[misc]
        def _on_training_start(self) -> None:
            track.train_start = time.perf_counter()

        def _on_rollout_end(self) -> None:
            recent.extend(float(e["r"]) for e in self.model.ep_info_buffer)
            track.observe(time.perf_counter(), self.model.num_timesteps, sum(recent) / len(recent))
            if stop_at_threshold and track.hit_step is not None and self.model.num_timesteps < STOPPED:
                self.model.num_timesteps += STOPPED  # taken back at the training's end

        def _on_step(self) -> bool:
            return True

        def _on_training_end(self) -> None:
            self.model.num_timesteps %= STOPPED
            track.observe(time.perf_counter(), self.model.num_timesteps, sum(recent) / len(recent) if recent else None)

    return Callback()


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sb3_contrib import ARS
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(a.threads)
    from stable_baselines3.common.vec_env import VecNormalize

    case = CASES[a.case]
    search = {**SHARED, **case["search"]}
    track = ThresholdTracker(case["threshold"], T0)
    t_setup = time.perf_counter()
    env = make_vec_env(case["env"], n_envs=1, seed=a.seed)
    if search["normalize_obs"]:
        env = VecNormalize(env, norm_obs=True, norm_reward=False)
    model = ARS(
        "LinearPolicy", env, n_delta=search["n_delta"], n_top=search["n_top"], learning_rate=search["lr"],
        delta_std=search["delta_std"], n_eval_episodes=search["n_eval_episodes"],
        alive_bonus_offset=search["alive_bonus_offset"], zero_policy=search["zero_policy"], seed=a.seed,
        device="cpu", verbose=0,
    )  # fmt: skip
    model.learn(a.steps, callback=iteration_callback(track, a.stop_at_threshold))
    t_returned = time.perf_counter()

    def act(obs: Any) -> Any:
        if isinstance(env, VecNormalize):  # the final statistics, frozen
            obs = env.normalize_obs(obs)
        return model.predict(obs, deterministic=True)[0]

    return {**track.record(t_setup, t_returned), **gym_eval(case["env"], act, EVAL_SEED, EVAL_EPISODES)}


def main_parent(a: argparse.Namespace) -> None:
    seeds = list(range(1, a.seeds + 1))
    case = CASES[a.case]
    steps = a.steps or case["steps"]
    header = provenance(["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium", "numpy", "mujoco"])
    args = ["--case", a.case, "--steps", str(steps), "--threads", str(a.threads)]
    args += ["--stop-at-threshold"] if a.stop_at_threshold else []
    runs = run_alternating(__file__, ["ours", "sb3"], seeds, args, show_run)
    print(f"\nARS, {case['env']}, {steps:,} steps, {a.seeds} seed(s) per side, torch threads {a.threads}")
    per_run, detail = threshold_metrics(f"{case['threshold']:g}", EVAL_EPISODES)
    summary = pair_report(runs, seeds, per_run, detail, "ours", "sb3", ("ours", "sb3-contrib"))
    payload = {
        "benchmark": "ars",
        **header,
        "settings": {
            "case": a.case,
            "env": case["env"],
            "threshold": case["threshold"],
            "steps": steps,
            "seeds": seeds,
            "threads": a.threads,
            "hyperparameters": {**SHARED, **case["search"]},
            "num_envs_ours": case["num_envs"],
            "stop_at_threshold": a.stop_at_threshold,
            "order": "per seed: ours, sb3",
        },
        "summary": summary,
        "runs": runs,
    }
    print(f"\nresults: {write_results('ars', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), default="cartpole", help="the task (see the docstring)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (1..N)")
    p.add_argument("--steps", type=positive_int, help="env steps per run (default: cartpole 200k, others 300k)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--stop-at-threshold", action="store_true", help="end each run once it reaches the threshold")
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    write_worker_record(a, {"ours": worker_ours, "sb3": worker_sb3}) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
