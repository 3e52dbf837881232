"""Vectorized environments with one step contract for the training loop.

`make_vec_env` builds N copies of any registered Gymnasium id or of a user's
`module:Class` / `module:function`, and returns a `VecEnv` whose `step` always
resets finished envs in the same step and reports their final observations
(`final_obs`), so that truncated episodes can bootstrap from V(final obs).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from policylab.envs.atari import is_atari, make_atari, register_atari
from policylab.envs.cartpole import SameStepCartPoleVectorEnv
from policylab.envs.encode import OneHotObservation, needs_encoding, raw_observation_space, storage_dtype
from policylab.envs.pendulum import PendulumVectorEnv
from policylab.envs.sync import SyncEnvs
from policylab.errors import EnvError, suggest
from policylab.imports import import_user_module

_NUMPY_VECTOR_ENVS: dict[str, type] = {
    "gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv": SameStepCartPoleVectorEnv,
}
_NUMPY_VECTOR_ENVS_BY_ID: dict[str, tuple[type, set[str]]] = {"Pendulum-v1": (PendulumVectorEnv, {"g"})}
"""Ids Gymnasium has no vector env for, with a numpy one here, and the env_kwargs it takes (others: one env each)."""


@dataclass
class StepResult:
    obs: np.ndarray
    """Next observations; for finished envs, the first observation of the new episode."""
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray | None
    """Like `obs`, but rows of finished envs hold their last observation; None if none finished."""

    @property
    def episode_end(self) -> np.ndarray:
        return self.terminated | self.truncated


class VecEnv:
    """A Gymnasium vector env with same-step autoreset, float32 observations (uint8 frames stay uint8) and state
    snapshots."""

    def __init__(
        self,
        env: gym.vector.VectorEnv | SyncEnvs,
        env_id: str,
        snapshot_able: bool,
        raw_observation_space: gym.Space | None = None,
        mask_method: bool | None = None,
    ) -> None:
        self.env = env
        self.env_id = env_id
        self.num_envs = env.num_envs
        self.single_observation_space = env.single_observation_space
        self.raw_observation_space = raw_observation_space or env.single_observation_space
        """The env's own observation space (a Discrete, a Tuple ...) where policylab encodes it as a Box."""
        self.single_action_space = env.single_action_space
        self.snapshot_able = snapshot_able
        self.obs_dtype = storage_dtype(self.single_observation_space)
        self.action_masks: np.ndarray | None = None
        """[N, mask size] flags (true: allowed) of the actions at the current observations, once
        `track_action_masks` was called (else None)."""
        self.mask_source: str | None = None
        """Where the masks come from: "method" (each env's `action_masks()`) or "info" (`info["action_mask"]`)."""
        envs = getattr(env, "envs", None)
        self.mask_method = has_mask_method(envs[0]) if mask_method is None and envs else bool(mask_method)
        """The envs have an `action_masks()` method (looked up through their wrappers)."""
        self.offers_info_masks = False
        """The last reset's info held an "action_mask" (a note suggests `action_masks=true` to runs without it)."""

    def track_action_masks(self) -> None:
        """Read the allowed actions at every reset and step from now on, into `action_masks`: from each env's
        `action_masks()` method (SB3-contrib's convention, e.g. its ActionMasker wrapper), else from
        `info["action_mask"]` (Gymnasium's, e.g. Taxi-v4). Call before `reset`; an env with neither is an error
        at that reset. `nets.heads.mask_logit_bias` checks them where they are used."""
        self.mask_source = "method" if self.mask_method else "pending"

    def _read_masks(self, info: dict[str, Any]) -> None:
        if self.mask_source == "pending":  # the first reset decides: the info's mask, or an error
            if "action_mask" not in info:
                raise EnvError(
                    f"{self.env_id!r} gives no action masks: it has no action_masks() method and its reset's info "
                    "has no 'action_mask'",
                    "give the env an action_masks() method returning one flag per action (sb3-contrib's "
                    "ActionMasker wrapper adds one), or return the flags as info['action_mask'] at every reset and "
                    "step; or drop action_masks",
                )
            self.mask_source = "info"
            if isinstance(self.env, SyncEnvs):
                self.env.info_masks = np.zeros(np.shape(info["action_mask"]), bool)
        if self.mask_source == "method":
            source = self.env.call("action_masks")  # type: ignore[union-attr]
        else:
            source = info["action_mask"]
        self.action_masks = np.asarray(source).astype(bool, copy=False)

    def mask_description(self) -> str:
        """Where this env's action masks come from, for errors about them."""
        where = "action_masks()" if self.mask_source == "method" else "info['action_mask']"
        return f"{self.env_id!r}'s {where}"

    def reset(self, seed: int | None = None) -> np.ndarray:
        obs, info = self.env.reset(seed=seed)
        self.offers_info_masks = "action_mask" in info
        if self.mask_source is not None:
            self._read_masks(info)
        return np.asarray(obs, dtype=self.obs_dtype)

    def step(self, actions: np.ndarray, rows: np.ndarray | None = None) -> StepResult:
        """Step the envs with one action per row. `rows`: only these rows need stepping (random search's free
        rows): envs stepped one by one skip the others (their rows show their last observation, reward 0, no end);
        vectorized envs step every row, and the caller ignores the rest."""
        if rows is not None and isinstance(self.env, SyncEnvs):
            obs, reward, terminated, truncated, info = self.env.step(actions, rows)
        else:
            obs, reward, terminated, truncated, info = self.env.step(actions)
        if self.mask_source is not None:
            self._read_masks(info)
        final_obs = None
        mask = info.get("_final_obs")
        if mask is not None and mask.any():
            final = info["final_obs"]
            if final.dtype == object:
                stacked = np.asarray(obs, dtype=self.obs_dtype).copy()
                stacked[mask] = np.stack(list(final[mask]))
                final = stacked
            final_obs = np.asarray(final, dtype=self.obs_dtype)
        return StepResult(
            np.asarray(obs, dtype=self.obs_dtype),
            np.asarray(reward, dtype=np.float32),
            np.asarray(terminated, dtype=bool),
            np.asarray(truncated, dtype=bool),
            final_obs,
        )

    def get_state(self) -> dict[str, Any] | None:
        """A JSON/array snapshot of every env's state, or None where that is not possible."""
        if not self.snapshot_able:
            return None
        if hasattr(self.env, "get_state"):  # the numpy-vectorized envs
            return self.env.get_state()  # type: ignore[no-any-return]
        subs = [_snapshot_env(e) for e in self.env.envs]  # type: ignore[union-attr]
        if any(s is None for s in subs):
            return None
        if self.action_masks is not None:  # an info mask cannot be asked for again: the current ones are saved
            return {"envs": subs, "action_masks": self.action_masks.copy()}
        return {"envs": subs}

    def set_state(self, snapshot: dict[str, Any]) -> None:
        if hasattr(self.env, "set_state"):
            self.env.set_state(snapshot)
            return
        for env, sub in zip(self.env.envs, snapshot["envs"]):  # type: ignore[union-attr]
            _restore_env(env, sub)
        if self.mask_source is not None:
            if "action_masks" not in snapshot:
                raise EnvError(
                    "this checkpoint was written by a run without action masks", "resume with action_masks=false"
                )
            if self.mask_source == "pending":
                self.mask_source = "method" if self.mask_method else "info"
            self.action_masks = np.asarray(snapshot["action_masks"], bool).copy()

    def close(self) -> None:
        self.env.close()


