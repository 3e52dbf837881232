"""Are policylab's PPO and A2C updates (with their GAE) stable-baselines3's? Checked apart from the random streams.

`ppo_cartpole.py` compares the two PPOs by wall clock at equal return; this script checks that the libraries
compute the same update from the same experience. SB3's initial actor and critic are copied into policylab's
network; policylab collects each rollout on CartPole-v1 with its preset, which is SB3's settings (PPO:
`ppo_cartpole.py`'s, 8 envs x 32 steps, 20 epochs of one 256-sample minibatch, gamma 0.98, GAE lambda 0.8, clip
0.2, vf_coef 0.5, max_grad_norm 0.5, Adam's epsilon 1e-5, the learning rate and the clip range held at their
starting values; A2C: SB3's defaults, 8 envs x 5 steps, one step of RMSprop (alpha 0.99, epsilon 1e-5) per
rollout, lr 7e-4, gamma 0.99, no advantage normalization), and SB3 gets the same observations, actions, rewards
and episode starts in its rollout buffer, with its own values and log-probabilities of them and its own
`compute_returns_and_advantage`, then its own `train()`. With one minibatch per epoch PPO's update does not depend
on the minibatches' order. After a number of rollouts: how far apart are the two actors' log-probabilities and the
two critics' values on the rollouts' observations, and the GAE advantages of the last rollout? The scale to
compare with: SB3's float32 run against the same run in float64.

    .venv/bin/python benchmarks/onpolicy_equivalence.py --seeds 3               # PPO
    .venv/bin/python benchmarks/onpolicy_equivalence.py --seeds 3 --algo a2c

Output: a table per seed and JSON in benchmarks/results/<ppo or a2c>_equivalence-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import stable_baselines3.common.policies as sb3_policies
import torch
from common import HelpFormatter, positive_int, print_table, provenance, write_results
from sb3_equivalence import linears, relative_gap
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

from policylab.algos import get_algo
from policylab.algos.onpolicy import rollout_advantages
from policylab.data import Batch
from policylab.train import OnPolicyLoop, resolve_config

ENV = "CartPole-v1"
ROLLOUTS = {"ppo": (1, 2, 4, 8), "a2c": (1, 8, 32, 128)}
SB3 = {"ppo": PPO, "a2c": A2C}
SETTINGS: dict[str, dict[str, Any]] = {
    "ppo": {"n_steps": 32, "batch_size": 256, "n_epochs": 20, "gamma": 0.98, "gae_lambda": 0.8, "ent_coef": 0.0},
    "a2c": {"n_steps": 5, "gamma": 0.99, "gae_lambda": 1.0, "ent_coef": 0.0, "learning_rate": 7e-4},
}
SETTINGS["ppo"].update(vf_coef=0.5, max_grad_norm=0.5, learning_rate=1e-3, clip_range=0.2)
SETTINGS["a2c"].update(vf_coef=0.5, max_grad_norm=0.5, rms_prop_eps=1e-5, normalize_advantage=False)
EXPECTED: dict[str, dict[str, Any]] = {  # policylab's CartPole-v1 presets: SB3's settings above
    "ppo": {"num_envs": 8, "n_steps": 32, "batch_size": 256, "epochs": 20, "gamma": 0.98, "gae_lambda": 0.8},
    "a2c": {"num_envs": 8, "n_steps": 5, "gamma": 0.99, "gae_lambda": 1.0, "lr": 7e-4, "optimizer": "rmsprop"},
}
EXPECTED["ppo"].update(ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, lr=1e-3, clip_eps=0.2, normalize_reward=False)
EXPECTED["a2c"].update(ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, rms_alpha=0.99, optim_eps=1e-5)
EXPECTED["a2c"].update(normalize_advantage=False, normalize_reward=False)
ALGO = "ppo"  # --algo a2c instead


def ours_loop(seed: int) -> OnPolicyLoop:
    """policylab's CartPole-v1 preset (the same values) with the schedules held at their start."""
    overrides = {"threads": 1, "eval_every": 0, "checkpoint_every": 0, "anneal_lr": False}
    overrides.update({"anneal_clip": False} if ALGO == "ppo" else {})
    cfg, _ = resolve_config(get_algo(ALGO), ENV, 100_000, seed, overrides=overrides, preset="auto")
    different = {k: getattr(cfg, k) for k, v in EXPECTED[ALGO].items() if getattr(cfg, k) != v}
    if different:
        raise SystemExit(f"policylab's CartPole-v1 preset is not the one this script states: {different}")
    return OnPolicyLoop(get_algo(ALGO), cfg)


