"""On-policy rollout storage: preallocated T x N tensors, filled in place step by step."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from policylab.data.batch import Batch
from policylab.runtime import check_memory


class RolloutBuffer:
    """Holds one rollout of `n_steps` steps from `num_envs` envs.

    `next_values[t]` is V of the state that followed step t: V(obs[t+1]) inside an
    episode, V(final obs) where the episode was truncated (the time limit is not
    part of the task, so the return is bootstrapped), and 0 where it terminated.
    """

    def __init__(
        self,
        n_steps: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        action_dtype: torch.dtype,
        device: torch.device | str = "cpu",
        obs_dtype: torch.dtype = torch.float32,
        logp_shape: tuple[int, ...] = (),
        logit_bias_size: int = 0,
    ) -> None:
        shape = (n_steps, num_envs)
        self.n_steps = n_steps
        self.num_envs = num_envs
        if torch.device(device).type == "cpu":
            obs_bytes = math.prod(obs_shape) * obs_dtype.itemsize
            # + values, rewards and bootstrap (float32), terminated and episode_end (bool)
            per = obs_bytes + math.prod(action_shape) * action_dtype.itemsize + 4 * math.prod(logp_shape) + 14
            per += 4 * logit_bias_size
            check_memory(
                n_steps * num_envs * per,
                f"a rollout of {n_steps:,} steps x {num_envs:,} envs ({per:,} bytes a step)",
                per,
                lambda fit: f"lower n_steps x num_envs to at most about {fit:,}",
            )
        self.obs = torch.zeros(*shape, *obs_shape, dtype=obs_dtype, device=device)  # uint8 for image frames
        self.actions = torch.zeros(*shape, *action_shape, dtype=action_dtype, device=device)
        self.logp = torch.zeros(*shape, *logp_shape, device=device)
        """One log-prob per step, or several (a diffusion policy's per denoising step: `logp_shape` (K,))."""
        self.values = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.episode_end = torch.zeros(shape, dtype=torch.bool, device=device)
        self.bootstrap = torch.zeros(shape, device=device)
        """V(final obs) at truncated steps, 0 elsewhere."""
        self.logit_bias = torch.zeros(*shape, logit_bias_size, device=device) if logit_bias_size else None
        """With action masks: the logit bias each step acted with (0 where allowed, -1e9 where not)."""

        self._numpy = torch.device(device).type == "cpu"
        if self._numpy:  # numpy views of the same memory: a numpy row write costs a fraction of a torch copy
            names = ("obs", "actions", "logp", "values", "rewards", "terminated", "episode_end", "bootstrap")
            self._np = {k: getattr(self, k).numpy() for k in names}
            if self.logit_bias is not None:
                self._np["logit_bias"] = self.logit_bias.numpy()

    def add_policy_step(
        self,
        t: int,
        obs: np.ndarray,
        actions: Tensor | np.ndarray,
        logp: Tensor | np.ndarray,
        values: Tensor | np.ndarray,
        logit_bias: np.ndarray | None = None,
    ) -> None:
        if self._numpy:
            np_ = self._np
            np_["obs"][t] = obs
            np_["actions"][t] = actions if isinstance(actions, np.ndarray) else actions.numpy()
            np_["logp"][t] = logp if isinstance(logp, np.ndarray) else logp.numpy()
            np_["values"][t] = values if isinstance(values, np.ndarray) else values.numpy()
            if logit_bias is not None:
                np_["logit_bias"][t] = logit_bias
            return
        assert isinstance(actions, Tensor) and isinstance(logp, Tensor) and isinstance(values, Tensor)
        self.obs[t] = torch.from_numpy(obs)
        self.actions[t] = actions
        self.logp[t] = logp
        self.values[t] = values
        if logit_bias is not None:
            assert self.logit_bias is not None
            self.logit_bias[t] = torch.from_numpy(logit_bias)

    def add_env_step(self, t: int, rewards: np.ndarray, terminated: np.ndarray, episode_end: np.ndarray) -> None:
        if self._numpy:
            self._np["rewards"][t] = rewards
            self._np["terminated"][t] = terminated
            self._np["episode_end"][t] = episode_end
            self._np["bootstrap"][t] = 0.0
            return
        self.rewards[t] = torch.from_numpy(rewards)
        self.terminated[t] = torch.from_numpy(terminated)
        self.episode_end[t] = torch.from_numpy(episode_end)
        self.bootstrap[t] = 0.0

    def set_bootstrap(self, t: int, env_index: Tensor, values: Tensor) -> None:
        self.bootstrap[t, env_index] = values

    def finish(self, last_values: Tensor) -> Batch:
        """The rollout as a T x N Batch, with `next_values` assembled from V(obs[t+1]) and the bootstraps."""
        following = torch.cat([self.values[1:], last_values.unsqueeze(0)])
        next_values = torch.where(self.episode_end, self.bootstrap, following)
        extra = {} if self.logit_bias is None else {"logit_bias": self.logit_bias}
        return Batch(
            obs=self.obs,
            actions=self.actions,
            logp=self.logp,
            values=self.values,
            rewards=self.rewards,
            terminated=self.terminated,
            episode_end=self.episode_end,
            next_values=next_values,
            **extra,
        )
