"""Atari 2600 games through ale-py (the `atari` extra: ale-py with its ROMs, and OpenCV for resizing), with the
preprocessing of the DQN papers that SB3's AtariWrapper applies: up to 30 no-op actions at reset, 4 frames per
step (the max of the last two), 84x84 grayscale, FIRE pressed at reset in games that need it, 4 frames stacked
(Gymnasium's AtariPreprocessing and FrameStackObservation). Two parts are for training only, as in SB3: a lost
life ends the episode (`terminal_on_life_loss`) and rewards are clipped to their sign (`clip_reward`); the
evaluations play whole games with the game's own score. Every option is an env_kwargs key
(`--set 'env_kwargs={frame_stack: 4, terminal_on_life_loss: false}'`); the others go to `gym.make`.

`ALE/<Game>-v5` ids (sticky actions, as the ALE recommends) and `<Game>NoFrameskip-v4` ids (none, as rl-zoo's
results) both work: the v5 ids are made with frameskip=1 and the frame skip is the preprocessing's.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from policylab.errors import EnvError

INSTALL = "pip install 'policylab[atari]' (ale-py with its ROMs, and opencv-python-headless)"
PREPROCESSING = {
    "frame_stack": 4,
    "noop_max": 30,
    "frame_skip": 4,
    "screen_size": 84,
    "terminal_on_life_loss": True,
    "clip_reward": True,
}


def looks_like_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def register_atari(env_id: str) -> None:
    """Register ale-py's games if `env_id` names one and they are not registered yet; an error naming the extra
    if ale-py is missing."""
    if env_id in gym.registry or not looks_like_atari(env_id):
        return
    try:
        import ale_py
    except ImportError:
        raise EnvError(f"{env_id!r} is an Atari game and ale-py is not installed", INSTALL) from None
    gym.register_envs(ale_py)


def is_atari(env_id: str) -> bool:
    spec = gym.registry.get(env_id)
    return spec is not None and str(spec.entry_point).startswith("ale_py")


class FireReset(gym.Wrapper):
    """Presses FIRE after every reset, for the games that wait for it (Breakout, ...), as SB3's FireResetEnv."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


def _sign(reward: Any) -> float:
    return float(np.sign(float(reward)))


def make_atari(env_id: str, training: bool, **kwargs: Any) -> gym.Env:
    """One Atari env with the preprocessing above (`training`: with its training-only parts)."""
    options = {key: kwargs.pop(key, default) for key, default in PREPROCESSING.items()}
    spec = gym.spec(env_id)
    if spec.kwargs.get("frameskip", 1) != 1:
        kwargs.setdefault("frameskip", 1)
    try:
        env = gym.make(env_id, **kwargs)
        env = gym.wrappers.AtariPreprocessing(
            env,
            noop_max=options["noop_max"],
            frame_skip=options["frame_skip"],
            screen_size=options["screen_size"],
            terminal_on_life_loss=training and options["terminal_on_life_loss"],
            grayscale_obs=True,
            scale_obs=False,
        )
    except gym.error.DependencyNotInstalled as exc:
        raise EnvError(f"{env_id!r} needs a package that is not installed: {exc}", INSTALL) from None
    if "FIRE" in env.unwrapped.get_action_meanings():  # type: ignore[attr-defined]
        env = FireReset(env)
    if training and options["clip_reward"]:
        env = gym.wrappers.TransformReward(env, _sign)
    return gym.wrappers.FrameStackObservation(env, options["frame_stack"])