def sb3_model(seed: int) -> Any:
    env = make_vec_env(ENV, n_envs=8, seed=seed)
    model = SB3[ALGO]("MlpPolicy", env, seed=seed, device="cpu", **SETTINGS[ALGO])
    model.set_logger(configure(None, []))
    return model


def copy_into_ours(model: Any, loop: OnPolicyLoop) -> None:
    """SB3's policy MLP + action_net into policylab's actor (member 0), its value MLP + value_net into the critic
    (member 1, whose last layer's first output is the value; its other outputs are unused and set to 0)."""
    policy, body = model.policy, loop.algo.net.body
    members = (
        [*linears(policy.mlp_extractor.policy_net), policy.action_net],
        [*linears(policy.mlp_extractor.value_net), policy.value_net],
    )
    with torch.no_grad():
        for k, layers in enumerate(members):
            for i, linear in enumerate(layers):
                weight, bias = body.weight(i)[k], body.biases[i][k].view(-1)
                weight.zero_()
                bias.zero_()
                weight[:, : linear.out_features].copy_(linear.weight.T)
                bias[: linear.out_features].copy_(linear.bias)


@contextlib.contextmanager
def sb3_in_float64(model: Any) -> Iterator[None]:
    """SB3's policy and optimizer in float64; its policies cast Box observations to float32, so that cast is lifted
    for the duration."""
    cast = sb3_policies.preprocess_obs
    model.policy.double()
    optimizer = model.policy.optimizer
    model.policy.optimizer = type(optimizer)(model.policy.parameters(), **optimizer.defaults)
    sb3_policies.preprocess_obs = lambda obs, *args, **kwargs: obs
    try:
        yield
    finally:
        sb3_policies.preprocess_obs = cast


def sb3_train(model: Any, rollout: Batch, starts: np.ndarray, last_obs: np.ndarray) -> np.ndarray:
    """SB3's own GAE and PPO.train() on policylab's rollout (SB3's values and log-probabilities of it); returns the
    advantages SB3 computed [T, N]."""
    policy, buffer = model.policy, model.rollout_buffer
    dtype = next(policy.parameters()).dtype
    steps, envs = rollout.rewards.shape
    obs = rollout.obs.to(dtype).reshape(steps * envs, -1)
    actions = rollout.actions.reshape(steps * envs)
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(obs, actions)
        last_values = policy.predict_values(torch.as_tensor(last_obs, dtype=dtype))
    buffer.reset()
    if dtype == torch.float64:  # the buffer's arrays (GAE runs on them in numpy) and the batches it hands out
        for name in ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs"):
            setattr(buffer, name, getattr(buffer, name).astype(np.float64))
        buffer.advantages = buffer.advantages.astype(np.float64)
        buffer.to_torch = lambda array, copy=True: torch.tensor(array, dtype=torch.float64)
    buffer.observations[:] = rollout.obs.numpy().reshape(buffer.observations.shape)
    buffer.actions[:] = rollout.actions.numpy().reshape(buffer.actions.shape)
    buffer.rewards[:] = rollout.rewards.numpy()
    buffer.episode_starts[:] = starts
    buffer.values[:] = values.double().numpy().reshape(steps, envs)
    buffer.log_probs[:] = log_prob.double().numpy().reshape(steps, envs)
    buffer.pos, buffer.full = steps, True
    buffer.compute_returns_and_advantage(last_values=last_values, dones=rollout.episode_end[-1].numpy())
    advantages = buffer.advantages.copy()  # [T, N]: train() flattens the buffer's arrays env by env
    model._current_progress_remaining = 1.0
    model.train()
    return advantages


