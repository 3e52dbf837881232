"""Networks of the off-policy family: Q-functions and actors.

Critic ensembles (twin critics, REDQ-style ensembles, TQC's quantile critics)
are members of one `StackedMLP`, so K critics cost one batched matmul per
layer, never a Python loop over critics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.nets.cnn import ImageEncoder, flat_features
from policylab.nets.mlp import StackedMLP
from policylab.nets.renorm import RenormSettings
from policylab.nets.sde import exploration_matrices, sde_log_std

_LOG_2 = math.log(2.0)
_LOG_2PI = math.log(2 * math.pi)


def sampled_greedy(
    greedy: Tensor,
    n_actions: int,
    epsilon: float,
    generator: torch.Generator | None,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """A Q-network's sampled action: the greedy action [B], replaced by a uniform one with probability
    `epsilon` (SB3's `predict(deterministic=False)`, with the run's final exploration rate); with action masks'
    `logit_bias`, uniform among the allowed actions."""
    if epsilon <= 0.0:
        return greedy
    draws = torch.rand((2, len(greedy)), generator=generator, device=greedy.device)
    if logit_bias is None:
        uniform = (draws[1] * n_actions).long().clamp_max(n_actions - 1)
    else:
        uniform = masked_greedy(torch.rand(logit_bias.shape, generator=generator, device=greedy.device), logit_bias)
    return torch.where(draws[0] < epsilon, uniform, greedy)


def masked_greedy(values: Any, logit_bias: Any) -> Any:
    """argmax over the last dimension (tensors or numpy arrays), among the allowed actions where action masks'
    `logit_bias` is given."""
    return (values if logit_bias is None else values + logit_bias).argmax(-1)


def act_on_values(
    values: Tensor, deterministic: bool, epsilon: float, generator: torch.Generator | None, logit_bias: Tensor | None
) -> Tensor:
    """A Q-network's action from its action values [B, A]: the greedy one, or with `deterministic` false
    epsilon-greedy with `epsilon` (among the allowed actions, with action masks' `logit_bias`)."""
    greedy = masked_greedy(values, logit_bias)
    return greedy if deterministic else sampled_greedy(greedy, values.shape[-1], epsilon, generator, logit_bias)


class QNetwork(nn.Module):
    """Q(s, .) for Discrete actions; dueling: V(s) + A(s, a) - mean_a A(s, a). Returns [K, B, n_actions]."""

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "relu",
        dueling: bool = False,
        members: int = 1,
        encoder: ImageEncoder | None = None,
        sample_epsilon: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        """`layer_norm`: LayerNorm before each hidden activation (PQN's network)."""
        super().__init__()
        self.dueling = dueling
        self.n_actions = n_actions
        self.sample_epsilon = sample_epsilon
        """`env_action(deterministic=False)`'s exploration rate (DQN: its eps_final; 0: greedy either way)."""
        self.encoder = encoder
        """An image encoder (nets/cnn.py) before the MLP; `obs_dim` is then its feature count."""
        out_dim = n_actions + 1 if dueling else n_actions
        self.body = StackedMLP(members, obs_dim, hidden_sizes, out_dim, activation, layer_norm)

    def forward(self, obs: Tensor) -> Tensor:
        return self.values(self.body(flat_features(self.encoder, obs)))

    def values(self, y: Tensor) -> Tensor:
        """The body's output -> Q(s, .): itself, or dueling's V + A - mean A."""
        if not self.dueling:
            return y
        value, advantage = y[..., :1], y[..., 1:]
        return value + advantage - advantage.mean(-1, keepdim=True)

    def greedy_numpy(self, obs: np.ndarray, logit_bias: np.ndarray | None = None) -> np.ndarray:
        """argmax_a Q(s, a) of member 0 (among the allowed actions, with action masks' `logit_bias`), in numpy
        (CPU acting; the dueling mean does not move the argmax)."""
        y = self.body.numpy_forward(obs.reshape(len(obs), -1), member=0)
        return masked_greedy(y[:, 1:] if self.dueling else y, logit_bias)  # type: ignore[no-any-return]

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """The greedy action of member 0; not `deterministic`: epsilon-greedy with `sample_epsilon` (among the
        allowed actions, with action masks' `logit_bias`)."""
        return act_on_values(self(obs)[0], deterministic, self.sample_epsilon, generator, logit_bias)


class ContinuousCritic(nn.Module):
    """Q(s, a) for Box actions: K critics in one call. Returns [K, B] (`quantiles` > 1: [K, B, quantiles])."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        members: int = 2,
        layer_norm: bool = False,
        quantiles: int = 1,
        batch_renorm: RenormSettings | None = None,
    ) -> None:
        super().__init__()
        self.quantiles = quantiles
        self.body = StackedMLP(
            members, obs_dim + act_dim, hidden_sizes, quantiles, activation, layer_norm, batch_renorm
        )

    def forward(self, obs: Tensor, actions: Tensor, members: int | None = None) -> Tensor:
        """`members=m`: only the first m critics."""
        y = self.body(torch.cat([obs.flatten(1), actions.flatten(1)], -1), members)
        return y[..., 0] if self.quantiles == 1 else y


def scale_to_bounds(squashed: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """[-1, 1] -> [low, high], elementwise."""
    return low + (squashed + 1.0) * 0.5 * (high - low)


class _BoundedActor(nn.Module):
    """Actors act in [-1, 1] (what critics and the replay buffer see, as in SB3); `env_action` scales to the
    env's bounds, which are buffers: they move with the module and are saved in its state_dict."""

    low: Tensor
    high: Tensor

    def __init__(self, low: Tensor, high: Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.reshape(-1).float())
        self.register_buffer("high", high.reshape(-1).float())

    def to_env_numpy(self, squashed: np.ndarray) -> np.ndarray:
        low, high = self.low.numpy(), self.high.numpy()
        return low + (squashed + 1.0) * 0.5 * (high - low)


class DeterministicActor(_BoundedActor):
    """DDPG / TD3: a = tanh(mu(s)) in [-1, 1]; the env gets low + (a + 1) / 2 * (high - low)."""

    def __init__(
        self,
        obs_dim: int,
        low: Tensor,
        high: Tensor,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
    ) -> None:
        super().__init__(low, high)
        self.body = StackedMLP(1, obs_dim, hidden_sizes, low.numel(), activation)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.body(obs.flatten(1))[0])

    def forward_numpy(self, obs: np.ndarray) -> np.ndarray:
        return np.tanh(self.body.numpy_forward(obs.reshape(len(obs), -1), member=0))

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        return scale_to_bounds(self(obs), self.low, self.high)


