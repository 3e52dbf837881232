"""DPPO: diffusion policy policy optimization (Ren et al. 2024, arXiv:2409.00588). PPO over the denoising chain:
each of the K DDIM/DDPM steps of a diffusion policy is a Gaussian pi(x_{k+1} | x_k, s), so the env step's
decision is K Gaussian decisions, each with an exact log-prob (nets/diffusion.py), and the one clipped surrogate
applies to every (env step, denoising step) pair. Made for fine-tuning a behaviour-cloned diffusion policy
(`pretrained`: a run of `policylab train bc --set head=diffusion`).

for each iteration:
    collect n_steps x num_envs steps; each stores its chain x_0 .. x_K (x_0 ~ N(0, I), x_{k+1} ~ N(mu_k, std_k^2),
        std_k = max(sigma_k, min_std)), the K log-probs, V(s); the env gets clip(x_K, -1, 1) scaled to the bounds
    A, R = GAE(lambda)(rewards, V)
    for epoch in 1..epochs, for each minibatch:
        r_k  = pi_k(x_{k+1} | x_k, s) / pi_k,old(...)                    (chain_log_prob under the current weights)
        A_k  = gamma_denoising^(K - 1 - k) A                       (denoising steps far from the action count less)
        eps_k = base + (clip_eps - base) (e^(rate k / (K - 1)) - 1) / (e^rate - 1)   (the tight clip of early steps)
        L = mean_{rows, k} -min(r_k A_k, clip(r_k, 1 - eps_k, 1 + eps_k) A_k)  + vf_coef (V(s) - R)^2
        Adam step                                                          (algos/generative_pg.py)

Defaults follow DPPO's Gym fine-tuning configs where they fit a CPU: 20 training steps, DDIM with 5 steps and
eta = 1 (the chain's noise), min std 0.1, clip 0.01 at the last step and 0.001 at the first (rate 3), denoising
discount 0.99, actor lr 1e-4, critic lr 1e-3, gamma 0.99, lambda 0.95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import torch
from torch import Tensor

from policylab.algos.generative_pg import (
    GenerativePGAlgo,
    GenerativePGConfig,
    build_generative_actor_critic,
    flat_rollout,
)
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.generative_ac import GenerativeActorCritic
from policylab.objectives import pg_surrogate


@dataclass
class DPPOConfig(GenerativePGConfig):
    """DPPO; see the module docstring for where the defaults come from."""

    sample_steps: int | None = 5
    ddim_eta: float = 1.0
    """DDIM's eta of the fine-tuned chain (1: DDPM-like noise in every step)."""
    min_std: float = 0.1
    """The floor on each denoising step's std, in sampling and in log-probs (DPPO's min denoising std)."""
    clip_eps: float = 0.01
    """The ratio clip of the last denoising step (DPPO's clip_ploss_coef)."""
    clip_eps_base: float = 0.001
    """The ratio clip of the first denoising step; in between it grows exponentially at `clip_eps_rate`."""
    clip_eps_rate: float = 3.0
    gamma_denoising: float = 0.99

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.min_std or not 0.0 < self.gamma_denoising <= 1.0 or self.clip_eps_base <= 0.0:
            raise ConfigError(
                f"min_std={self.min_std}, gamma_denoising={self.gamma_denoising}, "
                f"clip_eps_base={self.clip_eps_base}: each must be > 0 (gamma_denoising <= 1)",
                "set them to e.g. 0.1, 0.99, 0.001",
            )
        if not abs(self.clip_eps_rate) <= MAX_CLIP_RATE:
            raise ConfigError(
                f"clip_eps_rate={self.clip_eps_rate} is outside [-{MAX_CLIP_RATE:g}, {MAX_CLIP_RATE:g}]: the clips "
                "grow as exp(rate x k / (K - 1)) from clip_eps_base to clip_eps",
                "set clip_eps_rate to e.g. 3 (DPPO's), or 0 for a linear ramp",
            )


MAX_CLIP_RATE = 100.0
"""The steepest clip ramp taken (exp(100) is already a step at the last denoising step; exp(710) overflows)."""


def denoising_clips(steps: int, base: float, last: float, rate: float) -> Tensor:
    """eps_k for k = 0 .. K-1: `base` at the first (noisiest) step, `last` at the last, exponential in between."""
    if steps == 1:
        return torch.tensor([last])
    k = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    if rate == 0.0:  # the limit of the exponential ramp: a straight line
        return (base + (last - base) * k).float()
    return (base + (last - base) * torch.expm1(rate * k) / math.expm1(rate)).float()


def denoising_discounts(steps: int, gamma: float) -> Tensor:
    """gamma^(K - 1 - k) for k = 0 .. K-1: 1 at the step that produces the action."""
    return gamma ** torch.arange(steps - 1, -1, -1, dtype=torch.float32)


class DPPO(GenerativePGAlgo):
    name = "dppo"
    config_cls = DPPOConfig
    cfg: DPPOConfig

    def __init__(self, cfg: DPPOConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        steps = self.net.head.chain_steps
        assert steps is not None
        self.clips = denoising_clips(steps, cfg.clip_eps_base, cfg.clip_eps, cfg.clip_eps_rate).to(cfg.device)
        self.discounts = denoising_discounts(steps, cfg.gamma_denoising).to(cfg.device)

    @staticmethod
    def build_policy(cfg: DPPOConfig, obs_space: gym.Space, act_space: gym.Space) -> GenerativeActorCritic:
        return build_generative_actor_critic(cfg, obs_space, act_space, "diffusion", "dppo", cfg.min_std)

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        advantages, returns = self.learner.advantages(rollout)
        return self.learner.update(flat_rollout(rollout, advantages, returns), self.policy_loss, progress)

    def policy_loss(self, mb: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate over every (row, denoising step) pair of a minibatch."""
        logp = self.net.chain_log_prob(mb.obs, mb.actions)  # [B, K]
        advantages = mb.advantages.unsqueeze(-1) * self.discounts
        return pg_surrogate(logp, mb.logp, advantages, clip_low=self.clips)  # type: ignore[arg-type]
