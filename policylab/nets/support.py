"""Policies kept on the support of the dataset's behaviour: they only choose actions a model of the behaviour
policy finds likely. The acting networks of BCQ (Fujimoto et al. 2019) and PLAS (Zhou et al. 2020).

Box actions (`PerturbedVAEActor`): N candidates per state from a conditional VAE of the dataset's actions, each moved
by at most +-phi by a perturbation network, the one with the highest Q_1 taken:
    a_i = clip(D(s, z_i) + phi tanh(xi(s, D(s, z_i))), -1, 1),  z_i ~ N(0, I) clipped to +-0.5
    pi(s) = argmax_i Q_1(s, a_i)
Discrete actions (`ImitationFilteredQNetwork`): a Q-network and a behaviour-cloning classifier G(a|s); the greedy
action is the best of the actions whose probability is within a factor `threshold` of the likeliest one:
    pi(s) = argmax over {a : G(a|s) / max_a' G(a'|s) > threshold} of Q(s, a)
PLAS (`LatentPolicyActor`): a deterministic policy in the VAE's latent space, decoded into an action (PLAS+P: then
perturbed as BCQ's candidates are):
    pi(s) = D(s, max_latent tanh(f(s)))      (with perturbation: clip(a + phi tanh(xi(s, a)), -1, 1) of it)

Each holds what acting needs (BCQ's VAE, perturbation network and critics; PLAS's latent policy, VAE and perturbation
network; the Q-network and its classifier), so a checkpoint's `policy/` tensors are enough for `pl.load(run).act(obs)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from policylab.nets.cnn import ImageEncoder, flat_features
from policylab.nets.critics import (
    ContinuousCritic,
    QNetwork,
    _BoundedActor,
    masked_greedy,
    sampled_greedy,
    scale_to_bounds,
)
from policylab.nets.mlp import StackedMLP
from policylab.nets.vae import ConditionalVAE
from policylab.objectives.q_targets import MASKED_Q


class Perturbation(nn.Module):
    """xi(s, a): a -> clip(a + phi tanh(f(s, a)), -1, 1), a move of at most phi in [-1, 1] action units."""

    def __init__(
        self, obs_dim: int, act_dim: int, scale: float, hidden_sizes: Sequence[int], activation: str = "relu"
    ) -> None:
        super().__init__()
        self.scale = scale
        self.body = StackedMLP(1, obs_dim + act_dim, hidden_sizes, act_dim, activation)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        moved = torch.tanh(self.body(torch.cat([obs.flatten(1), actions], -1))[0])
        return (actions + self.scale * moved).clamp(-1.0, 1.0)


class PerturbedVAEActor(_BoundedActor):
    """BCQ's policy for Box actions (module docstring): the VAE, the perturbation network and the critics."""

    def __init__(
        self,
        vae: ConditionalVAE,
        perturbation: Perturbation,
        critic: ContinuousCritic,
        low: Tensor,
        high: Tensor,
        candidates: int = 10,
        latent_clip: float = 0.5,
    ) -> None:
        super().__init__(low, high)
        self.vae, self.perturbation, self.critic = vae, perturbation, critic
        self.candidates, self.latent_clip = candidates, latent_clip

    def propose(self, obs: Tensor, generator: torch.Generator | None, perturbation: nn.Module | None = None) -> Tensor:
        """One perturbed VAE draw per row of `obs` [N, ...] -> [N, A] (`perturbation`: e.g. a target copy)."""
        drawn = self.vae.sample(obs, generator, self.latent_clip)
        return (perturbation or self.perturbation)(obs, drawn)

    def act(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Actions [B, A] in [-1, 1]: the candidate with the highest Q_1 of each state's N."""
        b, n = len(obs), self.candidates
        repeated = obs.flatten(1).repeat_interleave(n, 0)  # [B N, O], a state's candidates adjacent
        proposals = self.propose(repeated, generator)
        q = self.critic(repeated, proposals, members=1)[0].view(b, n)
        return proposals.view(b, n, -1)[torch.arange(b, device=obs.device), q.argmax(-1)]

    def forward(self, obs: Tensor) -> Tensor:
        return self.act(obs)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """The same rule either way: BCQ's greedy choice is random through its VAE draws."""
        return scale_to_bounds(self.act(obs, generator), self.low, self.high)


class LatentPolicyActor(_BoundedActor):
    """PLAS's policy for Box actions (module docstring): the latent policy, the VAE and, for PLAS+P, the
    perturbation network."""

    def __init__(
        self,
        obs_dim: int,
        vae: ConditionalVAE,
        low: Tensor,
        high: Tensor,
        hidden_sizes: Sequence[int],
        activation: str = "relu",
        max_latent: float = 2.0,
        perturbation: Perturbation | None = None,
    ) -> None:
        super().__init__(low, high)
        self.vae, self.perturbation, self.max_latent = vae, perturbation, max_latent
        self.latent = StackedMLP(1, obs_dim, hidden_sizes, vae.latent_dim, activation)

    def act_with(self, obs: Tensor, latent: nn.Module, perturbation: nn.Module | None) -> Tensor:
        """pi(s) [B, A] with the given latent policy and perturbation networks (the online or the target ones)."""
        obs = obs.flatten(1)
        z = self.max_latent * torch.tanh(latent(obs)[0])
        actions = self.vae.decode(obs, z)
        return actions if perturbation is None else perturbation(obs, actions)

    def forward(self, obs: Tensor) -> Tensor:
        return self.act_with(obs, self.latent, self.perturbation)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        return scale_to_bounds(self(obs), self.low, self.high)


def filter_bias(logits: Tensor, threshold: float) -> Tensor:
    """0 for the actions with G(a|s) / max_a' G(a'|s) > threshold (the likeliest always), MASKED_Q for the others,
    [B, A] (logits in)."""
    log_ratio = logits - logits.amax(-1, keepdim=True)  # log G(a|s) - log max G: the softmax's normalizer cancels
    if threshold <= 0:
        return torch.zeros_like(logits)
    allowed = (log_ratio > math.log(threshold)) | (log_ratio == 0)
    return torch.where(allowed, 0.0, MASKED_Q).to(logits.dtype)


def filtered_greedy(q: Tensor, logits: Tensor, threshold: float, logit_bias: Tensor | None = None) -> Tensor:
    """argmax of Q(s, .) [B, A] over the actions the classifier's `logits` [B, A] allow (and action masks'
    `logit_bias`, where given): discrete BCQ's greedy action, [B]."""
    bias = filter_bias(logits, threshold)
    return masked_greedy(q, bias if logit_bias is None else bias + logit_bias)  # type: ignore[no-any-return]


class ImitationFilteredQNetwork(QNetwork):
    """Discrete BCQ's Q-network: QNetwork's Q(s, .) (what `forward` returns, as DQN's losses read it) and a
    classifier of the dataset's actions on the same features (the image encoder is shared, as in BCQ's Atari
    networks); acting takes the filtered greedy action (module docstring). The classifier is the second member of
    the MLP (an MLP of the Q-network's sizes, as the authors' networks), so each layer of both is one product;
    with dueling heads its first output column is unused."""

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "relu",
        dueling: bool = False,
        encoder: ImageEncoder | None = None,
        sample_epsilon: float = 0.0,
        threshold: float = 0.3,
    ) -> None:
        super().__init__(obs_dim, n_actions, hidden_sizes, activation, dueling, members=2, encoder=encoder,
                         sample_epsilon=sample_epsilon)  # fmt: skip
        self.threshold = threshold

    def forward(self, obs: Tensor) -> Tensor:
        """Q(s, .) alone, [1, B, A] (the classifier's member is not computed)."""
        return self.values(self.body(flat_features(self.encoder, obs), members=1))

    def values_and_logits(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Q(s, .) [1, B, A] and the classifier's logits [B, A], in one pass of both members."""
        y = self.body(flat_features(self.encoder, obs))
        return self.values(y[:1]), y[1, :, -self.n_actions :]

    def greedy_numpy(self, obs: np.ndarray, logit_bias: np.ndarray | None = None) -> np.ndarray:
        y = torch.from_numpy(self.body.numpy_forward(obs.reshape(len(obs), -1)))
        values = y[0, :, 1:] if self.dueling else y[0]  # the dueling mean does not move the argmax
        bias = None if logit_bias is None else torch.from_numpy(logit_bias)
        return filtered_greedy(values, y[1, :, -self.n_actions :], self.threshold, bias).numpy()

    def env_action(
        self,
        obs: Tensor,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        """The filtered greedy action; not `deterministic`: a uniform one (among the allowed actions, with action
        masks' `logit_bias`) with probability `sample_epsilon`."""
        q, logits = self.values_and_logits(obs)
        greedy = filtered_greedy(q[0], logits, self.threshold, logit_bias)
        if deterministic:
            return greedy
        return sampled_greedy(greedy, self.n_actions, self.sample_epsilon, generator, logit_bias)
