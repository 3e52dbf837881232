"""Is policylab's DQN the same algorithm as stable-baselines3's (its QR-DQN sb3-contrib's)? Checked apart from the
random streams.

The return comparison in `offpolicy.py` can only say "not shown different" for a bimodal measure over
tens of seeds. This script takes the random streams out and checks the two parts of the algorithm:

1. **The update.** The same initial network (SB3's, copied into policylab's), the same replay batches
   (real CartPole transitions, terminations included) fed to both: policylab's `algo.update` and SB3's own
   `DQN.train()` (its replay buffer's `sample` replaced by the shared batches). After 1 to 512 gradient
   steps, how far apart are the Q-values on a probe set? The scale to compare with: how far each float32
   run is from the same steps in float64 (SB3's `train()` with its network in float64), since float32
   rounding differs between any two implementations and Adam amplifies it.
2. **The schedule.** A short run of each (4,096 env steps, learning_starts 1,000, train_freq 256): the env
   steps at which training bursts start and how many gradient steps each has, the env steps of the target
   network copies, and epsilon at every exploring step. These must be equal, exactly.

    .venv/bin/python benchmarks/sb3_equivalence.py            # the dqn-cartpole case of offpolicy.py
    .venv/bin/python benchmarks/sb3_equivalence.py --case qrdqn-cartpole   # the update against sb3-contrib's QRDQN

The hyperparameters are `offpolicy.py`'s `dqn-cartpole` case (`--case qrdqn-cartpole`: its `qrdqn-cartpole`
case, the update only, against sb3-contrib's QRDQN, whose quantile network is copied in with its outputs
reordered). Output: a table per part and JSON in benchmarks/results/sb3_equivalence-<date>.json
(qrdqn_equivalence-<date>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import stable_baselines3.common.policies as sb3_policies
import torch
from common import HelpFormatter, positive_int, print_table, provenance, write_results
from offpolicy import CASES
from stable_baselines3.common.logger import configure
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.dqn import dqn as sb3_dqn

import policylab.algos.dqn as pl_dqn
from policylab.algos import get_algo
from policylab.data import Batch
from policylab.train import OffPolicyLoop, resolve_config

CASE = CASES["dqn-cartpole"]
CHECKPOINTS = (1, 8, 32, 128, 512, 2048)
SCHEDULE_STEPS = 4096
FILL_STEPS = 4000


def ours_loop(steps: int, learning_starts: int, seed: int) -> OffPolicyLoop:
    overrides = {**CASE.ours, "learning_starts": learning_starts, "num_envs": 1, "eval_every": 0, "threads": 1}
    overrides.update(checkpoint_every=0, n_step=1, prioritized=False, device="cpu")
    cfg, _ = resolve_config(get_algo(CASE.algo), CASE.env, steps, seed, overrides=overrides, preset="none")
    return OffPolicyLoop(get_algo(CASE.algo), cfg)


def sb3_model(learning_starts: int, seed: int) -> Any:
    """SB3's DQN (or sb3-contrib's QRDQN with --case qrdqn-cartpole)."""
    model_class = getattr(importlib.import_module(CASE.sb3_module), CASE.sb3)
    model = model_class(
        "MlpPolicy", CASE.env, learning_starts=learning_starts, seed=seed, device="cpu", **CASE.sb3_kwargs
    )
    model.set_logger(configure(None, []))
    return model


def sb3_net(model: Any, target: bool = False) -> torch.nn.Module:
    """SB3's Q-network (sb3-contrib's quantile network), or its target."""
    name = "quantile_net" if CASE.algo == "qrdqn" else "q_net"
    return getattr(model, f"{name}_target" if target else name)


def values(loop: OffPolicyLoop | None, model: Any | None, obs: torch.Tensor) -> torch.Tensor:
    """Q-values [P, A] (QR-DQN: quantiles [P, A, M]) of policylab's network or SB3's on `obs`."""
    if loop is not None:
        out = loop.algo.net(obs)
        return out if CASE.algo == "qrdqn" else out[0]
    out = sb3_net(model)(obs.to(next(model.policy.parameters()).dtype))
    return out.transpose(1, 2) if CASE.algo == "qrdqn" else out  # sb3-contrib's quantiles are [P, M, A]


def run_to_end(loop: OffPolicyLoop) -> None:
    while loop.step < loop.cfg.steps:
        loop.iterate()


# --- 1. the update ---------------------------------------------------------------------------------


def linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """A network's Linear layers in order (SB3's networks into policylab's: every equivalence script copies them)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def copy_into_ours(layers: list[torch.nn.Linear], loop: OffPolicyLoop) -> None:
    """SB3's Linear layers ([out, in] weights) into policylab's StackedMLP (member 0, [in, out]), target too. A
    quantile network's last layer is reordered: sb3-contrib's outputs are quantile-major (m A + a), policylab's
    action-major (a M + m)."""
    body = loop.algo.net.body
    order = None
    if CASE.algo == "qrdqn":
        actions, quantiles = loop.algo.net.n_actions, loop.algo.net.n_quantiles
        order = torch.arange(actions * quantiles).view(quantiles, actions).T.reshape(-1)  # ours a M + m <- theirs
    with torch.no_grad():
        for i, linear in enumerate(layers):
            weight, bias = linear.weight, linear.bias
            if order is not None and i == len(layers) - 1:
                weight, bias = weight[order], bias[order]
            body.weight(i)[0].copy_(weight.T)
            body.biases[i][0].view(-1).copy_(bias)
    loop.algo.q_target.update(1.0)


