"""Consistency policy head: one-step (or few-step) sampling, learned by consistency training.

Consistency models (Song et al. 2023, arXiv:2303.01469) map a noised point x = a + sigma z of the
probability-flow ODE straight to its end a. Parameterized with EDM's scalings (Karras et al. 2022) so that
f(x, sigma_min) = x:
    f(obs, x, sigma) = c_skip x + c_out F_theta(obs, c_in x, s),
    s = log(sigma / sigma_min) / log(sigma_max / sigma_min),
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),  sd = 0.5 (the data's std)
on the Karras grid sigma_i = (sigma_min^(1/rho) + i / (N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
i = 0 .. N-1, rho = 7.

Training is consistency training (CT: no teacher model; Algorithm 3 of Song et al.), with the choices of improved
CT (Song & Dhariwal 2023, arXiv:2310.14189): the target is the same network without gradient (no EMA copy),
a pseudo-Huber distance, noise levels drawn from a discretized log-normal, weights 1 / (sigma_{n+1} - sigma_n):
    n ~ p(n) proportional to erf((log sigma_{n+1} - Pm) / (sqrt 2 Ps)) - erf((log sigma_n - Pm) / (sqrt 2 Ps)),
        Pm = -1.1, Ps = 2.0,  n = 0 .. N-2;   z ~ N(0, I)
    loss = d(f(obs, a + sigma_{n+1} z, sigma_{n+1}), stopgrad f(obs, a + sigma_n z, sigma_n)) / (sigma_{n+1} - sigma_n)
    d(u, v) = sqrt(|u - v|^2 + c^2) - c,  c = 0.00054 sqrt(D)                          (per sample, [B])
This is how Ding & Jin (2024, arXiv:2309.16984, "Consistency Models as a Rich and Efficient Policy Class") train
their consistency behaviour-cloning policy. `loss_kind="ct"` is the original CT of Song et al. instead: levels
n ~ U{0 .. N-2}, the squared distance |f(obs, a + sigma_{n+1} z, sigma_{n+1}) - stopgrad f(obs, a + sigma_n z,
sigma_n)|^2 with weight 1. Its gradient shrinks as the two outputs agree, where the pseudo-Huber distance with a
small c behaves like |u - v| and keeps a gradient of about 1 / (sigma_{n+1} - sigma_n) per sample however close
they are: next to a Q term (Consistency-AC) that gradient drowns the critic's (measured on a mixed Pendulum dataset,
tests/test_expressive_offline.py). Consistency distillation from a trained DiffusionHead (`distillation_loss`)
takes the teacher's own levels sigma_t = sqrt((1 - abar_t) / abar_t) as the grid and one deterministic DDIM step
of the teacher as the ODE step.

Sampling (Algorithm 1): a = f(obs, sigma_max z, sigma_max); with K > 1 steps, for each of K - 1 lower levels
sigma (evenly spaced on the grid): a = f(obs, a + sqrt(sigma^2 - sigma_min^2) z, sigma). The action is a clipped
to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from policylab.nets.denoiser import Denoiser
from policylab.nets.diffusion import DiffusionHead

SIGMA_DATA = 0.5
RHO = 7.0
P_MEAN, P_STD = -1.1, 2.0
CONSISTENCY_LOSSES = ("ict", "ct")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = RHO) -> Tensor:
    """The N noise levels sigma_0 = sigma_min < ... < sigma_{N-1} = sigma_max (float64)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + ramp * (hi - lo)) ** rho


