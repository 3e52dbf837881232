"""policylab PPO vs stable-baselines3 PPO on CartPole-v1 with rl-zoo's tuned hyperparameters.

Run from the repository root (`make bench` runs the first line):

    .venv/bin/python benchmarks/ppo_cartpole.py --seeds 3                  # the benchmark
    .venv/bin/python benchmarks/ppo_cartpole.py --seeds 1 --steps 20000    # a quick smoke run

Both sides: 8 envs x n_steps 32, one 256-sample minibatch x 20 epochs, gamma 0.98, GAE lambda 0.8,
lr 1e-3 and clip 0.2 both annealed linearly to 0, ent_coef 0, vf_coef 0.5, max_grad_norm 0.5,
advantage normalization, separate 64x64 tanh actor and critic, orthogonal init, Adam eps 1e-5;
`--steps` env steps (default 100k), `--threads` torch threads (default 1) on both sides.
policylab gets these from its CartPole-v1 preset (checked against EXPECTED after each run).

Every run is a fresh `python benchmarks/ppo_cartpole.py --worker ours|sb3 ...` subprocess, run
alternately (ours, sb3, ours, sb3 ...), seeds 1..N. Measured per run: the whole-process wall
clock from launch to exit (by the parent), interpreter start-up, import time, set-up, the
wall clock from process start until the mean of the last 20 finished training episodes first
reaches 475 (and at which env step), training wall time and env steps/s, the final mean of the
last 20 training returns, and a deterministic evaluation over 20 episodes with the same plain
Gymnasium loop for both sides. Both sides check the threshold at the same point (after each
update), once per 256-step iteration. The limit: random actions through each side's own vector
env (`--env-steps` vector steps). Results: a table on stdout and JSON in benchmarks/results/.
"""

import time

T0 = time.perf_counter()  # the worker's first statement: everything after it counts as the run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from common import (  # noqa: E402
    command_line, fmt, fmt_summary, git_state, machine_info, package_versions, print_table, ratio, run_worker,
    summarize, write_results,
)

if TYPE_CHECKING:
    from policylab import IterationInfo

ENV_ID, N_ENVS, THRESHOLD, WINDOW, EVAL_EPISODES, EVAL_SEED = "CartPole-v1", 8, 475.0, 20, 20, 1_000_000
EXPECTED: dict[str, Any] = {  # policylab's resolved config must equal rl-zoo's / SB3's values
    "num_envs": 8, "n_steps": 32, "batch_size": 256, "epochs": 20, "gae_lambda": 0.8, "gamma": 0.98, "lr": 1e-3,
    "anneal_lr": True, "anneal_clip": True, "clip_eps": 0.2, "clip_eps_high": None, "ent_coef": 0.0, "vf_coef": 0.5,
    "max_grad_norm": 0.5, "normalize_advantage": True, "clip_value": None, "target_kl": None, "dual_clip": None,
    "hidden_sizes": [64, 64], "activation": "tanh", "shared_net": False, "ortho_init": True,
    "normalize_obs": False, "normalize_reward": False,
}  # fmt: skip


class Tracker:
    """Called once per iteration with (time, env step, mean of the last 20 returns): a few float ops."""

    def __init__(self) -> None:
        self.train_start = self.train_end = 0.0
        self.steps, self.last_mean = 0, None
        self.hit_time: float | None = None
        self.hit_step: int | None = None

    def observe(self, now: float, step: int, mean: float | None) -> None:
        self.train_end, self.steps, self.last_mean = now, step, mean
        if self.hit_time is None and mean is not None and mean >= THRESHOLD:
            self.hit_time, self.hit_step = now, step

    def record(self, t_setup: float, t_returned: float) -> dict[str, Any]:
        train = self.train_end - self.train_start
        hit = self.hit_time
        return {
            "time_to_475_s": None if hit is None else hit - T0, "steps_to_475": self.hit_step,
            "time_to_475_train_s": None if hit is None else hit - self.train_start,
            "setup_s": self.train_start - t_setup, "train_start_s": self.train_start - T0, "train_wall_s": train,
            "post_train_s": t_returned - self.train_end, "steps": self.steps, "train_steps_per_s": self.steps / train,
            "final_train_return_last20": self.last_mean,
        }  # fmt: skip


