"""Algorithms: one small file each. The registry maps names to (config, class)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policylab.algos.a2c import A2C, A2CConfig
from policylab.algos.dqn import DQN, DQNConfig
from policylab.algos.ppo import PPO, PPOConfig
from policylab.algos.reinforce import Reinforce, ReinforceConfig
from policylab.algos.sac import SAC, SACConfig
from policylab.algos.sac_discrete import DiscreteSAC, DiscreteSACConfig
from policylab.algos.td3 import TD3, DDPGConfig, TD3Config
from policylab.algos.tqc import TQC, TQCConfig
from policylab.errors import ConfigError, suggest


@dataclass(frozen=True)
class AlgoSpec:
    name: str
    config_cls: Any
    algo_cls: Any
    """A class with build_policy(cfg, obs_space, act_space), update(rollout, progress), net, optimizer, generator."""
    kind: str
    """on-policy: the loop collects rollouts with the current policy and hands them to update(rollout, progress).
    off-policy: the loop steps the envs into a replay buffer and calls update(batch, index) on sampled batches
    (the interface is described in algos/offpolicy.py)."""
    regimes: tuple[str, ...]
    summary: str


ALGORITHMS: dict[str, AlgoSpec] = {
    spec.name: spec
    for spec in (
        AlgoSpec("ppo", PPOConfig, PPO, "on-policy", ("online",), "PPO-clip: epochs of minibatch updates per rollout"),
        AlgoSpec("a2c", A2CConfig, A2C, "on-policy", ("online",), "A2C: one gradient step per short rollout"),
        AlgoSpec(
            "reinforce", ReinforceConfig, Reinforce, "on-policy", ("online",), "REINFORCE with a learned baseline"
        ),
        AlgoSpec("dqn", DQNConfig, DQN, "off-policy", ("online",), "DQN: double, dueling, n-step, prioritized"),
        AlgoSpec("ddpg", DDPGConfig, TD3, "off-policy", ("online",), "DDPG: deterministic actor, one critic"),
        AlgoSpec("td3", TD3Config, TD3, "off-policy", ("online",), "TD3: twin critics, smoothing, delayed actor"),
        AlgoSpec("sac", SACConfig, SAC, "off-policy", ("online",), "SAC: max-entropy actor-critic, auto temperature"),
        AlgoSpec("sac_discrete", DiscreteSACConfig, DiscreteSAC, "off-policy", ("online",), "SAC for discrete actions"),
        AlgoSpec("tqc", TQCConfig, TQC, "off-policy", ("online",), "TQC: SAC with truncated quantile critics"),
    )
}


def get_algo(name: str) -> AlgoSpec:
    key = name.lower()
    if key not in ALGORITHMS:
        raise ConfigError(
            f"unknown algorithm {name!r}.{suggest(key, ALGORITHMS)}",
            f"choose one of: {', '.join(ALGORITHMS)} (`policylab list` shows them with their presets)",
        )
    return ALGORITHMS[key]


__all__ = [
    "ALGORITHMS",
    "AlgoSpec",
    "get_algo",
    "A2C",
    "A2CConfig",
    "PPO",
    "PPOConfig",
    "Reinforce",
    "ReinforceConfig",
    "SAC",
    "SACConfig",
]