def tanh_gaussian_log_prob(noise: Tensor, log_std: Tensor, u: Tensor) -> Tensor:
    """log pi(tanh(u)) for u = mean + exp(log_std) * noise: the Gaussian density of u minus
    log |d tanh(u) / du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), summed over action dims."""
    logp = (-0.5 * noise * noise - log_std - 0.5 * _LOG_2PI).sum(-1)
    return logp - (2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))).sum(-1)


def draw_many(
    mean: Tensor, log_std: Tensor, m: int, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """m tanh-Gaussian draws per row of (mean, log_std) [B, A]: actions [B m, A] (row b m + j: draw j of row b) and
    their log-probabilities [B m]; `noise` [B m, A]: the standard normal draws to use (else from `generator`)."""
    mean, log_std = mean.repeat_interleave(m, 0), log_std.repeat_interleave(m, 0)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    u = torch.addcmul(mean, log_std.exp(), noise)
    return torch.tanh(u), tanh_gaussian_log_prob(noise, log_std, u)


class TanhGaussianActor(_BoundedActor):
    """SAC's actor: state-dependent mean and log-std, a = tanh(u) in [-1, 1], u ~ N(mean, std).

    log pi(a|s) = log N(u; mean, std) - sum log(1 - tanh(u)^2), with
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) for numerical stability. The density is
    that of the [-1, 1] action (as in SB3), so entropy targets do not depend on the env's bounds.

    With `batch_renorm` (CrossQ): batch renormalization before every linear layer (nets/renorm.py).

    With `sde` (gSDE, nets/sde.py; SB3's SAC `use_sde`): the body outputs the mean alone, clipped to
    +-`clip_mean` (SB3's Hardtanh), `log_std` is a [features, A] parameter and each row's log std comes from the
    last hidden features; exploration offsets the mean by phi(s) W with a held matrix W per env
    (`sample_matrices`), and every log-prob and gradient uses the per-row Gaussian.
    """

    def __init__(
        self,
        obs_dim: int,
        low: Tensor,
        high: Tensor,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
        sde: bool = False,
        log_std_init: float = -3.0,
        clip_mean: float = 2.0,
        batch_renorm: RenormSettings | None = None,
    ) -> None:
        super().__init__(low, high)
        self.act_dim = low.numel()
        self.sde, self.clip_mean = sde, clip_mean
        out_dim = self.act_dim if sde else 2 * self.act_dim
        self.body = StackedMLP(1, obs_dim, hidden_sizes, out_dim, activation, batch_renorm=batch_renorm)
        self.log_std_bounds = log_std_bounds
        self.latent_dim = hidden_sizes[-1] if hidden_sizes else obs_dim
        if sde:
            self.log_std = nn.Parameter(torch.full((self.latent_dim, self.act_dim), float(log_std_init)))

    def _mean_log_std(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        if self.sde:
            mean, features = self._sde_mean_features(obs)
            return mean, sde_log_std(features, self.log_std)
        y = self.body(obs.flatten(1))[0]
        mean, log_std = y[:, : self.act_dim], y[:, self.act_dim :]
        return mean, log_std.clamp(*self.log_std_bounds)

    def _sde_mean_features(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """gSDE: the clipped mean [B, A] and the last hidden features [B, latent]."""
        out, features = self.body.forward_features(obs.flatten(1))
        return out[0].clamp(-self.clip_mean, self.clip_mean), features[0]

    def sample(
        self, obs: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """A reparameterized sample (gradients flow through it) and its log-probability [B]; `noise`: the
        standard normal draws to use (else drawn from `generator`)."""
        mean, log_std = self._mean_log_std(obs)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + log_std.exp() * noise
        logp = tanh_gaussian_log_prob(noise, log_std, u)
        return torch.tanh(u), logp

    def log_prob(self, obs: Tensor, actions: Tensor, eps: float = 1e-6) -> Tensor:
        """log pi(a|s) [B] of given actions in [-1, 1] (dataset actions; clipped to +-(1 - eps) before atanh)."""
        mean, log_std = self._mean_log_std(obs)
        u = torch.atanh(actions.clamp(-1.0 + eps, 1.0 - eps))
        return tanh_gaussian_log_prob((u - mean) * torch.exp(-log_std), log_std, u)

    def sample_many(
        self, obs: Tensor, m: int, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """m samples per observation from one forward pass: actions [B m, A] (row b m + j: sample j of obs b) and
        their log-probabilities [B m]; `noise` [B m, A]: the standard normal draws to use."""
        return draw_many(*self._mean_log_std(obs), m, generator, noise)

    def forward(self, obs: Tensor) -> Tensor:
        """The deterministic action, tanh of the mean."""
        return torch.tanh(self._sde_mean_features(obs)[0] if self.sde else self._mean_log_std(obs)[0])

    def sample_numpy(self, obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """tanh(mean + std * noise) in numpy (CPU acting on small batches, no log-prob); with `sde`, `noise` is
        each row's standard normal matrix draw [B, latent, A] (`sample_matrices`)."""
        y, features = self.body.numpy_forward_features(obs.reshape(len(obs), -1), member=0)
        if self.sde:
            matrices = np.exp(self.log_std.detach().numpy()) * noise
            offset = np.matmul(features[:, None, :], matrices)[:, 0]
            return np.tanh(np.clip(y, -self.clip_mean, self.clip_mean) + offset)
        log_std = np.clip(y[:, self.act_dim :], *self.log_std_bounds)
        return np.tanh(y[:, : self.act_dim] + np.exp(log_std) * noise)

    def sample_matrices(self, obs: Tensor, standard: Tensor) -> Tensor:
        """gSDE's exploration, a = tanh(mean(s) + phi(s) W) with each row's W = exp(log_std) * `standard`
        [B, latent, A] (standard normal draws held across steps by the caller)."""
        mean, features = self._sde_mean_features(obs)
        offset = torch.bmm(features.unsqueeze(1), exploration_matrices(self.log_std, standard)).squeeze(1)
        return torch.tanh(mean + offset)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        squashed = self(obs) if deterministic else self.sample(obs, generator)[0]
        return scale_to_bounds(squashed, self.low, self.high)


class GaussianActor(_BoundedActor):
    """The offline actors' policy (IQL, AWAC as in CORL): a ~ N(tanh(mu(s)), exp(log_std)) in [-1, 1] units, with
    a state-independent log-std. Its density is defined at dataset actions on the bounds (where a tanh-squashed
    Gaussian's is not), which advantage-weighted regression needs; sampled actions are clipped to [-1, 1]."""

    def __init__(
        self,
        obs_dim: int,
        low: Tensor,
        high: Tensor,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        log_std_bounds: tuple[float, float] = (-5.0, 2.0),
    ) -> None:
        super().__init__(low, high)
        self.act_dim = low.numel()
        self.body = StackedMLP(1, obs_dim, hidden_sizes, self.act_dim, activation)
        self.log_std = nn.Parameter(torch.zeros(self.act_dim))
        self.log_std_bounds = log_std_bounds

    def forward(self, obs: Tensor) -> Tensor:
        """The deterministic action, the mean tanh(mu(s))."""
        return torch.tanh(self.body(obs.flatten(1))[0])

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log N(actions; tanh(mu(s)), std), summed over action dims: [B]."""
        log_std = self.log_std.clamp(*self.log_std_bounds)
        z = (actions - self(obs)) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - 0.5 * _LOG_2PI).sum(-1)

    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = self(obs)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + self.log_std.clamp(*self.log_std_bounds).exp() * noise).clamp(-1.0, 1.0)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        return scale_to_bounds(self(obs) if deterministic else self.sample(obs, generator), self.low, self.high)


class DiscreteBCActor(nn.Module):
    """Behaviour cloning's policy for Discrete actions: logits of a softmax policy, acting greedily."""

    def __init__(
        self, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int] = (256, 256), activation: str = "relu"
    ):
        super().__init__()
        self.body = StackedMLP(1, obs_dim, hidden_sizes, n_actions, activation)

    def forward(self, obs: Tensor) -> Tensor:
        """Logits [B, n_actions]."""
        return self.body(obs.flatten(1))[0]

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        logits = self(obs)
        if deterministic:
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


class CategoricalActor(nn.Module):
    """Discrete SAC's actor: the whole distribution (probabilities and log-probabilities) for every action."""

    def __init__(
        self, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int] = (256, 256), activation: str = "relu"
    ):
        super().__init__()
        self.body = StackedMLP(1, obs_dim, hidden_sizes, n_actions, activation)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(self.body(obs.flatten(1))[0], -1)
        return logp.exp(), logp

    def sample_numpy(self, obs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Inverse-CDF draws from the softmax, in numpy: `uniform` is [B] in [0, 1)."""
        logits = self.body.numpy_forward(obs.reshape(len(obs), -1), member=0)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        cdf = np.cumsum(probs, -1)
        return np.minimum((cdf < uniform[:, None] * cdf[:, -1:]).sum(-1), probs.shape[-1] - 1)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        probs, _ = self(obs)
        return probs.argmax(-1) if deterministic else torch.multinomial(probs, 1, generator=generator).squeeze(-1)
