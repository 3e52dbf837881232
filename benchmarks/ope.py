"""policylab's OPE estimators against SCOPE-RL's on the same logged data: the same estimates (relative
difference), their error against an exact truth, and wall-clock, 1 thread each, alternating processes.

    .venv/bin/python benchmarks/ope.py --setup       # once: SCOPE-RL's own venv (benchmarks/.venv-scope)
    .venv/bin/python benchmarks/ope.py --repeats 5

Problems (made here with numpy, seeded, saved as .npz both sides read):
- bandit: one step, 10 actions, 50 contexts; the behaviour policy a softmax of random logits per context, the
  evaluation policy the softmax of those logits plus N(0, 1) noise; rewards N(mean[context, action], 1); the
  truth is E_pi mean exactly.
- mdp: a random tabular MDP (10 states, 4 actions, horizon 10, fixed length as SCOPE-RL requires), stationary
  softmax policies (the evaluation policy's logits the behaviour's plus N(0, 0.5) noise); Q_t and the truth by
  backward induction; DR / WDR / DM are given the exact Q (so their error is the IS part alone).
Each problem at 1e5 and 1e6 logged steps. SCOPE-RL's inputs are flat per-step arrays (actions, rewards, the
behaviour's probability of each logged action, the evaluation policy's action distribution, Q for every
action); policylab's side converts them once into its inputs (log-probs of the logged actions, Q of the logged
action, V = sum_a pi Q, the [n, H] layout).
Timed: the point estimate of each estimator (median of --repeats calls; on policylab's side from the converted
arrays, each call building and checking its inputs and weights afresh), the one-off conversion, and the whole
job: all seven estimators with 95% bootstrap intervals (--bootstrap resamples; SCOPE-RL: `estimate_interval` of
each; policylab: the conversion, then one `estimate` call, whose estimators share the weights and the resamples).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    ONE_THREAD,
    REPO_ROOT,
    HelpFormatter,
    make_peer_venv,
    positive_int,
    provenance,
    run_worker,
    worker_record,
    write_results,
)

SCOPE_VENV = REPO_ROOT / "benchmarks" / ".venv-scope"
SCOPE_PY = SCOPE_VENV / "bin" / "python"
ESTIMATORS = ("dm", "is", "pdis", "wis", "wpdis", "dr", "wdr")
SCOPE_NAMES = {
    "dm": "DirectMethod",
    "is": "TrajectoryWiseImportanceSampling",
    "pdis": "PerDecisionImportanceSampling",
    "wis": "SelfNormalizedTIS",
    "wpdis": "SelfNormalizedPDIS",
    "dr": "DoublyRobust",
    "wdr": "SelfNormalizedDR",
}


def setup() -> None:
    make_peer_venv(SCOPE_VENV, "scope-rl==0.2.1")


# --- problems -----------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row of probs [N, A] (inverse CDF)."""
    return (probs.cumsum(-1) < rng.random((len(probs), 1))).sum(-1).clip(0, probs.shape[1] - 1)


