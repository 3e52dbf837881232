"""MDPO, Mirror Descent Policy Optimization (Tomar et al. 2020, arXiv:2005.09814), on- and off-policy.

On-policy ("mdpo"), for iteration k = 0..K-1 of a run of K rollouts:
    collect n_steps x num_envs transitions with pi_k               (the loop)
    A, R = GAE(lambda)(rewards, V)
    t_k = 1 - k / K                                                (the paper's annealed step size)
    m = epochs gradient steps (on the whole rollout by default) on
        L = -r A + (1 / t_k) KL(pi_theta || pi_k) + vf_coef (V(s) - R)^2,   r = pi_theta(a|s) / pi_k(a|s)
        KL estimated on the rollout's samples of pi_k: r log r - r + 1     (objectives.pg_surrogate, kl="reverse")
    no clipping: the KL term is the trust region. PPO's loop runs the steps (algos/ppo.py), so minibatches,
    the fused gradient path and demonstrations work as in PPO.

Off-policy ("mdpo_sac"): SAC (algos/sac.py) whose actor loss gains (1 / t) KL(pi_theta || pi_theta_k) to a copy
of the actor refreshed every `kl_refresh` gradient steps (the paper's off-policy MDPO: t constant, 1000 steps
per mirror-descent iteration; the KL in closed form between the pre-tanh Gaussians, which equals the squashed
policies'). It is SAC's update with one more term, so it is a SAC config (`kl_coef`, `kl_refresh`), not a copy of
SAC: the same class runs both, and SAC's own settings (temperature, critics, replay) all apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.onpolicy import ActorCriticLoss, whole_rollouts
from policylab.algos.ppo import PPO, PPOConfig, delegated
from policylab.algos.sac import SACConfig
from policylab.config import positive
from policylab.data import Batch


@dataclass
class MDPOConfig(PPOConfig):
    """On-policy MDPO. Defaults follow the paper's MuJoCo runs: 2048 steps per rollout, m = 10 full-batch steps."""

    batch_size: int = 2048
    """Rows per gradient step (the whole rollout by default: m = epochs steps per rollout, as in the paper)."""
    epochs: int = 10
    """m: gradient steps per rollout (passes over it with batch_size smaller than the rollout)."""
    t_min: float = 0.01
    """Lower bound of the step size t_k = 1 - k/K (the last rollout of a run may overshoot the budget)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "t_min")


def mdpo_step_size(progress: float, rollout: int, steps: int, t_min: float) -> float:
    """t_k = 1 - k / K with k the index of the rollout just collected (progress = (k + 1) / K), at least t_min."""
    return max(t_min, 1.0 - (progress - rollout / max(steps, 1)))


class MDPO:
    name = "mdpo"
    config_cls = MDPOConfig
    build_policy = staticmethod(PPO.build_policy)
    imitation = delegated("imitation")

    def __init__(self, cfg: MDPOConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.ppo = PPO(cfg, obs_space, act_space)
        self.net, self.learner = self.ppo.net, self.ppo.learner
        self.optimizer, self.generator = self.ppo.optimizer, self.ppo.generator

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        cfg = self.cfg
        t_k = mdpo_step_size(progress, cfg.n_steps * cfg.num_envs, whole_rollouts(cfg), cfg.t_min)
        loss = ActorCriticLoss(
            clip_low=None, clip_value=cfg.clip_value, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef, kl_coef=1.0 / t_k
        )
        metrics = self.ppo.update(rollout, progress, loss)
        metrics["t_k"] = torch.tensor(t_k)
        return metrics


@dataclass
class MDPOSACConfig(SACConfig):
    """Off-policy MDPO: SAC plus the mirror-descent KL term. Defaults follow the paper (1 / t = 1, the actor copy
    refreshed every 1000 gradient steps) and SB3's SAC for the rest."""

    kl_coef: float = 1.0
    kl_refresh: int = 1000
