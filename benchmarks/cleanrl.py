"""policylab against CleanRL's single-file scripts, the same algorithm with the same settings, side by side.

    .venv/bin/python benchmarks/cleanrl.py --setup                      # once: CleanRL's own venv
    .venv/bin/python benchmarks/cleanrl.py --seeds 3                    # every case at its own budget
    .venv/bin/python benchmarks/cleanrl.py --case c51-cartpole --seeds 3 --steps 50000

CleanRL is a set of scripts, not a library: the PyPI wheel `cleanrl==1.2.0` ships them as modules
(`python -m cleanrl.ppo ...`). Its metadata asks for Python < 3.11 and a mix of pins: gym 0.23 for some scripts,
gymnasium for others, and stable-baselines3's replay buffer, 1.2.0 for the gym scripts (`c51.py`,
`td3_continuous_action.py`) and 2.x for the gymnasium one that uses it (`dqn.py`). `--setup` makes two venvs with
torch 2.13.0 (the CPU wheel) and the wheel installed with `--no-deps --ignore-requires-python`:
`benchmarks/.venv-cleanrl` (gym 0.23.1, gymnasium 0.29.1, stable-baselines3 1.2.0, tensorboard, numpy < 2) and
`benchmarks/.venv-cleanrl-sb3` (gymnasium 0.29.1, stable-baselines3 2.3.2, tensorboard, numpy < 2); the scripts
below run there unchanged.

Cases (each side with the script's defaults; policylab's values are listed in CASES and passed with
`--preset none`, so no tuned preset applies):

- ppo-cartpole: `cleanrl.ppo` on CartPole-v1 (4 envs x 128 steps, 4 epochs of 4 minibatches, lr 2.5e-4 annealed,
  clip 0.2 with value clipping, ent 0.01, grad norm 0.5, 64x64 tanh). CleanRL's value loss has a factor 1/2 that
  policylab's does not (objectives/value.py), so policylab's vf_coef is 0.25 for CleanRL's 0.5.
- dqn-cartpole: `cleanrl.dqn` on CartPole-v1 (lr 2.5e-4, a 10k buffer, batch 128, an update every 10 steps after
  10k, a hard target copy every 500, epsilon 1 -> 0.05 over half the run, the squared TD error, [120, 84]).
- c51-cartpole: `cleanrl.c51` on CartPole-v1 (policylab's c51 defaults are this script's).
- td3-pendulum: `cleanrl.td3_continuous_action` on Pendulum-v1, 30k steps (its defaults: lr 3e-4 for both,
  256x256, batch 256, tau 0.005, actor and targets every 2 steps, smoothing 0.2 clipped at 0.5, exploration 0.1;
  learning after 10k random steps instead of its 25k, on both sides).
- rpo-pendulum: `cleanrl.rpo_continuous_action` on Pendulum-v1 (1 env x 2048 steps, 10 epochs of 32 minibatches,
  lr 3e-4 annealed, alpha 0.5, observations and rewards normalized and clipped at 10, 64x64 tanh; its default
  env is HalfCheetah-v4, whose v4 the policylab side does not have: Pendulum-v1 is the same env on both sides).

Each run is one process launched by this script, both sides alternating per seed, 1 thread each
(OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1; policylab also `--set threads=1`). Per run: the whole process's wall
clock (start-up, imports and env creation included, as a user waits for it) and the mean return of the last 20
training episodes (the return of what each side's exploring policy did at the end; CleanRL prints each episode's
return, policylab's train.csv logs that mean). policylab's run also ends with its usual 10-episode deterministic
evaluation (reported, and paid for in its wall clock); CleanRL's scripts evaluate nothing. Output: a table on
stdout and benchmarks/results/cleanrl-<date>.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ONE_THREAD, REPO_ROOT, fmt, make_peer_venv, positive_int, provenance, summarize, write_results

from policylab.nets.generative_ac import set_value

VENV = REPO_ROOT / "benchmarks" / ".venv-cleanrl"
PEER_PACKAGES = (
    "numpy<2",
    "gym==0.23.1",
    "gymnasium==0.29.1",
    "stable-baselines3==1.2.0",
    "tensorboard>=2.10,<3",
    "pygame",
)
SB3_VENV = REPO_ROOT / "benchmarks" / ".venv-cleanrl-sb3"
"""The scripts that give gymnasium spaces to stable-baselines3's replay buffer (dqn.py) need its 2.x."""
SB3_PACKAGES = ("numpy<2", "gymnasium==0.29.1", "stable-baselines3==2.3.2", "tensorboard>=2.10,<3")
CLEANRL = "cleanrl==1.2.0"
LAST_EPISODES = 20
EPISODE_RETURN = re.compile(r"episodic_return=\[?(-?[\d.]+(?:e[-+]?\d+)?)")


