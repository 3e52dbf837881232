"""Collection by rollout workers: slices of a run's envs, each with a copy of the acting policy.

`collect_rollout` is the one on-policy rollout step (act, step the envs, record, bootstrap at truncations) that
`OnPolicyLoop` runs over all its envs. With `rollout_workers=W`, the envs are split into W contiguous slices and
each `RolloutSlice` runs the same step over its slice with its own copy of the acting policy: in a Ray actor
(`rollout_backend=ray`), or in the learner's process one after another (`inline`: the same arithmetic, for tests
and debugging). What keeps a W-worker on-policy run reproducible for a fixed seed and W:

* the learner draws the rollout's action noise for all envs with its generator (one call, as in-process) and
  hands each worker its slice of it; a slice's envs are seeded with seed + their index, as in-process;
* the weights are broadcast once per rollout (through Ray's object store);
* observation and reward normalization statistics are frozen for a rollout: each worker normalizes with the
  learner's statistics of the rollout's start and returns the statistics of what it saw, which the learner
  merges afterwards (RLlib's filters do the same).

So a W-worker run is not the in-process run: it normalizes with statistics one rollout old (the in-process loop
updates them every step), its policy acts on batches of one slice (the same values up to float rounding), and
an env family that draws for all its envs from one generator (the numpy-vectorized CartPole) sees other
episodes in slices. For a fixed seed and W, the Ray and inline backends compute the same run, bit for bit.

Off-policy (`OffPolicySlice`): each worker steps its slice for the `train_freq` vector steps between two update
bursts with the weights of the burst's start (the in-process loop acts with the same weights there), exploring
with its own copy of the algorithm's exploration (epsilon-greedy, Gaussian or tanh-Gaussian noise, random
actions before `learning_starts`) from its own generator, seeded from the run's seed and the slice; observations
for acting are normalized with the learner's statistics of the segment's start. The learner records the
returned transitions in step order, exactly as the in-process loop records its own (replay, running statistics,
episode counters), then updates.

A worker whose actor dies is started again on the same slice and collects that slice again (its envs restart
from a reset, seeded with seed + index + 1000 x restarts); the learner never sees a partial rollout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.cluster import WorkerPool, one_thread_if_actor
from policylab.data import RolloutBuffer
from policylab.envs import EpisodeTracker, ObsNormalizer, RewardScaler, VecEnv, make_vec_env
from policylab.envs.encode import storage_dtype, torch_dtype
from policylab.envs.normalize import RunningMeanStd
from policylab.errors import ConfigError, PolicylabError
from policylab.nets.actor_critic import ActorCritic
from policylab.nets.heads import check_maskable, mask_logit_bias

BACKENDS = ("ray", "inline")
RESTART_SEED_STRIDE = 1000
"""A restarted worker reseeds its envs with seed + index + this x restarts (a fresh episode stream)."""
EXPLORATION_SEED_STRIDE = 7919
"""An off-policy worker's exploration generator: seed + this x (first env index + 1) + RESTART_SEED_STRIDE x
restarts, apart from the learner's generator (seed) and from each other."""
FIELDS = ("obs", "actions", "logp", "values", "rewards", "terminated", "episode_end", "bootstrap")


def rollout_buffer(cfg: Any, net: Any, obs_space: Any, num_envs: int) -> RolloutBuffer:
    """The rollout storage of `num_envs` envs stepped by `net` (with room for the action masks' logit bias where the
    run uses action masks)."""
    head = net.head
    return RolloutBuffer(
        cfg.n_steps, num_envs, tuple(obs_space.shape or ()), head.action_shape, head.action_dtype, cfg.device,
        torch_dtype(storage_dtype(obs_space)), getattr(head, "logp_shape", ()),
        head.n_outputs if getattr(cfg, "action_masks", False) else 0,
    )  # fmt: skip


def collected_fields(buf: RolloutBuffer) -> tuple[str, ...]:
    """The buffer fields a rollout fills (what a rollout worker sends back)."""
    return FIELDS if buf.logit_bias is None else (*FIELDS, "logit_bias")


def track_action_masks(cfg: Any, env: VecEnv, head: Any) -> None:
    """With `action_masks`: check that the actions can be masked, and have `env` read the masks (before its reset)."""
    if not getattr(cfg, "action_masks", False):
        return
    check_maskable(head, repr(cfg.env))  # before any env step
    env.track_action_masks()


def unused_masks_note(cfg: Any, env: VecEnv) -> list[str]:
    """A note for a run whose env offers action masks that it does not use."""
    if cfg.action_masks or not (env.offers_info_masks or env.mask_method):
        return []
    where = "an action_masks() method" if env.mask_method else "info['action_mask']"
    return [f"{cfg.env} offers action masks ({where}); --set action_masks=true acts only among the allowed actions"]