def sb3_samples(batch: Batch, dtype: torch.dtype) -> ReplayBufferSamples:
    return ReplayBufferSamples(
        observations=batch.obs.to(dtype),
        actions=batch.actions.long().unsqueeze(1),
        next_observations=batch.next_obs.to(dtype),
        dones=batch.terminated.to(dtype).unsqueeze(1),
        rewards=batch.rewards.to(dtype).unsqueeze(1),
    )


@contextlib.contextmanager
def sb3_in_float64(model: Any) -> Iterator[None]:
    """SB3's network and optimizer in float64; its policies cast Box observations to float32, so that cast is
    lifted for the duration."""
    cast = sb3_policies.preprocess_obs
    model.policy.double()
    optimizer = model.policy.optimizer  # Adam with SB3's epsilon (QRDQN's: 0.01 / batch size)
    model.policy.optimizer = type(optimizer)(sb3_net(model).parameters(), **optimizer.defaults)
    sb3_policies.preprocess_obs = lambda obs, *args, **kwargs: obs
    try:
        yield
    finally:
        sb3_policies.preprocess_obs = cast


def sb3_train(model: Any, batches: list[ReplayBufferSamples]) -> None:
    """SB3's own DQN.train() over the given batches, in order."""
    feed = iter(batches)
    model.replay_buffer.sample = lambda *args, **kwargs: next(feed)
    model.train(gradient_steps=len(batches), batch_size=CASE.sb3_kwargs["batch_size"])


def relative_gap(q: torch.Tensor, reference: torch.Tensor) -> float:
    """max |q - reference| over the probe set, relative to the mean |reference|."""
    return float((q.double() - reference.double()).abs().max() / reference.double().abs().mean())


def agreement(q: torch.Tensor, other: torch.Tensor) -> float:
    """The share of probe observations where the two Q-functions pick the same greedy action (QR-DQN: by the
    quantiles' mean)."""
    if q.ndim == 3:
        q, other = q.mean(-1), other.mean(-1)
    return float((q.argmax(-1) == other.argmax(-1)).double().mean())