def shared_eval(act: Callable[[Any], int], seed: int) -> dict[str, Any]:
    """The same plain Gymnasium loop for both sides: EVAL_EPISODES episodes, deterministic actions."""
    import gymnasium as gym

    start, env, returns = time.perf_counter(), gym.make(ENV_ID), []
    for i in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=EVAL_SEED + 1000 * seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return {"eval_return_mean": sum(returns) / len(returns), "eval_returns": returns,
            "eval_s": time.perf_counter() - start}  # fmt: skip


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch

    import policylab as pl

    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    track = Tracker()

    def callback(info: "IterationInfo") -> None:
        now = time.perf_counter()
        if track.steps == 0:
            track.train_start = now - info.elapsed
        track.observe(now, info.step, info.mean_return)

    overrides = {"eval_every": 0, "checkpoint_every": 0, "threads": a.threads, "eval_episodes": EVAL_EPISODES}
    t_setup = time.perf_counter()
    run = pl.train("ppo", env=ENV_ID, steps=a.steps, seed=a.seed, overrides=overrides, progress=False, verbose=False,
                   runs_dir=Path(a.out).parent / f"runs-ours-s{a.seed}", callback=callback)  # fmt: skip
    t_returned = time.perf_counter()
    cfg = dataclasses.asdict(run.config)
    wrong = {k: {"got": cfg.get(k), "want": v} for k, v in EXPECTED.items() if cfg.get(k) != v}
    assert not wrong, f"policylab's CartPole-v1 config differs from rl-zoo's: {wrong}"
    policy = pl.load(run.dir)
    ev = shared_eval(lambda obs: policy.act(obs, deterministic=True), a.seed)
    final = run.final_eval or {}
    return {"imports_s": imports_s, **track.record(t_setup, t_returned), **ev,
            "own_final_eval_return_mean": final.get("return_mean"), "config": cfg}  # fmt: skip


