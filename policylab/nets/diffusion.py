"""DDPM policy head: epsilon-prediction training, DDPM / DDIM sampling, and every denoising step as a Gaussian.

Training (Ho et al. 2020, arXiv:2006.11239, Algorithm 1), T steps t = 0 .. T-1, abar_t = prod_{s<=t} (1 - beta_s):
    x0 = the data (an action or a chunk, in [-1, 1]),  t ~ U{0 .. T-1},  eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = mean_dims (eps_theta(obs, x_t, t) - eps)^2                                   (per sample, [B])
beta: "cosine" (Nichol & Dhariwal 2021: abar(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), beta <= 0.999, as
DPPO and Diffusion Policy use) or "linear" (1e-4 .. 0.02 scaled by 1000 / T, as DDPM; IDQL uses few steps).

Sampling (DDIM, Song et al. 2021, arXiv:2010.02502, eq. 12) over K of the T steps tau_K > ... > tau_1 = 0 (evenly
spaced; abar_prev = 1 after tau_1), from x ~ N(0, I):
    x0_hat  = clip((x - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), -1, 1)
    eps_hat = (x - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)                    (the noise consistent with the clip)
    sigma   = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    x_prev  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,   z ~ N(0, I)
eta = 1 with K = T is DDPM's ancestral sampler exactly (mean = the posterior mean of q(x_{t-1} | x_t, x0_hat),
sigma^2 = its variance beta_t (1 - abar_{t-1}) / (1 - abar_t)); eta = 0 is the deterministic DDIM. The action is
x_0 clipped to [-1, 1].

DPPO (Ren et al. 2024, arXiv:2409.00588) treats each step as a Gaussian policy pi(x_prev | x, obs) =
N(mean, std^2) with std = max(sigma, min_std) (DDIM's eta = 0 steps have sigma = 0: min_std makes them
stochastic; DPPO's min_sampling / min_logprob denoising std, 0.1). `sample_chain` draws a chain with those stds
and returns its per-step log-probs; `chain_log_prob` recomputes them under the current weights:
    log pi_k = sum_dims log N(x_{k+1}; mean_k(x_k, obs), std_k^2),  k = 0 .. K-1     ([K, B])
(the chain holds the unclipped x's; the action is chain[-1] clipped to [-1, 1].)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from policylab.nets.denoiser import Denoiser

_LOG_2PI = math.log(2.0 * math.pi)


def beta_schedule(kind: str, steps: int) -> Tensor:
    """beta_t for t = 0 .. steps - 1 (float64): "cosine" or "linear"."""
    if kind == "cosine":
        s = 0.008
        x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
        abar = torch.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
        abar = abar / abar[0]
        return (1.0 - abar[1:] / abar[:-1]).clamp(max=0.999)
    if kind == "linear":
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), steps, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}: use cosine or linear")


def step_indices(train_steps: int, steps: int) -> Tensor:
    """The K = `steps` training steps a sampler visits, descending and ending at 0 (K = T: all of them)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"sampling steps={steps} must be in 1 .. {train_steps} (the training steps)")
    return torch.linspace(train_steps - 1, 0, steps, dtype=torch.float64).round().long()


def ve_sigmas(schedule: str, train_steps: int) -> list[float]:
    """The noise levels of a DDPM's T steps in variance-exploding form, sigma_t = sqrt((1 - abar_t) / abar_t), since
    x_t / sqrt(abar_t) = x0 + sigma_t eps: a consistency head distilled from such a DDPM takes them as its grid."""
    abar = torch.cumprod(1.0 - beta_schedule(schedule, train_steps), 0)
    return ((1.0 - abar) / abar).sqrt().tolist()


