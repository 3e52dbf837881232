"""policylab's PPO with invalid-action masking against SB3-contrib's MaskablePPO.

    .venv/bin/python benchmarks/masked.py --case invalid --seeds 3    # sb3-contrib's InvalidActionEnvDiscrete
    .venv/bin/python benchmarks/masked.py --case taxi --seeds 3       # Gymnasium's Taxi-v4
    .venv/bin/python benchmarks/masked.py --case taxi --seeds 1 --steps 8192   # a quick smoke run

Cases (`--case`):

* `invalid`: sb3-contrib's own test env for masking, `InvalidActionEnvDiscrete(dim=80, n_invalid_actions=60)` (the
  sizes of sb3-contrib's tests): observation i of Discrete(80), reward 1 for action i and 0 otherwise, 100 steps per
  episode (return 0..100), and at each step 60 of the 79 wrong actions masked (a random masked policy scores 5, an
  unmasked one 1.25). It is `make_invalid` below: that class with its two random draws (the next state and the
  masked actions) taken from the env's own seeded generator instead of the action space's unseeded one and
  NumPy's global one, and its mask computed once per step as a boolean array rather than by 80 list searches, so
  that seeds reproduce and the env costs little; the task and its statistics are sb3-contrib's. Both sides read
  its `action_masks()` method. Default budget 150,000 env steps, threshold 40 (the training
  policy samples its actions, so its returns rise far more slowly than the deterministic one's: SB3-contrib's
  deterministic evaluation is near 100 already at 20,000 steps, its running training mean reaches 40 at ~115k).
* `taxi`: Gymnasium's Taxi-v4 (Discrete(500) observations, 6 actions, -1 per step, +20 for a delivery, -10 for a
  wrong pickup or drop-off, 200 steps at most; its `info["action_mask"]` masks moves into walls and pickups and
  drop-offs that would fail). policylab reads `info["action_mask"]`; SB3's side wraps each env in
  `ActionMasker(env, lambda e: e.unwrapped.action_mask(e.unwrapped.s))`, the same mask (the evaluation checks
  that at every step). Default budget 300,000 env steps, threshold 0.

Both sides, both cases: PPO with 8 envs x n_steps 128, minibatches of 256 x 4 epochs, gamma 0.99, GAE lambda 0.95,
lr 3e-4 and clip 0.2 (constant), ent_coef 0.01, vf_coef 0.5, max_grad_norm 0.5, advantages normalized per
minibatch, separate actor and critic MLPs of 64x64 tanh with orthogonal init, observations one-hot encoded (each
library's own encoding of a Discrete space), no observation or reward normalization, invalid actions masked in
rollouts, updates and evaluation; `--steps` env steps, `--threads` torch threads (default 1) on both sides. Each
side steps its own vector env (policylab's, SB3's DummyVecEnv), seeded with the run's seed.

Each run is a fresh subprocess, run alternately (ours, sb3, ours, sb3 ...), seeds 1..N. Per run: whole-process
wall clock; training time and env steps/s; when the mean of the last 20 training returns first reaches the case's
threshold; a deterministic evaluation of 20 episodes in the same plain Gymnasium loop for both, with the env's mask
passed at every step (policylab: `Policy.act(obs, action_mask=mask)`; SB3: `model.predict(obs, action_masks=mask,
deterministic=True)`), and the fraction of that evaluation's actions that the mask forbade (0 expected on both
sides). Output: tables on stdout, JSON in benchmarks/results/masked-<date>.json.
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
    pair_report,
    positive_int,
    provenance,
    run_alternating,
    show_run,
    threshold_metrics,
    write_results,
    write_worker_record,
)

N_ENVS, WINDOW, EVAL_EPISODES, EVAL_SEED = 8, 20, 20, 1_000_000
INVALID_DIM, INVALID_N = 80, 60  # sb3-contrib's tests' sizes (tests/test_invalid_actions.py)
CASES: dict[str, dict[str, Any]] = {
    "invalid": {"env": "masked:make_invalid", "steps": 150_000, "threshold": 40.0,
                "title": f"InvalidActionEnvDiscrete(dim={INVALID_DIM}, n_invalid_actions={INVALID_N})"},
    "taxi": {"env": "Taxi-v4", "steps": 300_000, "threshold": 0.0, "title": "Taxi-v4"},
}  # fmt: skip
OURS: dict[str, Any] = {  # the hyperparameters of both sides, in policylab's names
    "action_masks": True,
    "num_envs": N_ENVS,
    "n_steps": 128,
    "batch_size": 256,
    "epochs": 4,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "lr": 3e-4,
    "anneal_lr": False,
    "clip_eps": 0.2,
    "anneal_clip": False,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "normalize_advantage": True,
    "hidden_sizes": [64, 64],
    "activation": "tanh",
    "ortho_init": True,
    "shared_net": False,
    "normalize_obs": False,
    "normalize_reward": False,
}


def make_invalid() -> Any:
    """sb3-contrib's InvalidActionEnvDiscrete(dim=80, n_invalid_actions=60), its draws from the env's seeded generator
    and its mask a boolean array (the module docstring says why); importable by policylab as `masked:make_invalid`."""
    import numpy as np
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete

    class SeededInvalidActionEnv(InvalidActionEnvDiscrete):
        def _choose_next_state(self) -> None:
            n = int(self.action_space.n)
            self.state = int(self.np_random.integers(n))
            wrong = np.delete(np.arange(n), self.state)
            self.invalid_actions = self.np_random.choice(wrong, self.n_invalid_actions, replace=False).tolist()
            self._mask = np.ones(n, dtype=bool)
            self._mask[self.invalid_actions] = False

        def action_masks(self) -> Any:
            return self._mask.copy()

    return SeededInvalidActionEnv(dim=INVALID_DIM, n_invalid_actions=INVALID_N)


def taxi_mask(env: Any) -> Any:
    """SB3-contrib's ActionMasker function for Taxi-v4: the mask Taxi puts in info["action_mask"]."""
    return env.unwrapped.action_mask(env.unwrapped.s)


