"""The evaluation policy as off-policy evaluation needs it: log pi(a|s) of logged actions, action probabilities
(Discrete) and samples (Box), from the same loaded `Policy` a user deploys.

Every trained network of policylab has one of these forms, and each gives its own distribution:

| network (algorithms)                               | pi(a|s) used by OPE                                        |
|----------------------------------------------------|------------------------------------------------------------|
| ActorCritic, categorical (PPO, A2C, REINFORCE)     | its softmax                                                |
| ActorCritic, Gaussian (PPO, A2C on Box)            | its Gaussian, in env units (squashed: with the tanh term)  |
| CategoricalActor (discrete SAC), DiscreteBCActor   | its softmax                                                |
| TanhGaussianActor (SAC, CQL, Cal-QL, EDAC, SAC-N)  | its tanh-Gaussian, in env units                            |
| GaussianActor (IQL, AWAC, Gaussian BC)             | its Gaussian, in env units                                 |
| QNetwork (DQN), greedy                             | epsilon-greedy: needs `epsilon` > 0 for support off-greedy |
| DeterministicActor (TD3, DDPG, TD3+BC, ReBRAC ...) | N(mu(s), (sigma * half-range)^2); without `sigma` only the |
|                                                    | critic-based dm / fqe apply (the action itself)            |

`epsilon` (Discrete) mixes any policy with the uniform one: (1 - epsilon) pi + epsilon / n. Densities are in
the env's action units, as `collect` records the behaviour log-probs, so that their ratios are the ones IS
needs; a Gaussian's clipping to the action bounds is not in its density (as in `collect`).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from policylab.errors import ConfigError, PolicylabError
from policylab.nets.actor_critic import ActorCritic
from policylab.nets.critics import (
    CategoricalActor,
    DeterministicActor,
    DiscreteBCActor,
    GaussianActor,
    QNetwork,
    TanhGaussianActor,
)
from policylab.nets.heads import CategoricalHead, GaussianHead
from policylab.nets.population import SearchPolicy
from policylab.policy import Policy

_LOG_2PI = math.log(2 * math.pi)


class TargetPolicy:
    """A `Policy` as OPE reads it. Observations given to its methods are raw (it applies the policy's own
    observation normalization); Box actions are in env units for `log_prob`, in [-1, 1] units for
    `sample_unit` (what the critics of fitted Q evaluation take)."""

    def __init__(self, policy: Policy, epsilon: float = 0.0, sigma: float | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigError(f"epsilon={epsilon} must be in [0, 1]", "e.g. epsilon=0.05 for an epsilon-greedy policy")
        if sigma is not None and sigma <= 0:
            raise ConfigError(f"sigma={sigma} must be > 0", "e.g. sigma=0.1 (a fraction of the action half-range)")
        self.policy, self.net, self.epsilon, self.sigma = policy, policy.net, epsilon, sigma
        space: Any = policy.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        if self.discrete:
            self.n_actions, self.start = int(space.n), int(space.start)
        elif isinstance(space, gym.spaces.Box) and np.isfinite(space.low).all() and np.isfinite(space.high).all():
            self.low = torch.as_tensor(space.low, dtype=torch.float32).reshape(-1)
            self.high = torch.as_tensor(space.high, dtype=torch.float32).reshape(-1)
            self.half = (self.high - self.low) / 2.0
            self.act_dim = int(self.low.numel())
        else:
            raise PolicylabError(
                f"off-policy evaluation takes Discrete or bounded Box actions, not {space}",
                "evaluate a policy of an env with such actions",
            )
        self._check_supported()

    @property
    def greedy(self) -> bool:
        """A network whose Discrete action is the argmax of its outputs: a Q-network, or ARS's search policy."""
        return isinstance(self.net, QNetwork) or (isinstance(self.net, SearchPolicy) and self.discrete)

    @property
    def deterministic_actor(self) -> bool:
        """A network with one Box action per state: a deterministic actor (TD3 ...), or ARS's search policy."""
        return isinstance(self.net, DeterministicActor) or (isinstance(self.net, SearchPolicy) and not self.discrete)

    @property
    def deterministic(self) -> bool:
        """Whether pi(a|s) is 1 for one action and 0 for all others (a greedy network with epsilon 0)."""
        return self.greedy and self.epsilon == 0.0

    def describe(self) -> str:
        """One line saying which distribution the estimates are for."""
        kind = type(self.net).__name__
        if self.greedy:
            return f"epsilon-greedy ({kind}, epsilon={self.epsilon})"
        if self.deterministic_actor:
            if self.sigma is None:
                return f"its deterministic action ({kind})"
            return f"Gaussian around the deterministic action ({kind}, sigma={self.sigma} half-ranges)"
        mixed = f", mixed with uniform epsilon={self.epsilon}" if self.discrete and self.epsilon else ""
        return f"the policy's own distribution ({kind}{mixed})"

    def _check_supported(self) -> None:
        net = self.net
        if self.policy.action_masks:
            raise PolicylabError(
                "off-policy evaluation does not read action masks yet: the probabilities of a policy trained with "
                "action_masks=true depend on each step's mask, and logged datasets hold none",
                "evaluate it in its env instead (policylab eval RUN, pl.evaluate)",
            )
        if self.policy.target_return is not None:
            raise PolicylabError(
                "off-policy evaluation needs the policy's pi(a | s), and a Decision Transformer's actions depend on "
                "the episode so far and the return it asks for, which a logged step does not hold",
                "evaluate it in its env instead (policylab eval RUN --target-return R, pl.evaluate)",
            )
        if isinstance(net, ActorCritic) and not isinstance(net.head, CategoricalHead | GaussianHead):
            raise PolicylabError(
                f"OPE does not support the {type(net.head).__name__} action head", "use Discrete or Box actions"
            )
        known = (ActorCritic, CategoricalActor, DiscreteBCActor, QNetwork, TanhGaussianActor, GaussianActor)
        if not isinstance(net, known + (DeterministicActor, SearchPolicy)):
            raise PolicylabError(f"OPE does not know the policy network {type(net).__name__}", "report this")

    # --- observations -------------------------------------------------------------------------------------------

    def obs(self, observations: np.ndarray) -> Tensor:
        """Raw observations -> the network's input (normalized as the policy normalizes them)."""
        x = np.asarray(observations, dtype=np.float32)
        if self.policy.obs_normalizer is not None:
            x = self.policy.obs_normalizer(x)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    # --- Discrete -----------------------------------------------------------------------------------------------

    def probs(self, obs: Tensor) -> Tensor:
        """pi(.|s) [B, n] of network inputs `obs` (Discrete)."""
        net = self.net
        if self.greedy:
            greedy = net(obs)[0].argmax(-1) if isinstance(net, QNetwork) else net(obs).argmax(-1)
            probs = torch.nn.functional.one_hot(greedy, self.n_actions).float()
        elif isinstance(net, CategoricalActor):
            probs = net(obs)[0]
        elif isinstance(net, DiscreteBCActor):
            probs = torch.softmax(net(obs), -1)
        else:
            probs = torch.softmax(net(obs)[0], -1)
        return (1.0 - self.epsilon) * probs + self.epsilon / self.n_actions

    # --- log-probs of logged actions ----------------------------------------------------------------------------

    @torch.no_grad()
    def log_prob(self, observations: np.ndarray, actions: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """log pi(a|s) [N] of raw observations and env actions, in float64 (-inf where pi(a|s) = 0)."""
        out = np.empty(len(actions), np.float64)
        for start in range(0, len(actions), batch):
            obs = self.obs(observations[start : start + batch])
            chunk = np.asarray(actions[start : start + batch])
            out[start : start + batch] = self._log_prob(obs, chunk).double().numpy()
        return out

    def _log_prob(self, obs: Tensor, actions: np.ndarray) -> Tensor:
        if self.discrete:
            index = torch.as_tensor(actions.astype(np.int64).reshape(-1) - self.start)
            return self.probs(obs).gather(-1, index[:, None]).squeeze(-1).log()
        env = torch.as_tensor(actions, dtype=torch.float32).reshape(len(actions), -1)
        unit = (2.0 * (env - self.low) / (self.high - self.low) - 1.0).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        to_env_units = self.half.log().sum()
        net = self.net
        if isinstance(net, TanhGaussianActor | GaussianActor):
            return net.log_prob(obs, unit) - to_env_units
        if self.deterministic_actor:
            if self.sigma is None:
                raise ConfigError(
                    f"the policy ({self.policy.algo}) is deterministic, so it has no density at the logged actions",
                    "pass sigma (e.g. --sigma 0.1: a Gaussian of that many half-ranges around its action), or use "
                    "only dm / fqe",
                )
            std = self.sigma * self.half
            z = (env - self.policy_mean_env(obs)) / std
            return (-0.5 * z * z - std.log() - 0.5 * _LOG_2PI).sum(-1)
        assert isinstance(net, ActorCritic) and isinstance(net.head, GaussianHead)
        mean, log_std = net.distribution(obs)
        raw = net.head.from_env(env)
        logp, _ = net.head.log_prob_entropy(mean, log_std, raw)
        return logp - to_env_units if net.head.squash else logp

    def policy_mean_env(self, obs: Tensor) -> Tensor:
        """The deterministic actor's action in env units."""
        if isinstance(self.net, SearchPolicy):
            return self.net.env_action(obs)
        return self.low + (self.net(obs) + 1.0) * self.half

    # --- samples for a critic -----------------------------------------------------------------------------------

    def sample_unit(self, obs: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
        """m actions per observation from pi, in [-1, 1] units: [B, m, A] (Box)."""
        net, batch = self.net, len(obs)
        if isinstance(net, TanhGaussianActor):
            return net.sample_many(obs, m, generator)[0].view(batch, m, -1)
        repeated = obs.repeat_interleave(m, 0)
        if isinstance(net, GaussianActor):
            return net.sample(repeated, generator).view(batch, m, -1)
        if self.deterministic_actor:
            if isinstance(net, DeterministicActor):
                mean = net(repeated)
            else:  # ARS's search policy acts in env units
                mean = (self.policy_mean_env(repeated) - self.low) / self.half - 1.0
            if self.sigma is None:
                return mean.view(batch, m, -1)
            noise = torch.randn(mean.shape, generator=generator)
            # sigma half-ranges is sigma in [-1, 1] units; the env clips what leaves the bounds
            return (mean + self.sigma * noise).clamp(-1.0, 1.0).view(batch, m, -1)
        assert isinstance(net, ActorCritic)
        raw, _ = net.head.sample(*net.distribution(repeated), generator)
        env = net.head.to_env(raw).reshape(batch * m, -1)
        return (2.0 * (env - self.low) / (self.high - self.low) - 1.0).view(batch, m, -1)


def target_policy(policy: Any, epsilon: float = 0.0, sigma: float | None = None) -> TargetPolicy:
    """A TargetPolicy of a Policy or of a run directory (its final policy)."""
    if not isinstance(policy, Policy):
        from policylab.policy import load

        policy = load(policy)
    return TargetPolicy(policy, epsilon, sigma)