class DiffusionHead(nn.Module):
    """A DDPM over x in R^D (D = horizon * act_dim) conditioned on obs; see the module docstring."""

    abar: Tensor

    def __init__(
        self,
        denoiser: Denoiser,
        train_steps: int = 20,
        schedule: str = "cosine",
        sample_steps: int | None = None,
        eta: float = 0.0,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.dim = denoiser.x_dim
        self.train_steps = train_steps
        self.sample_steps = train_steps if sample_steps is None else sample_steps
        """K, the default number of sampling steps (DDIM with K < T)."""
        self.eta = eta
        """The default DDIM eta (0: deterministic steps, 1: DDPM's ancestral noise)."""
        step_indices(train_steps, self.sample_steps)  # checks K
        self._step_levels: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        abar = torch.cumprod(1.0 - beta_schedule(schedule, train_steps), 0)
        self.register_buffer("abar", abar.float(), persistent=False)  # derived from the config: not saved
        self.abar_host: list[float] = abar.tolist()
        """The same numbers on the host: the sampler's per-step scalars cost no device syncs."""

    # --- training -----------------------------------------------------------------------------------------------

    def loss(self, obs: Tensor, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample epsilon-prediction loss [B] at random steps and noise."""
        t = torch.randint(self.train_steps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.per_sample_loss(obs, x0, noise, t)

    def per_sample_loss(self, obs: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """mean_dims (eps_theta(obs, x_t, t) - noise)^2 with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: [B]."""
        abar = self.abar[t].unsqueeze(-1)
        x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
        return (self.eps(obs, x_t, t) - noise).pow(2).mean(-1)

    def eps(self, obs: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """eps_theta(obs, x, t): t [B] or a scalar step index."""
        return self.denoiser(obs, x, t.to(x.dtype) / self.train_steps)

    # --- one step -------------------------------------------------------------------------------------------------

    def step_mean_std(self, obs: Tensor, x: Tensor, t: int, t_prev: int, eta: float) -> tuple[Tensor, float]:
        """The mean [B, D] and sigma of x_prev given x at step t (t_prev = -1: the last step, abar_prev = 1)."""
        abar_t = self.abar_host[t]
        abar_prev = self.abar_host[t_prev] if t_prev >= 0 else 1.0
        eps = self.denoiser(obs, x, self._step_level(t, x))
        x0 = ((x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1.0, 1.0)
        eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        direction = math.sqrt(max(1.0 - abar_prev - sigma * sigma, 0.0))
        return math.sqrt(abar_prev) * x0 + direction * eps, sigma

    def _step_level(self, t: int, x: Tensor) -> Tensor:
        """t / T as `eps` computes it from a step index, kept per step: three calls fewer per sampling step."""
        key = (t, x.device, x.dtype)
        level = self._step_levels.get(key)
        if level is None:
            level = self._step_levels[key] = torch.tensor(t, device=x.device).to(x.dtype) / self.train_steps
        return level

    def _schedule(self, steps: int | None) -> list[tuple[int, int]]:
        """(t, t_prev) pairs of a K-step sampler, as Python ints (a short host-side list, no device syncs)."""
        ts = step_indices(self.train_steps, self.sample_steps if steps is None else steps).tolist()
        return list(zip(ts, [*ts[1:], -1]))

    # --- sampling ----------------------------------------------------------------------------------------------------

    def sample(
        self,
        obs: Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        deterministic: bool = False,
        eta: float | None = None,
    ) -> Tensor:
        """Actions [B, D] in [-1, 1] by K-step DDIM (eta) from x ~ N(0, I); `deterministic`: x = 0 and eta = 0, a
        fixed function of obs (on multimodal data it can fall between the modes)."""
        eta = self.eta if eta is None else eta
        shape = (obs.shape[0], self.dim)
        x = torch.zeros(shape, device=obs.device) if deterministic else self._noise(shape, obs, generator)
        for t, t_prev in self._schedule(steps):
            mean, sigma = self.step_mean_std(obs, x, t, t_prev, 0.0 if deterministic else eta)
            x = mean if sigma == 0.0 or t_prev < 0 else mean + sigma * self._noise(shape, obs, generator)
        return x.clamp(-1.0, 1.0)

    def sample_chain(
        self,
        obs: Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        eta: float | None = None,
        min_std: float = 0.1,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """A denoising chain [K + 1, B, D] (chain[0] ~ N(0, I); every step x_prev ~ N(mean, max(sigma, min_std)^2))
        and its per-step log-probs [K, B]. The action is chain[-1].clamp(-1, 1). `noise` [K + 1, B, D]: pre-drawn
        standard normals (the start, then each step's z; an on-policy rollout draws them all in one call)."""
        eta = self.eta if eta is None else eta
        schedule = self._schedule(steps if noise is None else noise.shape[0] - 1)
        shape = (obs.shape[0], self.dim)
        chain = torch.empty((len(schedule) + 1, *shape), device=obs.device)
        log_probs = torch.empty((len(schedule), obs.shape[0]), device=obs.device)
        chain[0] = self._noise(shape, obs, generator) if noise is None else noise[0]
        for k, (t, t_prev) in enumerate(schedule):
            mean, sigma = self.step_mean_std(obs, chain[k], t, t_prev, eta)
            std = max(sigma, min_std)
            z = self._noise(shape, obs, generator) if noise is None else noise[k + 1]
            chain[k + 1] = mean + std * z
            log_probs[k] = gaussian_log_prob_of_noise(z, std)
        return chain, log_probs

    def chain_log_prob(self, obs: Tensor, chain: Tensor, eta: float | None = None, min_std: float = 0.1) -> Tensor:
        """log pi_k(chain[k + 1] | chain[k], obs) [K, B] under the current weights (K = len(chain) - 1 steps; the
        same eta and min_std as the chain was sampled with). Differentiable: DPPO's ratio is exp(new - old).

        All K steps in one denoiser call on [K * B] rows (the chain is known, so the steps need not wait for each
        other): `step_mean_std`'s arithmetic with per-step coefficients as [K, 1, 1] tensors."""
        eta = self.eta if eta is None else eta
        steps, rows, dim = chain.shape[0] - 1, chain.shape[1], chain.shape[2]
        coefficients = [self._step_coefficients(t, t_prev, eta, min_std) for t, t_prev in self._schedule(steps)]
        c = torch.tensor(coefficients, dtype=chain.dtype, device=chain.device).T.reshape(6, steps, 1, 1)
        root_abar, root_one_minus, root_abar_prev, direction, std, t = c
        x = chain[:-1]
        eps = self.eps(obs.repeat(steps, *([1] * (obs.dim() - 1))), x.reshape(steps * rows, dim),
                       t.reshape(steps).repeat_interleave(rows)).view(steps, rows, dim)  # fmt: skip
        x0 = ((x - root_one_minus * eps) / root_abar).clamp(-1.0, 1.0)
        eps = (x - root_abar * x0) / root_one_minus
        z = (chain[1:] - (root_abar_prev * x0 + direction * eps)) / std
        return -0.5 * z.pow(2).sum(-1) - dim * (std.reshape(steps, 1).log() + 0.5 * _LOG_2PI)

    def _step_coefficients(self, t: int, t_prev: int, eta: float, min_std: float) -> tuple[float, ...]:
        """sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), the direction's weight, max(sigma, min_std) and t:
        the numbers of `step_mean_std` for one step, as host floats."""
        abar_t = self.abar_host[t]
        abar_prev = self.abar_host[t_prev] if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        direction = math.sqrt(max(1.0 - abar_prev - sigma * sigma, 0.0))
        root = math.sqrt
        return root(abar_t), root(1.0 - abar_t), root(abar_prev), direction, max(sigma, min_std), float(t)

    @staticmethod
    def _noise(shape: tuple[int, int], like: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn(shape, generator=generator, device=like.device)


def gaussian_log_prob_of_noise(z: Tensor, std: float) -> Tensor:
    """sum_dims log N(mean + std z; mean, std^2) = sum_dims (-z^2 / 2 - log std - log(2 pi) / 2): [B]."""
    return -0.5 * z.pow(2).sum(-1) - z.shape[-1] * (math.log(std) + 0.5 * _LOG_2PI)