def has_mask_method(env: gym.Env) -> bool:
    """Whether `env` has a callable `action_masks()` (looked up through its wrappers)."""
    try:
        return callable(env.get_wrapper_attr("action_masks"))
    except AttributeError:
        return False


def resolve_env_id(env_id: str) -> None:
    """Raise a clear error for an env id that Gymnasium does not know."""
    if ":" in env_id:
        return
    register_atari(env_id)
    if env_id not in gym.registry:
        raise EnvError(
            f"unknown environment {env_id!r}.{suggest(env_id, gym.registry.keys())}",
            "use a registered Gymnasium id (see `python -c 'import gymnasium; gymnasium.pprint_registry()'`) "
            "or 'module:Class' / 'module:function' for your own env",
        )


def _import_entry(target: str) -> Callable[..., gym.Env]:
    module_name, _, attr = target.partition(":")
    try:
        module = import_user_module(module_name)
    except ImportError as exc:
        top = module_name.partition(".")[0]
        if exc.name and exc.name.partition(".")[0] != top:  # the user's module imports a missing package
            fix = f"install {exc.name.partition('.')[0]} (the module {module_name!r} imports it)"
        else:
            fix = "run from the folder that holds it, add that folder to PYTHONPATH, or pip install it"
        raise EnvError(
            f"cannot import module {module_name!r} for env {target!r}: {exc} (looked in the current directory "
            f"{Path.cwd()} and on sys.path)",
            fix,
        ) from None
    if not hasattr(module, attr):
        raise EnvError(
            f"module {module_name!r} has no attribute {attr!r}.{suggest(attr, dir(module))}",
            "name a class or function that returns a gymnasium.Env, as 'module:Class'",
        )
    return getattr(module, attr)


