"""A conditional VAE of actions given observations: a density model of the behaviour policy (BCQ's generative
model, SPOT's support estimate). Encoder q(z | s, a) = N(mean, std^2); decoder a = tanh(f(s, z)) in [-1, 1], the
replay format of Box actions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from policylab.nets.mlp import StackedMLP

LOG_STD_BOUNDS = (-4.0, 15.0)
"""The encoder's log std is clamped to this range (BCQ's and SPOT's values, for numerical stability)."""


class ConditionalVAE(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden_sizes: Sequence[int] = (750, 750),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = StackedMLP(1, obs_dim + act_dim, hidden_sizes, 2 * latent_dim, activation)
        self.decoder = StackedMLP(1, obs_dim + latent_dim, hidden_sizes, act_dim, activation)

    def encode(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std, [B, D] each."""
        mean, log_std = self.encoder(torch.cat([obs.flatten(1), actions], -1))[0].chunk(2, -1)
        return mean, log_std.clamp(*LOG_STD_BOUNDS).exp()

    def decode(self, obs: Tensor, latents: Tensor, squash: bool = True) -> Tensor:
        """Actions in [-1, 1] for observations [N, ...] and latents [N, D] (`squash` false: before the tanh)."""
        raw = self.decoder(torch.cat([obs.flatten(1), latents], -1))[0]
        return torch.tanh(raw) if squash else raw

    def sample(
        self, obs: Tensor, generator: torch.Generator | None = None, latent_clip: float = 0.5, squash: bool = True
    ) -> Tensor:
        """Actions from the prior: decode(s, z) with z ~ N(0, I) clipped to +-latent_clip (BCQ's and BEAR's draws
        from the behaviour model, which stay near its mode), [N, A] for observations [N, ...]."""
        z = torch.randn((len(obs), self.latent_dim), generator=generator, device=obs.device, dtype=obs.dtype)
        z.clamp_(-latent_clip, latent_clip)
        return self.decode(obs, z, squash)

    def forward(
        self, obs: Tensor, actions: Tensor, samples: int = 1, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Encode (s, a), draw `samples` reparameterized latents per row and decode them: reconstructions
        [B, S, A], latents [B, S, D], and the posterior's mean and std [B, D]."""
        mean, std = self.encode(obs, actions)
        n = len(mean)
        noise = torch.randn((n, samples, self.latent_dim), generator=generator, device=mean.device, dtype=mean.dtype)
        latents = mean.unsqueeze(1) + std.unsqueeze(1) * noise
        decoded = self.decode(obs.flatten(1).repeat_interleave(samples, 0), latents.flatten(0, 1))
        return decoded.view(n, samples, -1), latents, mean, std
