"""What SPOT, BCQ and PLAS share: a conditional VAE of the dataset's actions (nets/vae.py), its settings and its
loss, mean [ mean_A (D(s, z) - a)^2 + vae_kl_weight KL(q(z|s,a) || N(0, I)) ],  z ~ q(z|s,a)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from policylab.config import positive
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.vae import ConditionalVAE
from policylab.objectives.offline import vae_negative_elbo


@dataclass
class BehaviourVAEConfig:
    """The VAE's settings (the algorithms set their own defaults where they differ)."""

    vae_lr: float = 1e-3
    vae_hidden_sizes: list[int] = field(default_factory=lambda: [750, 750])
    vae_latent_dim: int | None = None
    """None: 2 dim(A)."""
    vae_kl_weight: float = 0.5
    """The KL term's weight in the VAE's loss (beta)."""

    def validate_vae(self) -> None:
        positive(self, "vae_lr", "vae_kl_weight")
        if any(h <= 0 for h in self.vae_hidden_sizes) or (self.vae_latent_dim is not None and self.vae_latent_dim < 1):
            raise ConfigError(
                f"vae_hidden_sizes={self.vae_hidden_sizes} and vae_latent_dim={self.vae_latent_dim} must be positive "
                "widths (vae_latent_dim none: twice the action size)",
                "set vae_hidden_sizes to e.g. [750, 750] and drop vae_latent_dim",
            )

    def build_vae(self, obs_dim: int, act_dim: int, activation: str) -> ConditionalVAE:
        return ConditionalVAE(obs_dim, act_dim, self.vae_latent_dim or 2 * act_dim, self.vae_hidden_sizes, activation)


def vae_loss(vae: ConditionalVAE, batch: Batch, kl_weight: float, generator: torch.Generator) -> Tensor:
    """The VAE's loss on a batch's (s, a), one latent draw per row."""
    reconstructed, _, mean, std = vae(batch.obs, batch.actions, 1, generator)
    return vae_negative_elbo(reconstructed, batch.actions.unsqueeze(1), mean, std, kl_weight).mean()