def make_single_env(
    env_id: str, env_kwargs: dict[str, Any] | None = None, *, training: bool = False, **extra: Any
) -> gym.Env:
    """One plain environment (for evaluation with rendering, or for `module:Class` envs); `training`: an env that
    training steps (Atari games then end episodes at lost lives and clip rewards, envs/atari.py)."""
    kwargs = {**(env_kwargs or {}), **extra}
    resolve_env_id(env_id)
    if is_atari(env_id):
        return _construct(env_id, lambda: make_atari(env_id, training, **kwargs))
    if ":" in env_id:
        entry = _import_entry(env_id)
        env = _construct(env_id, lambda: entry(**kwargs))
        if not isinstance(env, gym.Env):
            raise EnvError(f"{env_id!r} returned {type(env).__name__}, not a gymnasium.Env", "return a gymnasium.Env")
        return _encoded(env)
    try:
        return _encoded(_construct(env_id, lambda: gym.make(env_id, **kwargs)))
    except gym.error.DependencyNotInstalled as exc:
        raise EnvError(f"environment {env_id!r} needs a package that is not installed: {exc}", "install it") from None


def _encoded(env: gym.Env) -> gym.Env:
    """Discrete / MultiDiscrete / MultiBinary / Tuple / Dict observations as a float32 vector (envs/encode.py)."""
    return OneHotObservation(env) if needs_encoding(env.observation_space) else env


def _construct(env_id: str, build: Callable[[], Any]) -> Any:
    """Call an env constructor; a TypeError from bad env_kwargs becomes an error naming them."""
    try:
        with _mujoco_warnings_once(env_id):
            return build()
    except TypeError as exc:
        raise EnvError(
            f"cannot create {env_id!r} with the given env_kwargs: {exc}",
            "fix or remove the offending key in env_kwargs (--set env_kwargs={...})",
        ) from None


_MUJOCO_WARNINGS_SHOWN: set[str] = set()