@dataclass(frozen=True)
class Case:
    module: str
    env: str
    algo: str
    ours: dict[str, Any] = field(default_factory=dict)
    peer: tuple[str, ...] = ()
    steps: int = 100_000
    """The default budget (--steps overrides it for every case)."""
    venv: Path = VENV


PPO_CARTPOLE = {
    "num_envs": 4, "n_steps": 128, "batch_size": 128, "epochs": 4, "lr": 2.5e-4, "anneal_lr": True, "gamma": 0.99,
    "gae_lambda": 0.95, "clip_eps": 0.2, "clip_value": 0.2, "ent_coef": 0.01, "vf_coef": 0.25, "max_grad_norm": 0.5,
    "hidden_sizes": [64, 64], "activation": "tanh", "normalize_advantage": True, "ortho_init": True,
}  # fmt: skip
RPO_PENDULUM = {
    "num_envs": 1, "n_steps": 2048, "batch_size": 64, "epochs": 10, "lr": 3e-4, "anneal_lr": True, "gamma": 0.99,
    "gae_lambda": 0.95, "clip_eps": 0.2, "clip_value": 0.2, "ent_coef": 0.0, "vf_coef": 0.25, "max_grad_norm": 0.5,
    "hidden_sizes": [64, 64], "activation": "tanh", "normalize_advantage": True, "ortho_init": True,
    "rpo_alpha": 0.5, "normalize_obs": True, "normalize_reward": True, "clip_obs": 10.0, "clip_reward": 10.0,
    "log_std_init": 0.0, "squash_actions": False,
}  # fmt: skip
TD3_PENDULUM = {
    "lr": 3e-4, "hidden_sizes": [256, 256], "batch_size": 256, "buffer_size": 1_000_000, "tau": 0.005,
    "gamma": 0.99, "policy_delay": 2, "target_noise": 0.2, "target_noise_clip": 0.5, "action_noise": 0.1,
    "learning_starts": 10_000, "num_envs": 1, "train_freq": 1, "gradient_steps": 1,
}  # fmt: skip
DQN_CARTPOLE = {
    "lr": 2.5e-4, "buffer_size": 10_000, "gamma": 0.99, "tau": 1.0, "target_update_interval": 500,
    "batch_size": 128, "eps_start": 1.0, "eps_final": 0.05, "exploration_fraction": 0.5, "learning_starts": 10_000,
    "train_freq": 10, "hidden_sizes": [120, 84], "activation": "relu", "loss": "mse", "max_grad_norm": None,
    "double_q": False, "dueling": False, "num_envs": 1,
}  # fmt: skip
CASES = {
    "ppo-cartpole": Case("cleanrl.ppo", "CartPole-v1", "ppo", PPO_CARTPOLE),
    "dqn-cartpole": Case("cleanrl.dqn", "CartPole-v1", "dqn", DQN_CARTPOLE, venv=SB3_VENV),
    "c51-cartpole": Case("cleanrl.c51", "CartPole-v1", "c51"),
    "rpo-pendulum": Case("cleanrl.rpo_continuous_action", "Pendulum-v1", "rpo", RPO_PENDULUM),
    "td3-pendulum": Case(
        "cleanrl.td3_continuous_action",
        "Pendulum-v1",
        "td3",
        TD3_PENDULUM,
        ("--learning-starts", "10000"),
        steps=30_000,
    ),
}


def setup() -> None:
    for venv, packages in ((VENV, PEER_PACKAGES), (SB3_VENV, SB3_PACKAGES)):
        make_peer_venv(venv, *packages)
        python = str(venv / "bin" / "python")
        pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-requires-python", CLEANRL]
        subprocess.run(pip, check=True)


def run_ours(case: Case, seed: int, steps: int, tmp: Path) -> dict[str, Any]:
    """`policylab train` in a fresh process: (wall clock, last-20 training return, final evaluation)."""
    overrides = {**case.ours, "threads": 1, "eval_every": 0}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={set_value(value)}")]
    runs_dir = tmp / f"ours-{case.algo}-{seed}"
    command = [str(Path(sys.executable).parent / "policylab"), "train", case.algo, "--env", case.env,
               "--steps", str(steps), "--seed", str(seed), "--preset", "none", "--runs-dir", str(runs_dir),
               "--no-progress", *sets]  # fmt: skip
    wall, output = _timed(command)
    run_dir = next(runs_dir.iterdir())
    rows = list(csv.DictReader(open(run_dir / "train.csv")))
    evaluation = list(csv.DictReader(open(run_dir / "eval.csv")))
    return {
        "side": "policylab",
        "seed": seed,
        "wall_s": wall,
        "steps": int(rows[-1]["step"]),
        "last_returns": float(rows[-1]["return_mean"]),
        "final_eval": float(evaluation[-1]["return_mean"]),
        "output_tail": output[-300:],
    }