def bandit(steps: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    contexts, actions = 50, 10
    logits = rng.normal(0, 1, (contexts, actions))
    behaviour = _softmax(logits)
    evaluation = _softmax(logits + rng.normal(0, 1, (contexts, actions)))
    means = rng.normal(0, 1, (contexts, actions))
    x = rng.integers(contexts, size=steps)
    a = _draw(behaviour[x], rng)
    r = means[x, a] + rng.normal(0, 1, steps)
    q_all = means[x]
    return _problem(1, a, r, behaviour[x, a], evaluation[x], q_all, float((evaluation * means).sum(1).mean()), 1.0)


def mdp(steps: int, seed: int, horizon: int = 10, gamma: float = 0.95) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    states, actions = 10, 4
    transition = rng.dirichlet(np.ones(states), (states, actions))  # [S, A, S']
    reward_mean = rng.normal(0, 1, (states, actions))
    logits = rng.normal(0, 1, (states, actions))
    behaviour = _softmax(logits)
    evaluation = _softmax(logits + rng.normal(0, 0.5, (states, actions)))  # a policy near the logged one
    q = np.zeros((horizon, states, actions))  # Q_t, backward induction
    for t in range(horizon - 1, -1, -1):
        future = 0.0 if t == horizon - 1 else transition @ (evaluation * q[t + 1]).sum(1)
        q[t] = reward_mean + gamma * future
    n = steps // horizon
    s = np.zeros((n, horizon), np.int64)
    a = np.zeros((n, horizon), np.int64)
    s[:, 0] = rng.integers(states, size=n)
    for t in range(horizon):  # vectorized over trajectories
        a[:, t] = _draw(behaviour[s[:, t]], rng)
        if t + 1 < horizon:
            s[:, t + 1] = _draw(transition[s[:, t], a[:, t]], rng)
    r = reward_mean[s, a] + rng.normal(0, 1, (n, horizon))
    q_all = q[np.arange(horizon)[None, :], s]  # [n, H, A]
    truth = float((evaluation * q[0]).sum(1).mean())  # initial states uniform
    flat = lambda x: x.reshape(n * horizon, *x.shape[2:])  # noqa: E731
    return _problem(horizon, flat(a), flat(r), flat(behaviour[s, a]), flat(evaluation[s]), flat(q_all), truth, gamma)


def _problem(horizon: int, action, reward, pscore, dist, q_all, truth: float, gamma: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "step_per_trajectory": horizon,
        "action": action.astype(np.int64),
        "reward": reward.astype(np.float64),
        "pscore": pscore.astype(np.float64),
        "evaluation_policy_action_dist": dist.astype(np.float64),
        "state_action_value_prediction": q_all.astype(np.float64),
        "truth": truth,
        "gamma": gamma,
    }


# --- workers ------------------------------------------------------------------------------------------------


def _load(path: str) -> dict[str, Any]:
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data["step_per_trajectory"] = int(data["step_per_trajectory"])
    data["gamma"], data["truth"] = float(data["gamma"]), float(data["truth"])
    return data


def _median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _converted(d: dict[str, Any]) -> dict[str, np.ndarray]:
    """SCOPE-RL's per-step inputs as policylab's: log-probs of the logged actions, Q of the logged action and V =
    sum_a pi Q, in the [n, H] layout (fixed-length episodes)."""
    dist, q_all, action = d["evaluation_policy_action_dist"], d["state_action_value_prediction"], d["action"]
    shape = (-1, d["step_per_trajectory"])
    return {
        "rewards": d["reward"].reshape(shape),
        "behavior_log_probs": np.log(d["pscore"]).reshape(shape),
        "target_log_probs": np.log(np.take_along_axis(dist, action[:, None], 1)[:, 0]).reshape(shape),
        "q_values": np.take_along_axis(q_all, action[:, None], 1)[:, 0].reshape(shape),
        "v_values": (dist * q_all).sum(1).reshape(shape),
    }


def worker_ours(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from policylab.ope import Trajectories, estimate, get_estimator

    d = _load(a.data)
    convert_seconds, arrays = _median_time(lambda: _converted(d), a.repeats)
    out: dict[str, Any] = {"convert_seconds": convert_seconds}
    for name in ESTIMATORS:  # each call checks its inputs and computes its weights afresh, as SCOPE-RL's does
        seconds, value = _median_time(
            lambda n=name: get_estimator(n)(Trajectories(**arrays), gamma=d["gamma"]).value(), a.repeats
        )
        out[name] = {"value": value, "seconds": seconds}

    def all_with_intervals() -> dict[str, Any]:
        data = Trajectories(**_converted(d))
        return estimate(list(ESTIMATORS), data, gamma=d["gamma"], bootstrap=a.bootstrap, seed=0)

    out["all_seconds"], results = _median_time(all_with_intervals, 1)
    for name, result in results.items():
        out[name]["ci"] = [result.ci_low, result.ci_high]
    return out


def worker_scope(a: argparse.Namespace) -> dict[str, Any]:
    import scope_rl.ope.discrete as scope

    d = _load(a.data)
    inputs = {k: d[k] for k in ("step_per_trajectory", "action", "reward", "pscore", "evaluation_policy_action_dist",
                                "state_action_value_prediction", "gamma")}  # fmt: skip
    estimators = {name: getattr(scope, SCOPE_NAMES[name])() for name in ESTIMATORS}
    out: dict[str, Any] = {}
    for name, est in estimators.items():
        seconds, value = _median_time(lambda e=est: e.estimate_policy_value(**inputs), a.repeats)
        out[name] = {"value": float(value), "seconds": seconds}
    kwargs = {"alpha": 0.05, "n_bootstrap_samples": a.bootstrap, "random_state": 0}

    def all_with_intervals() -> dict[str, Any]:
        return {name: est.estimate_interval(**inputs, **kwargs) for name, est in estimators.items()}

    out["all_seconds"], intervals = _median_time(all_with_intervals, 1)
    for name, ci in intervals.items():
        out[name]["ci"] = [float(ci["95.0% CI (lower)"]), float(ci["95.0% CI (upper)"])]
    return out


# --- FQE: a logged CartPole dataset, d3rlpy's FQE (SCOPE-RL's) against policylab's -------------------------------


def heuristic(obs: np.ndarray) -> np.ndarray:
    """The evaluated policy on both sides: push the cart toward the side the pole leans to (a mediocre,
    deterministic CartPole policy: its episodes end on their own, well before the time limit)."""
    return (np.asarray(obs)[..., 2] > 0).astype(np.int64)


def fqe_problem(where: Path, episodes: int, seed: int, gamma: float) -> dict[str, Any]:
    """The logged dataset (epsilon-greedy 0.3 around the heuristic) and the heuristic's Monte-Carlo value."""
    sys.path.insert(0, str(REPO_ROOT))
    import policylab as pl
    from policylab.data.dataset import write_dataset

    logged = pl.collect("CartPole-v1", heuristic, episodes=episodes, noise=0.3, seed=seed)
    write_dataset(logged, where / "cartpole-logged", overwrite=True)
    own = pl.collect("CartPole-v1", heuristic, episodes=2000, seed=seed + 1)
    returns = _discounted_episode_returns(own.rewards, own.episode_lengths, gamma)
    index = logged.obs_index()
    np.savez(
        where / "cartpole-logged.npz",
        observations=logged.observations[index],
        actions=logged.actions,
        rewards=logged.rewards,
        terminals=logged.terminations,
        timeouts=logged.truncations,
        initial=logged.observations[index[logged.episode_starts()]],
        gamma=gamma,
    )
    return {"truth": float(returns.mean()), "truth_sem": float(returns.std() / np.sqrt(len(returns))),
            "steps": int(logged.num_steps), "episodes": episodes}  # fmt: skip


def _discounted_episode_returns(rewards: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step = np.arange(len(rewards)) - np.repeat(starts, lengths)
    return np.add.reduceat(rewards * gamma**step, starts)


def worker_fqe_ours(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import policylab as pl
    from policylab.nets.critics import QNetwork
    from policylab.ope import FQEConfig, evaluate_policy

    torch.set_num_threads(1)

    class Heuristic(QNetwork):  # a greedy Q-network whose greedy action is the heuristic's
        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.zeros_like(obs[:, 2]), obs[:, 2]], -1)[None]

    data = pl.load_dataset(Path(a.data) / "cartpole-logged")
    policy = pl.Policy(Heuristic(4, 2, (1,)), data.observation_space, data.action_space, algo="dqn")
    out = []
    for steps in map(int, a.budgets.split(",")):
        start = time.perf_counter()
        report = evaluate_policy(data, policy, ["fqe"], gamma=a.gamma, bootstrap=0, fqe=FQEConfig(steps=steps))
        out.append({"steps": steps, "seconds": time.perf_counter() - start, "value": report.results["fqe"].value})
    return {"runs": out}


def worker_fqe_d3rlpy(a: argparse.Namespace) -> dict[str, Any]:
    import d3rlpy
    import torch
    from d3rlpy.logging import NoopAdapterFactory

    torch.set_num_threads(1)
    with np.load(Path(a.data) / "cartpole-logged.npz") as f:
        d = {k: f[k] for k in f.files}
    dataset = d3rlpy.dataset.MDPDataset(
        d["observations"].astype(np.float32),
        d["actions"].astype(np.int64),
        d["rewards"].astype(np.float32),
        d["terminals"].astype(np.float32),
        d["timeouts"].astype(np.float32),
        action_space=d3rlpy.ActionSpace.DISCRETE,
        action_size=2,
    )
    initial = d["initial"].astype(np.float32)
    out = []
    for steps in map(int, a.budgets.split(",")):
        start = time.perf_counter()
        algo = d3rlpy.algos.DQNConfig().create()
        algo.build_with_dataset(dataset)
        algo.impl.predict_best_action = lambda x: (x[:, 2] > 0).long()  # the evaluated policy: the heuristic
        fqe = d3rlpy.ope.DiscreteFQE(algo=algo, config=d3rlpy.ope.FQEConfig(gamma=a.gamma))
        fqe.fit(dataset, n_steps=steps, n_steps_per_epoch=steps, show_progress=False,
                logger_adapter=NoopAdapterFactory())  # fmt: skip
        value = float(fqe.predict_value(initial, heuristic(initial)).mean())
        out.append({"steps": steps, "seconds": time.perf_counter() - start, "value": value})
    return {"runs": out}


def run_fqe(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        problem = fqe_problem(where, a.fqe_episodes, a.seed, a.gamma)
        truth = f"{problem['truth']:.3f} +- {problem['truth_sem']:.3f}"
        print(f"CartPole, {problem['episodes']} logged episodes ({problem['steps']} steps), the heuristic's value")
        print(f"{truth} (gamma {a.gamma}, 2000 Monte-Carlo episodes)")
        sides = {}
        for side, python, budgets in (("policylab", None, a.ours_budgets), ("d3rlpy", str(SCOPE_PY), a.their_budgets)):
            args = ["--worker", f"fqe-{side}", "--data", str(where), "--budgets", budgets, "--gamma", str(a.gamma)]
            res = run_worker(__file__, args, where / f"{side}.json", python=python, env=ONE_THREAD)
            sides[side] = worker_record(res, f"{side} worker")["runs"]
    for side, runs in sides.items():
        for run in runs:
            run["error"] = run["value"] - problem["truth"]
            print(f"  {side:<10} {run['steps']:>6} steps {run['seconds']:7.1f} s  value {run['value']:8.3f}  "
                  f"error {run['error']:+7.3f} ({100 * run['error'] / problem['truth']:+.1f}%)")  # fmt: skip
    payload = {"provenance": provenance(["numpy", "policylab"]), "problem": problem, "gamma": a.gamma,
               "d3rlpy": "2.8.1 (SCOPE-RL 0.2.1's FQE)", "sides": sides}  # fmt: skip
    print(f"results: {write_results('ope-fqe', payload)}")


# --- the parent ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create SCOPE-RL's venv and exit")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per estimate (the median)")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for the interval timing")
    parser.add_argument("--steps", default="100000,1000000", help="logged steps per problem, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems (and of the FQE data)")
    parser.add_argument("--fqe", action="store_true", help="FQE on a logged CartPole dataset against d3rlpy's")
    parser.add_argument("--fqe-episodes", type=positive_int, default=300, help="--fqe: logged episodes")
    parser.add_argument("--gamma", type=float, default=0.99, help="discount")
    parser.add_argument("--ours-budgets", default="1000,2000,5000", help="--fqe: policylab's gradient steps")
    parser.add_argument("--their-budgets", default="5000,10000,20000,40000", help="--fqe: d3rlpy's gradient steps")
    parser.add_argument("--budgets", help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker", choices=("policylab", "scope", "fqe-policylab", "fqe-d3rlpy"), help=argparse.SUPPRESS
    )
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        workers = {"policylab": worker_ours, "scope": worker_scope, "fqe-policylab": worker_fqe_ours,
                   "fqe-d3rlpy": worker_fqe_d3rlpy}  # fmt: skip
        record = workers[a.worker](a)
        Path(a.out).write_text(json.dumps(record))
        return
    if a.setup:
        setup()
        return
    if not SCOPE_PY.exists():
        raise SystemExit("SCOPE-RL's venv is missing: run `.venv/bin/python benchmarks/ope.py --setup` first")
    if a.fqe:
        run_fqe(a)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for problem in (bandit, mdp):
            for steps in map(int, a.steps.split(",")):
                data = _problem_file(problem(steps, a.seed), Path(tmp) / f"{problem.__name__}-{steps}.npz")
                sides = {}
                for side, python in (("policylab", None), ("scope", str(SCOPE_PY))):
                    args = ["--worker", side, "--data", str(data), "--repeats", str(a.repeats),
                            "--bootstrap", str(a.bootstrap)]  # fmt: skip
                    res = run_worker(__file__, args, Path(tmp) / f"{side}.json", python=python, env=ONE_THREAD)
                    sides[side] = worker_record(res, f"{side} worker")
                truth = float(np.load(data)["truth"])
                rows.extend(_rows(problem.__name__, steps, truth, sides))
    _print(rows)
    payload = {
        "provenance": provenance(["numpy", "policylab"]),
        "settings": {"repeats": a.repeats, "bootstrap": a.bootstrap, "steps": a.steps, "seed": a.seed},
        "scope_rl": "0.2.1",
        "rows": rows,
    }
    print(f"results: {write_results('ope', payload)}")


def _problem_file(problem: dict[str, Any], path: Path) -> Path:
    np.savez(path, **problem)
    return path


def _rows(problem: str, steps: int, truth: float, sides: dict[str, Any]) -> list[dict[str, Any]]:
    ours_all, scope_all = sides["policylab"]["all_seconds"], sides["scope"]["all_seconds"]
    rows = []
    for name in ESTIMATORS:
        ours, theirs = sides["policylab"][name], sides["scope"][name]
        rows.append(
            {
                "problem": problem,
                "steps": steps,
                "estimator": name,
                "truth": truth,
                "ours": ours["value"],
                "scope": theirs["value"],
                "relative_difference": abs(ours["value"] - theirs["value"]) / max(abs(theirs["value"]), 1e-12),
                "error_ours": ours["value"] - truth,
                "ms_ours": 1e3 * ours["seconds"],
                "ms_scope": 1e3 * theirs["seconds"],
                "speedup": theirs["seconds"] / ours["seconds"],
                "convert_ms_ours": 1e3 * sides["policylab"]["convert_seconds"],
                "all_with_ci_ms_ours": 1e3 * ours_all,
                "all_with_ci_ms_scope": 1e3 * scope_all,
                "all_with_ci_speedup": scope_all / ours_all,
                "ci_ours": ours["ci"],
                "ci_scope": theirs["ci"],
            }
        )
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    header = f"{'problem':<8}{'steps':>9} {'est':<6}{'truth':>9}{'ours':>10}{'rel diff':>10}"
    print(header + f"{'ms ours':>9}{'ms scope':>10}{'x':>7}")
    for r in rows:
        print(
            f"{r['problem']:<8}{r['steps']:>9} {r['estimator']:<6}{r['truth']:9.4f}{r['ours']:10.4f}"
            f"{r['relative_difference']:10.1e}{r['ms_ours']:9.2f}{r['ms_scope']:10.2f}{r['speedup']:7.1f}"
        )
    print("\nall seven estimators with bootstrap intervals, policylab's conversion from SCOPE-RL's inputs included:")
    for r in rows:
        if r["estimator"] == ESTIMATORS[0]:
            print(
                f"{r['problem']:<8}{r['steps']:>9}  ours {r['all_with_ci_ms_ours']:9.1f} ms  SCOPE-RL "
                f"{r['all_with_ci_ms_scope']:9.1f} ms  x{r['all_with_ci_speedup']:.1f}  (conversion "
                f"{r['convert_ms_ours']:.1f} ms)"
            )


if __name__ == "__main__":
    main()