def normalize_obs(obs_norm: ObsNormalizer | None, raw: np.ndarray, update: bool) -> np.ndarray:
    if obs_norm is None:
        return raw
    if update:
        obs_norm.update(raw)
    return obs_norm(raw)


def rollout_noise(
    net: Any, steps: int, envs: int, generator: torch.Generator | None, device: str | torch.device
) -> Tensor:
    """A rollout's pre-drawn noise in one RNG call, envs on axis 1 (`ActorCritic.rollout_noise`; a generative
    policy's head draws it per step)."""
    if isinstance(net, ActorCritic):
        return net.rollout_noise(steps, envs, generator, device)
    return net.head.noise((steps, envs), generator, device)


def collect_rollout(
    net: ActorCritic,
    env: VecEnv,
    buf: RolloutBuffer,
    noise: Tensor,
    obs: np.ndarray,
    observe: Callable[[np.ndarray, bool], np.ndarray],
    tracker: EpisodeTracker,
    reward_scaler: RewardScaler | None,
    device: str | torch.device,
) -> tuple[np.ndarray, Tensor]:
    """Step `env` for `buf.n_steps` steps from `obs` with `net`, writing into `buf`; `noise` [T, N, ...] is the
    rollout's pre-drawn action noise, `observe(raw, update)` normalizes observations. Returns (the observation
    after the last step, its value)."""
    head = net.head
    numpy_acting = net.numpy_acting
    noise_np = noise.numpy() if numpy_acting else None
    noise_at = net.noise_at if isinstance(net, ActorCritic) else lambda noise, t: noise[t]
    masking = buf.logit_bias is not None
    bias = None
    for t in range(buf.n_steps):
        if masking:  # the allowed actions at `obs`, as the logit bias the policy acts with (and is trained with)
            bias = mask_logit_bias(head, env.action_masks, env.mask_description())
        if numpy_acting:  # small CPU batches: numpy calls cost a fifth of torch calls
            acting = (obs, noise_at(noise_np, t)) if bias is None else (obs, noise_at(noise_np, t), bias)
            actions, logp, values = net.act_numpy(*acting)  # type: ignore[arg-type]
            env_actions = head.to_env_numpy(actions)
            buf.add_policy_step(t, obs, actions, logp, values, bias)
        else:
            with torch.inference_mode():
                acting_obs, step_noise = torch.from_numpy(obs).to(device), noise_at(noise, t)
                if bias is None:  # (a generative policy's `act` takes no mask)
                    taken, log_probs, value_estimates = net.act(acting_obs, noise=step_noise)
                else:
                    logit_bias = torch.from_numpy(bias).to(device)
                    taken, log_probs, value_estimates = net.act(acting_obs, noise=step_noise, logit_bias=logit_bias)
                env_actions = head.to_env(taken).cpu().numpy()
            buf.add_policy_step(t, obs, taken, log_probs, value_estimates, bias)
        res = env.step(env_actions)
        episode_end = res.episode_end
        tracker.update(res.reward, episode_end)
        reward = res.reward if reward_scaler is None else reward_scaler(res.reward, episode_end)
        buf.add_env_step(t, reward, res.terminated, episode_end)
        if res.final_obs is not None:
            truncated = res.truncated & ~res.terminated
            if truncated.any():
                idx = np.flatnonzero(truncated)
                final = observe(res.final_obs[idx], False)
                rows = torch.from_numpy(idx).to(device)
                with torch.inference_mode():  # a recurrent net: from the envs' states before their reset
                    boot = net.predict_values(torch.from_numpy(final).to(device), rows if net.recurrent else None)
                buf.set_bootstrap(t, rows, boot)
        if net.recurrent:
            net.reset_states(episode_end)
        obs = observe(res.obs, True)
    with torch.inference_mode():
        last_values = net.predict_values(torch.from_numpy(obs).to(device))
    return obs, last_values


