"""Fitted Q evaluation (Le, Voloshin & Yue 2019): Q^pi of the evaluation policy regressed on a dataset with the
off-policy family's critics and replay `Batch`, then the direct method's value mean_i V(s_0^i).

    Q(s, a) <- r + gamma (1 - terminated) E_{a' ~ pi(.|s')} Q_target(s', a')

Discrete actions: a `QNetwork` (one output per action) and the exact expectation sum_a' pi(a'|s') Q(s', a').
Box actions: a `ContinuousCritic` on [-1, 1] actions and the mean over `action_samples` draws of pi. The target
network follows by Polyak averaging (`tau`). Rewards can be scaled for the regression (`reward_scale`, undone
in every value it returns), which keeps the Q targets of long-horizon tasks near unit scale.

The regression step has the gradient written by hand (`_regression_step`: d mean_B (Q - y)^2 / dQ = 2 (Q - y) / B
at the logged action, back through the critic's `StackedMLP`), as the off-policy algorithms' fused updates do:
the same step as autograd's (tests/test_ope.py) without building a graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor

from policylab.data.dataset import Dataset
from policylab.data.sources import dataset_buffer
from policylab.errors import ConfigError
from policylab.nets.critics import ContinuousCritic, QNetwork
from policylab.nets.mlp import StackedMLP
from policylab.ope.policies import TargetPolicy
from policylab.optim import Adam
from policylab.runtime import flush_denormals


@dataclass
class FQEConfig:
    steps: int = 5_000
    batch_size: int = 256
    lr: float = 1e-3
    """1e-3 reached a logged CartPole value within 3% in 6000 steps, 3e-4 needed about 15000
    (`benchmarks/ope.py --fqe`)."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    tau: float = 0.02
    """Polyak rate of the target critic: each target is one application of the Bellman operator, so it must
    move fast enough for about a horizon's worth of them within the step budget."""
    action_samples: int = 4
    """Box actions: draws of pi per next state (targets) and per state (V)."""
    reward_scale: float = 1.0
    seed: int = 0
    threads: int = 1

    def validate(self) -> None:
        """A ConfigError naming the field, its rule, its `policylab ope` flag and its default."""
        defaults = FQEConfig.__dataclass_fields__

        def fail(name: str, rule: str) -> ConfigError:
            flag = f"--fqe-{'hidden' if name == 'hidden_sizes' else name.replace('_', '-')}"
            default = defaults[name].default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else f"{default:g}"
            return ConfigError(
                f"fqe {name}={getattr(self, name)!r} must be {rule}",
                f"set {name} to {rule} (FQEConfig({name}=...), `policylab ope {flag}`; default {shown})",
            )

        for name in ("steps", "batch_size", "action_samples", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
                raise fail(name, "a whole number > 0")
        hidden = self.hidden_sizes
        if not isinstance(hidden, tuple | list) or not all(
            isinstance(h, Integral) and not isinstance(h, bool) and h > 0 for h in hidden
        ):
            raise fail("hidden_sizes", "a list of whole numbers > 0")
        if not (isinstance(self.tau, Real) and 0 < self.tau <= 1):
            raise fail("tau", "a number in (0, 1]")
        for name in ("lr", "reward_scale"):
            value = getattr(self, name)
            if not (isinstance(value, Real) and math.isfinite(value) and value > 0):
                raise fail(name, "a finite number > 0")


class FittedQ:
    """Q^pi and V^pi of the evaluation policy, fitted by `fit_fqe` (values in the dataset's reward units)."""

    def __init__(self, target: TargetPolicy, critic: torch.nn.Module, reward_scale: float, samples: int, seed: int):
        self.target, self.critic, self.reward_scale, self.samples = target, critic, reward_scale, samples
        self.generator = torch.Generator().manual_seed(seed + 1)

    def _q_all(self, obs: Tensor) -> Tensor:
        return self.critic(obs)[0]  # [B, n] (Discrete)

    def _v(self, obs: Tensor) -> Tensor:
        """E_{a ~ pi} Q(s, a) [B] of network inputs, in the scaled units of the regression."""
        if self.target.discrete:
            return (self.target.probs(obs) * self._q_all(obs)).sum(-1)
        actions = self.target.sample_unit(obs, self.samples, self.generator)  # [B, m, A]
        repeated = obs.repeat_interleave(self.samples, 0)
        return self.critic(repeated, actions.reshape(len(repeated), -1))[0].view(len(obs), -1).mean(-1)

    def _q(self, obs: Tensor, unit_actions: Tensor) -> Tensor:
        if self.target.discrete:
            return self._q_all(obs).gather(-1, unit_actions.long().view(-1, 1)).squeeze(-1)
        return self.critic(obs, unit_actions)[0]

    @torch.no_grad()
    def values(self, observations: np.ndarray, actions: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, ...]:
        """(Q(s_t, a_t), V(s_t)) [N] of raw observations and env actions, in reward units."""
        q_out, v_out = np.empty(len(actions)), np.empty(len(actions))
        for start in range(0, len(actions), batch):
            obs = self.target.obs(observations[start : start + batch])
            unit = self._unit_actions(np.asarray(actions[start : start + batch]))
            q_out[start : start + batch] = self._q(obs, unit).double().numpy() / self.reward_scale
            v_out[start : start + batch] = self._v(obs).double().numpy() / self.reward_scale
        return q_out, v_out

    @torch.no_grad()
    def initial_values(self, observations: np.ndarray) -> np.ndarray:
        """V(s_0) [E] of raw initial observations, in reward units."""
        return self._v(self.target.obs(observations)).double().numpy() / self.reward_scale

    def _unit_actions(self, actions: np.ndarray) -> Tensor:
        t = self.target
        if t.discrete:
            return torch.as_tensor(actions.astype(np.int64).reshape(-1) - t.start)
        env = torch.as_tensor(actions, dtype=torch.float32).reshape(len(actions), -1)
        return 2.0 * (env - t.low) / (t.high - t.low) - 1.0


def fit_fqe(dataset: Dataset, target: TargetPolicy, gamma: float, cfg: FQEConfig | None = None) -> FittedQ:
    """Fit Q^pi on the dataset's transitions (see the module docstring); `gamma` is the value's discount."""
    cfg = cfg or FQEConfig()
    cfg.validate()
    flush_denormals()  # as the training loops do: Adam's moments of dead ReLU units decay into denormals
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    obs_dim = int(np.prod(dataset.observation_space.shape or ()))
    if target.discrete:
        critic: torch.nn.Module = QNetwork(obs_dim, target.n_actions, cfg.hidden_sizes)
        action_shape: tuple[int, ...] = ()
        action_dtype = torch.long
    else:
        critic = ContinuousCritic(obs_dim, target.act_dim, cfg.hidden_sizes, members=1)
        action_shape, action_dtype = (target.act_dim,), torch.float32
    buffer = dataset_buffer(
        _shifted_discrete(dataset, target),
        action_shape,
        action_dtype,
        gamma=gamma,
        obs_normalizer=target.policy.obs_normalizer,
        reward_scale=cfg.reward_scale,
    )
    frozen = FittedQ(target, _copy(critic), cfg.reward_scale, cfg.action_samples, cfg.seed)
    fitted = FittedQ(target, critic, cfg.reward_scale, cfg.action_samples, cfg.seed)
    optimizer = Adam(list(critic.parameters()), lr=cfg.lr)
    online: list[Tensor] = list(critic.parameters())
    offline: list[Tensor] = list(frozen.critic.parameters())
    by_hand = _by_hand(critic)
    for _ in range(cfg.steps):
        batch = buffer.sample(cfg.batch_size, generator)
        with torch.no_grad():
            next_v = frozen._v(batch.next_obs)
            y = batch.rewards + batch.discounts * (~batch.terminated).float() * next_v
        if by_hand:
            _regression_step(fitted, batch.obs, batch.actions, y)
        else:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(fitted._q(batch.obs, batch.actions), y).backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(offline, online, cfg.tau)
    critic.eval()
    return fitted


def _by_hand(critic: torch.nn.Module) -> bool:
    """Whether the regression's gradient can be written by hand: a plain (not dueling) critic whose StackedMLP
    has an analytic backward."""
    body = getattr(critic, "body", None)
    return bool(body is not None and body.analytic_backward and not getattr(critic, "dueling", False))


@torch.no_grad()
def _regression_step(fitted: FittedQ, obs: Tensor, unit_actions: Tensor, y: Tensor) -> None:
    """The gradient of mean_B (Q(s, a) - y)^2 written into the critic's `.grad` (no graph): 2 (Q - y) / B at the
    logged action's output, back through the body."""
    body = fitted.critic.body
    assert isinstance(body, StackedMLP)
    n = len(y)
    if fitted.target.discrete:
        out, inputs = body.forward_cached(obs.flatten(1))  # [1, B, n_actions]
        index = unit_actions.long().view(-1, 1)
        g_q = (out[0].gather(1, index).squeeze(1) - y).mul_(2.0 / n)
        g_out = torch.zeros_like(out[0]).scatter_(1, index, g_q.unsqueeze(1))
    else:
        out, inputs = body.forward_cached(torch.cat([obs.flatten(1), unit_actions.flatten(1)], -1))  # [1, B, 1]
        g_out = (out[0] - y.unsqueeze(1)).mul_(2.0 / n)
    body.backward(inputs, g_out.unsqueeze(0))


def _copy(critic: torch.nn.Module) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(critic)
    clone.requires_grad_(False)
    return clone


def _shifted_discrete(dataset: Dataset, target: TargetPolicy) -> Dataset:
    """The dataset with Discrete actions counted from 0 (the critic's output index)."""
    if not target.discrete or target.start == 0:
        return dataset
    from dataclasses import replace

    return replace(dataset, actions=np.asarray(dataset.actions) - target.start)
