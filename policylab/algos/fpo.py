"""FPO: flow policy optimization (McAllister et al. 2025, arXiv:2507.21053). PPO-clip for a flow-matching policy,
whose likelihood has no closed form: the ratio is exp(L_old - L_new), L the conditional flow-matching loss of the
taken action at the same (noise, time) draws, so no log-prob is ever computed and any sampler can act.

for each iteration:
    collect n_steps x num_envs steps with K Euler steps of the flow from x_0 ~ N(0, I); store the actions a
    A, R = GAE(lambda)(rewards, V)
    draw M pairs (eps_i, t_i) per stored action, once;  l_old,i = |v_old(x_t_i, t_i; s) - (a - eps_i)|^2,
        x_t_i = (1 - t_i) eps_i + t_i a                                        (FlowHead.per_sample_loss)
    for epoch in 1..epochs, for each minibatch:
        ratio = exp(mean_i (l_old,i - l_new,i))               ("mean": FPO's estimate of pi / pi_old)
             or exp(l_old,i - l_new,i) per draw                ("per_draw": FPO++'s per-sample ratios, each clipped)
        L = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + vf_coef (V(s) - R)^2      (objectives.pg_surrogate)

The surrogate takes log-probs, so it is handed -l_new and -l_old: exp(-l_new - (-l_old)) is FPO's ratio.
Defaults: M = 8 draws, 10 Euler steps, clip 0.05, lr 3e-4 (ours for small control tasks; the paper tunes them
per suite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
from policylab.nets.flow import FlowHead
from policylab.nets.generative_ac import GenerativeActorCritic
from policylab.objectives import pg_surrogate

RATIOS = ("mean", "per_draw")


@dataclass
class FPOConfig(GenerativePGConfig):
    """FPO; see the module docstring."""

    kind: ClassVar[str] = "flow"
    lr: float = 3e-4
    clip_eps: float = 0.05
    mc_draws: int = 8
    """M, the (noise, time) draws per action that estimate the flow-matching loss."""
    ratio: str = "mean"
    """mean (FPO: one ratio per action from the mean loss difference) or per_draw (FPO++: one per draw)."""

    def validate(self) -> None:
        super().validate()
        if self.mc_draws < 1:
            raise ConfigError(f"mc_draws={self.mc_draws} must be >= 1", "set mc_draws to e.g. 8")
        if self.ratio not in RATIOS:
            raise ConfigError(f"ratio={self.ratio!r} is not one of {', '.join(RATIOS)}", "set ratio=mean")


def fpo_log_ratio_inputs(head: FlowHead, obs: Tensor, actions: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """-l_i [B, M]: minus the flow-matching loss of each action at its M draws (noise [B, M, D], t [B, M])."""
    b, m, d = noise.shape
    losses = head.per_sample_loss(
        obs.repeat_interleave(m, 0), actions.repeat_interleave(m, 0), noise.reshape(b * m, d), t.reshape(b * m)
    )
    return -losses.view(b, m)


class FPO(GenerativePGAlgo):
    name = "fpo"
    config_cls = FPOConfig
    cfg: FPOConfig

    @staticmethod
    def build_policy(cfg: FPOConfig, obs_space: gym.Space, act_space: gym.Space) -> GenerativeActorCritic:
        return build_generative_actor_critic(cfg, obs_space, act_space, "flow", "fpo")

    @property
    def flow(self) -> FlowHead:
        head = self.net.generative
        assert isinstance(head, FlowHead)
        return head

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        advantages, returns = self.learner.advantages(rollout)
        data = flat_rollout(rollout, advantages, returns)
        n, m = len(data), self.cfg.mc_draws
        obs = data.obs.reshape(n, -1)
        data.noise = torch.randn((n, m, self.net.head.dim), generator=self.generator, device=obs.device)
        data.t = self.flow.sample_time(n * m, self.generator, obs.device).view(n, m)
        with torch.no_grad():  # the weights that collected the rollout: the old policy's losses
            data.logp = fpo_log_ratio_inputs(self.flow, obs, data.actions, data.noise, data.t)
        return self.learner.update(data, self.policy_loss, progress)

    def policy_loss(self, mb: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        neg_loss = fpo_log_ratio_inputs(self.flow, mb.obs.reshape(len(mb), -1), mb.actions, mb.noise, mb.t)
        if self.cfg.ratio == "mean":
            return pg_surrogate(neg_loss.mean(-1), mb.logp.mean(-1), mb.advantages, clip_low=self.cfg.clip_eps)
        advantages = mb.advantages.unsqueeze(-1).expand_as(neg_loss)
        return pg_surrogate(neg_loss, mb.logp, advantages, clip_low=self.cfg.clip_eps)