def worker_sb3(a: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    imports_s = time.perf_counter() - t
    torch.set_num_threads(a.threads)
    track = Tracker()

    class Callback(BaseCallback):
        def _mean(self) -> float | None:
            last = list(self.model.ep_info_buffer or [])[-WINDOW:]
            return sum(e["r"] for e in last) / len(last) if last else None

        def _on_training_start(self) -> None:
            track.train_start = time.perf_counter()

        def _on_rollout_start(self) -> None:  # right after the previous update, where policylab's callback runs
            if self.model.num_timesteps:
                track.observe(time.perf_counter(), self.model.num_timesteps, self._mean())

        def _on_step(self) -> bool:
            return True

        def _on_training_end(self) -> None:
            track.observe(time.perf_counter(), self.model.num_timesteps, self._mean())

    def linear(start: float) -> Callable[[float], float]:
        return lambda progress_remaining: start * progress_remaining

    t_setup = time.perf_counter()
    model = PPO("MlpPolicy", make_vec_env(ENV_ID, n_envs=N_ENVS, seed=a.seed), n_steps=32, batch_size=256,
                gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=linear(1e-3),
                clip_range=linear(0.2), seed=a.seed, device="cpu", verbose=0)  # fmt: skip
    pol = model.policy
    assert pol.ortho_init and pol.optimizer.defaults["eps"] == 1e-5 and pol.activation_fn is torch.nn.Tanh
    assert model.max_grad_norm == 0.5 and model.vf_coef == 0.5 and model.normalize_advantage
    assert pol.net_arch == {"pi": [64, 64], "vf": [64, 64]}  # separate actor and critic MLPs
    model.learn(a.steps, callback=Callback())
    t_returned = time.perf_counter()
    ev = shared_eval(lambda obs: int(model.predict(obs, deterministic=True)[0]), a.seed)
    return {"imports_s": imports_s, **track.record(t_setup, t_returned), **ev}


def worker_env(a: argparse.Namespace, side: str) -> dict[str, Any]:
    """Random actions through the vector env each side trains on: the speed limit for training."""
    import numpy as np

    if side == "ours":
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
    elapsed = time.perf_counter() - start
    env.close()
    return {"vector_steps": a.env_steps, "env_steps_per_s": a.env_steps * N_ENVS / elapsed}


def main_worker(a: argparse.Namespace) -> None:
    workers = {"ours": worker_ours, "sb3": worker_sb3, "env-ours": lambda x: worker_env(x, "ours"),
               "env-sb3": lambda x: worker_env(x, "sb3")}  # fmt: skip
    record = {"side": a.worker, "seed": a.seed, "t0_abs": T0, **workers[a.worker](a)}
    record["worker_end_s"] = time.perf_counter() - T0
    Path(a.out).write_text(json.dumps(record))


def main_parent(a: argparse.Namespace) -> None:
    common_args = ["--steps", str(a.steps), "--threads", str(a.threads), "--env-steps", str(a.env_steps)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ppo-cartpole-") as tmp:
        for seed in range(1, a.seeds + 1):
            for worker in ("ours", "sb3", "env-ours", "env-sb3"):  # alternating: drift hits both sides
                res = run_worker(__file__, ["--worker", worker, "--seed", str(seed), *common_args], Path(tmp) / "out.json")
                if res.record is None:
                    raise SystemExit(f"worker {worker} seed {seed} failed (exit {res.returncode}):\n{res.stderr_tail}")
                rec = {**res.record, "order": len(runs), "process_wall_s": res.wall_s}
                if "eval_s" in rec:
                    rec["process_wall_minus_eval_s"] = res.wall_s - rec["eval_s"]
                runs.append(rec)
                print(f"  {worker:8s} seed {seed}: " + (f"{rec['env_steps_per_s']:,.0f} env steps/s" if "vector_steps" in rec
                      else f"process {res.wall_s:.1f}s, time-to-475 {fmt(rec['time_to_475_s'], '.1f')}s, "
                           f"{rec['train_steps_per_s']:,.0f} steps/s, eval {rec['eval_return_mean']:.1f}"), flush=True)  # fmt: skip
    report(a, runs)


def report(a: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    by = {(r["side"], r["seed"]): r for r in runs}
    seeds = list(range(1, a.seeds + 1))

    def col(side: str, key: str) -> list[Any]:
        return [by[(side, s)].get(key) for s in seeds]

    def ratios(key: str) -> list[float | None]:
        return [ratio(by[("ours", s)].get(key), by[("sb3", s)].get(key)) for s in seeds]

    keys = {"time-to-475 (s since process start)": "time_to_475_s", "process wall clock (s)": "process_wall_s",
            "process wall clock without shared eval (s)": "process_wall_minus_eval_s",
            "training env steps/s": "train_steps_per_s"}  # fmt: skip
    print(f"\nPPO CartPole-v1, {a.steps:,} steps, {a.seeds} seed(s), torch threads {a.threads}; ratio = ours/SB3 per seed")
    rows = [[s, *(f"{fmt(by[('ours', s)].get(k), '.4g')} / {fmt(by[('sb3', s)].get(k), '.4g')} = {fmt(r[i], '.2f')}"
                  for k, r in ((k, ratios(k)) for k in keys.values()))] for i, s in enumerate(seeds)]  # fmt: skip
    print_table(["seed", *(f"{n}: ours / SB3 = ratio" for n in keys)], rows)
    summary: dict[str, Any] = {}
    for name, key in keys.items():
        summary[key] = {"ratio": summarize(ratios(key)), "ours": summarize(col("ours", key)), "sb3": summarize(col("sb3", key))}
    extra = {"steps_to_475": "env steps to reach 475 (sample efficiency)", "final_train_return_last20": "final return, last 20 training episodes",
             "eval_return_mean": f"shared deterministic eval, {EVAL_EPISODES} episodes", "startup_s": "interpreter start-up (s)",
             "imports_s": "imports (s)", "setup_s": "set-up before training (s)", "post_train_s": "after training inside train()/learn() (s)",
             "eval_s": "shared eval (s)"}  # fmt: skip
    for key in extra:
        summary[key] = {"ours": summarize(col("ours", key)), "sb3": summarize(col("sb3", key))}
    summary["own_final_eval_return_mean"] = {"ours": summarize(col("ours", "own_final_eval_return_mean"))}
    env = {side: summarize(col(f"env-{side}", "env_steps_per_s")) for side in ("ours", "sb3")}
    share = {side: summarize([ratio(x, y) for x, y in zip(col(side, "train_steps_per_s"), col(f"env-{side}", "env_steps_per_s"))])
             for side in ("ours", "sb3")}  # fmt: skip
    summary["env_raw_steps_per_s"], summary["train_share_of_env_raw"] = env, share
    print("\nmedian [min-max] over seeds")
    lines = [[n, fmt_summary(summary[k]["ratio"]), fmt_summary(summary[k]["ours"], ".4g"), fmt_summary(summary[k]["sb3"], ".4g")]
             for n, k in keys.items()]  # fmt: skip
    lines += [[n, "", fmt_summary(summary[k]["ours"], ".4g"), fmt_summary(summary[k]["sb3"], ".4g")] for k, n in extra.items()]
    lines.append(["policylab's own final eval (train(), 20 episodes)", "", fmt_summary(summary["own_final_eval_return_mean"]["ours"], ".4g"), ""])
    lines.append(["raw env throughput, random actions (env steps/s)", fmt_summary(
        summarize([ratio(x, y) for x, y in zip(col("env-ours", "env_steps_per_s"), col("env-sb3", "env_steps_per_s"))])),
        fmt_summary(env["ours"], ",.0f"), fmt_summary(env["sb3"], ",.0f")])  # fmt: skip
    lines.append(["training steps/s as a share of own raw env", "", fmt_summary(share["ours"], ".1%"), fmt_summary(share["sb3"], ".1%")])
    print_table(["metric", "ratio ours/SB3", "ours", "SB3"], lines)
    never = {side: [s for s in seeds if by[(side, s)]["time_to_475_s"] is None] for side in ("ours", "sb3")}
    print(f"runs that never reached {THRESHOLD:g}: ours seeds {never['ours'] or 'none'}, SB3 seeds {never['sb3'] or 'none'}")
    payload = {
        "benchmark": "ppo_cartpole", "date": datetime.date.today().isoformat(),
        "datetime": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command_line(),
        "machine": machine_info(), "git": git_state(),
        "versions": package_versions(["policylab", "torch", "stable-baselines3", "gymnasium", "numpy"]),
        "settings": {"env": ENV_ID, "steps": a.steps, "seeds": seeds, "threads": a.threads, "threshold": THRESHOLD,
                     "window": WINDOW, "eval_episodes": EVAL_EPISODES, "env_vector_steps": a.env_steps,
                     "hyperparameters": EXPECTED, "order": "per seed: ours, sb3, env-ours, env-sb3"},
        "summary": summary, "never_reached": never, "runs": runs,
    }  # fmt: skip
    print(f"\nresults: {write_results('ppo_cartpole', payload)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seeds", type=int, default=3, help="seeds per side (1..N)")
    p.add_argument("--steps", type=int, default=100_000, help="env steps per run")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--env-steps", type=int, default=20_000, help="vector steps for the raw env throughput")
    p.add_argument("--worker", choices=["ours", "sb3", "env-ours", "env-sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    main_worker(a) if a.worker else main_parent(a)


if __name__ == "__main__":
    main()