def make_masked_env(case: str) -> Any:
    """One env of `case` with an `action_masks()` method (SB3-contrib's convention): what SB3's side trains on and
    what both sides are evaluated on."""
    if case == "invalid":
        return make_invalid()
    import gymnasium as gym
    from sb3_contrib.common.wrappers import ActionMasker

    return ActionMasker(gym.make("Taxi-v4"), taxi_mask)


def shared_eval(case: str, act: Callable[[Any, Any], int], seed: int) -> dict[str, Any]:
    """The same plain Gymnasium loop for both sides: EVAL_EPISODES episodes, deterministic actions, `act(obs, mask)`
    given the env's mask (a boolean array) at every step; counts the actions the mask forbade. For Taxi, also checks
    that the ActionMasker's mask (SB3's) is the env's info["action_mask"] (policylab's) at every step."""
    import numpy as np

    start, env, returns, steps, invalid = time.perf_counter(), make_masked_env(case), [], 0, 0
    for i in range(EVAL_EPISODES):
        obs, info = env.reset(seed=EVAL_SEED + 1000 * seed + i)
        total, done = 0.0, False
        while not done:
            mask = np.asarray(env.action_masks(), dtype=bool)
            if "action_mask" in info and not np.array_equal(mask, np.asarray(info["action_mask"], dtype=bool)):
                raise SystemExit(f"ActionMasker's mask {mask} differs from info['action_mask'] {info['action_mask']}")
            action = act(obs, mask)
            steps, invalid = steps + 1, invalid + int(not mask[action])
            obs, reward, terminated, truncated, info = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return {"eval_return_mean": sum(returns) / len(returns), "eval_returns": returns,
            "eval_invalid_fraction": invalid / steps, "eval_steps": steps,
            "eval_s": time.perf_counter() - start}  # fmt: skip


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import policylab as pl

    torch.set_num_threads(a.threads)
    case = CASES[a.case]
    track = ThresholdTracker(case["threshold"], T0)
    callback = track.policylab_callback()

    overrides = {**OURS, "eval_every": 0, "checkpoint_every": 0, "threads": a.threads, "eval_episodes": 1}
    t_setup = time.perf_counter()
    run = pl.train("ppo", env=case["env"], steps=a.steps, seed=a.seed, overrides=overrides, preset="none",
                   progress=False, verbose=False, runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}",
                   callback=callback)  # fmt: skip
    t_returned = time.perf_counter()
    wrong = config_mismatches(run.config, OURS)
    if wrong:
        raise SystemExit(f"policylab's config differs from the benchmark's: {wrong}")
    policy = pl.load(run.dir)

    def act(obs: Any, mask: Any) -> int:
        return int(policy.act(obs, deterministic=True, action_mask=mask))

    return {**track.record(t_setup, t_returned), **shared_eval(a.case, act, a.seed)}


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(a.threads)
    track = ThresholdTracker(CASES[a.case]["threshold"], T0)

    t_setup = time.perf_counter()
    env = make_vec_env(lambda: make_masked_env(a.case), n_envs=N_ENVS, seed=a.seed)
    model = MaskablePPO(
        "MlpPolicy", env, n_steps=128, batch_size=256, n_epochs=4, gamma=0.99, gae_lambda=0.95, learning_rate=3e-4,
        clip_range=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, normalize_advantage=True, seed=a.seed,
        device="cpu", verbose=0, policy_kwargs={"ortho_init": True, "activation_fn": torch.nn.Tanh,
                                                "net_arch": {"pi": [64, 64], "vf": [64, 64]}},
    )  # fmt: skip
    model.learn(a.steps, callback=track.sb3_callback(WINDOW))
    t_returned = time.perf_counter()

    def act(obs: Any, mask: Any) -> int:
        action, _ = model.predict(obs, action_masks=mask, deterministic=True)
        return int(action)

    return {**track.record(t_setup, t_returned), **shared_eval(a.case, act, a.seed)}