@contextlib.contextmanager
def _mujoco_warnings_once(env_id: str) -> Iterator[None]:
    """MuJoCo prints its warnings from C to stdout (and appends them to MUJOCO_LOG.TXT in the current directory)
    each time a model compiles: Gymnasium's v5 models give a deprecation warning ('settotalmass') for every env made,
    13 times in a HalfCheetah-v5 run's output. While an env is made, each distinct warning goes to stderr once per
    process instead; MuJoCo's own handler is back afterwards (warnings while stepping are printed as MuJoCo does)."""
    if "mujoco" not in sys.modules and "mujoco" not in str(getattr(gym.registry.get(env_id), "entry_point", "")):
        yield
        return
    import mujoco

    def once(message: str) -> None:
        if message not in _MUJOCO_WARNINGS_SHOWN:
            _MUJOCO_WARNINGS_SHOWN.add(message)
            print(f"MuJoCo warning: {message}", file=sys.stderr, flush=True)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(once)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_vec_env(
    env_id: str,
    num_envs: int,
    vectorization: str = "auto",
    env_kwargs: dict[str, Any] | None = None,
    training: bool = False,
) -> VecEnv:
    """N copies of `env_id` behind the same-step `VecEnv` contract (`training`: see make_single_env)."""
    resolve_env_id(env_id)
    kwargs = dict(env_kwargs or {})
    if ":" not in env_id and vectorization == "auto":
        spec = gym.spec(env_id)
        fast = _NUMPY_VECTOR_ENVS.get(str(spec.vector_entry_point))
        if fast is not None:
            max_steps = kwargs.pop("max_episode_steps", None) or spec.max_episode_steps or 500
            env = _construct(env_id, lambda: fast(num_envs=num_envs, max_episode_steps=max_steps, **kwargs))
            env.spec = spec  # type: ignore[misc]
            return VecEnv(env, env_id, snapshot_able=True)
        by_id, accepted = _NUMPY_VECTOR_ENVS_BY_ID.get(env_id, (None, set()))
        if by_id is not None and set(kwargs) <= accepted | {"max_episode_steps"}:
            max_steps = kwargs.pop("max_episode_steps", None) or spec.max_episode_steps
            return VecEnv(by_id(num_envs, max_steps, **kwargs), env_id, snapshot_able=True)
    make_one = lambda: make_single_env(env_id, kwargs, training=training)  # noqa: E731
    probe = make_one()
    check_spaces_are_vectorizable(probe, env_id)
    raw = raw_observation_space(probe)
    mask_method = has_mask_method(probe)
    probe.close()
    if vectorization == "async":
        env = gym.vector.AsyncVectorEnv([make_one] * num_envs, autoreset_mode=AutoresetMode.SAME_STEP)
        return VecEnv(env, env_id, snapshot_able=False, raw_observation_space=raw, mask_method=mask_method)
    return VecEnv(SyncEnvs(make_one, num_envs), env_id, snapshot_able=True, raw_observation_space=raw)  # type: ignore[arg-type]


def check_spaces_are_vectorizable(env: gym.Env, env_id: str) -> None:
    if not isinstance(env.observation_space, gym.spaces.Box):
        raise EnvError(
            f"{env_id!r} has observation space {env.observation_space}: policylab takes Box, Discrete, "
            "MultiDiscrete and MultiBinary observations and one-level Tuples or Dicts of them (encoded as one vector)",
            "flatten nested spaces yourself (gymnasium.wrappers.FlattenObservation) in a `module:function` env",
        )


# --- state snapshots of single envs, for exact resume -------------------------------------------


def _time_limit(env: gym.Env) -> gym.wrappers.TimeLimit | None:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = env.env
    return None


_MUJOCO_FIELDS = ("qpos", "qvel", "act", "qacc_warmstart", "ctrl")


def _snapshot_env(env: gym.Env) -> dict[str, Any] | None:
    base: Any = env.unwrapped
    arrays: dict[str, np.ndarray] = {}
    data = getattr(base, "data", None)
    if data is not None and hasattr(data, "qpos"):
        arrays.update({f"mj_{k}": np.array(getattr(data, k)) for k in _MUJOCO_FIELDS})
        arrays["mj_time"] = np.array(data.time)
    elif isinstance(getattr(base, "state", None), np.ndarray):
        arrays["state"] = np.array(base.state)
    elif isinstance(getattr(base, "s", None), (int, np.integer)):  # toy-text grids: FrozenLake, CliffWalking
        arrays["s"] = np.array(int(base.s))
    else:
        return None
    limit = _time_limit(env)
    return {
        "arrays": arrays,
        "rng": base.np_random.bit_generator.state,
        "elapsed": None if limit is None else limit._elapsed_steps,
    }


def _restore_env(env: gym.Env, snapshot: dict[str, Any]) -> None:
    base: Any = env.unwrapped
    arrays = snapshot["arrays"]
    if "mj_qpos" in arrays:
        import mujoco

        for k in _MUJOCO_FIELDS:
            getattr(base.data, k)[:] = arrays[f"mj_{k}"]
        base.data.time = float(arrays["mj_time"])
        mujoco.mj_forward(base.model, base.data)
    elif "s" in arrays:
        base.s = int(arrays["s"])
    else:
        base.state = np.array(arrays["state"])
    base.np_random.bit_generator.state = snapshot["rng"]
    limit = _time_limit(env)
    if limit is not None:
        limit._elapsed_steps = snapshot["elapsed"]
