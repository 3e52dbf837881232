"""Algorithms: one small file each. The registry maps names to (config, class)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from policylab.algos.a2c import A2C, A2CConfig
from policylab.algos.ars import ARS, ARSConfig
from policylab.algos.awac import AWAC, AWACConfig
from policylab.algos.bc import BC, BCConfig
from policylab.algos.bcq import BCQ, PLAS, BCQConfig, DiscreteBCQ, DiscreteBCQConfig, PLASConfig
from policylab.algos.bear import BEAR, BEARConfig
from policylab.algos.c51 import C51, C51Config
from policylab.algos.cal_ql import CalQL, CalQLConfig
from policylab.algos.cql import CQL, CQLConfig, DiscreteCQL, DiscreteCQLConfig
from policylab.algos.crossq import CrossQ, CrossQConfig
from policylab.algos.crr import CRR, CRRConfig
from policylab.algos.diffusion_ql import ConsistencyACConfig, DiffusionQL, DiffusionQLConfig, EDPConfig
from policylab.algos.dppo import DPPO, DPPOConfig
from policylab.algos.dqn import DQN, DQNConfig
from policylab.algos.dt import DT, DTConfig
from policylab.algos.edac import SACN, EDACConfig, SACNConfig
from policylab.algos.fixpo import FixPO, FixPOConfig
from policylab.algos.fpo import FPO, FPOConfig
from policylab.algos.idql import IDQL, IDQLConfig
from policylab.algos.iql import IQL, IQLConfig
from policylab.algos.mdpo import MDPO, MDPOConfig, MDPOSACConfig
from policylab.algos.pa_rl import PARL, PARLConfig
from policylab.algos.ppo import PPO, PPOConfig
from policylab.algos.pqn import PQN, PQNConfig
from policylab.algos.prdc import PRDC, PRDCConfig
from policylab.algos.qrdqn import QRDQN, QRDQNConfig
from policylab.algos.rebrac import ReBRAC, ReBRACConfig
from policylab.algos.reinforce import Reinforce, ReinforceConfig
from policylab.algos.rnd import PPORND, RNDConfig
from policylab.algos.rpo import RPOConfig
from policylab.algos.sac import SAC, SACConfig
from policylab.algos.sac_discrete import DiscreteSAC, DiscreteSACConfig
from policylab.algos.spo import SPOConfig
from policylab.algos.spot import SPOT, SPOTConfig
from policylab.algos.td3 import TD3, DDPGConfig, TD3BCConfig, TD3Config
from policylab.algos.tqc import TQC, TQCConfig
from policylab.algos.trpo import TRPO, TRPOConfig
from policylab.errors import ConfigError, PolicylabError, suggest
from policylab.nets.cnn import VectorObservationsOnly


@dataclass(frozen=True)
class AlgoSpec:
    name: str
    config_cls: Any
    algo_cls: Any
    """A class with build_policy(cfg, obs_space, act_space), update(rollout, progress), net, optimizer, generator."""
    kind: str
    """on-policy: the loop collects rollouts with the current policy and hands them to update(rollout, progress).
    off-policy: the loop steps the envs into a replay buffer and calls update(batch, index) on sampled batches
    (the interface is described in algos/offpolicy.py); with a dataset, the batches come from it, or from both
    (data/sources.py). The offline algorithms are off-policy algorithms whose defaults expect a dataset.
    population: random search; the loop runs whole episodes of the candidates(), then calls update(scores)."""
    regimes: tuple[str, ...]
    summary: str

    def build(self, cfg: Any, obs_space: gym.Space, act_space: gym.Space) -> Any:
        """The algorithm for an env's spaces; image observations given to one whose networks read vectors only
        are an error naming it and the algorithms that take images."""
        try:
            return self.algo_cls(cfg, obs_space, act_space)
        except VectorObservationsOnly:
            raise ConfigError(
                f"{self.name} does not take image observations yet: its networks read vectors",
                f"use one of {', '.join(image_algorithms())} on images",
            ) from None


ON_POLICY = ("online", "hybrid")
"""Rollouts stay on-policy; a dataset adds an imitation term to the loss (objectives/imitation.py)."""
OFF_POLICY = ("online", "offline", "hybrid", "offline-to-online")
OFFLINE = ("offline", "offline-to-online", "hybrid")

ALGORITHMS: dict[str, AlgoSpec] = {
    spec.name: spec
    for spec in (
        AlgoSpec("ppo", PPOConfig, PPO, "on-policy", ON_POLICY, "PPO-clip: epochs of minibatch updates per rollout"),
        AlgoSpec("a2c", A2CConfig, A2C, "on-policy", ON_POLICY, "A2C: one gradient step per short rollout"),
        AlgoSpec("reinforce", ReinforceConfig, Reinforce, "on-policy", ON_POLICY, "REINFORCE with a learned baseline"),
        AlgoSpec("trpo", TRPOConfig, TRPO, "on-policy", ("online",), "TRPO: natural gradient, KL line search"),
        AlgoSpec("mdpo", MDPOConfig, MDPO, "on-policy", ON_POLICY, "MDPO: KL-regularized mirror descent steps"),
        AlgoSpec("spo", SPOConfig, PPO, "on-policy", ON_POLICY, "SPO: PPO with a ratio penalty, no clip"),
        AlgoSpec("rpo", RPOConfig, PPO, "on-policy", ON_POLICY, "RPO: PPO, the mean moved by uniform noise"),
        AlgoSpec("fixpo", FixPOConfig, FixPO, "on-policy", ON_POLICY, "FixPO: learned KL penalty + fixup phase"),
        AlgoSpec("dppo", DPPOConfig, DPPO, "on-policy", ("online",), "DPPO: PPO over a diffusion policy's chain"),
        AlgoSpec("fpo", FPOConfig, FPO, "on-policy", ("online",), "FPO: PPO-clip on flow-matching loss ratios"),
        AlgoSpec("ppo_rnd", RNDConfig, PPORND, "on-policy", ("online",), "PPO + RND: a random-network novelty bonus"),
        AlgoSpec("pqn", PQNConfig, PQN, "on-policy", ("online",), "PQN: Q(lambda) from parallel envs, LayerNorm"),
        AlgoSpec("ars", ARSConfig, ARS, "population", ("online",), "ARS: random search over policy parameters"),
        AlgoSpec("dqn", DQNConfig, DQN, "off-policy", OFF_POLICY, "DQN: double, dueling, n-step, prioritized"),
        AlgoSpec("qrdqn", QRDQNConfig, QRDQN, "off-policy", OFF_POLICY, "QR-DQN: quantiles of the return per action"),
        AlgoSpec("c51", C51Config, C51, "off-policy", OFF_POLICY, "C51: a categorical return distribution per action"),
        AlgoSpec("ddpg", DDPGConfig, TD3, "off-policy", OFF_POLICY, "DDPG: deterministic actor, one critic"),
        AlgoSpec("td3", TD3Config, TD3, "off-policy", OFF_POLICY, "TD3: twin critics, smoothing, delayed actor"),
        AlgoSpec("sac", SACConfig, SAC, "off-policy", OFF_POLICY, "SAC: max-entropy actor-critic, auto temperature"),
        AlgoSpec("mdpo_sac", MDPOSACConfig, SAC, "off-policy", OFF_POLICY, "off-policy MDPO: SAC + KL to pi_k"),
        AlgoSpec("sac_discrete", DiscreteSACConfig, DiscreteSAC, "off-policy", OFF_POLICY, "SAC for discrete actions"),
        AlgoSpec("tqc", TQCConfig, TQC, "off-policy", OFF_POLICY, "TQC: SAC with truncated quantile critics"),
        AlgoSpec("crossq", CrossQConfig, CrossQ, "off-policy", OFF_POLICY, "CrossQ: SAC, batch renorm, no targets"),
        AlgoSpec("bc", BCConfig, BC, "off-policy", OFFLINE, "behaviour cloning (deterministic, Gaussian, discrete)"),
        AlgoSpec("td3_bc", TD3BCConfig, TD3, "off-policy", OFFLINE, "TD3+BC: TD3 with a behaviour-cloning term"),
        AlgoSpec("iql", IQLConfig, IQL, "off-policy", OFFLINE, "IQL: expectile values, advantage-weighted actor"),
        AlgoSpec("awac", AWACConfig, AWAC, "off-policy", OFFLINE, "AWAC: advantage-weighted actor, TD critics"),
        AlgoSpec("crr", CRRConfig, CRR, "off-policy", OFFLINE, "CRR: BC weighted by the critic's advantage"),
        AlgoSpec("cql", CQLConfig, CQL, "off-policy", OFFLINE, "CQL(H) on SAC: conservative critics"),
        AlgoSpec("cql_discrete", DiscreteCQLConfig, DiscreteCQL, "off-policy", OFFLINE, "CQL on DQN, discrete actions"),
        AlgoSpec("rebrac", ReBRACConfig, ReBRAC, "off-policy", OFFLINE, "ReBRAC: TD3+BC, BC in the target, LayerNorm"),
        AlgoSpec("sac_n", SACNConfig, SACN, "off-policy", OFFLINE, "SAC-N: SAC with a min over N critics"),
        AlgoSpec("edac", EDACConfig, SACN, "off-policy", OFFLINE, "EDAC: SAC-N with diverse critic gradients"),
        AlgoSpec("cal_ql", CalQLConfig, CalQL, "off-policy", OFFLINE, "Cal-QL: CQL bounded below by MC returns"),
        AlgoSpec("bcq", BCQConfig, BCQ, "off-policy", OFFLINE, "BCQ: perturbed VAE draws, the best by Q"),
        AlgoSpec("bcq_discrete", DiscreteBCQConfig, DiscreteBCQ, "off-policy", OFFLINE, "BCQ for discrete actions"),
        AlgoSpec("bear", BEARConfig, BEAR, "off-policy", OFFLINE, "BEAR: SAC held near the data by an MMD bound"),
        AlgoSpec("plas", PLASConfig, PLAS, "off-policy", OFFLINE, "PLAS: a policy in the VAE's latent space"),
        AlgoSpec("spot", SPOTConfig, SPOT, "off-policy", OFFLINE, "SPOT: TD3 with a VAE density penalty"),
        AlgoSpec("prdc", PRDCConfig, PRDC, "off-policy", OFFLINE, "PRDC: TD3+BC towards nearest dataset actions"),
        AlgoSpec("pa_rl", PARLConfig, PARL, "off-policy", OFFLINE, "PA-RL: any head, distils critic-optimized actions"),
        AlgoSpec("idql", IDQLConfig, IDQL, "off-policy", OFFLINE, "IDQL: IQL critic, diffusion BC, critic resampling"),
        AlgoSpec("diffusion_ql", DiffusionQLConfig, DiffusionQL, "off-policy", OFFLINE, "Diffusion-QL: BC + Q"),
        AlgoSpec("edp", EDPConfig, DiffusionQL, "off-policy", OFFLINE, "EDP: Diffusion-QL, one-step action estimate"),
        AlgoSpec("consistency_ac", ConsistencyACConfig, DiffusionQL, "off-policy", OFFLINE, "consistency actor-critic"),
        AlgoSpec("dt", DTConfig, DT, "off-policy", ("offline",), "Decision Transformer: return-conditioned sequences"),
    )
}


@functools.cache
def image_algorithms() -> tuple[str, ...]:
    """The algorithms whose networks take image observations (uint8 frames through a CNN encoder): found by
    building each on a small image space, with Discrete or Box actions, rather than written down."""
    frames = gym.spaces.Box(0, 255, (40, 40, 3), np.uint8)
    actions = (gym.spaces.Discrete(2), gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
    found = []
    for spec in ALGORITHMS.values():
        offline = "online" not in spec.regimes
        cfg = spec.config_cls(dataset="dataset") if offline else spec.config_cls()  # the configs need one
        for act in actions:
            try:
                spec.algo_cls(cfg, frames, act)
            except VectorObservationsOnly:
                break
            except PolicylabError:  # an action space it does not take: the other one
                continue
            found.append(spec.name)
            break
    return tuple(found)


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
    "image_algorithms",
    "A2C",
    "A2CConfig",
    "AWAC",
    "AWACConfig",
    "BC",
    "BCConfig",
    "BEAR",
    "BEARConfig",
    "C51",
    "C51Config",
    "BCQ",
    "BCQConfig",
    "DiscreteBCQ",
    "DiscreteBCQConfig",
    "PLAS",
    "PLASConfig",
    "CQL",
    "CQLConfig",
    "CRR",
    "CRRConfig",
    "DiscreteCQL",
    "DiscreteCQLConfig",
    "IQL",
    "IQLConfig",
    "PPO",
    "PPOConfig",
    "PQN",
    "PQNConfig",
    "PPORND",
    "RNDConfig",
    "Reinforce",
    "ReinforceConfig",
    "SAC",
    "SACConfig",
    "ReBRAC",
    "ReBRACConfig",
    "SACN",
    "SACNConfig",
    "EDACConfig",
    "CalQL",
    "CalQLConfig",
    "SPOT",
    "SPOTConfig",
    "PRDC",
    "PRDCConfig",
    "PARL",
    "PARLConfig",
]