def compare_updates(seed: int) -> list[dict[str, float]]:
    loop = ours_loop(FILL_STEPS, FILL_STEPS, seed)  # a buffer of real transitions, no updates yet
    run_to_end(loop)
    generator = torch.Generator().manual_seed(seed)
    batches = [loop.buffer.sample(CASE.sb3_kwargs["batch_size"], generator) for _ in range(CHECKPOINTS[-1])]
    probe = loop.buffer.sample(1000, generator).obs
    sb3_32, sb3_64 = sb3_model(0, seed), sb3_model(0, seed)
    sb3_net(sb3_64).load_state_dict(sb3_net(sb3_32).state_dict())
    sb3_net(sb3_64, target=True).load_state_dict(sb3_net(sb3_32).state_dict())
    copy_into_ours(linears(sb3_net(sb3_32)), loop)
    with torch.no_grad():
        initial = values(None, sb3_32, probe)
    rows, done = [], 0
    with sb3_in_float64(sb3_64):
        for upto in CHECKPOINTS:
            chunk = batches[done:upto]
            for index, batch in enumerate(chunk):
                loop.algo.update(batch, done + index)
            sb3_train(sb3_32, [sb3_samples(b, torch.float32) for b in chunk])
            sb3_train(sb3_64, [sb3_samples(b, torch.float64) for b in chunk])
            done = upto
            with torch.no_grad():
                ours, theirs, exact = (values(loop, None, probe), *(values(None, m, probe) for m in (sb3_32, sb3_64)))
            rows.append(
                {
                    "gradient_steps": upto,
                    "moved_from_initial": relative_gap(initial, theirs),
                    "ours_vs_sb3": relative_gap(ours, theirs),
                    "ours_vs_float64": relative_gap(ours, exact),
                    "sb3_vs_float64": relative_gap(theirs, exact),
                    "greedy_agreement": agreement(ours, theirs),
                    "sb3_float64_greedy_agreement": agreement(theirs, exact),
                }
            )
    loop.close()
    return rows


# --- 2. the schedule -------------------------------------------------------------------------------

Schedule = dict[str, list[Any]]


def bursts(update_steps: list[int]) -> list[list[int]]:
    """[[env step, gradient steps], ...] from the env step of every gradient step."""
    out: list[list[int]] = []
    for step in update_steps:
        if out and out[-1][0] == step:
            out[-1][1] += 1
        else:
            out.append([step, 1])
    return out


def ours_schedule(seed: int) -> Schedule:
    loop = ours_loop(SCHEDULE_STEPS, CASE.learning_starts, seed)
    algo, log = loop.algo, {"updates": [], "targets": [], "epsilon": []}
    update, target_update, epsilon = algo.update, algo.q_target.update, pl_dqn.epsilon

    def recording_epsilon(cfg: Any, progress: float) -> float:
        value = epsilon(cfg, progress)
        log["epsilon"].append([loop.step, value])  # before this step's increment, as SB3's num_timesteps
        return value

    def recording_update(batch: Batch, index: int) -> dict[str, torch.Tensor]:
        log["updates"].append(loop.step)  # after this step's increment, as SB3's num_timesteps in train()
        return update(batch, index)

    def recording_target_update(tau: float) -> None:
        log["targets"].append(loop.step)
        target_update(tau)

    algo.update = recording_update  # type: ignore[method-assign]
    algo.q_target.update = recording_target_update  # type: ignore[method-assign]
    pl_dqn.epsilon = recording_epsilon
    try:
        run_to_end(loop)
    finally:
        pl_dqn.epsilon = epsilon
    loop.close()
    return {"bursts": bursts(log["updates"]), "target_copies": log["targets"], "epsilon": log["epsilon"]}


def sb3_schedule(seed: int) -> Schedule:
    model = sb3_model(CASE.learning_starts, seed)
    log: Schedule = {"bursts": [], "target_copies": [], "epsilon": []}
    train, predict, polyak = model.train, model.predict, sb3_dqn.polyak_update

    def recording_predict(*args: Any, **kwargs: Any) -> Any:  # called for every step after learning_starts
        log["epsilon"].append([model.num_timesteps, model.exploration_rate])
        return predict(*args, **kwargs)

    def recording_polyak(params: Any, target: Any, tau: float) -> None:
        if not log["target_copies"] or log["target_copies"][-1] != model.num_timesteps:  # once per copy
            log["target_copies"].append(model.num_timesteps)
        polyak(params, target, tau)

    def recording_train(gradient_steps: int, batch_size: int) -> None:
        log["bursts"].append([model.num_timesteps, gradient_steps])
        train(gradient_steps, batch_size)

    model.train = recording_train
    model.predict = recording_predict
    sb3_dqn.polyak_update = recording_polyak
    try:
        model.learn(SCHEDULE_STEPS)
    finally:
        sb3_dqn.polyak_update = polyak
    return log


