"""CRR: critic-regularized regression (Wang et al. 2020, arXiv:2006.15134), Box actions. Behaviour cloning weighted
by how much better the dataset's action is than the policy's own, with TD critics and target networks.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    y = r + d (1 - done) min_k Q'_k(s', a'),  a' ~ pi'(.|s')                   (pi': the target actor)
    Q step on 1/2 sum_k mean (Q_k(s, a) - y)^2
    A = min_k Q_k(s, a) - baseline_j min_k Q_k(s, a_j),  a_1..a_m ~ pi(.|s)  (baseline: mean or max over the m)
    actor step on -mean f(A) log pi(a | s),  f = min(exp(A / crr_beta), max_weight) or 1(A > 0)
    every target_update_interval steps: pi' <- (1 - tau) pi' + tau pi;  Q' <- (1 - tau) Q' + tau Q
act (cwp): m draws a_j ~ pi(.|s), one chosen with probabilities softmax_j Q_1..K-min(s, a_j) (the paper's
critic-weighted policy; nets/selection.py); without cwp the Gaussian's mean (evaluation) or a draw (online).

Defaults are d3rlpy's (the paper's with a non-distributional critic): exp weights, mean baseline, m = 4,
crr_beta 1, max_weight 20, lr 3e-4, batch 100, one critic, hard target copies every 100 steps. The actor is IQL's
Gaussian (state-independent log-std; d3rlpy's is state-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from policylab.algos.fused_offpolicy import fused_crr_applies, fused_crr_update
from policylab.algos.iql import IQL, IQLConfig
from policylab.algos.offpolicy import FlatAdam, TargetNetwork, box_bounds, obs_dim, seeded_generator
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, GaussianActor
from policylab.nets.selection import CriticSelectedActor
from policylab.objectives.offline import crr_weights
from policylab.objectives.q_targets import td3_target

ADVANTAGE_BASELINES = ("mean", "max")
WEIGHT_KINDS = ("exp", "binary")


@dataclass
class CRRConfig(IQLConfig):
    """CRR with d3rlpy's values (IQL's `expectile`, `beta` and `deterministic_actor` are not used)."""

    batch_size: int = 100
    n_critics: int = 1
    max_weight: float = 20.0
    crr_beta: float = 1.0
    """Temperature of the exp weights exp(A / crr_beta)."""
    weight: str = "exp"
    """exp (CRR-exp) or binary (CRR-binary: 1 where A > 0)."""
    advantage_baseline: str = "mean"
    """The value A is measured against: the mean (the paper's) or max of Q over the policy's m draws."""
    n_action_samples: int = 4
    """m: policy draws per state, for the baseline and for acting (cwp)."""
    cwp: bool = True
    """Act by the critic-weighted policy (m draws, one resampled by softmax of Q); false: the Gaussian itself."""
    tau: float = 1.0
    target_update_interval: int = 100
    """Target updates (Polyak with `tau`; 1.0 a hard copy) every this many gradient steps."""

    def validate(self) -> None:
        super().validate()
        if self.deterministic_actor:
            raise ConfigError("CRR's policy is a Gaussian (it weighs log-likelihoods)", "drop deterministic_actor")
        for name, allowed in (("weight", WEIGHT_KINDS), ("advantage_baseline", ADVANTAGE_BASELINES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}",
                                  f"set {name} to {allowed[0]}")  # fmt: skip
        if self.crr_beta <= 0 or self.n_action_samples < 1 or self.target_update_interval < 1:
            raise ConfigError(
                f"crr_beta={self.crr_beta} must be > 0, n_action_samples={self.n_action_samples} and "
                f"target_update_interval={self.target_update_interval} >= 1",
                "set crr_beta to e.g. 1.0, n_action_samples to 4 and target_update_interval to 100",
            )


class CRR(IQL):
    """IQL's Gaussian actor, random actions and checkpointed pieces; its own critics' targets and actor weights."""

    name = "crr"
    config_cls = CRRConfig  # type: ignore[assignment]
    cfg: CRRConfig

    uses_value = False

    def __init__(self, cfg: CRRConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.actor = cast(GaussianActor, self.net.actor if cfg.cwp else self.net)
        self.act_dim = self.actor.act_dim
        if cfg.cwp:
            self.critic = cast(ContinuousCritic, self.net.critic)
        else:
            self.critic = ContinuousCritic(obs_dim(obs_space), self.act_dim, cfg.hidden_sizes, cfg.activation,
                                           cfg.n_critics).to(cfg.device)  # fmt: skip
        self.actor_opt = FlatAdam(self.actor, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.actor_target = TargetNetwork(self.actor, self.actor_opt.params)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.modules: dict[str, nn.Module] = {
            "actor_target": self.actor_target.module,
            "critic_target": self.critic_target.module,
        }
        if not cfg.cwp:  # with cwp the critic is part of the policy
            self.modules["critic"] = self.critic
        self.optimizers = {"actor": self.actor_opt.optimizer, "critic": self.critic_opt.optimizer}
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = fused_crr_applies(self)

    @staticmethod
    def build_policy(cfg: IQLConfig, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
        assert isinstance(cfg, CRRConfig)
        low, high = box_bounds(act_space, "crr", cfg)
        n_obs = obs_dim(obs_space)
        actor = GaussianActor(n_obs, low, high, cfg.hidden_sizes, cfg.activation)
        if not cfg.cwp:
            return actor
        critic = ContinuousCritic(n_obs, low.numel(), cfg.hidden_sizes, cfg.activation, cfg.n_critics)
        return CriticSelectedActor(actor, critic, None, cfg.n_action_samples, "softmax", "softmax")

    def explore(self, obs: np.ndarray, progress: float) -> np.ndarray:
        with torch.inference_mode():
            x = torch.as_tensor(obs, device=self.cfg.device)
            actions = self.net.act(x, self.generator) if self.cfg.cwp else self.actor.sample(x, self.generator)
            return actions.cpu().numpy()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        return fused_crr_update(self, batch, index) if self.fused else self.autograd_update(batch, index)

    def autograd_update(self, batch: Batch, index: int = 0) -> dict[str, Tensor]:  # type: ignore[override]
        actor, critic = self.actor, self.critic
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        with torch.no_grad():
            next_actions = cast(GaussianActor, self.actor_target.module).sample(next_obs, self.generator)
            next_q = self.critic_target(next_obs, next_actions)
            target = td3_target(batch.rewards, batch.discounts, batch.terminated, next_q)
        td = critic(obs, batch.actions) - target
        critic_loss = 0.5 * (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        with torch.no_grad():
            q_data, weights = self.advantage_weights(obs, batch.actions)
        actor_loss = -(weights * actor.log_prob(obs, batch.actions)).mean()
        self.actor_opt.step(actor_loss)
        self.update_targets(index)
        return {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "q": q_data.mean(),
            "adv_weight": weights.mean(),
        }

    def advantage_weights(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """min_k Q_k(s, a) [B] and the weights f(A) [B], A against the baseline over m policy draws (no gradient)."""
        cfg = self.cfg
        m, b = cfg.n_action_samples, len(obs)
        repeated = obs.repeat_interleave(m, 0)  # a state's m draws adjacent
        drawn = torch.cat([self.actor.sample(repeated, self.generator), actions])  # one critic call for both
        q = self.critic(torch.cat([repeated, obs]), drawn).min(0).values
        q_policy, q_data = q[: b * m].view(b, m), q[b * m :]
        baseline = q_policy.mean(-1) if cfg.advantage_baseline == "mean" else q_policy.amax(-1)
        return q_data, crr_weights(q_data - baseline, cfg.weight, cfg.crr_beta, cfg.max_weight)

    def update_targets(self, index: int) -> None:
        if (index + 1) % self.cfg.target_update_interval == 0:
            self.actor_target.update(self.cfg.tau)
            self.critic_target.update(self.cfg.tau)
