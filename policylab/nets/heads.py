"""Action distributions as plain tensor functions (no per-call distribution objects).

A head maps the network's output to actions, log-probs and entropies, and
maps stored actions to what the env accepts (`to_env`).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.errors import EnvError, PolicylabError

_LOG_2PI = math.log(2 * math.pi)
_LOG_2 = math.log(2.0)
_MASKED = -1e9  # logit bias of the unused entries of a MultiDiscrete grid (probability 0, no NaN in p log p)


def _probabilities(logp_all: Tensor, logits: Tensor, masked: bool) -> Tensor:
    """exp(log-softmax): with masked logits (-1e9 entries) through softmax instead, whose CPU kernel keeps its speed
    where torch's exp slows down on inputs that underflow (`benchmarks/micro.py --only masks`)."""
    return torch.softmax(logits, dim=-1) if masked else logp_all.exp()


def check_maskable(head: Any, source: str, error: type[PolicylabError] = EnvError) -> None:
    """One `error` naming `source` where `head`'s actions cannot be masked (anything but Discrete / MultiDiscrete)."""
    if not hasattr(head, "mask_bias"):
        raise error(
            f"action masks apply to Discrete and MultiDiscrete actions; {source} belongs to an env with "
            f"{'continuous (Box)' if getattr(head, 'continuous', False) else type(head).__name__} actions",
            "drop action_masks (continuous actions have no invalid choices to mask)",
        )


def mask_logit_bias(head: Any, masks: Any, source: str, error: type[PolicylabError] = EnvError) -> np.ndarray:
    """Action masks [B, head.mask_size] (true or 1: allowed) as the logit bias [B, n_outputs] that `head` adds to
    its logits; one `error` naming `source` where the masks do not fit the action space or a row allows nothing."""
    check_maskable(head, source, error)
    flags = np.asarray(masks)
    if flags.ndim != 2 or flags.shape[1] != head.mask_size:
        raise error(
            f"{source} has shape {flags.shape[1:] if flags.ndim == 2 else flags.shape}: the action space needs "
            f"{head.mask_size} flags per observation",
            "return one flag per action (for MultiDiscrete: every dimension's choices, one dimension after another)",
        )
    bias = head.mask_bias(flags.astype(bool, copy=False))
    empty = np.flatnonzero(head.nothing_allowed(bias))
    if len(empty):
        raise error(
            f"{source} allows no action at all (row {int(empty[0])}{', and others' if len(empty) > 1 else ''})",
            "allow at least one action in every state (end the episode where nothing can be done)",
        )
    return bias


