"""BEAR: bootstrapping error accumulation reduction (Kumar et al. 2019, arXiv:1906.00949), Box actions. SAC whose
actor is held near the support of the dataset's actions by a maximum mean discrepancy (MMD) constraint, enforced with
a Lagrange multiplier, against draws of a behaviour VAE (behaviour_vae.py); the critics' targets take the best of a
few policy draws, as BCQ's.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    VAE step on mean [ mean_A (D(s, z) - a)^2 + vae_kl_weight KL(q(z|s,a) || N(0, I)) ]
    a'_1..a'_T ~ pi(.|s'),  v_i = lam min_k Q'_k(s', a'_i) + (1 - lam) max_k Q'_k(s', a'_i),  i* = argmax_i v_i
    y = r + d (1 - done) (v_i* - alpha log pi(a'_i*|s'))
    critic step on 1/2 sum_k mean (Q_k(s, a) - y)^2
    MMD(s) = sqrt(mean k(u, u') + mean k(b, b') - 2 mean k(u, b) + 1e-6) over m pre-tanh policy draws u and m
             pre-tanh VAE draws b (z clipped to +-0.5) per state; k(x, y) = exp(-|x - y|_1 / (2 sigma)) (laplacian)
             or exp(-|x - y|^2 / (2 sigma)) (gaussian)
    the first warmup_steps: actor step on mean lagrange (MMD(s) - eps) alone;
    after: alpha step as SAC's; actor step on
               mean(alpha log pi(a~|s) - min_k Q_k(s, a~)) + mean lagrange (MMD(s) - eps);
           lagrange step up the same term's gradient (log lagrange clipped to [-5, 10])
    Q' <- (1 - tau) Q' + tau Q
act: the best of N policy draws by min_k Q_k (nets/selection.py)

Defaults are d3rlpy's BEAR (the authors' values where d3rlpy keeps them): lr 3e-4 for the critics and the VAE, 1e-4
for the actor and the temperature, 1e-3 for the multiplier (initially 1), eps 0.05, lam 0.75, T 10, m 4, the
laplacian kernel with sigma 20, N 100, 40k warm-up steps (capped at a fifth of the run), batch 256, [256, 256]
networks and VAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.bcq import SupportConstrainedActing
from policylab.algos.behaviour_vae import BehaviourVAEConfig, vae_loss
from policylab.algos.cql import _ParameterHolder
from policylab.algos.offpolicy import (
    FlatAdam,
    OfflineConfig,
    TargetNetwork,
    obs_dim,
    seeded_generator,
    tanh_gaussian_policy,
    temperature_for,
)
from policylab.algos.sac import SACConfig
from policylab.config import check_unit_interval, positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets import ContinuousCritic, TanhGaussianActor
from policylab.nets.selection import CriticSelectedActor
from policylab.objectives.offline import mmd
from policylab.objectives.q_targets import bootstrap
from policylab.optim import Adam, set_lr

KERNELS = ("laplacian", "gaussian")


@dataclass
class BEARConfig(OfflineConfig, SACConfig, BehaviourVAEConfig):
    """BEAR with d3rlpy's values (module docstring). SAC's gSDE and off-policy MDPO options do not apply."""

    actor_lr: float = 1e-4
    """The actor's and the temperature's learning rate (`lr` is the critics')."""
    vae_lr: float = 3e-4
    vae_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    lagrange_lr: float = 1e-3
    initial_lagrange: float = 1.0
    mmd_threshold: float = 0.05
    """eps: the MMD the actor may keep from the behaviour's draws."""
    mmd_kernel: str = "laplacian"
    mmd_sigma: float = 20.0
    mmd_samples: int = 4
    """m: policy and VAE draws per state in the MMD."""
    bcq_lambda: float = 0.75
    """The weight of the min over the critics in the target (1 - lambda on the max)."""
    target_samples: int = 10
    """T: policy draws per next state in the target."""
    candidates: int = 100
    """N: policy draws per state when acting, the best by min_k Q_k taken."""
    warmup_steps: int | None = None
    """Gradient steps whose actor step is the MMD term alone (part of `steps`). None: 40k, or a fifth of `steps`."""

    @property
    def actor_warmup_steps(self) -> int:
        return min(40_000, self.steps // 5) if self.warmup_steps is None else self.warmup_steps

    def validate(self) -> None:
        super().validate()
        positive(self, "actor_lr", "lagrange_lr", "initial_lagrange", "mmd_sigma", "mmd_samples", "target_samples",
                 "candidates")  # fmt: skip
        self.validate_vae()
        check_unit_interval(self, "bcq_lambda")
        if self.mmd_kernel not in KERNELS:
            raise ConfigError(f"mmd_kernel={self.mmd_kernel!r} is not one of {', '.join(KERNELS)}",
                              "set mmd_kernel to laplacian")  # fmt: skip
        if self.mmd_threshold < 0 or not 0 <= self.actor_warmup_steps <= self.steps:
            raise ConfigError(
                f"mmd_threshold={self.mmd_threshold} must be >= 0 and warmup_steps={self.warmup_steps} within the run "
                f"(0 to steps={self.steps})",
                "set mmd_threshold to e.g. 0.05 and warmup_steps to e.g. a fifth of steps",
            )
        if self.use_sde or self.kl_coef:
            raise ConfigError("use_sde and kl_coef are SAC's online options; BEAR takes neither",
                              "drop use_sde and kl_coef")  # fmt: skip


class BEAR(SupportConstrainedActing):
    name = "bear"
    config_cls = BEARConfig

    def __init__(self, cfg: BEARConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.actor: TanhGaussianActor = self.net.actor  # type: ignore[assignment]
        self.critic, self.act_dim = self.net.critic, self.actor.act_dim
        self.vae = cfg.build_vae(obs_dim(obs_space), self.act_dim, cfg.activation).to(cfg.device)
        self.actor_opt = FlatAdam(self.actor, cfg.actor_lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.vae_opt = FlatAdam(self.vae, cfg.vae_lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.temperature = temperature_for(cfg, self.act_dim)
        self.log_lagrange = nn.Parameter(torch.full((1,), math.log(cfg.initial_lagrange), device=cfg.device))
        self.lagrange_opt = Adam([self.log_lagrange], lr=cfg.lagrange_lr)
        self.modules: dict[str, nn.Module] = {
            "critic_target": self.critic_target.module,
            "vae": self.vae,
            "temperature": self.temperature,
            "lagrange": _ParameterHolder(self.log_lagrange),
        }
        self.optimizers = {
            "actor": self.actor_opt.optimizer,
            "critic": self.critic_opt.optimizer,
            "vae": self.vae_opt.optimizer,
            "lagrange": self.lagrange_opt,
        }
        if self.temperature.optimizer is not None:
            set_lr(self.temperature.optimizer, cfg.actor_lr)
            self.optimizers["temperature"] = self.temperature.optimizer
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = False

    @staticmethod
    def build_policy(cfg: BEARConfig, obs_space: gym.Space, act_space: gym.Space) -> CriticSelectedActor:
        actor = tanh_gaussian_policy(cfg, obs_space, act_space, "bear")
        critic = ContinuousCritic(obs_dim(obs_space), actor.act_dim, cfg.hidden_sizes, cfg.activation, cfg.n_critics)
        return CriticSelectedActor(actor, critic, None, cfg.candidates, "greedy", "greedy")

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg, actor, critic = self.cfg, self.actor, self.critic
        obs = batch.obs.flatten(1)
        vae_step_loss = vae_loss(self.vae, batch, cfg.vae_kl_weight, self.generator)
        self.vae_opt.step(vae_step_loss)
        with torch.no_grad():
            target = self.td_target(batch)
        td = critic(obs, batch.actions) - target  # [K, B]
        critic_loss = 0.5 * (td * td).mean(-1).sum()
        self.critic_opt.step(critic_loss)
        lagrange = self.log_lagrange.detach().exp()
        gap = self.mmd(obs) - cfg.mmd_threshold  # [B], differentiable in the actor
        constraint = (lagrange * gap).mean()
        metrics = {"vae_loss": vae_step_loss.detach(), "critic_loss": critic_loss.detach(), "mmd": gap.detach().mean()}
        metrics.update(q=(td.detach() + target).mean(), lagrange=lagrange[0])
        if index < cfg.actor_warmup_steps:
            actor_loss = constraint
        else:
            actions_pi, logp_pi = actor.sample(obs, self.generator)
            alpha = self.temperature.update(logp_pi + self.temperature.target_entropy)
            critic.requires_grad_(False)  # the actor loss needs dQ/da, not critic weight gradients
            q_pi = critic(obs, actions_pi).min(0).values
            critic.requires_grad_(True)
            actor_loss = (alpha * logp_pi - q_pi).mean() + constraint
            # the multiplier rises while the constraint is violated: d/d log_lagrange of -lagrange mean(gap)
            self.log_lagrange.grad = -(lagrange * gap.detach().mean()).reshape(1)
            self.lagrange_opt.step()
            with torch.no_grad():
                self.log_lagrange.clamp_(-5.0, 10.0)
            metrics["alpha"] = alpha[0]
        self.actor_opt.step(actor_loss)
        self.critic_target.update(cfg.tau)
        metrics["actor_loss"] = actor_loss.detach()
        return metrics

    def td_target(self, batch: Batch) -> Tensor:
        """y = r + d (1 - done) (v_i* - alpha log pi(a'_i*|s')) over T policy draws at s' (module docstring)."""
        cfg = self.cfg
        n, t = len(batch), cfg.target_samples
        repeated = batch.next_obs.flatten(1).repeat_interleave(t, 0)  # a state's draws adjacent
        actions, logp = self.actor.sample(repeated, self.generator)
        q = self.critic_target(repeated, actions)  # [K, B T]
        mixed = torch.lerp(q.amax(0), q.amin(0), cfg.bcq_lambda).view(n, t)
        best = mixed.argmax(-1, keepdim=True)
        value = mixed.gather(-1, best)[:, 0] - self.temperature.log_alpha.exp() * logp.view(n, t).gather(-1, best)[:, 0]
        return bootstrap(batch.rewards, batch.discounts, batch.terminated, value)

    def mmd(self, obs: Tensor) -> Tensor:
        """MMD(s) [B] between m pre-tanh policy draws (reparameterized: differentiable in the actor) and m pre-tanh
        VAE draws per state."""
        cfg = self.cfg
        repeated = obs.repeat_interleave(cfg.mmd_samples, 0)
        with torch.no_grad():
            behaviour = self.vae.sample(repeated, self.generator, 0.5, squash=False)
        mean, log_std = self.actor._mean_log_std(repeated)
        noise = torch.randn(mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
        policy = torch.addcmul(mean, log_std.exp(), noise)
        shape = (len(obs), cfg.mmd_samples, self.act_dim)
        return mmd(policy.view(shape), behaviour.view(shape), cfg.mmd_kernel, cfg.mmd_sigma)