class ConsistencyHead(nn.Module):
    """A consistency function over x in R^D conditioned on obs; see the module docstring."""

    sigmas: Tensor
    level_probs: Tensor

    def __init__(
        self,
        denoiser: Denoiser,
        scales: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sample_steps: int = 1,
        loss_kind: str = "ict",
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """`sigmas`: an explicit increasing grid instead of Karras's (then scales, sigma_min and sigma_max are its own):
        a distilled head takes its teacher's levels (`diffusion.ve_sigmas`)."""
        super().__init__()
        if sigmas is not None:
            scales, sigma_min, sigma_max = len(sigmas), float(sigmas[0]), float(sigmas[-1])
        if scales < 2 or not 0.0 < sigma_min < sigma_max or sample_steps < 1 or loss_kind not in CONSISTENCY_LOSSES:
            raise ValueError(f"need scales >= 2, 0 < sigma_min < sigma_max, sample_steps >= 1, loss_kind in "
                             f"{CONSISTENCY_LOSSES}; got {scales}, {sigma_min}, {sigma_max}, {sample_steps}, "
                             f"{loss_kind!r}")  # fmt: skip
        self.loss_kind = loss_kind
        self.denoiser = denoiser
        self.dim = denoiser.x_dim
        self.scales, self.sigma_min, self.sigma_max = scales, sigma_min, sigma_max
        self.sample_steps = sample_steps
        grid = (
            karras_sigmas(sigma_min, sigma_max, scales) if sigmas is None else torch.tensor(sigmas, dtype=torch.float64)
        )
        if sigmas is not None and not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("sigmas must increase")
        cdf = torch.erf((grid.log() - P_MEAN) / (math.sqrt(2.0) * P_STD))
        self.register_buffer("sigmas", grid.float(), persistent=False)
        self.register_buffer("level_probs", (cdf[1:] - cdf[:-1]).float(), persistent=False)
        self.sigmas_host: list[float] = grid.tolist()
        self.huber_c = 0.00054 * math.sqrt(self.dim)

    def consistency(self, obs: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        """f(obs, x, sigma) [B, D]; sigma [B], a scalar tensor, or a float (one level for all rows: the scalings are
        computed on the host and the level's embedding is cached, the sampler's case)."""
        if isinstance(sigma, float):
            return self._consistency_at_level(obs, x, sigma)
        sigma = sigma.to(x.dtype).expand(x.shape[0]) if sigma.dim() == 0 else sigma.to(x.dtype)
        sd2 = SIGMA_DATA * SIGMA_DATA
        c_skip = sd2 / ((sigma - self.sigma_min).pow(2) + sd2)
        c_out = SIGMA_DATA * (sigma - self.sigma_min) / (sd2 + sigma * sigma).sqrt()
        c_in = 1.0 / (sigma * sigma + sd2).sqrt()
        s = (sigma / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)
        out = self.denoiser(obs, c_in.unsqueeze(-1) * x, s)
        return c_skip.unsqueeze(-1) * x + c_out.unsqueeze(-1) * out

    def _consistency_at_level(self, obs: Tensor, x: Tensor, sigma: float) -> Tensor:
        sd2 = SIGMA_DATA * SIGMA_DATA
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = SIGMA_DATA * (sigma - self.sigma_min) / math.sqrt(sd2 + sigma * sigma)
        c_in = 1.0 / math.sqrt(sigma * sigma + sd2)
        level = math.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        out = self.denoiser(obs, c_in * x, torch.tensor(level, dtype=x.dtype, device=x.device))
        return torch.add(c_out * out, x, alpha=c_skip)

    def loss(self, obs: Tensor, a: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample consistency-training loss [B] at random levels and noise."""
        if self.loss_kind == "ict":
            n = torch.multinomial(self.level_probs, a.shape[0], replacement=True, generator=generator)
        else:
            n = torch.randint(self.scales - 1, (a.shape[0],), generator=generator, device=a.device)
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        return self.per_sample_loss(obs, a, noise, n)

    def per_sample_loss(self, obs: Tensor, a: Tensor, noise: Tensor, n: Tensor) -> Tensor:
        """The loss [B] at given noise [B, D] and level indices n [B] (in 0 .. N-2)."""
        lo, hi = self.sigmas[n], self.sigmas[n + 1]
        student = self.consistency(obs, a + hi.unsqueeze(-1) * noise, hi)
        with torch.no_grad():
            target = self.consistency(obs, a + lo.unsqueeze(-1) * noise, lo)
        squared = (student - target).pow(2).sum(-1)
        if self.loss_kind == "ct":
            return squared
        return ((squared + self.huber_c**2).sqrt() - self.huber_c) / (hi - lo)

    def distillation_loss(
        self,
        obs: Tensor,
        a: Tensor,
        teacher: DiffusionHead,
        generator: torch.Generator | None = None,
        target: ConsistencyHead | None = None,
    ) -> Tensor:
        """Consistency distillation (Song et al. 2023, Algorithm 2) from a DDPM teacher whose levels this head's grid
        is (`ve_sigmas`): per sample [B], with n ~ U{0 .. N-2}, z ~ N(0, I), x = a + sigma_{n+1} z,
            x^_n = x0 + sigma_n (x - x0) / sigma_{n+1},  x0 = the teacher's clipped estimate of a at step n + 1
        (one deterministic DDIM step of the teacher, read in the variance-exploding coordinates x = x_t / sqrt(abar_t)),
            loss = |f(obs, x, sigma_{n+1}) - stopgrad f-(obs, x^_n, sigma_n)|^2,
        f- the `target` head (an EMA copy of this one, as Song et al.) or this one."""
        n = torch.randint(self.scales - 1, (a.shape[0],), generator=generator, device=a.device)
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        lo, hi = self.sigmas[n].unsqueeze(-1), self.sigmas[n + 1].unsqueeze(-1)
        x = a + hi * noise
        with torch.no_grad():
            abar = teacher.abar[n + 1].unsqueeze(-1)
            x_t = x * abar.sqrt()
            x0 = ((x_t - (1.0 - abar).sqrt() * teacher.eps(obs, x_t, n + 1)) / abar.sqrt()).clamp(-1.0, 1.0)
            goal = (self if target is None else target).consistency(obs, x0 + lo * (x - x0) / hi, lo[:, 0])
        return (self.consistency(obs, x, hi[:, 0]) - goal).pow(2).sum(-1)

    def sample(
        self,
        obs: Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """Actions [B, D] in [-1, 1] in K = `steps` evaluations (default `sample_steps`, 1); `deterministic`: z = 0."""
        k_steps = self.sample_steps if steps is None else steps
        shape = (obs.shape[0], self.dim)
        levels = torch.linspace(self.scales - 1, 0, k_steps + 1)[:-1].round().long().tolist()
        a = torch.zeros(shape, device=obs.device)
        for k, i in enumerate(levels):
            sigma = self.sigmas_host[i]
            spread = sigma if k == 0 else math.sqrt(max(sigma * sigma - self.sigma_min**2, 0.0))
            z = (
                torch.zeros(shape, device=obs.device)
                if deterministic
                else torch.randn(shape, generator=generator, device=obs.device)
            )
            a = self.consistency(obs, a + spread * z, sigma)
        return a.clamp(-1.0, 1.0)