def outputs(loop: OnPolicyLoop | None, model: Any | None, obs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The actor's log-probabilities of both actions and the critic's values on `obs`."""
    with torch.no_grad():
        if loop is not None:
            logits, values = loop.algo.net(obs)
            return {"log_probs": torch.log_softmax(logits, -1), "values": values}
        dtype = next(model.policy.parameters()).dtype
        obs = obs.to(dtype)
        distribution = model.policy.get_distribution(obs).distribution
        return {
            "log_probs": torch.log_softmax(distribution.logits, -1),
            "values": model.policy.predict_values(obs)[:, 0],
        }


def compare(seed: int) -> list[dict[str, Any]]:
    loop = ours_loop(seed)
    sb3_32, sb3_64 = sb3_model(seed), sb3_model(seed)
    sb3_64.policy.load_state_dict(sb3_32.policy.state_dict())
    copy_into_ours(sb3_32, loop)
    rows: list[dict[str, Any]] = []
    starts = np.ones(loop.cfg.num_envs, np.float32)  # the first observations start episodes
    seen: list[torch.Tensor] = []
    with sb3_in_float64(sb3_64):
        for index in range(1, ROLLOUTS[ALGO][-1] + 1):
            rollout = loop.collect()
            if not torch.equal(rollout.terminated, rollout.episode_end):
                raise SystemExit("a CartPole episode was truncated: SB3 would bootstrap it in its rewards; use a seed "
                                 "without one")  # fmt: skip
            episode_starts = np.concatenate([starts[None], rollout.episode_end[:-1].numpy().astype(np.float32)])
            starts = rollout.episode_end[-1].numpy().astype(np.float32)
            ours_advantages = rollout_advantages(rollout, "gae", loop.cfg)[0]
            last_obs = np.asarray(loop.obs)
            theirs = sb3_train(sb3_32, rollout, episode_starts, last_obs)
            exact = sb3_train(sb3_64, rollout, episode_starts, last_obs)
            loop.algo.update(rollout, progress=0.0)
            seen.append(rollout.obs.reshape(-1, rollout.obs.shape[-1]))
            if index not in ROLLOUTS[ALGO]:
                continue
            probe = torch.cat(seen)
            ours, sb3, f64 = outputs(loop, None, probe), outputs(None, sb3_32, probe), outputs(None, sb3_64, probe)
            row: dict[str, Any] = {"rollouts": index, "gradient_steps": index * getattr(loop.cfg, "epochs", 1)}
            row["advantages"] = {
                "ours_vs_sb3": relative_gap(ours_advantages, torch.from_numpy(theirs)),
                "ours_vs_float64": relative_gap(ours_advantages, torch.from_numpy(exact)),
                "sb3_vs_float64": relative_gap(torch.from_numpy(theirs), torch.from_numpy(exact)),
            }
            for what in ("log_probs", "values"):
                row[what] = {
                    "ours_vs_sb3": relative_gap(ours[what], sb3[what]),
                    "ours_vs_float64": relative_gap(ours[what], f64[what]),
                    "sb3_vs_float64": relative_gap(sb3[what], f64[what]),
                }
            rows.append(row)
    loop.close()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    name = ALGO.upper()
    print(f"policylab's {name} against SB3's {name}.train() on the same rollouts: max |d| / mean |value|")
    headers = ["rollouts", "gradient steps", "output", "ours vs SB3", "ours vs float64", "SB3 vs float64"]
    table = [
        [str(r["rollouts"]), str(r["gradient_steps"]), what]
        + [f"{r[what][k]:.1e}" for k in ("ours_vs_sb3", "ours_vs_float64", "sb3_vs_float64")]
        for r in rows
        for what in ("advantages", "log_probs", "values")
    ]
    print_table(headers, table)


def main() -> None:
    global ALGO
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--algo", choices=tuple(SB3), default="ppo", help="the algorithm on both sides")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 1..N (initial networks, env)")
    args = parser.parse_args()
    ALGO = args.algo
    torch.set_num_threads(1)
    per_seed = []
    for seed in range(1, args.seeds + 1):
        print(f"\n== seed {seed}")
        rows = compare(seed)
        print_rows(rows)
        per_seed.append({"seed": seed, "rows": rows})
    payload = {**provenance(["policylab", "torch", "stable-baselines3", "gymnasium"]), "case": f"{ALGO}-cartpole"}
    payload["seeds"] = per_seed
    print(f"\nresults: {write_results(f'{ALGO}_equivalence', payload)}")


if __name__ == "__main__":
    main()