def run_cleanrl(case: Case, seed: int, steps: int, tmp: Path) -> dict[str, Any]:
    """CleanRL's script in its venv, in a fresh process (its tensorboard logs go to a scratch directory)."""
    command = [str(case.venv / "bin" / "python"), "-m", case.module, "--env-id", case.env, "--seed", str(seed),
               "--total-timesteps", str(steps), "--capture-video", "False", "--track", "False", *case.peer]  # fmt: skip
    wall, output = _timed(command, cwd=tmp)
    returns = [float(m.group(1)) for m in EPISODE_RETURN.finditer(output)]
    if not returns:
        raise SystemExit(f"{case.module} printed no episode returns:\n{output[-2000:]}")
    return {
        "side": "cleanrl",
        "seed": seed,
        "wall_s": wall,
        "steps": steps,
        "last_returns": statistics.fmean(returns[-LAST_EPISODES:]),
        "episodes": len(returns),
    }


def _timed(command: list[str], cwd: Path = REPO_ROOT) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, output


def report(case_name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ours = {r["seed"]: r for r in runs if r["side"] == "policylab"}
    theirs = {r["seed"]: r for r in runs if r["side"] == "cleanrl"}
    ratios = [ours[s]["wall_s"] / theirs[s]["wall_s"] for s in sorted(ours)]
    summary = {
        "wall_ratio": summarize(ratios),
        "ours_wall_s": summarize([r["wall_s"] for r in ours.values()]),
        "cleanrl_wall_s": summarize([r["wall_s"] for r in theirs.values()]),
        "ours_last_returns": [ours[s]["last_returns"] for s in sorted(ours)],
        "cleanrl_last_returns": [theirs[s]["last_returns"] for s in sorted(theirs)],
        "ours_final_eval": [ours[s]["final_eval"] for s in sorted(ours)],
    }
    ratio = summary["wall_ratio"]
    print(
        f"{case_name}: ours/CleanRL wall clock {fmt(ratio['median'])} [{fmt(ratio['min'])}-{fmt(ratio['max'])}] "
        f"({fmt(summary['ours_wall_s']['median'], '.1f')} s / {fmt(summary['cleanrl_wall_s']['median'], '.1f')} s); "
        f"last {LAST_EPISODES} training returns ours {[round(v, 1) for v in summary['ours_last_returns']]} / "
        f"CleanRL {[round(v, 1) for v in summary['cleanrl_last_returns']]}; ours' final evaluation "
        f"{[round(v, 1) for v in summary['ours_final_eval']]}",
        flush=True,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create CleanRL's venv and exit")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="the cases to run (default: all)")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--steps", type=positive_int, help="env steps per run, both sides (default: the case's)")
    a = parser.parse_args()
    if a.setup:
        setup()
        return
    if not all((case.venv / "bin" / "python").exists() for case in CASES.values()):
        raise SystemExit("CleanRL's venv is missing: run `.venv/bin/python benchmarks/cleanrl.py --setup` first")
    results: dict[str, Any] = {"provenance": provenance(["torch", "gymnasium", "numpy"])}
    results["cases"] = {}
    with tempfile.TemporaryDirectory(prefix="policylab-cleanrl-") as scratch:
        tmp = Path(scratch)
        for name in a.case or list(CASES):
            case, runs = CASES[name], []
            steps = a.steps or case.steps
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                runs.append(run_ours(case, seed, steps, tmp))
                runs.append(run_cleanrl(case, seed, steps, tmp))
                print(f"  {name} seed {seed}: ours {runs[-2]['wall_s']:.1f} s, CleanRL {runs[-1]['wall_s']:.1f} s",
                      flush=True)  # fmt: skip
            record = case.__dict__ | {"ours": dict(case.ours), "steps": steps, "venv": case.venv.name}
            results["cases"][name] = {"case": record, "runs": runs,
                                      "summary": report(name, runs)}  # fmt: skip
    print(f"results: {write_results('cleanrl', results)}")


if __name__ == "__main__":
    main()
