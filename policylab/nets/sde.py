"""Generalized state-dependent exploration (gSDE; Raffin, Kober and Stulp, "Smooth exploration for robotic
reinforcement learning", CoRL 2021), as Stable-Baselines3's `use_sde` has it for PPO, A2C and SAC (here:
nets/actor_critic.py for the on-policy family, nets/critics.py's TanhGaussianActor for SAC and TQC).

The action noise is a function of the state, eps(s) = phi(s) W, where phi(s) [latent] are the policy network's
last hidden features (held out of the gradient: SB3's default `learn_features=False`) and W [latent, actions] is
a matrix of Gaussian weights, W_jk ~ N(0, S_jk^2) with S = exp(log_std) a learned [latent, actions] parameter
(SB3's `full_std=True`). Each env keeps its W for `sde_sample_freq` steps (or a whole rollout), so exploration is
smooth in time and in the state instead of white noise at every step. Given s, a = mean(s) + phi(s) W is Gaussian
with the per-row variance

    sigma_k(s)^2 = sum_j phi_j(s)^2 S_jk^2 + 1e-6        (SB3's epsilon)

and that Gaussian is what every log-probability, entropy and gradient uses: the heads take log sigma(s) [B, A]
in place of their shared log std. Here: that log std, its gradient into `log_std`, and the noise offset."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

VARIANCE_FLOOR = 1e-6
"""Added to each action's variance (SB3's epsilon): a row whose features are all zero keeps a density."""


def sde_log_std(features: Tensor, log_std: Tensor) -> Tensor:
    """log sigma(s) [B, A] from the features [B, latent] (held out of the gradient) and `log_std` [latent, A]."""
    variance = (features.detach() ** 2) @ torch.exp(2.0 * log_std)
    return 0.5 * torch.log(variance + VARIANCE_FLOOR)


def sde_log_std_numpy(features: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """`sde_log_std` in numpy (acting on CPU)."""
    return 0.5 * np.log((features * features) @ np.exp(2.0 * log_std) + VARIANCE_FLOOR)


def sde_log_std_grad(features: Tensor, row_log_std: Tensor, g_row_log_std: Tensor, log_std: Tensor) -> Tensor:
    """d(loss)/d(log_std) [latent, A] from d(loss)/d(log sigma(s)) per row [B, A]:
    d log sigma_bk / d log_std_jk = phi_bj^2 S_jk^2 / sigma_bk^2."""
    return ((features * features).T @ (g_row_log_std * torch.exp(-2.0 * row_log_std))) * torch.exp(2.0 * log_std)


def exploration_matrices(log_std: Tensor, standard: Tensor) -> Tensor:
    """The weights W = S * Z [..., latent, A] of standard normal draws Z [..., latent, A]."""
    return torch.exp(log_std) * standard


def standardized_noise(features: Tensor, matrices: Tensor, row_log_std: Tensor) -> Tensor:
    """(phi(s) W) / sigma(s) [B, A], each row with its env's matrix [B, latent, A]: the standard normal draw that
    the heads' `sample(mean, log sigma(s), noise=...)` turns into a = mean + phi(s) W."""
    offset = torch.bmm(features.unsqueeze(1), matrices).squeeze(1)
    return offset * torch.exp(-row_log_std)


def standardized_noise_numpy(features: np.ndarray, matrices: np.ndarray, row_log_std: np.ndarray) -> np.ndarray:
    """`standardized_noise` in numpy."""
    return np.matmul(features[:, None, :], matrices)[:, 0] * np.exp(-row_log_std)