def env_slices(num_envs: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of the envs, as even as possible (the first ones one env larger)."""
    size, extra = divmod(num_envs, workers)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(workers)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_workers(cfg: Any) -> None:
    """rollout_workers / rollout_backend against the config and the machine."""
    workers, backend = cfg.rollout_workers, cfg.rollout_backend
    if workers < 0:
        raise ConfigError(f"rollout_workers={workers} must be >= 0", "set rollout_workers=0 (in-process) or e.g. 2")
    if backend not in BACKENDS:
        raise ConfigError(f"rollout_backend={backend!r} is not one of {', '.join(BACKENDS)}", "set rollout_backend=ray")
    if workers > cfg.num_envs:
        raise ConfigError(
            f"rollout_workers={workers} is more than num_envs={cfg.num_envs}: a worker would have no env",
            f"set rollout_workers <= {cfg.num_envs}, or more num_envs",
        )


class RolloutSlice:
    """The envs [start, stop) of a run and a copy of its acting policy; `collect` runs one rollout of them."""

    def __init__(self, algo: str, cfg: Any, start: int, stop: int, restarts: int = 0) -> None:
        from policylab.algos import get_algo

        one_thread_if_actor()
        self.cfg, self.start, self.stop = cfg, start, stop
        n = stop - start
        self.env = make_vec_env(cfg.env, n, cfg.vectorization, cfg.env_kwargs, training=True)
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        self.net: ActorCritic = get_algo(algo).algo_cls.build_policy(cfg, obs_space, act_space).to(cfg.device)
        shape: tuple[int, ...] = tuple(obs_space.shape or ())
        self.buf = rollout_buffer(cfg, self.net, obs_space, n)
        track_action_masks(cfg, self.env, self.net.head)
        self.tracker = EpisodeTracker(n)
        self.obs_norm = ObsNormalizer(shape, cfg.clip_obs) if cfg.normalize_obs else None
        self.reward_scaler = RewardScaler(n, cfg.gamma, cfg.clip_reward) if cfg.normalize_reward else None
        self.raw_obs = self.env.reset(seed=cfg.seed + start + RESTART_SEED_STRIDE * restarts)
        self._fresh_stats()
        self._seen_obs(self.raw_obs)  # the first observations count, as in-process

    def _fresh_stats(self) -> None:
        if self.obs_norm is not None:
            self.obs_norm.updates = RunningMeanStd(self.obs_norm.rms.mean.shape, count=0.0)
        if self.reward_scaler is not None:
            self.reward_scaler.updates = RunningMeanStd((), count=0.0)

    def _seen_obs(self, raw: np.ndarray) -> None:
        if self.obs_norm is not None:
            self.obs_norm.update(raw)

    def _observe(self, raw: np.ndarray, update: bool) -> np.ndarray:
        if update:
            self.raw_obs = raw
        return normalize_obs(self.obs_norm, raw, update)

    def collect(
        self,
        weights: dict[str, np.ndarray],
        noise: np.ndarray,
        obs_stats: dict[str, np.ndarray] | None,
        reward_stats: dict[str, np.ndarray] | None,
    ) -> dict[str, Any]:
        """One rollout of the slice with `weights`, the slice's `noise` and the learner's frozen statistics."""
        self.net.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
        if self.obs_norm is not None and obs_stats is not None:
            self.obs_norm.rms.load(obs_stats)
        if self.reward_scaler is not None and reward_stats is not None:
            self.reward_scaler.rms.load(reward_stats)
        started = time.perf_counter()
        episodes_before = self.tracker.episodes
        obs = normalize_obs(self.obs_norm, self.raw_obs, False)
        _, last_values = collect_rollout(
            self.net, self.env, self.buf, torch.from_numpy(noise), obs, self._observe, self.tracker,
            self.reward_scaler, self.cfg.device,
        )  # fmt: skip
        finished = self.tracker.episodes - episodes_before
        out: dict[str, Any] = {name: getattr(self.buf, name).numpy() for name in collected_fields(self.buf)}
        out["last_values"] = last_values.numpy()
        out["episodes"] = finished
        kept = min(finished, len(self.tracker.recent_returns))
        out["episode_returns"] = list(self.tracker.recent_returns)[len(self.tracker.recent_returns) - kept :]
        out["episode_lengths"] = list(self.tracker.recent_lengths)[len(self.tracker.recent_lengths) - kept :]
        out["obs_updates"] = None if self.obs_norm is None else self.obs_norm.updates.state()  # type: ignore[union-attr]
        out["reward_updates"] = None if self.reward_scaler is None else self.reward_scaler.updates.state()  # type: ignore[union-attr]
        self._fresh_stats()
        out["seconds"] = time.perf_counter() - started  # the collection itself, without the call around it
        return out

    def get_state(self) -> dict[str, Any]:
        """Everything the slice carries between rollouts, for the run's checkpoint (None env: not capturable)."""
        return {
            "env": self.env.get_state(),
            "raw_obs": self.raw_obs.copy(),
            "tracker": self.tracker.state(),
            "reward_returns": None if self.reward_scaler is None else self.reward_scaler.returns.copy(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state["env"] is None:  # an env that cannot be saved restarts its episodes (the loop says so)
            self.raw_obs = self.env.reset(seed=self.cfg.seed + self.start)
        else:
            self.env.set_state(state["env"])
            self.raw_obs = np.asarray(state["raw_obs"], np.float32).copy()
        self.tracker.load(state["tracker"])
        if self.reward_scaler is not None and state["reward_returns"] is not None:
            self.reward_scaler.returns = np.asarray(state["reward_returns"], np.float64).copy()
        self._fresh_stats()

    def close(self) -> None:
        self.env.close()


class OffPolicySlice:
    """The envs [start, stop) of an off-policy run and a copy of its algorithm for acting; `collect` steps them
    between two update bursts and returns the transitions."""

    def __init__(self, algo: str, cfg: Any, start: int, stop: int, restarts: int = 0) -> None:
        from policylab.algos import get_algo

        one_thread_if_actor()
        self.cfg, self.start = cfg, start
        self.env = make_vec_env(cfg.env, stop - start, cfg.vectorization, cfg.env_kwargs, training=True)
        spaces = (self.env.single_observation_space, self.env.single_action_space)
        self.algo = get_algo(algo).algo_cls(cfg, *spaces)
        seed = cfg.seed + EXPLORATION_SEED_STRIDE * (start + 1) + RESTART_SEED_STRIDE * restarts
        self.algo.generator.manual_seed(seed)
        self.obs = self.env.reset(seed=cfg.seed + start + RESTART_SEED_STRIDE * restarts)
        self.norm = ObsNormalizer(tuple(spaces[0].shape or ()), cfg.clip_obs) if cfg.normalize_obs else None

    def current_obs(self) -> np.ndarray:
        return self.obs

    def collect(
        self,
        weights: dict[str, np.ndarray],
        steps: int,
        first_step: int,
        random_until: int,
        offline_steps: int,
        online_total: int,
        obs_stats: dict[str, np.ndarray] | None,
    ) -> dict[str, Any]:
        """`steps` vector steps from env step `first_step` (summed over all the run's envs), acting as the
        in-process loop does: random actions before `random_until`, else the algorithm's exploration."""
        algo, cfg = self.algo, self.cfg
        algo.net.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
        norm = None
        if self.norm is not None and obs_stats is not None:
            self.norm.rms.load(obs_stats)
            norm = self.norm
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "reward", "next_obs", "terminated")}
        rows.update(truncated=[], final_obs=[])
        finals = []
        for i in range(steps):
            step = first_step + i * cfg.num_envs
            if step < random_until:
                actions = algo.random_actions(len(self.obs))
            else:
                acting_obs = self.obs if norm is None else norm(self.obs)
                actions = algo.explore(acting_obs, (step - offline_steps) / online_total)
            res = self.env.step(algo.to_env(actions))
            for key, value in (("obs", self.obs), ("actions", actions), ("reward", res.reward), ("next_obs", res.obs)):
                rows[key].append(value)
            rows["terminated"].append(res.terminated)
            rows["truncated"].append(res.truncated)
            rows["final_obs"].append(res.obs if res.final_obs is None else res.final_obs)
            finals.append(res.final_obs is not None)
            self.obs = res.obs
        return {**{k: np.stack(v) for k, v in rows.items()}, "has_final": np.array(finals, dtype=bool)}

    def get_state(self) -> dict[str, Any]:
        generator = self.algo.generator.get_state().numpy()
        state = {"env": self.env.get_state(), "obs": self.obs.copy(), "generator": generator}
        sde = getattr(self.algo, "sde", None)  # gSDE's held matrices (SAC, TQC)
        if sde is not None:
            state["sde"] = sde.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if state["env"] is None:
            self.obs = self.env.reset(seed=self.cfg.seed + self.start)
        else:
            self.env.set_state(state["env"])
            self.obs = np.asarray(state["obs"], np.float32).copy()
        self.algo.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        sde = getattr(self.algo, "sde", None)
        if sde is not None and "sde" in state:
            sde.set_state(state["sde"])

    def close(self) -> None:
        self.env.close()


class RolloutWorkers(WorkerPool):
    """W slices of one run's envs: Ray actors (one CPU each), or inline objects in the learner's process."""

    def __init__(self, algo: str, cfg: Any, slice_cls: type) -> None:
        self.slices = env_slices(cfg.num_envs, cfg.rollout_workers)

        def arguments(i: int, restarts: int) -> tuple[Any, ...]:
            return (algo, cfg, *self.slices[i], restarts)

        super().__init__(slice_cls, arguments, len(self.slices), cfg.rollout_backend, "rollout_workers")

    def collect(
        self, weights: dict[str, np.ndarray], per_slice: list[dict[str, Any]], **common: Any
    ) -> list[dict[str, Any]]:
        """Every slice's `collect(weights, **per_slice[i], **common)`, in slice order; a dead worker is restarted
        and its slice collected again."""
        return self.map("collect", weights, per_slice, **common)

    def get_state(self) -> list[dict[str, Any]]:
        return self.call("get_state")

    def set_state(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.handles):
            raise PolicylabError(
                f"the checkpoint has {len(states)} rollout workers' state, this run {len(self.handles)}",
                f"resume with --set rollout_workers={len(states)}",
            )
        self.call_each("set_state", states)
