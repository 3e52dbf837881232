"""Acting by drawing candidate actions from a generative actor and choosing one with a critic (IDQL, Diffusion-QL,
EDP, consistency actor-critic; CRR's critic-weighted policy over its Gaussian actor's draws; BEAR's best of its
tanh-Gaussian's draws).

for a batch of states s [B]:
    a_{b,1} .. a_{b,N} ~ mu(. | s_b)                 N candidates per state: one head call on B x N rows
    q_{b,i} = min_k Q_k(s_b, a_{b,i})                 one batched critic call
    greedy:     i = argmax_i q_{b,i}                                     (IDQL's released evaluation)
    softmax:    i ~ Categorical(softmax(q_{b,.} / temperature))          (Diffusion-QL's, EDP's: temperature 1)
    expectile:  i ~ Categorical(w_{b,.}),  w_i = |tau - 1(q_i - V(s) < 0)| / |q_i - V(s)|
                (IDQL, Hansen-Estruch et al. 2023, arXiv:2304.10573, eq. 8: the policy implied by the expectile
                loss is mu(a|s) times these weights; its released code drops the 1 / |q - V| factor)
With N = 1 the action is the actor's own draw (for IDQL: the behaviour model alone, plain diffusion BC).

The module holds what acting needs (the actor, the critic and, for `expectile`, V), so a checkpoint's `policy/`
tensors are enough for `pl.load(run).act(obs)`; the algorithms keep the rest (the trained actor when acting uses
an EMA copy, the online critic when acting uses the target copy) in their `modules`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from policylab.nets.critics import ContinuousCritic, GaussianActor, TanhGaussianActor, scale_to_bounds
from policylab.nets.generative import GenerativeActor

SELECTIONS = ("greedy", "softmax", "expectile")


def selection_probs(
    q: Tensor, v: Tensor | None, selection: str, expectile: float = 0.7, temperature: float = 1.0
) -> Tensor:
    """The categorical over N candidates [B, N] from their values q [B, N] (and V(s) [B] for `expectile`)."""
    if selection == "greedy":
        return torch.nn.functional.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
    if selection == "softmax":
        return torch.softmax(q / temperature, -1)
    if selection == "expectile":
        if v is None:
            raise ValueError("expectile selection needs V(s)")
        adv = q - v.unsqueeze(-1)
        w = (expectile - (adv < 0).to(q.dtype)).abs() / adv.abs().clamp_min(1e-6)
        return w / w.sum(-1, keepdim=True)
    raise ValueError(f"unknown selection {selection!r}: use one of {', '.join(SELECTIONS)}")


class CriticSelectedActor(nn.Module):
    """A generative actor whose action is one of `candidates` draws, chosen by the critic (module docstring)."""

    def __init__(
        self,
        actor: GenerativeActor | GaussianActor | TanhGaussianActor,
        critic: ContinuousCritic,
        value: nn.Module | None = None,
        candidates: int = 64,
        selection: str = "expectile",
        eval_selection: str = "greedy",
        expectile: float = 0.7,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(actor, GenerativeActor) and actor.horizon != 1:
            raise ValueError("candidate selection scores single actions: horizon must be 1")
        for s in (selection, eval_selection):
            if s not in SELECTIONS or (s == "expectile" and value is None):
                raise ValueError(f"selection {s!r} is not one of {', '.join(SELECTIONS)} (expectile needs a V)")
        self.actor, self.critic, self.value = actor, critic, value
        self.candidates = candidates
        self.selection, self.eval_selection = selection, eval_selection
        """The rule when sampling (online exploration, `deterministic=False`) and when evaluating."""
        self.expectile, self.temperature = expectile, temperature

    def act(self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
        """Actions [B, A] in [-1, 1]: N candidates per state from the actor, one chosen per state."""
        b, n = obs.shape[0], self.candidates
        obs = obs.flatten(1)
        repeated = obs.repeat_interleave(n, 0)  # [B N, O], the N candidates of a state adjacent
        draws = self.draw(repeated, generator)  # [B N, A]
        if n == 1:
            return draws
        q = self.critic(repeated, draws).min(0).values.view(b, n)
        v = None if self.value is None else self.value(obs)[0, :, 0]
        rule = self.eval_selection if deterministic else self.selection
        probs = selection_probs(q, v, rule, self.expectile, self.temperature)
        if rule == "greedy":
            index = probs.argmax(-1)
        else:
            index = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return draws.view(b, n, -1)[torch.arange(b, device=obs.device), index]

    def draw(self, obs: Tensor, generator: torch.Generator | None) -> Tensor:
        """One action per row of `obs` from the actor (a tanh-Gaussian's sample without its log-probability)."""
        actor = self.actor
        if isinstance(actor, GenerativeActor):
            return actor.head.sample(obs, generator)
        if isinstance(actor, TanhGaussianActor):
            return actor.sample(obs, generator)[0]
        return actor.sample(obs, generator)

    def forward(self, obs: Tensor) -> Tensor:
        return self.act(obs, None, True)

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        return scale_to_bounds(self.act(obs, generator, deterministic), self.actor.low, self.actor.high)

    def to_env_numpy(self, squashed: np.ndarray) -> np.ndarray:
        return self.actor.to_env_numpy(squashed)
