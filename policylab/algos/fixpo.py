"""FixPO (Zentner et al. 2023, "Guaranteed Trust Region Optimization via Two-Phase KL Penalization",
arXiv:2312.05405): PPO's epochs with a learned KL penalty, then a fixup phase that enforces the trust region.

for each iteration:
    collect n_steps x num_envs transitions with pi_old           (the loop)
    A, R = GAE(lambda)(rewards, V)
    primary phase, for epoch in 1..epochs, for each minibatch:
        L = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL(pi_old || pi)   (objectives.pg_surrogate, kl="forward")
            + vf_coef (V(s) - R)^2 - ent_coef H[pi(.|s)]
        KL estimated on the samples of pi_old: r - 1 - log r
        Adam step on L;  then the Lagrange multiplier:
        Adam step on beta (eps_kl - C_beta KL) (KL detached),  beta <- max(beta, beta_min)
    fixup phase: while KL(pi_old || pi) over the whole rollout > eps_kl (at most fixup_max_steps times):
        Adam step on beta KL(pi_old || pi) alone (and the beta step above)
    report fixup_steps, the KL before and after

With C_beta > 1 the multiplier grows until the primary phase keeps the KL below eps_kl / C_beta, so the fixup
phase rarely takes more than a few steps. The primary phase is PPO's loop (algos/ppo.py) with an `after_step` hook;
the fixup step is the same gradient step (fused where possible) with zero advantages and no value term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.onpolicy import ActorCriticLoss, adam, with_logit_bias
from policylab.algos.ppo import PPO, PPOConfig, delegated
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.policy import kl_estimate


@dataclass
class FixPOConfig(PPOConfig):
    """FixPO. PPO's defaults (Stable-Baselines3's) plus the paper's KL settings (eps_kl 0.2, C_beta 2,
    beta_0 1, beta's learning rate 0.01, as in the authors' implementation)."""

    eps_kl: float = 0.2
    """The trust region: the fixup phase ends once the mean KL(pi_old || pi) over the rollout is at most this."""
    kl_target_coef: float = 2.0
    """C_beta > 1: the primary phase's beta targets a KL of eps_kl / C_beta, a margin below the bound."""
    beta_init: float = 1.0
    """The initial KL multiplier beta."""
    beta_lr: float = 0.01
    """Adam learning rate of beta."""
    beta_min: float = 0.01
    """The floor of beta (the penalty never vanishes completely)."""
    fixup_max_steps: int = 100
    """The most fixup gradient steps per rollout (the metric fixup_steps counts those taken)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "eps_kl", "beta_init", "beta_lr", "fixup_max_steps")
        if self.kl_target_coef < 1.0:
            raise ConfigError(f"kl_target_coef={self.kl_target_coef} must be >= 1", "set kl_target_coef to e.g. 2")
        if self.recurrent:
            raise ConfigError("fixpo does not support recurrent=true", "drop recurrent, or use ppo for LSTM policies")
        if not 0.0 <= self.beta_min <= self.beta_init:
            raise ConfigError(
                f"beta_min={self.beta_min} must be in [0, beta_init={self.beta_init}]", "set beta_min to e.g. 0.01"
            )


class KLMultiplier(nn.Module):
    """FixPO's Lagrange multiplier beta >= beta_min, learned by Adam on beta (eps_kl - C_beta KL)."""

    def __init__(self, cfg: FixPOConfig) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(cfg.beta_init)))
        self.beta.grad = torch.zeros(())
        self.optimizer = adam([self.beta], cfg.beta_lr)
        self.cfg = cfg

    def step(self, kl: Tensor) -> None:
        """One Adam step on beta (eps_kl - C_beta kl) (d/d beta: eps_kl - C_beta kl), no host sync."""
        with torch.no_grad():
            self.beta.grad.copy_(self.cfg.eps_kl - self.cfg.kl_target_coef * kl)  # type: ignore[union-attr]
            self.optimizer.step()
            self.beta.clamp_(min=self.cfg.beta_min)


class FixPO:
    name = "fixpo"
    config_cls = FixPOConfig
    build_policy = staticmethod(PPO.build_policy)
    imitation = delegated("imitation")

    def __init__(self, cfg: FixPOConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.ppo = PPO(cfg, obs_space, act_space)
        self.net, self.learner = self.ppo.net, self.ppo.learner
        self.optimizer, self.generator = self.ppo.optimizer, self.ppo.generator
        self.multiplier = KLMultiplier(cfg).to(cfg.device)
        self.modules = {"kl_multiplier": self.multiplier}
        """Checkpointed beside the network: beta (its Adam state as an optimizer below)."""
        self.optimizers = {"kl_multiplier": self.multiplier.optimizer}

    def update(self, rollout: Batch, progress: float) -> dict[str, Tensor]:
        beta = self.multiplier.beta.detach()  # shares storage: each step sees the multiplier's latest value
        primary = replace(self.ppo.clip_loss(progress), kl_coef=beta, kl="forward")
        metrics = self.ppo.update(rollout, progress, primary, after_step=lambda m: self.multiplier.step(m["approx_kl"]))
        metrics.update(self.fixup(rollout, beta))
        metrics["beta"] = beta.clone()
        return metrics

    def fixup(self, rollout: Batch, beta: Tensor) -> dict[str, Tensor]:
        """Steps on beta KL(pi_old || pi) over the whole rollout until that KL is at most eps_kl (one host sync a
        check: the loop's condition)."""
        cfg = self.cfg
        data = Batch(obs=rollout.obs, actions=rollout.actions, logp=rollout.logp, values=rollout.values).flatten()
        with_logit_bias(data, rollout)
        data.advantages = torch.zeros_like(data.logp)
        data.returns = data.values
        loss = ActorCriticLoss(clip_low=None, vf_coef=0.0, ent_coef=0.0, kl_coef=beta, kl="forward")
        kl_before = kl = self.rollout_kl(data)
        steps = 0
        while steps < cfg.fixup_max_steps and float(kl) > cfg.eps_kl:
            self.learner.step(data, loss, with_metrics=False)
            steps += 1
            kl = self.rollout_kl(data)
            self.multiplier.step(kl)
        return {"fixup_steps": torch.tensor(float(steps)), "kl_before_fixup": kl_before, "kl_final": kl}

    def rollout_kl(self, data: Batch) -> Tensor:
        """Mean KL(pi_old || pi) over the rollout, estimated on its samples: r - 1 - log r."""
        with torch.no_grad():
            logp = self.net.evaluate(data.obs, data.actions, data.get("logit_bias"))[0]
            log_ratio = logp - data.logp
            return kl_estimate(log_ratio.exp(), log_ratio, "forward").mean()