class CategoricalHead:
    """Discrete(n) actions from n logits."""

    continuous = False

    def __init__(self, n: int) -> None:
        self.n_outputs = n
        self.action_shape: tuple[int, ...] = ()
        self.action_dtype = torch.long

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Gumbel noise -log(-log u) for `shape` (e.g. steps x envs) samples, drawn in one call."""
        u = torch.rand((*shape, self.n_outputs), generator=generator, device=device)
        return u.log_().neg_().log_().neg_()

    def sample(
        self, logits: Tensor, _log_std: Tensor | None, generator: torch.Generator | None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gumbel-max sampling: argmax(logits + Gumbel noise); `noise` from `noise()` saves the RNG call per step."""
        logp_all = torch.log_softmax(logits, dim=-1)
        if noise is None:
            noise = self.noise(logits.shape[:-1], generator, logits.device)
        actions = (logits + noise).argmax(-1, keepdim=True)
        return actions.squeeze(-1), logp_all.gather(-1, actions).squeeze(-1)

    def log_prob_entropy(
        self, logits: Tensor, _log_std: Tensor | None, actions: Tensor, masked: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(log-probs of `actions`, entropies); `masked`: the logits carry action masks' -1e9 biases."""
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(_probabilities(logp_all, logits, masked) * logp_all).sum(-1)
        return logp, entropy

    def log_prob_entropy_cached(
        self, logits: Tensor, _log_std: Tensor | None, actions: Tensor, need_entropy: bool = True, masked: bool = False
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        """`log_prob_entropy` without autograd, keeping what `grad` needs (entropy only if asked for)."""
        with torch.no_grad():
            logp_all = torch.log_softmax(logits, dim=-1)
            index = actions.long().unsqueeze(-1)
            probs = _probabilities(logp_all, logits, masked)
            entropy = (probs * logp_all).sum(-1).neg_() if need_entropy else None
            return logp_all.gather(-1, index).squeeze(-1), entropy, (logp_all, probs, index, entropy)

    def grad(
        self, cache: tuple[Tensor | None, ...], g_logp: Tensor, g_entropy: float | Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """d(loss)/d(logits) from d(loss)/d(logp) per sample and the loss's weight on each entropy (one number,
        or one per sample: rows that are not in the entropy bonus get 0).

        d logp / d logits = onehot(a) - p;  d H / d logits = -p (log p + H).
        """
        logp_all, probs, index, entropy = cache
        assert logp_all is not None and probs is not None and index is not None
        g = g_logp.unsqueeze(-1)
        g_logits = probs * g
        g_logits.neg_().scatter_add_(-1, index, g)
        if isinstance(g_entropy, Tensor) or g_entropy != 0.0:
            assert entropy is not None, "entropy gradient needs log_prob_entropy_cached(need_entropy=True)"
            g_h = probs * (logp_all + entropy.unsqueeze(-1))
            g_logits.sub_(g_h * g_entropy.unsqueeze(-1) if isinstance(g_entropy, Tensor) else g_h * g_entropy)
        return g_logits, None

    def fisher_product(self, logits: Tensor, _log_std: Tensor | None, tangent: Tensor) -> Tensor:
        """The distribution's Fisher matrix in its logits times `tangent`, per sample: (diag(p) - p p^T) t, the
        Hessian of KL(pi_old || pi) in pi's logits at pi = pi_old (TRPO's Fisher-vector products)."""
        p = torch.softmax(logits, dim=-1)
        pt = p * tangent
        return pt.sub_(p * pt.sum(-1, keepdim=True))

    def kl(self, logits: Tensor, _log_std: Tensor | None, ref_logits: Tensor, _ref_log_std: Tensor | None) -> Tensor:
        """KL(pi || pi_ref) per sample, in closed form: sum_a p(a) (log p(a) - log p_ref(a))."""
        logp_all = torch.log_softmax(logits, dim=-1)
        return (logp_all.exp() * (logp_all - torch.log_softmax(ref_logits, dim=-1))).sum(-1)

    def mode(self, logits: Tensor) -> Tensor:
        return logits.argmax(-1)

    def to_env(self, actions: Tensor) -> Tensor:
        return actions

    def from_env(self, env_actions: Tensor) -> Tensor:
        """Env actions (e.g. a dataset's) as this head stores them: the inverse of `to_env`."""
        return env_actions.long()

    def sample_numpy(
        self, logits: np.ndarray, _log_std: np.ndarray | None, noise: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`sample` in numpy (acting on CPU): Gumbel-max with pre-drawn noise; returns (actions, log-probs)."""
        actions = (logits + noise).argmax(-1)
        shifted = logits - logits.max(-1, keepdims=True)
        logp_all = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return actions, np.take_along_axis(logp_all, actions[:, None], -1)[:, 0]

    def to_env_numpy(self, actions: np.ndarray) -> np.ndarray:
        return actions

    @property
    def mask_size(self) -> int:
        """The length of an action mask row: one flag per action."""
        return self.n_outputs

    def mask_bias(self, masks: np.ndarray) -> np.ndarray:
        """Action masks [B, n] (true: allowed) as logit biases [B, n]: 0 where allowed, -1e9 where not (the
        action's probability is then exactly 0, and so is its gradient)."""
        return np.where(masks, np.float32(0.0), np.float32(_MASKED))

    def nothing_allowed(self, bias: np.ndarray) -> np.ndarray:
        """The rows of `mask_bias` output that allow no action at all."""
        return np.asarray((bias < 0).all(-1))


class MultiCategoricalHead:
    """MultiDiscrete(nvec) actions: one independent categorical per dimension.

    The network outputs k * m logits (k dimensions, m = max(nvec)), viewed as a
    [k, m] grid; the entries past a dimension's size get a bias of -1e9, so each
    row is a softmax over its own choices. Log-probs and entropies are sums over
    the dimensions, and the gradient of the constant bias is zero, so the fused
    update path works unchanged.
    """

    continuous = False

    def __init__(self, space: gym.spaces.MultiDiscrete) -> None:
        nvec = np.asarray(space.nvec)
        if nvec.ndim != 1:
            raise EnvError(f"MultiDiscrete actions of shape {nvec.shape} are not supported", "flatten nvec to 1-D")
        self.k, self.m = len(nvec), int(nvec.max())
        self.n_outputs = self.k * self.m
        self.action_shape: tuple[int, ...] = (self.k,)
        self.action_dtype = torch.long
        pad = torch.zeros(self.k, self.m)
        for i, n in enumerate(nvec):
            pad[i, int(n) :] = _MASKED
        self.pad = pad
        self.padded = bool((pad < 0).any())
        """Some dimension has fewer choices than the grid's width (its padding takes the -1e9 bias)."""
        self.start = torch.as_tensor(np.asarray(space.start).reshape(-1), dtype=torch.long)
        self._np_pad, self._np_start = pad.numpy(), self.start.numpy()
        self._mask_columns = np.array([i * self.m + j for i, n in enumerate(nvec) for j in range(int(n))])
        """Where each entry of an action mask row (the dimensions' flags one after another, SB3-contrib's layout)
        falls in the [k, m] logit grid."""

    def _grid(self, out: Tensor) -> Tensor:
        return out.reshape(out.shape[0], self.k, self.m) + self.pad.to(out.device)

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> Tensor:
        u = torch.rand((*shape, self.k, self.m), generator=generator, device=device)
        return u.log_().neg_().log_().neg_()

    def sample(
        self, logits: Tensor, _log_std: Tensor | None, generator: torch.Generator | None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        grid = self._grid(logits)
        if noise is None:
            noise = self.noise(logits.shape[:-1], generator, logits.device)
        actions = (grid + noise).argmax(-1, keepdim=True)
        logp = torch.log_softmax(grid, dim=-1).gather(-1, actions).squeeze(-1).sum(-1)
        return actions.squeeze(-1), logp

    def log_prob_entropy(
        self, logits: Tensor, _log_std: Tensor | None, actions: Tensor, masked: bool = False
    ) -> tuple[Tensor, Tensor]:
        grid = self._grid(logits)
        logp_all = torch.log_softmax(grid, dim=-1)
        logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1).sum(-1)
        return logp, -(_probabilities(logp_all, grid, masked or self.padded) * logp_all).sum((-1, -2))

    def log_prob_entropy_cached(
        self, logits: Tensor, _log_std: Tensor | None, actions: Tensor, need_entropy: bool = True, masked: bool = False
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        with torch.no_grad():
            grid = self._grid(logits)
            logp_all = torch.log_softmax(grid, dim=-1)
            index = actions.long().unsqueeze(-1)
            probs = _probabilities(logp_all, grid, masked or self.padded)
            per_dim = (probs * logp_all).sum(-1).neg_() if need_entropy else None
            logp = logp_all.gather(-1, index).squeeze(-1).sum(-1)
            return logp, None if per_dim is None else per_dim.sum(-1), (logp_all, probs, index, per_dim)

    def grad(
        self, cache: tuple[Tensor | None, ...], g_logp: Tensor, g_entropy: float | Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Per dimension, as CategoricalHead.grad: d logp/d logits = onehot - p; dH/d logits = -p (log p + H_dim)."""
        logp_all, probs, index, per_dim = cache
        assert logp_all is not None and probs is not None and index is not None
        g = g_logp.view(-1, 1, 1)
        g_grid = probs * g
        g_grid.neg_().scatter_add_(-1, index, g.expand(-1, self.k, 1).contiguous())
        if isinstance(g_entropy, Tensor) or g_entropy != 0.0:
            assert per_dim is not None, "entropy gradient needs log_prob_entropy_cached(need_entropy=True)"
            g_h = probs * (logp_all + per_dim.unsqueeze(-1))
            g_grid.sub_(g_h * g_entropy.view(-1, 1, 1) if isinstance(g_entropy, Tensor) else g_h * g_entropy)
        return g_grid.reshape(g_grid.shape[0], self.n_outputs), None

    def fisher_product(self, logits: Tensor, _log_std: Tensor | None, tangent: Tensor) -> Tensor:
        """As CategoricalHead's, one dimension's row of the grid at a time (the padded entries have p = 0)."""
        p = torch.softmax(self._grid(logits), dim=-1)
        pt = p * tangent.reshape(p.shape)
        return pt.sub_(p * pt.sum(-1, keepdim=True)).reshape(tangent.shape)

    def kl(self, logits: Tensor, _log_std: Tensor | None, ref_logits: Tensor, _ref_log_std: Tensor | None) -> Tensor:
        """KL(pi || pi_ref) per sample: the sum over the independent dimensions of their categorical KLs."""
        logp_all = torch.log_softmax(self._grid(logits), dim=-1)
        ref_all = torch.log_softmax(self._grid(ref_logits), dim=-1)
        return (logp_all.exp() * (logp_all - ref_all)).sum((-1, -2))

    def mode(self, logits: Tensor) -> Tensor:
        return self._grid(logits).argmax(-1)

    def to_env(self, actions: Tensor) -> Tensor:
        return actions + self.start.to(actions.device)

    def from_env(self, env_actions: Tensor) -> Tensor:
        """Env actions (e.g. a dataset's) as this head stores them: the inverse of `to_env`."""
        return (env_actions - self.start.to(env_actions.device)).long()

    def sample_numpy(
        self, logits: np.ndarray, _log_std: np.ndarray | None, noise: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        grid = logits.reshape(logits.shape[0], self.k, self.m) + self._np_pad
        actions = (grid + noise).argmax(-1)
        shifted = grid - grid.max(-1, keepdims=True)
        logp_all = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return actions, np.take_along_axis(logp_all, actions[..., None], -1)[..., 0].sum(-1)

    def to_env_numpy(self, actions: np.ndarray) -> np.ndarray:
        return actions + self._np_start

    @property
    def mask_size(self) -> int:
        """The length of an action mask row: the flags of every dimension's choices, one dimension after another."""
        return len(self._mask_columns)

    def mask_bias(self, masks: np.ndarray) -> np.ndarray:
        """Action masks [B, sum(nvec)] as logit biases on the [k, m] grid, flattened [B, k * m] (0 where allowed
        and on the padding, which has its own bias; -1e9 where not allowed)."""
        bias = np.zeros((masks.shape[0], self.n_outputs), np.float32)
        bias[:, self._mask_columns] = np.where(masks, np.float32(0.0), np.float32(_MASKED))
        return bias

    def nothing_allowed(self, bias: np.ndarray) -> np.ndarray:
        """The rows of `mask_bias` output in which some dimension allows no choice at all."""
        grid = bias.reshape(bias.shape[0], self.k, self.m) + self._np_pad
        return (grid < 0).all(-1).any(-1)


class GaussianHead:
    """Box actions: diagonal Gaussian with a state-independent log-std, optionally tanh-squashed. Every method
    also takes a log std per row, [B, A] (gSDE's, nets/sde.py).

    Stored actions are the pre-squash samples u; with squashing the env gets
    tanh(u) scaled to the bounds and log pi(a) = log N(u) - sum log(1 - tanh(u)^2).
    Without squashing the env gets u clipped to the bounds. With squashing the
    reported entropy is the Gaussian's (the squashed one has no closed form).
    """

    continuous = True

    def __init__(self, space: gym.spaces.Box, squash: bool) -> None:
        self.action_shape = tuple(space.shape)
        self.n_outputs = int(np.prod(space.shape))
        self.action_dtype = torch.float32
        self.squash = squash
        low = torch.as_tensor(space.low, dtype=torch.float32).reshape(-1)
        high = torch.as_tensor(space.high, dtype=torch.float32).reshape(-1)
        self.bounded = bool(torch.isfinite(low).all() and torch.isfinite(high).all())
        if squash and not self.bounded:
            raise EnvError(
                f"tanh squashing needs finite action bounds, but the action space is {space}",
                "set squash_actions=false, or give the env finite bounds",
            )
        self.low, self.high = low, high
        self._np_bounds = (low.numpy(), high.numpy())

    def _log_prob(self, mean: Tensor, log_std: Tensor, u: Tensor) -> Tensor:
        z = (u - mean) * torch.exp(-log_std)
        logp = (-0.5 * z * z - log_std - 0.5 * _LOG_2PI).sum(-1)
        if self.squash:
            logp = logp - (2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))).sum(-1)
        return logp

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Standard normal noise for `shape` (e.g. steps x envs) samples, drawn in one call."""
        return torch.randn((*shape, self.n_outputs), generator=generator, device=device)

    def sample(
        self, mean: Tensor, log_std: Tensor | None, generator: torch.Generator | None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        assert log_std is not None
        if noise is None:
            noise = self.noise(mean.shape[:-1], generator, mean.device)
        u = torch.addcmul(mean, torch.exp(log_std), noise)
        return u, self._log_prob(mean, log_std, u)

    def log_prob_entropy(
        self, mean: Tensor, log_std: Tensor | None, actions: Tensor, masked: bool = False
    ) -> tuple[Tensor, Tensor]:
        """`masked`: part of every head's signature; Box actions are never masked (`check_maskable`)."""
        assert log_std is not None
        actions = actions.reshape(mean.shape)
        entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1).expand(mean.shape[0])
        return self._log_prob(mean, log_std, actions), entropy

    def log_prob_entropy_cached(
        self, mean: Tensor, log_std: Tensor | None, actions: Tensor, need_entropy: bool = True, masked: bool = False
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
        """`log_prob_entropy` without autograd (no squashing), keeping what `grad` needs."""
        assert log_std is not None and not self.squash
        with torch.no_grad():
            inv_std = torch.exp(-log_std)
            z = (actions.reshape(mean.shape) - mean) * inv_std
            logp = (-0.5 * z * z - log_std - 0.5 * _LOG_2PI).sum(-1)
            entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1).expand(mean.shape[0])
            return logp, entropy, (z, inv_std)

    def grad(
        self, cache: tuple[Tensor | None, ...], g_logp: Tensor, g_entropy: float | Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(d loss/d mean, d loss/d log_std). d logp/d mean = z / std; d logp/d log_std = z^2 - 1; dH/d log_std = 1
        (for each sample; `g_entropy` one weight for all, or one per sample). With a log std per row (gSDE), its
        gradient per row, [B, A]."""
        z, inv_std = cache
        assert z is not None and inv_std is not None
        g = g_logp.unsqueeze(-1)
        g_mean = g * z * inv_std
        if inv_std.dim() == 2:
            return g_mean, g * (z * z - 1.0) + (g_entropy.unsqueeze(-1) if isinstance(g_entropy, Tensor) else g_entropy)
        entropy_part = g_entropy.sum() if isinstance(g_entropy, Tensor) else g_entropy * z.shape[0]
        g_log_std = (g * (z * z - 1.0)).sum(0) + entropy_part
        return g_mean, g_log_std

    log_std_fisher = 2.0
    """The Fisher matrix's block of the log-std parameter: 2 I (the mean and log-std blocks do not mix)."""

    def fisher_product(self, mean: Tensor, log_std: Tensor | None, tangent: Tensor) -> Tensor:
        """The distribution's Fisher matrix in its mean times `tangent`, per sample: t / std^2, the Hessian of
        KL(pi_old || pi) in pi's mean at pi = pi_old (also with squashing: the KL is that of the Gaussians)."""
        assert log_std is not None
        return tangent * torch.exp(-2.0 * log_std)

    def kl(self, mean: Tensor, log_std: Tensor | None, ref_mean: Tensor, ref_log_std: Tensor | None) -> Tensor:
        """KL(pi || pi_ref) per sample between the diagonal Gaussians, in closed form: sum over dimensions of
        log(s_ref / s) + (s^2 + (m - m_ref)^2) / (2 s_ref^2) - 1/2. tanh squashing is an invertible map of the
        same sample, which leaves the KL unchanged, so this is also the squashed policies' KL."""
        assert log_std is not None and ref_log_std is not None
        return gaussian_kl(mean, log_std, ref_mean, ref_log_std)

    def mode(self, mean: Tensor) -> Tensor:
        return mean

    def sample_numpy(
        self, mean: np.ndarray, log_std: np.ndarray | None, noise: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`sample` in numpy (acting on CPU) with pre-drawn standard normal noise; returns (u, log-probs)."""
        assert log_std is not None
        u = mean + np.exp(log_std) * noise
        logp = (-0.5 * noise * noise - log_std - 0.5 * _LOG_2PI).sum(-1)  # z = (u - mean) / std = noise
        if self.squash:
            logp -= (2.0 * (_LOG_2 - u - np.logaddexp(0.0, -2.0 * u))).sum(-1)
        return u, logp

    def to_env_numpy(self, actions: np.ndarray) -> np.ndarray:
        low, high = self._np_bounds
        if self.squash:
            return low + (np.tanh(actions) + 1.0) * 0.5 * (high - low)
        return np.clip(actions, low, high) if self.bounded else actions

    def from_env(self, env_actions: Tensor) -> Tensor:
        """Env actions (e.g. a dataset's) as this head stores them: as they are, or with squashing the pre-tanh
        value (bounds mapped to +-(1 - 1e-6) first, so that a dataset action on a bound has a finite log-prob)."""
        flat = env_actions.reshape(env_actions.shape[0], -1).float()
        if not self.squash:
            return flat
        low, high = self.low.to(flat.device), self.high.to(flat.device)
        unit = (2.0 * (flat - low) / (high - low) - 1.0).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
        return torch.atanh(unit)

    def to_env(self, actions: Tensor) -> Tensor:
        flat = actions.reshape(actions.shape[0], -1)
        low, high = self.low.to(flat.device), self.high.to(flat.device)
        if self.squash:
            flat = low + (torch.tanh(flat) + 1.0) * 0.5 * (high - low)
        elif self.bounded:
            flat = torch.clamp(flat, low, high)
        return flat.reshape(actions.shape[0], *self.action_shape)


Head = CategoricalHead | MultiCategoricalHead | GaussianHead


def gaussian_kl(mean: Tensor, log_std: Tensor, ref_mean: Tensor, ref_log_std: Tensor) -> Tensor:
    """KL(N(mean, std) || N(ref_mean, ref_std)) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = torch.exp(2.0 * (log_std - ref_log_std))
    z = (mean - ref_mean) * torch.exp(-ref_log_std)
    return (0.5 * (var_ratio + z * z - 1.0) - (log_std - ref_log_std)).sum(-1)


def make_head(space: gym.Space, squash: bool = False, algo: str = "this algorithm") -> Head:
    if isinstance(space, gym.spaces.Discrete):
        if space.start != 0:
            raise EnvError(f"Discrete action space with start={space.start} is not supported", "use start=0")
        return CategoricalHead(int(space.n))
    if isinstance(space, gym.spaces.MultiDiscrete):
        return MultiCategoricalHead(space)
    if isinstance(space, gym.spaces.Box):
        return GaussianHead(space, squash)
    raise EnvError(
        f"{algo} cannot handle the action space {space}",
        "use an env with Discrete, MultiDiscrete or Box actions (flatten Tuple/Dict action spaces into one of those)",
    )
