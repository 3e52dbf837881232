"""CQL: conservative Q-learning (Kumar et al. 2020, arXiv:2006.04779), continuous (SAC-based, CQL(H)) and discrete
(DQN-based). The critics learn a lower bound of the policy's value by adding to the TD loss a term that pushes
Q down on sampled actions and up on the dataset's (objectives.offline.cql_penalty).

Continuous, for each gradient step on a batch (s, a, r, s', done, d = gamma^n), on top of SAC's step:
    a_rand ~ U[-1, 1]^A, a_cur ~ pi(.|s), a_next ~ pi(.|s')    (`n_action_samples` each, all evaluated at s)
    penalty_k = mean_B [logsumexp over the 3M samples of (Q_k(s, a_j) - log mu(a_j)) - Q_k(s, a)]
    critic loss = 1/2 sum_k mean (Q_k(s, a) - y)^2 + cql_alpha sum_k penalty_k
    (with `lagrange`: cql_alpha is multiplied by alpha' >= 0, tuned so that penalty_k stays near `target_gap`)
y is SAC's target (with `backup_entropy=false`, without the entropy term, as CORL runs it). All sampled-action
values of both critics are one batched call: B (3M + 1) rows.

Discrete: DQN's loss + cql_alpha mean_B [logsumexp_a Q(s, a) - Q(s, a_data)].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.dqn import DQN, DQNConfig
from policylab.algos.fused_offpolicy import fused_cql_update, fused_sac_applies
from policylab.algos.offpolicy import OfflineConfig, soft_actor_critic_state
from policylab.algos.sac import SAC, SACConfig
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.offline import cql_penalty, discrete_cql_penalty
from policylab.objectives.q_targets import sac_target
from policylab.optim import Adam, set_lr


@dataclass
class CQLNoise:
    """One step's draws: `policy` [2B, A] standard normal (the s rows, then s'), `proposals` [2B M, A] standard
    normal (row b M + j: draw j of row b of [s; s']), `uniform` [B M, A] in [-1, 1]."""

    policy: Tensor
    proposals: Tensor
    uniform: Tensor


@dataclass
class CQLConfig(OfflineConfig, SACConfig):
    """CQL(H) on SAC: CORL's locomotion values for the penalty (cql_alpha 10, 10 samples per proposal), d3rlpy's
    learning rates (critics 3e-4, actor and temperature 1e-4)."""

    cql_alpha: float = 10.0
    actor_lr: float = 1e-4
    """The actor's (and temperature's) learning rate; `lr` is the critics'. CQL needs a slower actor than SAC
    (d3rlpy 1e-4, CORL 3e-5)."""
    n_action_samples: int = 10
    cql_temperature: float = 1.0
    lagrange: bool = False
    """Tune a multiplier alpha' >= 0 on the penalty so that it stays near `target_gap` (CQL's Lagrangian form)."""
    target_gap: float = 10.0
    backup_entropy: bool = True
    """Keep SAC's entropy term in the TD target (d3rlpy); false: without it (CORL)."""
    bc_steps: int = 0
    """For the first this many gradient steps the actor clones the dataset, mean(alpha log pi(a~|s) - log pi(a|s)),
    while the critics learn as usual (CORL's `bc_steps`: 0 by default, 100k of 1M in its AntMaze configs)."""

    def validate(self) -> None:
        super().validate()
        positive(self, "n_action_samples")
        if self.bc_steps < 0:
            raise ConfigError(
                f"bc_steps={self.bc_steps} must be >= 0", "set bc_steps to 0 (no cloning phase) or e.g. 1000"
            )
        if self.actor_lr <= 0:
            raise ConfigError(f"actor_lr={self.actor_lr} must be > 0", "set actor_lr to e.g. 1e-4")
        if self.cql_alpha < 0 or self.cql_temperature <= 0:
            raise ConfigError(
                f"cql_alpha={self.cql_alpha} must be >= 0 and cql_temperature={self.cql_temperature} > 0",
                "set cql_alpha to e.g. 5 or 10 and cql_temperature to 1",
            )


class CQL(SAC):
    name = "cql"
    config_cls = CQLConfig
    cfg: CQLConfig

    def __init__(self, cfg: CQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = fused_sac_applies(self)  # the hand-derived step (from bc_steps on)
        for optimizer in (self.actor_opt.optimizer, self.temperature.optimizer):
            if optimizer is not None:
                set_lr(optimizer, cfg.actor_lr)
        self.log_alpha_prime = nn.Parameter(torch.zeros(1, device=cfg.device))
        self.alpha_prime_opt = Adam([self.log_alpha_prime], lr=cfg.lr)
        self.modules, self.optimizers = soft_actor_critic_state(
            self.actor_opt, self.critic_opt, self.critic_target, self.temperature
        )
        if cfg.lagrange:
            self.modules["cql_multiplier"] = _ParameterHolder(self.log_alpha_prime)
            self.optimizers["cql_multiplier"] = self.alpha_prime_opt

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        if self.fused and index >= self.cfg.bc_steps:
            return fused_cql_update(self, batch, index)
        return self.autograd_update(batch, index)

    def autograd_update(  # type: ignore[override]  # CQL draws more than SAC's noise
        self, batch: Batch, index: int, noise: CQLNoise | None = None
    ) -> dict[str, Tensor]:
        """The update with autograd (`noise`: the step's draws, for tests)."""
        cfg, actor, critic = self.cfg, self.net, self.critic
        n = len(batch)
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        noise_pi, noise_next = (None, None) if noise is None else (noise.policy[:n], noise.policy[n:])
        actions_pi, logp_pi = actor.sample(obs, self.generator, noise_pi)
        alpha = self.temperature.update(logp_pi + self.temperature.target_entropy)
        with torch.no_grad():
            next_actions, next_logp = actor.sample(next_obs, self.generator, noise_next)
            target = self.td_target(batch, next_actions, next_logp, alpha)
            # proposals, all to be evaluated at s: uniform, pi(.|s), pi(.|s')
            proposals = torch.cat([obs, next_obs])
            sampled, sampled_logp = actor.sample_many(
                proposals, cfg.n_action_samples, self.generator, None if noise is None else noise.proposals
            )
            uniform = self.uniform_proposals(n, noise)
        q_all = critic.body(self.proposal_rows(batch, uniform, sampled))[..., 0]  # [K, B (1 + 3M)]
        critic_loss, metrics = self.critic_loss(q_all, target, sampled_logp, batch)
        self.critic_opt.step(critic_loss)
        critic.requires_grad_(False)
        q_pi = critic(obs, actions_pi).min(0).values
        critic.requires_grad_(True)
        if index < cfg.bc_steps:
            q_pi = actor.log_prob(obs, batch.actions.flatten(1))  # the data's likelihood in place of Q
        actor_loss = (alpha * logp_pi - q_pi).mean()
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        metrics.update(alpha=alpha[0], actor_loss=actor_loss.detach(), entropy=-logp_pi.detach().mean())
        return metrics

    def td_target(self, batch: Batch, next_actions: Tensor, next_logp: Tensor, alpha: Tensor) -> Tensor:
        """SAC's target, with the entropy term only with `backup_entropy`."""
        next_q = self.critic_target(batch.next_obs, next_actions)
        entropy_alpha = alpha if self.cfg.backup_entropy else torch.zeros_like(alpha)
        return sac_target(batch.rewards, batch.discounts, batch.terminated, next_q, next_logp, entropy_alpha)

    def uniform_proposals(self, n: int, noise: CQLNoise | None) -> Tensor:
        """`n_action_samples` uniform actions in [-1, 1] per state, [B M, A]."""
        if noise is not None:
            return noise.uniform
        shape = (n * self.cfg.n_action_samples, self.act_dim)
        return torch.rand(shape, generator=self.generator, device=self.cfg.device) * 2.0 - 1.0

    def proposal_rows(self, batch: Batch, uniform: Tensor, sampled: Tensor) -> Tensor:
        """The critics' input rows [B (1 + 3M), obs + act]: (s, a_data), then s with the uniform actions, with the
        policy's draws at s and with its draws at s' (`sampled`: [2 B M, A], the s rows first)."""
        obs = batch.obs.flatten(1)
        repeated = obs.repeat_interleave(self.cfg.n_action_samples, 0).repeat(3, 1)
        return torch.cat([torch.cat([obs, repeated]), torch.cat([batch.actions.flatten(1), uniform, sampled])], -1)

    def critic_loss(
        self, q_all: Tensor, target: Tensor, sampled_logp: Tensor, batch: Batch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The critics' loss from their values at `proposal_rows` (q_all [K, B (1 + 3M)]): the TD loss plus the
        weighted penalty, after the Lagrangian multiplier's step (with `lagrange`)."""
        cfg, n, m = self.cfg, len(batch), self.cfg.n_action_samples
        q_data = q_all[:, :n]
        q_sampled = q_all[:, n:].reshape(q_all.shape[0], 3, n, m).permute(0, 2, 1, 3).flatten(2)  # [K, B, 3M]
        log_uniform = torch.full((n, m), -self.act_dim * math.log(2.0), device=q_all.device)
        logp_s, logp_next = sampled_logp.view(2, n, m)
        log_density = torch.cat([log_uniform, logp_next, logp_s], -1)
        order = torch.cat([torch.arange(m), torch.arange(2 * m, 3 * m), torch.arange(m, 2 * m)]).to(q_all.device)
        q_sampled = self.penalized_values(q_sampled[..., order], batch)
        penalty = cql_penalty(q_data, q_sampled, log_density, cfg.cql_temperature)  # [K]
        td = q_data - target
        td_loss = 0.5 * (td * td).mean(-1).sum()
        weight: float | Tensor = cfg.cql_alpha
        metrics: dict[str, Tensor] = {}
        if cfg.lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            gap_loss = -(alpha_prime * cfg.cql_alpha * (penalty.detach() - cfg.target_gap)).mean()
            self.alpha_prime_opt.zero_grad()
            gap_loss.backward()
            self.alpha_prime_opt.step()
            weight = float(cfg.cql_alpha) * alpha_prime.detach()
            metrics["cql_multiplier"] = alpha_prime.detach()
        critic_loss = td_loss + (weight * (penalty - (cfg.target_gap if cfg.lagrange else 0.0))).sum()
        metrics.update(critic_loss=td_loss.detach(), cql_penalty=penalty.detach().mean(), q=q_data.detach().mean())
        return critic_loss, metrics

    def penalized_values(self, q_sampled: Tensor, batch: Batch) -> Tensor:
        """Q at the sampled actions as the penalty sees them, [K, B, 3M]: `n_action_samples` uniform ones, then
        the policy's at s' and at s. CQL takes them as they are; Cal-QL bounds the policy's from below."""
        return q_sampled


class _ParameterHolder(nn.Module):
    """A lone parameter as a module (what checkpoints save)."""

    def __init__(self, parameter: nn.Parameter) -> None:
        super().__init__()
        self.value = parameter


@dataclass
class OfflineDQNConfig(OfflineConfig, DQNConfig):
    """What the offline DQN family (discrete CQL, discrete BCQ) shares. Its fields are declared here because
    OfflineConfig's copies of OffPolicyConfig's defaults would otherwise replace DQNConfig's (dataclasses read the
    bases last to first): the offline values, and DQN's hard target copies (tau 1)."""

    lr: float = 3e-4
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    batch_size: int = 256
    train_freq: int = 1
    max_grad_norm: float | None = None
    tau: float = 1.0
    target_update_interval: int = 2_000
    """Hard target copies every this many gradient steps (then env steps online); d3rlpy's Atari value is 8000."""
    exploration_fraction: float = 0.0
    eps_start: float = 0.05
    """Online (after the offline phase): epsilon-greedy from the start, not a decay from 1."""


@dataclass
class DiscreteCQLConfig(OfflineDQNConfig):
    """Discrete CQL on DQN (d3rlpy's DiscreteCQL: alpha 1, Huber TD loss, hard target copies)."""

    cql_alpha: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.cql_alpha < 0:
            raise ConfigError(f"cql_alpha={self.cql_alpha} must be >= 0", "set cql_alpha to e.g. 1")


class DiscreteCQL(DQN):
    name = "cql_discrete"
    config_cls = DiscreteCQLConfig
    cfg: DiscreteCQLConfig

    def __init__(self, cfg: DiscreteCQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = False

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        td_loss, q_all, q, _ = self.td_loss(batch)
        penalty = discrete_cql_penalty(q_all, q)
        self.q_opt.step(td_loss + self.cfg.cql_alpha * penalty)
        return {"loss": td_loss.detach(), "cql_penalty": penalty.detach(), "q": q.detach().mean()}