def first_difference(a: list[Any], b: list[Any], same: Callable[[Any, Any], bool]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if not same(x, y):
            return f"entry {i}: ours {x}, SB3 {y}"
    return "" if len(a) == len(b) else f"lengths: ours {len(a)}, SB3 {len(b)}"


def compare_schedules(seed: int) -> dict[str, Any]:
    ours, theirs = ours_schedule(seed), sb3_schedule(seed)
    close = lambda x, y: x[0] == y[0] and math.isclose(x[1], y[1], rel_tol=1e-9, abs_tol=1e-12)  # noqa: E731
    checks = {
        "bursts": first_difference(ours["bursts"], theirs["bursts"], lambda x, y: x == y),
        "target_copies": first_difference(ours["target_copies"], theirs["target_copies"], lambda x, y: x == y),
        "epsilon": first_difference(ours["epsilon"], theirs["epsilon"], close),
    }
    return {
        "equal": {k: not v for k, v in checks.items()},
        "first_difference": checks,
        "counts": {k: [len(ours[k]), len(theirs[k])] for k in ours},
        "bursts_ours": ours["bursts"],
        "bursts_sb3": theirs["bursts"],
    }


def print_updates(updates: list[dict[str, float]]) -> None:
    print("1. the update: same network, same batches; max |dQ| / mean |Q| on 1,000 probe observations")
    headers = ["gradient steps", "SB3 vs its initial net", "ours vs SB3", "ours vs float64", "SB3 vs float64"]
    rows = [
        [str(r["gradient_steps"])]
        + [f"{r[k]:.1e}" for k in ("moved_from_initial", "ours_vs_sb3", "ours_vs_float64", "sb3_vs_float64")]
        + [f"{r['greedy_agreement']:.1%}", f"{r['sb3_float64_greedy_agreement']:.1%}"]
        for r in updates
    ]
    print_table([*headers, "same greedy action: ours/SB3", "SB3/float64"], rows)


def print_schedule(schedule: dict[str, Any]) -> None:
    print(f"\n2. the schedule over {SCHEDULE_STEPS:,} env steps (counts ours / SB3)")
    rows = [
        [k, str(schedule["equal"][k]), "{} / {}".format(*schedule["counts"][k]), schedule["first_difference"][k]]
        for k in ("bursts", "target_copies", "epsilon")
    ]
    print_table(["what", "equal", "count", "first difference"], rows)


def main() -> None:
    global CASE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N (initial network, batches, env)")
    parser.add_argument(
        "--case",
        choices=("dqn-cartpole", "qrdqn-cartpole"),
        default="dqn-cartpole",
        help="qrdqn-cartpole: the update of policylab's QR-DQN against sb3-contrib's QRDQN (the schedule is DQN's)",
    )
    args = parser.parse_args()
    CASE = CASES[args.case]
    torch.set_num_threads(1)
    per_seed = []
    for seed in range(1, args.seeds + 1):
        print(f"\n== seed {seed}")
        updates = compare_updates(seed)
        print_updates(updates)
        result: dict[str, Any] = {"seed": seed, "update": updates}
        if CASE.algo == "dqn":
            result["schedule"] = compare_schedules(seed)
            print_schedule(result["schedule"])
        per_seed.append(result)
    packages = ["policylab", "torch", "stable-baselines3", "sb3-contrib", "gymnasium"]
    payload = {**provenance(packages), "case": args.case}
    payload["seeds"] = per_seed
    print(f"\nresults: {write_results('sb3_equivalence' if CASE.algo == 'dqn' else 'qrdqn_equivalence', payload)}")


if __name__ == "__main__":
    main()
