"""Replay buffer: preallocated per-env rings, uniform sampling, n-step returns, no duplicate next observations.

N envs write one transition each per step. Each env has its own ring of
`slots` entries; an entry holds (obs, action, reward, terminated, episode_end).
The next observation of an entry is the obs of the entry after it, so it is
never stored twice:

  - inside an episode, the next step's obs is written ahead into the next slot
    (as a pending, not yet sampleable entry) and becomes a transition when that
    step is added;
  - at an episode end, the final observation (the one to bootstrap from at a
    truncation) takes one extra slot that is never sampled as a transition, and
    the new episode starts after it.

So memory is one obs per transition plus one per episode. `store_next_obs=True`
stores next observations explicitly instead (twice the obs memory, simpler
layout for datasets that arrive as (s, a, r, s') tuples).

Sampling returns a `Batch` with obs, actions, rewards (n-step discounted sums),
next_obs (the obs n steps on, or the final obs), terminated, discounts
(gamma^m for the m steps summed) and indices (plus importance `weights` with
`prioritized=True`, and the stored action at next_obs, `next_actions`, with
`next_actions=True`, and each transition's discounted return-to-go, `mc_returns`,
with `mc_returns=True`, and the allowed actions at next_obs, `next_action_mask`,
with `mask_size` > 0): the same fields whether the transitions came from envs
or from a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.data.batch import Batch
from policylab.data.sumtree import SumTree
from policylab.runtime import check_memory

PER_STEP_FIELDS = ("obs", "actions", "rewards", "terminated")
"""Batch fields stored once per step, which `ReplayBuffer.gather` can look up alone."""


def _bytes_per_transition(
    obs_shape: tuple[int, ...],
    obs_dtype: torch.dtype,
    action_shape: tuple[int, ...],
    action_dtype: torch.dtype,
    mc_returns: bool,
    episodes: bool,
) -> int:
    """What one transition of `ReplayBuffer` takes: its observation, action, reward and three flags, and the
    optional returns (4 bytes) and episode bounds (16)."""
    obs = math.prod(obs_shape) * obs_dtype.itemsize
    return obs + math.prod(action_shape) * action_dtype.itemsize + 4 + 3 + 4 * mc_returns + 16 * episodes


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        action_dtype: torch.dtype = torch.float32,
        *,
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta: float = 0.4,
        priority_eps: float = 1e-6,
        device: torch.device | str = "cpu",
        next_actions: bool = False,
        mc_returns: bool = False,
        episodes: bool = False,
        obs_dtype: torch.dtype = torch.float32,
        action_chunk: int = 1,
        memory_fix: Callable[[int], str] | None = None,
        mask_size: int = 0,
        sequence_length: int = 0,
    ) -> None:
        """`memory_fix(n)`: the fix to show where the buffer cannot fit in memory, given about how many transitions
        would (default: lower buffer_size to n)."""
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        self.num_envs = num_envs
        self.slots = max(2 + n_step, math.ceil(capacity / num_envs))
        self.n_step = n_step
        self.gamma = gamma
        self.with_next_actions = next_actions
        """Batches carry `next_actions`: the stored action at the slot of `next_obs` (ReBRAC's target needs the
        dataset's next action). Within an episode that is the action taken at `next_obs`; after an episode's last
        step it is whatever the final-obs slot holds (zeros, or a stale action once the ring wrapped): harmless at
        a termination (the target multiplies it by 1 - terminated), a stale value at a truncation (CORL's D4RL
        loader drops the truncated transitions instead)."""
        if action_chunk < 1:
            raise ValueError(f"action_chunk must be >= 1, got {action_chunk}")
        self.action_chunk = action_chunk
        """> 1: batches carry `action_chunks` [B, H, *action_shape], the actions of the sampled step and the H - 1
        steps after it in its episode; past the episode's last step the last action repeats (Diffusion Policy's
        padding)."""
        if sequence_length < 0 or (sequence_length and not mc_returns):
            raise ValueError(f"sequence_length={sequence_length} needs to be >= 0, and > 0 needs mc_returns=True")
        self.sequence_length = sequence_length
        """> 0: `sample` returns windows of this many consecutive steps of one episode (`windows`), the returns to go
        and the steps' timesteps within their episodes with them (sequence models: the Decision Transformer)."""
        self.device = torch.device(device)
        shape = (self.slots, num_envs)
        if self.device.type == "cpu":
            per = _bytes_per_transition(obs_shape, obs_dtype, action_shape, action_dtype, mc_returns, episodes)
            per += 16 * prioritized + mask_size  # the sum tree's two float64 nodes per leaf, the mask's flags
            per += 8 * bool(sequence_length)  # the timesteps
            check_memory(
                self.slots * num_envs * per,
                f"a replay buffer of {self.slots * num_envs:,} transitions ({per:,} bytes each)",
                per,
                memory_fix or (lambda fit: f"lower buffer_size to at most about {fit:,}"),
            )
        self.obs = torch.zeros(*shape, *obs_shape, dtype=obs_dtype, device=device)  # uint8 for image frames
        self.actions = torch.zeros(*shape, *action_shape, dtype=action_dtype, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.episode_end = torch.zeros(shape, dtype=torch.bool, device=device)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        """True for entries that are transitions (not pending obs, not final-obs slots)."""
        self.ptr = torch.zeros(num_envs, dtype=torch.long, device=device)
        self._envs = torch.arange(num_envs, device=device)
        self.action_masks: Tensor | None = (
            torch.ones(*shape, mask_size, dtype=torch.bool, device=device) if mask_size else None
        )
        """With `mask_size` > 0: the allowed actions at each slot's observation (a final observation's: all, as its
        env's mask there is not known; it only matters at truncations), in batches as `next_action_mask`."""
        names = ("obs", "actions", "rewards", "terminated", "episode_end", "valid", "ptr")
        self._tensors: dict[str, Tensor] = {k: getattr(self, k) for k in names}
        if self.action_masks is not None:
            self._tensors["action_masks"] = self.action_masks
        self._tensors["envs"] = self._envs
        self.mc_returns: Tensor | None = torch.zeros(shape, device=device) if mc_returns else None
        """With `mc_returns=True`: each transition's discounted return to the end of its episode (the Monte-Carlo
        value of the policy that collected it; Cal-QL's lower bound), in batches as `mc_returns`. Nothing is added
        after an episode's last step, whether it terminated or was truncated (as CORL and the Cal-QL authors do);
        -inf (no bound) while the episode is still running online."""
        self.episode_steps = torch.zeros(num_envs, dtype=torch.long, device=device)
        """Transitions of each env's running episode so far (where its returns start when it ends)."""
        if self.mc_returns is not None:
            self._tensors.update(mc_returns=self.mc_returns, episode_steps=self.episode_steps)
        self.timesteps: Tensor | None = torch.zeros(shape, dtype=torch.long, device=device) if sequence_length else None
        """With `sequence_length` > 0: each transition's step within its episode (0 at the first)."""
        if self.timesteps is not None:
            self._tensors["timesteps"] = self.timesteps
        self.episode_first: Tensor | None = torch.zeros(shape, dtype=torch.long, device=device) if episodes else None
        self.episode_last: Tensor | None = torch.zeros(shape, dtype=torch.long, device=device) if episodes else None
        """With `episodes=True`: each transition's episode, as the slots of its first and last transitions (last:
        -1 while the episode runs), for hindsight relabelling (data/her.py)."""
        self.episode_start = torch.zeros(num_envs, dtype=torch.long, device=device)
        """The slot of each env's running episode's first transition."""
        if episodes:
            assert self.episode_first is not None and self.episode_last is not None
            self._tensors.update(
                episode_first=self.episode_first, episode_last=self.episode_last, episode_start=self.episode_start
            )
        self.relabeler: Callable[[ReplayBuffer, Batch, torch.Generator | None], None] | None = None
        """Called on every sampled batch (e.g. `HindsightRelabeler`; it needs `episodes=True`)."""
        # [slots * num_envs, ...] views (flat index = slot * num_envs + env) for the 1-step sampling path
        self._flat = {k: getattr(self, k).flatten(0, 1) for k in ("obs", "actions", "rewards", "terminated")}
        if self.mc_returns is not None:
            self._flat["mc_returns"] = self.mc_returns.view(-1)
        # numpy views of the same memory on the CPU (writes only; sampling stays in torch)
        self._np = {k: v.numpy() for k, v in self._tensors.items()} if self.device.type == "cpu" else None
        self._discounts = gamma ** torch.arange(n_step, dtype=torch.float32, device=device)
        self.prioritized, self.alpha, self.beta, self.priority_eps = prioritized, alpha, beta, priority_eps
        self.tree = SumTree(self.slots * num_envs, device) if prioritized else None
        self.max_priority = 1.0
        self.transitions_added = 0
        self._step_table: Tensor | None = None
        """The flat indices of every transition while the buffer holds only whole episodes from `add_episodes` (a
        dataset): sampling then draws among them directly, where it otherwise redraws the final-obs slots it hits.
        `add` and `load` drop it."""
        self.single = (
            self._np is not None
            and num_envs == 1
            and self.action_masks is None
            and self.tree is None
            and self.mc_returns is None
            and self.timesteps is None
            and self.episode_first is None
        )
        """Whether `add` takes its one-env path (`_add_one`): one env on the CPU without per-transition extras."""
        self.filled = 0
        """Slots of the furthest-advanced ring that hold transitions (each add advances a ring by 1, or 2 at an
        episode end); sampling draws below it and redraws the few pending or final-obs slots it hits."""

    @property
    def bytes_per_transition(self) -> float:
        """Storage bytes per transition slot (obs, action, reward, flags), next obs included (not duplicated)."""
        tensors = (self.obs, self.actions, self.rewards, self.terminated, self.episode_end, self.valid)
        return sum(t.element_size() * t.numel() for t in tensors) / (self.slots * self.num_envs)

    def __len__(self) -> int:
        return int(self.valid.sum())

    def add(
        self,
        obs: Tensor | np.ndarray,
        actions: Tensor | np.ndarray,
        rewards: Tensor | np.ndarray,
        next_obs: Tensor | np.ndarray,
        terminated: Tensor | np.ndarray,
        truncated: Tensor | np.ndarray,
        final_obs: Tensor | np.ndarray | None = None,
        masks: np.ndarray | None = None,
        next_masks: np.ndarray | None = None,
    ) -> None:
        """One step of N envs (numpy arrays or tensors). `next_obs` is what the envs return (the reset obs
        where an episode ended); `final_obs` (rows of ended envs) is the last obs of the ended episodes,
        needed at truncations. With action masks, `masks` / `next_masks` [N, mask size]: the allowed actions at
        `obs` / `next_obs`. On the CPU the writes go through numpy views (a third of the cost)."""
        if self.single:
            self._add_one(obs, actions, rewards, next_obs, terminated, truncated, final_obs)
            return
        self._step_table = None
        cpu = self._np is not None
        xp: Any = np if cpu else torch
        arr: Any = np.asarray if cpu else (lambda x: torch.as_tensor(x, device=self.device))
        store: Any = self._np if cpu else self._tensors
        term, trunc = arr(terminated), arr(truncated)
        if final_obs is None and bool(trunc.any()):
            raise ValueError("a truncated episode needs its final observation: pass final_obs")
        envs, slot = store["envs"], store["ptr"].copy() if cpu else self.ptr.clone()
        end = term | trunc
        ended = bool(end.any())
        next_obs = arr(next_obs)
        for name, value in (("obs", obs), ("actions", actions), ("rewards", rewards), ("terminated", term)):
            store[name][slot, envs] = arr(value)
        store["episode_end"][slot, envs] = end
        store["valid"][slot, envs] = True
        if self.timesteps is not None:  # before _track_returns counts this step
            store["timesteps"][slot, envs] = store["episode_steps"]
        if self.mc_returns is not None:
            self._track_returns(store, slot, envs, end, ended)
        if self.episode_first is not None:
            self._track_episodes(store, slot, envs, end, ended)
        after = (slot + 1) % self.slots
        # The slot after each transition holds its next obs: the final obs at an episode end, else the pending obs.
        rows = end.reshape(-1, *([1] * (next_obs.ndim - 1)))
        final = xp.where(rows, arr(final_obs), next_obs) if ended and final_obs is not None else next_obs
        store["obs"][after, envs] = final
        store["valid"][after, envs] = False
        started = after
        if ended:  # an ended episode keeps its final-obs slot; the next episode starts one slot further on
            started = (after + end * 1) % self.slots
            store["obs"][started, envs] = xp.where(rows, next_obs, store["obs"][started, envs])
            store["valid"][started, envs] = store["valid"][started, envs] & ~end
        store["ptr"][:] = started
        if self.action_masks is not None:
            self._write_masks(store, slot, after, started, envs, end, ended, masks, next_masks)
        if self.episode_first is not None and ended:
            store["episode_start"][:] = xp.where(end, started, store["episode_start"])
        if self.tree is not None:
            self._new_priorities(*(torch.as_tensor(x, device=self.device) for x in (slot, after, started, envs)))
        self.transitions_added += self.num_envs
        self.filled = min(self.slots, self.filled + (2 if ended else 1))

    def _add_one(
        self, obs: Any, actions: Any, rewards: Any, next_obs: Any, terminated: Any, truncated: Any, final_obs: Any
    ) -> None:
        """`add`'s writes for one env with scalar indices (the general path's fancy indexing over an env axis of 1
        cost most of its time): the off-policy loop's most common case. The same slots and values (tested)."""
        self._step_table = None
        store = self._np
        assert store is not None
        term, trunc = bool(terminated[0]), bool(truncated[0])
        if trunc and final_obs is None:
            raise ValueError("a truncated episode needs its final observation: pass final_obs")
        end = term or trunc
        slot = int(store["ptr"][0])
        store["obs"][slot, 0] = obs[0]
        store["actions"][slot, 0] = actions[0]
        store["rewards"][slot, 0] = rewards[0]
        store["terminated"][slot, 0] = term
        store["episode_end"][slot, 0] = end
        store["valid"][slot, 0] = True
        after = (slot + 1) % self.slots
        # the slot after the transition holds its next obs: the final obs at an episode end, else the pending one
        store["obs"][after, 0] = final_obs[0] if end and final_obs is not None else next_obs[0]
        store["valid"][after, 0] = False
        started = after
        if end:  # the ended episode keeps its final-obs slot; the next one starts a slot further on
            started = (after + 1) % self.slots
            store["obs"][started, 0] = next_obs[0]
            store["valid"][started, 0] = False
        store["ptr"][0] = started
        self.transitions_added += 1
        self.filled = min(self.slots, self.filled + (2 if end else 1))

    def _write_masks(
        self, store: Any, slot: Any, after: Any, started: Any, envs: Any, end: Any, ended: bool, masks: Any, nxt: Any
    ) -> None:
        """The action masks of `add`'s slots: `masks` at the step's slot, `next_masks` at the next one (all allowed
        at a final-obs slot) and, where an episode ended, at the new episode's first slot."""
        if masks is None or nxt is None:
            raise ValueError("a replay buffer with action masks needs masks and next_masks in every add")
        arr: Any = np.asarray if self._np is not None else (lambda x: torch.as_tensor(x, device=self.device))
        xp: Any = np if self._np is not None else torch
        store["action_masks"][slot, envs] = arr(masks)
        rows = end.reshape(-1, 1)
        store["action_masks"][after, envs] = xp.where(rows, True, arr(nxt)) if ended else arr(nxt)
        if ended:
            store["action_masks"][started, envs] = xp.where(rows, arr(nxt), store["action_masks"][started, envs])

    def add_episodes(
        self,
        observations: np.ndarray | Tensor,
        actions: np.ndarray | Tensor,
        rewards: np.ndarray | Tensor,
        terminations: np.ndarray | Tensor,
        episode_lengths: np.ndarray,
    ) -> None:
        """Whole episodes at once (a dataset; one-env buffers only), in the layout `add` gives them: each
        episode's T + 1 observations on consecutive slots, its T transitions on the first T of them and its
        final observation on the last (never sampled). `observations` holds the episodes back to back
        ([sum(T) + E, *obs_shape]), the other arrays [sum(T)]. A few vectorized copies, no loop over steps."""
        if self.num_envs != 1:
            raise ValueError("add_episodes needs a one-env buffer (num_envs=1)")
        if self.episode_first is not None:
            raise ValueError("add_episodes does not track episodes for hindsight relabelling (episodes=True)")
        episodes_only = self.transitions_added == 0 or self._step_table is not None  # nothing `add`ed or loaded
        lengths = np.asarray(episode_lengths, np.int64)
        n_obs = int(lengths.sum() + len(lengths))
        start = int(self.ptr[0])
        if start + n_obs + 1 > self.slots:  # + the slot the next `add` writes its pending obs into
            raise ValueError(f"{n_obs:,} dataset slots do not fit after slot {start:,} of a {self.slots:,}-slot buffer")
        ends = np.cumsum(lengths + 1) - 1  # the final-obs slot of each episode, relative to `start`
        is_step = np.ones(n_obs, bool)
        is_step[ends] = False
        step_slots = torch.from_numpy(start + np.flatnonzero(is_step)).to(self.device)
        last_steps = torch.from_numpy(start + ends - 1).to(self.device)
        as_tensor = lambda x, dtype=None: torch.as_tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        self.obs[start : start + n_obs, 0] = as_tensor(observations, self.obs.dtype)
        self.actions[step_slots, 0] = as_tensor(actions, self.actions.dtype)
        self.rewards[step_slots, 0] = as_tensor(rewards, self.rewards.dtype)
        self.terminated[step_slots, 0] = as_tensor(terminations, torch.bool)
        if self.mc_returns is not None:
            returns = discounted_returns_to_go(self.rewards[step_slots, 0].cpu().numpy(), lengths, self.gamma)
            self.mc_returns[step_slots, 0] = as_tensor(returns)
            self.episode_steps[0] = 0
        if self.timesteps is not None:
            firsts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            self.timesteps[step_slots, 0] = as_tensor(np.arange(int(lengths.sum())) - firsts)
        self.episode_end[start : start + n_obs, 0] = False
        self.episode_end[last_steps, 0] = True
        self.valid[start : start + n_obs, 0] = as_tensor(is_step)
        self.valid[start + n_obs, 0] = False
        self.ptr[0] = start + n_obs
        if self.tree is not None:
            self.tree.set(step_slots, torch.full((len(step_slots),), self.max_priority, dtype=torch.float64))
        self.transitions_added += int(lengths.sum())
        self.filled = min(self.slots, max(self.filled, start + n_obs))
        if episodes_only:
            self._step_table = torch.nonzero(self.valid.view(-1)).squeeze(1)

    def _track_returns(self, store: Any, slot: Any, envs: Any, end: Any, ended: bool) -> None:
        """Monte-Carlo returns of the transitions `add` just wrote: unknown (-inf) until their episode ends, then
        those of every step of the ended episodes at once (one backward pass over each episode's rewards)."""
        store["mc_returns"][slot, envs] = -math.inf
        store["episode_steps"][:] += 1
        if not ended:
            return
        assert self.mc_returns is not None
        finished = torch.as_tensor(end, device=self.device)
        for env in finished.nonzero().flatten().tolist():
            last = int(slot[env])
            steps = min(int(self.episode_steps[env]), self.slots - 2)  # the final obs and next start take 2 slots
            rows = torch.arange(last - steps + 1, last + 1, device=self.device) % self.slots
            rewards = self.rewards[rows, env].cpu().numpy()
            returns = discounted_returns_to_go(rewards, np.array([steps]), self.gamma)
            self.mc_returns[rows, env] = torch.as_tensor(returns, device=self.device)
        self.episode_steps[finished] = 0

    def _track_episodes(self, store: Any, slot: Any, envs: Any, end: Any, ended: bool) -> None:
        """The episode of each transition `add` just wrote; at an episode end, its last slot on all its steps."""
        store["episode_first"][slot, envs] = store["episode_start"]
        store["episode_last"][slot, envs] = -1
        if not ended:
            return
        for env in np.flatnonzero(np.asarray(end.cpu() if isinstance(end, Tensor) else end)).tolist():
            first, last = int(store["episode_start"][env]), int(slot[env])
            rows = torch.arange(first, first + (last - first) % self.slots + 1, device=self.device) % self.slots
            self.episode_last[rows, env] = last  # type: ignore[index]

    def _new_priorities(self, slot: Tensor, after: Tensor, started: Tensor, envs: Tensor) -> None:
        """New transitions get the highest priority so far; the pending and final-obs slots get none."""
        assert self.tree is not None
        n = self.num_envs
        touched = torch.cat([slot * n + envs, after * n + envs, started * n + envs])
        values = torch.zeros(3 * n, dtype=torch.float64, device=self.device)
        values[:n] = self.max_priority
        self.tree.set(touched, values)

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, fields: tuple[str, ...] | None = None
    ) -> Batch:
        """Uniform over stored transitions, with n-step returns that stop at episode ends. `fields`: the only
        ones the caller reads (e.g. behaviour cloning's obs and actions), which the one-step path then gathers
        alone; None gathers every field.

        Rejection sampling over the written slots: draws that land on a pending or final-obs
        slot (one per env, plus one per episode) are redrawn, so no O(capacity) scan is needed.
        """
        if self.transitions_added == 0:
            raise ValueError("the replay buffer is empty: add transitions before sampling")
        if self.tree is not None:
            return self._sample_prioritized(batch_size, generator)
        table = self._step_table
        if table is not None:
            index = table.index_select(
                0, torch.randint(len(table), (batch_size,), generator=generator, device=self.device)
            )
        else:
            high = self.filled * self.num_envs
            index = torch.randint(high, (batch_size,), generator=generator, device=self.device)
            self._redraw_invalid(index, high, generator)
        if self.sequence_length:
            return self.windows(index, self.sequence_length)
        batch = self.gather(index, fields)
        if self.action_chunk > 1:
            batch.action_chunks = self.chunks(index, self.action_chunk)
        if self.relabeler is not None:
            self.relabeler(self, batch, generator)
        return batch

    def _gathers_alone(self, fields: tuple[str, ...]) -> bool:
        """Whether `fields` can come from plain per-step lookups: stored per step, no relabelling of the batch,
        and observations stored whole (frame-stacking buffers rebuild theirs)."""
        plain = type(self)._observations is ReplayBuffer._observations
        return plain and self.relabeler is None and all(k in PER_STEP_FIELDS for k in fields)

    def _redraw_invalid(self, index: Tensor, high: int, generator: torch.Generator | None) -> None:
        """Redraw, in place, the draws that hit a pending or final-obs slot, until none does."""
        cpu = self._np is not None  # CPU: the checks in numpy on views of the same memory (cheaper calls)
        valid: Any = self._np["valid"].reshape(-1) if self._np is not None else self.valid.view(-1)
        drawn: Any = index.numpy() if cpu else index
        missed = ~valid[drawn]
        while bool(missed.any()):
            redrawn = torch.randint(high, (int(missed.sum()),), generator=generator, device=self.device)
            drawn[missed] = redrawn.numpy() if cpu else redrawn
            missed = ~valid[drawn]

    def _sample_prioritized(self, batch_size: int, generator: torch.Generator | None) -> Batch:
        """Proportional prioritized replay (Schaul et al. 2016): stratified draws from the sum tree,
        importance weights (n P(i))^-beta normalized by the batch maximum."""
        assert self.tree is not None
        total = float(self.tree.total)
        u = torch.rand(batch_size, generator=generator, device=self.device, dtype=torch.float64)
        mass = (torch.arange(batch_size, device=self.device, dtype=torch.float64) + u) * (total / batch_size)
        index = self.tree.find(mass.clamp(max=total * (1 - 1e-12)))
        probs = self.tree.get(index) / total
        weights = (len(self) * probs).pow(-self.beta)
        batch = self.gather(index)
        batch.weights = (weights / weights.max()).to(torch.float32)
        if self.action_chunk > 1:
            batch.action_chunks = self.chunks(index, self.action_chunk)
        return batch

    def update_priorities(self, flat_index: Tensor, td_errors: Tensor) -> None:
        """Priorities (|delta| + eps)^alpha for sampled transitions (prioritized=True only)."""
        if self.tree is None:
            raise ValueError("update_priorities needs ReplayBuffer(prioritized=True)")
        priorities = (td_errors.detach().abs().to(torch.float64) + self.priority_eps).pow(self.alpha)
        valid = self.valid.view(-1)[flat_index]  # a slot overwritten since it was sampled keeps its new priority
        self.tree.set(flat_index[valid], priorities[valid])
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def gather(self, flat_index: Tensor, fields: tuple[str, ...] | None = None) -> Batch:
        """The transitions at flat indices (slot * num_envs + env), with their n-step targets; only `fields` where
        they are all stored per step (obs, actions, rewards, terminated) and nothing else is asked of the batch."""
        if self.n_step == 1:  # the common case: one index_select per field on the flat storage
            flat = self._flat
            if fields is not None and self._gathers_alone(fields):
                return Batch(**{k: flat[k].index_select(0, flat_index) for k in fields}, indices=flat_index)
            if self._np is not None:  # the next row's index (wrapping around the ring) in numpy: cheaper calls
                next_index = torch.from_numpy((flat_index.numpy() + self.num_envs) % len(flat["rewards"]))
            else:
                next_index = torch.remainder(flat_index + self.num_envs, len(flat["rewards"]))
            obs, next_obs = self._observations(flat_index, next_index)
            batch = Batch(
                obs=obs,
                actions=flat["actions"].index_select(0, flat_index),
                rewards=flat["rewards"].index_select(0, flat_index),
                next_obs=next_obs,
                terminated=flat["terminated"].index_select(0, flat_index),
                discounts=torch.full(flat_index.shape, self.gamma, device=self.device),
                indices=flat_index,
            )
            if self.with_next_actions:
                batch.next_actions = flat["actions"].index_select(0, next_index)
            if self.mc_returns is not None:
                batch.mc_returns = flat["mc_returns"].index_select(0, flat_index)
            if self.action_masks is not None:
                batch.next_action_mask = self.action_masks.flatten(0, 1).index_select(0, next_index)
            return batch
        slot, env = flat_index // self.num_envs, flat_index % self.num_envs
        steps, include = self._episode_steps(slot, env, self.n_step)
        envs = env.unsqueeze(1).expand_as(steps)
        count = include.sum(1)
        last = torch.gather(steps, 1, (count - 1).unsqueeze(1)).squeeze(1)
        rewards = (self.rewards[steps, envs] * include * self._discounts).sum(1)
        next_slot = (last + 1) % self.slots
        obs, next_obs = self._observations(flat_index, next_slot * self.num_envs + env)
        batch = Batch(
            obs=obs,
            actions=self.actions[slot, env],
            rewards=rewards,
            next_obs=next_obs,
            terminated=self.terminated[last, env],
            discounts=self.gamma ** count.to(rewards.dtype),
            indices=flat_index,
        )
        if self.with_next_actions:  # the action after the last included step
            batch.next_actions = self.actions[next_slot, env]
        if self.mc_returns is not None:  # from the sampled step on, whatever n
            batch.mc_returns = self.mc_returns[slot, env]
        if self.action_masks is not None:  # the allowed actions where the target bootstraps
            batch.next_action_mask = self.action_masks[next_slot, env]
        return batch

    def _episode_steps(self, slot: Tensor, env: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """The slots of the n steps from `slot` on ([B, n], wrapping around the ring) and which of them belong to
        the sampled step's episode: step k is included if steps 0..k-1 did not end it and step k is stored."""
        steps = (slot.unsqueeze(1) + torch.arange(n, device=self.device)) % self.slots
        envs = env.unsqueeze(1).expand_as(steps)
        end = self.episode_end[steps, envs]
        valid = self.valid[steps, envs]
        open_before = torch.cumprod(torch.cat([torch.ones_like(end[:, :1]), ~end[:, :-1]], 1).long(), 1).bool()
        return steps, open_before & torch.cumprod(valid.long(), 1).bool()

    def chunks(self, flat_index: Tensor, horizon: int) -> Tensor:
        """The actions of `horizon` consecutive steps from each flat index [B, H, *action_shape], within its
        episode: past the episode's last step, its last action again."""
        slot, env = flat_index // self.num_envs, flat_index % self.num_envs
        steps, include = self._episode_steps(slot, env, horizon)
        last = include.sum(1, keepdim=True) - 1
        k = torch.minimum(torch.arange(horizon, device=self.device).unsqueeze(0), last)
        return self.actions[torch.gather(steps, 1, k), env.unsqueeze(1)]

    def windows(self, flat_index: Tensor, length: int) -> Batch:
        """The `length` consecutive steps of each sampled step's episode from it on, as a batch of sequences
        [B, L, ...]: obs, actions, rewards, returns (the Monte-Carlo returns to go), timesteps (within the episode)
        and mask (1 for steps of the episode, 0 for the padding after its last step, whose fields are zeros).
        Online, the steps of an episode still running have no return yet: they are masked (and zeroed) too."""
        assert self.mc_returns is not None and self.timesteps is not None, "windows need sequence_length > 0"
        slot, env = flat_index // self.num_envs, flat_index % self.num_envs
        steps, include = self._episode_steps(slot, env, length)
        envs = env.unsqueeze(1).expand_as(steps)
        include &= self.mc_returns[steps, envs] > -math.inf

        def kept(values: Tensor) -> Tensor:  # the padding zeroed
            mask = include.view(*include.shape, *([1] * (values.dim() - 2)))
            return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))

        return Batch(
            obs=kept(self.obs[steps, envs]),
            actions=kept(self.actions[steps, envs]),
            rewards=kept(self.rewards[steps, envs]),
            returns=kept(self.mc_returns[steps, envs]),
            timesteps=kept(self.timesteps[steps, envs]),
            mask=include.to(torch.float32),
            indices=flat_index,
        )

    def _observations(self, flat_index: Tensor, next_index: Tensor) -> tuple[Tensor, Tensor]:
        """The observations at the transitions' slots and at the slots of their next observations."""
        flat = self._flat["obs"]
        return flat.index_select(0, flat_index), flat.index_select(0, next_index)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON for a checkpoint: the written slots only (large once the buffer has filled)."""
        n = min(self.filled + 1, self.slots)  # + the pending obs at the write head
        tensors = {k: getattr(self, k)[:n] for k in ("obs", "actions", "rewards", "terminated", "episode_end", "valid")}
        tensors["ptr"] = self.ptr
        if self.mc_returns is not None:
            tensors.update(mc_returns=self.mc_returns[:n], episode_steps=self.episode_steps)
        if self.timesteps is not None:
            tensors["timesteps"] = self.timesteps[:n]
        if self.episode_first is not None and self.episode_last is not None:
            tensors.update(episode_first=self.episode_first[:n], episode_last=self.episode_last[:n])
            tensors["episode_start"] = self.episode_start
        if self.tree is not None:
            tensors["priority_tree"] = self.tree.tree
        if self.action_masks is not None:
            tensors["action_masks"] = self.action_masks[:n]
        meta = {"transitions_added": self.transitions_added, "filled": self.filled, "max_priority": self.max_priority}
        return tensors, meta

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self._step_table = None
        for name, value in tensors.items():
            if name == "priority_tree" and self.tree is not None:
                self.tree.tree.copy_(value)
            else:
                getattr(self, name)[: len(value)].copy_(value)
        self.transitions_added = int(meta["transitions_added"])
        self.filled = int(meta["filled"])
        self.max_priority = float(meta["max_priority"])


def discounted_returns_to_go(rewards: np.ndarray, episode_lengths: np.ndarray, gamma: float) -> np.ndarray:
    """Each step's discounted return to the end of its episode, G_t = sum_{k=t}^{T-1} gamma^(k-t) r_k, for episodes
    stored back to back (float32; nothing after an episode's last step). Vectorized: the discounted sums that run on
    across episode ends, S, then each episode's share, G_t = S_t - gamma^(T-t) S_T (both terms are bounded by the
    largest |S|, so the difference loses nothing to cancellation)."""
    lengths = np.asarray(episode_lengths, np.int64)
    through = _discounted_reverse_sums(np.asarray(rewards, np.float64), gamma)
    ends = np.repeat(np.cumsum(lengths), lengths)  # each step's episode end (exclusive)
    after = np.append(through, 0.0)[ends]
    return (through - gamma ** (ends - np.arange(len(through))) * after).astype(np.float32)


def _discounted_reverse_sums(values: np.ndarray, gamma: float) -> np.ndarray:
    """S_t = sum_{k>=t} gamma^(k-t) x_k over the whole array: exact reverse cumulative sums of gamma^j x within
    blocks short enough that gamma^j stays far from underflow, then the blocks' totals carried back to front by
    the same function (on the block starts, with factor gamma^block: a few levels of recursion)."""
    n = len(values)
    if n == 0 or gamma <= 1e-100:  # gamma^1 S_{t+1} is below float precision: S = x
        return values.copy()
    block = 256 if gamma >= 0.5 else max(1, min(256, int(-250 / math.log10(gamma))))
    rows = -(-n // block)
    padded = np.zeros(rows * block)
    padded[:n] = values
    powers = gamma ** np.arange(block)
    within = np.cumsum((padded.reshape(rows, block) * powers)[:, ::-1], axis=1)[:, ::-1] / powers
    if rows == 1:
        return within.reshape(-1)[:n]
    from_next = np.append(_discounted_reverse_sums(within[:, 0], gamma**block)[1:], 0.0)  # S at each next block
    return (within + gamma ** (block - np.arange(block)) * from_next[:, None]).reshape(-1)[:n]


class StackedFrameReplay(ReplayBuffer):
    """A replay buffer for stacks of k frames ([k, H, W] observations, the newest last, as Gymnasium's
    FrameStackObservation makes them) that stores each frame once: a slot holds its observation's newest frame,
    and a stack is put together when a batch is drawn from the slots before it in the same episode. Where an
    episode is younger than k steps, the frames before its first are the padding FrameStackObservation uses: copies
    of the first frame (`padding="reset"`, its default) or zeros (`"zero"`). Memory: H x W bytes per uint8
    transition instead of k x H x W (a 1M-transition Atari replay of 84x84 frames: 7 GB, not 28).

    The padding is checked at every episode start, so stacks that were not made this way are an error, not wrong
    batches. The k - 1 oldest slots of the ring, whose earlier frames the ring has overwritten, are not drawn."""

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if len(obs_shape) != 3:
            raise ValueError(f"stacked frames are [k, H, W] observations, not {obs_shape}")
        kwargs["episodes"] = True  # each slot's episode start: where its stack begins
        super().__init__(capacity, num_envs, obs_shape[1:], *args, **kwargs)
        self.stack = obs_shape[0]
        self.padding: str | None = None
        """"reset" or "zero", read from the first episode start."""
        self._starting = np.ones(num_envs, bool)
        """Envs whose next added observation begins an episode."""
        self._unseen_frames = np.zeros(num_envs, np.int64)
        """Per env, how many of its next transitions need frames from before this buffer's first (a buffer started
        mid-episode, e.g. on resume without save_buffer): those are written but never drawn."""
        self._oldest = torch.arange(1, self.stack, device=self.device).unsqueeze(1)
        """Offsets from the write head of the k - 1 oldest slots, whose earlier frames are overwritten."""

    def add(
        self,
        obs: Tensor | np.ndarray,
        actions: Tensor | np.ndarray,
        rewards: Tensor | np.ndarray,
        next_obs: Tensor | np.ndarray,
        terminated: Tensor | np.ndarray,
        truncated: Tensor | np.ndarray,
        final_obs: Tensor | np.ndarray | None = None,
        masks: np.ndarray | None = None,
        next_masks: np.ndarray | None = None,
    ) -> None:
        self._check_padding(obs)
        slot = self.ptr.clone()
        newest = None if final_obs is None else final_obs[:, -1]
        super().add(obs[:, -1], actions, rewards, next_obs[:, -1], terminated, truncated, newest, masks, next_masks)
        self._starting = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        if self._unseen_frames.any():
            unseen = torch.from_numpy(self._unseen_frames > 0).to(self.device)
            self.valid[slot[unseen], self._envs[unseen]] = False
            self._unseen_frames = np.maximum(self._unseen_frames - 1, 0)
        self.valid[(self.ptr + self._oldest) % self.slots, self._envs] = False  # one write for the k - 1 oldest

    def _check_padding(self, obs: Tensor | np.ndarray) -> None:
        """At episode starts, the stack must be k copies of the first frame, or zeros then the first frame."""
        for env in np.flatnonzero(self._starting).tolist():
            stack = np.asarray(obs[env])
            repeated = bool((stack[:-1] == stack[-1]).all())
            zeros = not bool(stack[:-1].any())
            if not (repeated or zeros) and self.transitions_added == 0:  # joined an episode under way
                self._unseen_frames[env] = self.stack - 1
                continue
            padding = None if repeated and zeros else "reset" if repeated else "zero" if zeros else "neither"
            if padding is None:  # a blank first frame: either padding fits
                continue
            if padding == "neither" or self.padding not in (None, padding):
                raise ValueError(
                    "these observations are not frame stacks whose first frames are padding (copies of the episode's "
                    "first frame, or zeros): stacked-frame replay cannot rebuild them; use frame_stack_replay=false"
                )
            self.padding = padding

    def _observations(self, flat_index: Tensor, next_index: Tensor) -> tuple[Tensor, Tensor]:
        assert self.episode_first is not None
        first = self.episode_first.view(-1).index_select(0, flat_index)
        return self._stacks(flat_index, first), self._stacks(next_index, first)

    def _stacks(self, flat_index: Tensor, first: Tensor) -> Tensor:
        """[B, k, H, W]: the frames of the k slots up to each index's, the padding before its episode's first."""
        n, slots = self.num_envs, self.slots
        slot, env = flat_index // n, flat_index % n
        age = (slot - first) % slots  # steps since the episode's first observation
        back = torch.arange(self.stack - 1, -1, -1, device=self.device)  # oldest first
        before_start = back.unsqueeze(0) > age.unsqueeze(1)
        source = (slot.unsqueeze(1) - back) % slots
        source = torch.where(before_start, first.unsqueeze(1), source)
        frames = self._flat["obs"].index_select(0, (source * n + env.unsqueeze(1)).view(-1))
        frames = frames.view(len(flat_index), self.stack, *frames.shape[1:])
        if self.padding == "zero":
            frames = frames.masked_fill(before_start.view(*before_start.shape, 1, 1), 0)
        return frames

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        tensors["starting"] = torch.from_numpy(self._starting.copy())
        tensors["unseen_frames"] = torch.from_numpy(self._unseen_frames.copy())
        return tensors, {**meta, "padding": self.padding}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        tensors = dict(tensors)
        self._starting = tensors.pop("starting").numpy().copy()
        self._unseen_frames = tensors.pop("unseen_frames").numpy().copy()
        super().load(tensors, meta)
        self.padding = meta.get("padding")
