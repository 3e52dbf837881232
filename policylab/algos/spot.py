"""SPOT: supported policy optimization (Wu et al. 2022, arXiv:2202.06239). TD3 whose actor is kept on the support
of the behaviour policy: a conditional VAE of the dataset's actions (nets/vae.py) estimates -log pi_beta(a|s),
and the actor loss adds it, at the actor's own actions, as a density penalty.

first `vae_steps` gradient steps (counted in `steps`), on the same batches (s, a):
    VAE step on mean [ mean_A (dec(s, z) - a)^2 + vae_kl_weight KL(q(z|s,a) || N(0, I)) ],  z ~ q(z|s,a)
then, the VAE frozen, TD3's step (td3.py) with the actor loss
    -mean Q_1(s, mu(s)) / mean |Q_1(s, mu(s))|  +  spot_lambda mean -log pi_beta(mu(s)|s)   (|Q| held constant)
where -log pi_beta(a|s) is the VAE's negative ELBO, up to scale and shift (objectives.offline.vae_negative_elbo),
or with `iwae` its importance-sampled estimate over `density_samples` latents (vae_importance_weighted_log_likelihood).

Defaults are CORL's (algorithms/finetune/spot.py, `TrainConfig`; its configs are AntMaze and Adroit ones). CORL
trains its VAE for 100k steps before, not within, the 1M offline steps; online it also cools lambda down,
resets the optimizers and changes gamma, none of which is done here (the VAE stays frozen online, as there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gymnasium as gym
from torch import Tensor

from policylab.algos.behaviour_vae import BehaviourVAEConfig, vae_loss
from policylab.algos.offpolicy import FlatAdam, OfflineConfig, obs_dim
from policylab.algos.td3 import TD3, TD3Config
from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.objectives.offline import td3_bc_lambda, vae_importance_weighted_log_likelihood, vae_negative_elbo
from policylab.optim import set_lr


@dataclass
class SPOTConfig(OfflineConfig, TD3Config, BehaviourVAEConfig):
    """SPOT with CORL's defaults: critics lr 3e-4, actor lr 1e-4, [256, 256] networks, policy_delay 2, target noise
    0.2 clipped at 0.5, tau 5e-3, gamma 0.99; VAE [750, 750], latent 2 dim(A), lr 1e-3, KL weight 0.5, 100k steps
    (capped at a tenth of `steps`); lambda 1 (CORL's Adroit value; its AntMaze configs use 0.025), one latent
    sample, ELBO (not IWAE). CORL does not normalize observations; here they are normalized with the dataset's
    statistics (normalize_obs, as the other offline algorithms)."""

    lr: float = 3e-4
    actor_lr: float = 1e-4
    """The actor's learning rate (`lr` is the critics')."""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    spot_lambda: float = 1.0
    """Weight of the density penalty -log pi_beta(mu(s)|s) in the actor loss (CORL's `lambd`)."""
    vae_steps: int | None = None
    """Gradient steps of VAE training at the start of the run (part of `steps`); the VAE is frozen after them.
    None: CORL's 100k, or a tenth of `steps` if that is less."""
    vae_kl_weight: float = 0.5
    """The KL term's weight in the VAE's loss and in the density estimate (CORL's `beta`)."""
    density_samples: int = 1
    """Latent samples per state in the density estimate (CORL's `num_samples`)."""
    iwae: bool = False
    """Estimate log pi_beta by importance sampling (IWAE) instead of the ELBO."""

    @property
    def vae_pretraining_steps(self) -> int:
        return min(100_000, self.steps // 10) if self.vae_steps is None else self.vae_steps

    def validate(self) -> None:
        super().validate()
        positive(self, "actor_lr", "density_samples")
        self.validate_vae()
        if self.spot_lambda < 0:
            raise ConfigError(f"spot_lambda={self.spot_lambda} must be >= 0", "set spot_lambda to e.g. 1.0")
        if not 0 <= self.vae_pretraining_steps < self.steps:
            raise ConfigError(
                f"vae_steps={self.vae_steps} must be >= 0 and below steps={self.steps} (they are part of the run)",
                "set vae_steps to e.g. a tenth of steps",
            )
        if self.bc_alpha:
            raise ConfigError("bc_alpha is TD3+BC's weight; SPOT's is spot_lambda", "drop bc_alpha")


class SPOT(TD3):
    name = "spot"
    config_cls = SPOTConfig  # type: ignore[assignment]  # its dataclass __init__ adds the VAE's fields
    cfg: SPOTConfig

    def __init__(self, cfg: SPOTConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        super().__init__(cfg, obs_space, act_space)
        self.fused = False  # the hand-derived TD3 step has no density term
        set_lr(self.actor_opt.optimizer, cfg.actor_lr)
        self.vae = cfg.build_vae(obs_dim(obs_space), self.act_dim, cfg.activation).to(cfg.device)
        self.vae_opt = FlatAdam(self.vae, cfg.vae_lr, cfg.max_grad_norm)
        self.modules["vae"] = self.vae
        self.optimizers["vae"] = self.vae_opt.optimizer
        self._vae_frozen = False

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        vae_steps = self.cfg.vae_pretraining_steps
        if index < vae_steps:
            return self.vae_update(batch)
        if not self._vae_frozen:
            self.vae.requires_grad_(False)
            self._vae_frozen = True
        return self.autograd_update(batch, index - vae_steps)

    def vae_update(self, batch: Batch) -> dict[str, Tensor]:
        loss = vae_loss(self.vae, batch, self.cfg.vae_kl_weight, self.generator)
        self.vae_opt.step(loss)
        return {"vae_loss": loss.detach()}

    def actor_loss(self, batch: Batch) -> Tensor:
        pi = self.net(batch.obs)
        q_pi = self.critic(batch.obs, pi, members=1)
        density_penalty = self.negative_log_density(batch.obs, pi).mean()
        return -td3_bc_lambda(q_pi, 1.0) * q_pi.mean() + self.cfg.spot_lambda * density_penalty

    def negative_log_density(self, obs: Tensor, actions: Tensor) -> Tensor:
        """-log pi_beta(a|s) up to scale and shift, by the frozen VAE, [B] (differentiable in `actions`)."""
        cfg = self.cfg
        reconstructed, latents, mean, std = self.vae(obs, actions, cfg.density_samples, self.generator)
        if cfg.iwae:
            decoder_std = math.sqrt(cfg.vae_kl_weight / 4.0)
            return -vae_importance_weighted_log_likelihood(actions, reconstructed, latents, mean, std, decoder_std)
        return vae_negative_elbo(reconstructed, actions.unsqueeze(1), mean, std, cfg.vae_kl_weight)