def metrics(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    per_run, detail = threshold_metrics(f"{CASES[case]['threshold']:g}", EVAL_EPISODES)
    per_run["eval_invalid_fraction"] = ("invalid actions in the eval (fraction, 0 expected)", ".4f", False)
    return per_run, detail


def main_parent(a: argparse.Namespace) -> None:
    seeds = list(range(1, a.seeds + 1))
    case = CASES[a.case]
    steps = a.steps or case["steps"]
    header = provenance(["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium", "numpy"])
    args = ["--case", a.case, "--steps", str(steps), "--threads", str(a.threads)]
    runs = run_alternating(__file__, ["ours", "sb3"], seeds, args, show_run)
    print(f"\nmasked PPO, {case['title']}, {steps:,} steps, {a.seeds} seed(s) per side, torch threads {a.threads}")
    per_run, detail = metrics(a.case)
    summary = pair_report(runs, seeds, per_run, detail, "ours", "sb3", ("ours", "SB3-contrib"))
    by = index_runs(runs)
    never = {side: [s for s in seeds if by[(side, s)]["time_to_threshold_s"] is None] for side in ("ours", "sb3")}
    invalid = {side: [s for s in seeds if by[(side, s)]["eval_invalid_fraction"] > 0] for side in ("ours", "sb3")}
    if any(invalid.values()):
        print(f"\nWARNING: masked actions taken in the evaluation (seeds per side): {invalid}")
    payload = {
        "benchmark": "masked",
        **header,
        "settings": {
            "case": a.case,
            "env": case["title"],
            "threshold": case["threshold"],
            "steps": steps,
            "seeds": seeds,
            "threads": a.threads,
            "hyperparameters": OURS,
            "order": "per seed: ours, sb3",
        },
        "summary": summary,
        "never_reached": never,
        "invalid_actions_in_eval": invalid,
        "runs": runs,
    }
    print(f"\nresults: {write_results('masked', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=HelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), default="invalid", help="the task (see the docstring)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per side (1..N)")
    p.add_argument("--steps", type=positive_int, help="env steps per run (default: invalid 150,000, taxi 300,000)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, both sides")
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    write_worker_record(a, {"ours": worker_ours, "sb3": worker_sb3}) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
