"""A trained policy, loaded from a run directory: `pl.load(dir).act(obs, deterministic=True)`.

The policy carries its observation-normalization statistics and the env's
spaces, so it needs nothing but the checkpoint: one plain Gymnasium observation
in, one action the plain env accepts out (or a batch in, a batch out).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from policylab.checkpoint import BEST, find_best, load_checkpoint, load_module_state, unprefixed
from policylab.data.dataset import d4rl_score
from policylab.envs import ObsNormalizer, make_single_env, make_vec_env
from policylab.envs.encode import ObservationEncoder, needs_encoding
from policylab.envs.vec import has_mask_method
from policylab.errors import CheckpointError, EnvError, PolicylabError
from policylab.nets.actor_critic import ActorCritic
from policylab.nets.heads import CategoricalHead, mask_logit_bias


def space_to_json(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist()}
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "low": space.low.astype(np.float64).tolist(),
            "high": space.high.astype(np.float64).tolist(),
            "dtype": str(space.dtype),
        }
    if isinstance(space, gym.spaces.MultiBinary):
        n: Any = space.n
        return {"type": "MultiBinary", "n": int(n) if np.ndim(n) == 0 else [int(k) for k in np.ravel(n)]}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_json(s) for s in space]}
    if isinstance(space, gym.spaces.Dict):  # a list of pairs: JSON objects do not promise an order
        return {"type": "Dict", "spaces": [[str(k), space_to_json(s)] for k, s in space.spaces.items()]}
    raise EnvError(f"cannot save the space {space}", "use Box, Discrete, MultiDiscrete, MultiBinary, Tuple or Dict")


def space_from_json(data: dict[str, Any]) -> gym.Space:
    if data["type"] == "Discrete":
        return gym.spaces.Discrete(data["n"], start=data.get("start", 0))
    if data["type"] == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(np.array(data["nvec"]), start=np.array(data["start"]))
    if data["type"] == "Box":
        dtype = np.dtype(data["dtype"])
        low = np.array(data["low"]).astype(dtype)
        high = np.array(data["high"]).astype(dtype)
        return gym.spaces.Box(low, high, shape=tuple(data["shape"]), dtype=dtype)
    if data["type"] == "MultiBinary":
        return gym.spaces.MultiBinary(data["n"])
    if data["type"] == "Tuple":
        return gym.spaces.Tuple([space_from_json(s) for s in data["spaces"]])
    if data["type"] == "Dict":
        return gym.spaces.Dict([(k, space_from_json(s)) for k, s in data["spaces"]])  # order kept
    raise CheckpointError(f"unknown space type {data['type']!r} in checkpoint", "retrain with this policylab version")


class Policy:
    """Acting with a trained network (deterministic or sampled), on one observation or a batch."""

    def __init__(
        self,
        net: nn.Module,
        observation_space: gym.spaces.Box,
        action_space: gym.Space,
        obs_normalizer: ObsNormalizer | None = None,
        env_id: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        algo: str | None = None,
        seed: int = 0,
        raw_observation_space: gym.Space | None = None,
        eval_deterministic: bool = True,
        reference_returns: tuple[float, float] | None = None,
        action_masks: bool = False,
    ) -> None:
        self.net: Any = net  # any policy network: it has env_action(obs, deterministic, generator)
        self.observation_space = observation_space
        """What the network reads: a Box (for Discrete / Tuple envs, the encoded vector of envs/encode.py)."""
        self.encoder = None
        if raw_observation_space is not None and needs_encoding(raw_observation_space):
            self.encoder = ObservationEncoder(raw_observation_space)
        self.action_space = action_space
        self.obs_normalizer = obs_normalizer
        self.env_id = env_id
        self.env_kwargs = env_kwargs or {}
        self.algo = algo
        self.eval_deterministic = eval_deterministic
        """How its run evaluated it (`policylab eval` does the same unless told otherwise)."""
        self.reference_returns = reference_returns
        """(random, expert) returns of the dataset its run learned from, where it has both: normalized scores."""
        self.action_masks = action_masks
        """Trained with action masks: `evaluate` (and `policylab eval`) reads its env's masks and acts among them."""
        self._warned_unmasked = False
        self._generator = torch.Generator().manual_seed(seed)
        self._device = next(net.parameters()).device
        self.recurrent = bool(getattr(net, "recurrent", False))
        """An LSTM policy: `act` carries its memory from call to call; `reset` clears it at episode starts."""
        self._state: torch.Tensor | None = None

    def __repr__(self) -> str:
        extras = ", observations normalized" if self.obs_normalizer is not None else ""
        extras += ", recurrent" if self.recurrent else ""
        extras += ", action masks" if self.action_masks else ""
        extras += f", target_return={self.target_return:g}" if self.target_return is not None else ""
        observed = str(self.observation_space)
        if self.encoder is not None:  # what act() takes, and the vector the network reads
            observed = f"{self.encoder.space} (read as {self.observation_space})"
        return (
            f"Policy(algo={self.algo!r}, env={self.env_id!r}, observation_space={observed}, "
            f"action_space={self.action_space}{extras})"
        )

    def normalized_score(self, return_mean: float) -> float | None:
        """D4RL's score with its run's dataset's references (`d4rl_score`); None without them."""
        low, high = self.reference_returns or (None, None)
        score = d4rl_score(return_mean, low, high)
        return None if score is None else float(score)

    def reset(self, ended: np.ndarray | None = None) -> None:
        """Clear a recurrent policy's memory: of every env (before a new episode), or of the envs where `ended`
        is true (their next observation starts an episode). A policy acting by action chunks (nets/generative.py)
        drops those envs' plans; a Decision Transformer starts their contexts over. Nothing for other policies."""
        reset_memory = getattr(self.net, "reset_memory", None)
        if reset_memory is not None:
            reset_memory(ended)
        if self._state is None:
            return
        if ended is None:
            self._state = None
        elif bool(np.any(ended)):
            mask = torch.as_tensor(np.asarray(ended, bool), device=self._state.device)
            self._state = self._state.masked_fill(mask.view(1, 1, -1, 1), 0.0)

    def observe(self, rewards: Any, ended: np.ndarray | None = None) -> None:
        """After each env step: the rewards the last actions earned and which episodes ended (`reset(ended)`).
        A Decision Transformer lowers the return it asks for by the rewards; other policies only reset."""
        observe_rewards = getattr(self.net, "observe_rewards", None)
        if observe_rewards is not None:
            observe_rewards(np.asarray(rewards, np.float32).reshape(-1))
        if ended is not None:
            self.reset(ended)

    @property
    def target_return(self) -> float | None:
        """A Decision Transformer's return to ask for at an episode's start (in the env's units); None for the
        policies that take none. Set it to ask for another (from the next episode, or after `reset()`)."""
        return float(self.net.target_return) if hasattr(self.net, "observe_rewards") else None

    @target_return.setter
    def target_return(self, value: float) -> None:
        if not hasattr(self.net, "observe_rewards"):
            raise PolicylabError(
                f"this {self.algo or type(self.net).__name__} policy is not conditioned on a return",
                "set target_return on a dt (Decision Transformer) policy only",
            )
        if not np.isfinite(value):
            raise PolicylabError(f"target_return={value}: a finite return is needed", "pass e.g. 3600")
        self.net.target_return = float(value)

    def act(self, obs: Any, deterministic: bool = True, action_mask: Any = None) -> Any:
        """One observation -> one action; a batch [B, *obs_shape] -> a batch of B actions (numpy). For an env with
        Discrete / Tuple / Dict observations, its own observations (an int, a tuple, a dict, or a batch of them) or
        their encoded vectors. A recurrent policy remembers the observations of earlier calls: call `reset()`
        before each new episode (`reset(ended)` for the envs of a batch whose episode ended); a Decision Transformer
        (and so every policy, in a loop that should work for all) gets each step's rewards through
        `observe(rewards, ended)`, which also resets the envs whose episode ended. `action_mask`: the
        allowed actions (true or 1; one row per observation, or one row for one observation; for MultiDiscrete the
        dimensions' choices one after another): the action is chosen among them (actor-critics, Q-networks)."""
        if self.encoder is not None and not self.encoder.is_encoded(obs):
            single = self.encoder.is_single(obs)
            obs = self.encoder.one(obs) if single else self.encoder.batch(obs)
        x = np.asarray(obs, dtype=np.float32)
        shape = tuple(self.observation_space.shape)
        single = x.shape == shape
        if single:
            x = x[None]
        elif x.shape[1:] != shape:
            raise PolicylabError(
                f"observation of shape {x.shape} does not match the policy's observation shape {shape}",
                f"pass one observation of shape {shape} or a batch of shape (B, {', '.join(map(str, shape))})",
            )
        if self.obs_normalizer is not None:
            x = self.obs_normalizer(x)
        if action_mask is None and self.action_masks and not self._warned_unmasked:
            self._warned_unmasked = True
            warnings.warn(
                "this policy was trained with action masks, and act() got none: it may choose a forbidden action "
                "(pass action_mask=...)",
                stacklevel=2,
            )
        masking = {} if action_mask is None else {"logit_bias": self._mask_bias(action_mask, len(x), single)}
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._device)
            if self.recurrent:  # the LSTM state carried from the last call (zeros at first and after reset())
                if self._state is None or self._state.shape[2] != len(t):
                    self._state = self.net.initial_state(len(t), self._device)
                actions = self.net.env_action(t, deterministic, self._generator, self._state, **masking).cpu().numpy()
                self._state = self.net.last_state
            else:
                actions = self.net.env_action(t, deterministic, self._generator, **masking).cpu().numpy()
        if isinstance(self.action_space, gym.spaces.Discrete):
            actions = actions.astype(np.int64)
            return int(actions[0]) if single else actions
        actions = actions.astype(self.action_space.dtype)
        return actions[0] if single else actions

    __call__ = act

    def _mask_bias(self, action_mask: Any, rows: int, single: bool) -> torch.Tensor:
        """`act`'s action_mask as the logit bias its network adds (one error naming the problem)."""
        head: Any = None
        if isinstance(self.net, ActorCritic):
            head = self.net.head
        elif isinstance(getattr(self.net, "n_actions", None), int):  # a Q-network: greedy among the allowed
            head = CategoricalHead(self.net.n_actions)
        if head is None:
            raise PolicylabError(
                f"this {self.algo or type(self.net).__name__} policy does not take action masks: they apply to the "
                "on-policy actor-critics' Discrete and MultiDiscrete actions and to Q-networks' Discrete ones",
                "drop action_mask, or train ppo (or dqn ...) with action_masks=true",
            )
        flags = np.asarray(action_mask)
        flags = flags[None] if single and flags.ndim == 1 else flags
        if flags.ndim == 1 or (flags.ndim == 2 and flags.shape[0] != rows):
            got = "one row" if flags.ndim == 1 else f"{flags.shape[0]} rows"
            raise PolicylabError(
                f"action_mask has {got} for {rows} observations", "pass one mask row per observation ([B, flags])"
            )
        return torch.from_numpy(mask_logit_bias(head, flags, "action_mask", PolicylabError)).to(self._device)


def load(path: str | Path, device: str = "cpu", which: Literal["final", "best"] = "final") -> Policy:
    """Load the policy of a run directory or of one checkpoint directory.

    `which="final"`: the run's latest checkpoint (the policy at the end of training, or where it stopped).
    `which="best"`: the policy of the run's best evaluation (highest mean return, periodic or final),
    kept in `<run>/best/`.
    """
    from policylab.algos import get_algo
    from policylab.config import check_device

    if not isinstance(path, str | Path):
        raise PolicylabError(
            f"path is a {type(path).__name__}: it takes a run directory (or a checkpoint directory)",
            'pass e.g. pl.load("runs/ppo-CartPole-v1-s1")',
        )
    check_device(device)
    if which not in ("final", "best"):
        raise PolicylabError(
            f"which={which!r} is not a policy of a run", "pass which='final' (the default) or which='best'"
        )
    try:
        tensors, state, ckpt_dir = load_checkpoint(find_best(path) if which == "best" else path)
    except CheckpointError as exc:
        run = next((p for p in (Path(path), *Path(path).parents[:2]) if (p / BEST / "state.json").is_file()), None)
        if which == "best" or run is None:
            raise
        raise CheckpointError(
            exc.problem,
            f"load the run's best evaluated policy instead (policylab eval {run} --best, pl.load({str(run)!r}, "
            f'which="best")), or {exc.fix}',
        ) from None
    spec = get_algo(state["algo"])
    cfg = spec.config_cls(**{**state["config"], "device": device})
    obs_space: Any = space_from_json(state["spaces"]["observation"])
    act_space = space_from_json(state["spaces"]["action"])
    raw = state["spaces"].get("raw_observation")
    if raw is not None and needs_encoding(space_from_json(raw)):  # the encoded Box, with where its frames are
        obs_space = ObservationEncoder(space_from_json(raw)).box
    net = spec.algo_cls.build_policy(cfg, obs_space, act_space).to(device)
    load_module_state(net, unprefixed("policy", tensors), ckpt_dir)
    net.eval()
    normalizer = None
    if "obs_norm/mean" in tensors:
        normalizer = ObsNormalizer(tuple(obs_space.shape), clip=cfg.clip_obs)
        normalizer.rms.load({k: tensors[f"obs_norm/{k}"].numpy() for k in ("mean", "var", "count")})
    data = state.get("dataset") or {}
    low, high = data.get("ref_min_score"), data.get("ref_max_score")
    return Policy(
        net, obs_space, act_space, normalizer, cfg.env, cfg.env_kwargs, state["algo"], cfg.seed,
        None if raw is None else space_from_json(raw), cfg.eval_deterministic,
        None if low is None or high is None else (float(low), float(high)), bool(cfg.action_masks),
    )  # fmt: skip


MAX_EVAL_EPISODE_STEPS = 100_000
"""An evaluation episode this long means an env without a time limit that the policy never finishes: an error."""


def evaluate(
    policy: Policy | str | Path,
    episodes: int = 10,
    seed: int = 0,
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    deterministic: bool = True,
    max_envs: int = 16,
) -> dict[str, Any]:
    """Run `episodes` full episodes of `policy` (a loaded Policy, or a run directory: its final policy), spread over
    up to `max_envs` parallel envs. Returns summary statistics: return_mean / std / min / max, length_mean,
    episodes."""
    if not isinstance(policy, Policy):
        policy = load(policy)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise PolicylabError(f"episodes={episodes!r}: at least one episode is needed", "pass --episodes 1 or more")
    if isinstance(max_envs, bool) or not isinstance(max_envs, int) or max_envs < 1:
        raise PolicylabError(f"max_envs={max_envs!r}: at least one env is needed", "pass max_envs=1 or more")
    from policylab.config import check_seed

    check_seed(seed)
    env_id = env_id or policy.env_id
    if env_id is None:
        raise PolicylabError("the policy does not know its env", "pass env_id")
    n = min(episodes, max_envs)
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    env = make_vec_env(env_id, n, "auto", env_kwargs if env_kwargs is not None else policy.env_kwargs)
    try:
        if env_id != policy.env_id:
            spaces = env.single_observation_space, env.single_action_space
            check_acts_in(
                policy, "evaluated", env_id, *spaces, fix=f"evaluate it in {policy.env_id} (leave env_id / --env out)"
            )
        if policy.action_masks:
            env.track_action_masks()
        obs = env.reset(seed=seed)
        policy.reset()
        running = np.zeros(n)
        lengths = np.zeros(n, np.int64)
        done_count = np.zeros(n, np.int64)
        returns: list[float] = []
        ep_lengths: list[int] = []
        while (done_count < quota).any():
            res = env.step(np.asarray(policy.act(obs, deterministic, env.action_masks)))
            running += res.reward
            lengths += 1
            if lengths.max() > MAX_EVAL_EPISODE_STEPS:
                raise PolicylabError(
                    f"an evaluation episode of {env_id} ran {MAX_EVAL_EPISODE_STEPS:,} steps without ending: the env "
                    "has no time limit and the deterministic policy never reaches an end (e.g. it walks into a wall)",
                    "give the env a time limit: --set 'env_kwargs={max_episode_steps: 200}'",
                )
            ended = res.episode_end & (done_count < quota)
            if ended.any():
                returns.extend(running[ended].tolist())
                ep_lengths.extend(lengths[ended].tolist())
            done_count += res.episode_end
            policy.observe(res.reward, res.episode_end)
            running[res.episode_end] = 0.0
            lengths[res.episode_end] = 0
            obs = res.obs
    finally:
        env.close()
    r = np.array(returns)
    return {
        "episodes": len(returns),
        "return_mean": float(r.mean()),
        "return_std": float(r.std()),
        "return_min": float(r.min()),
        "return_max": float(r.max()),
        "length_mean": float(np.mean(ep_lengths)),
        "returns": [float(x) for x in returns],
    }


def check_acts_in(
    policy: Policy, source: str, env: str, obs_space: gym.Space, act_space: gym.Space, fix: str | None = None
) -> None:
    """One clear error when a loaded run's policy cannot act in `env` (other observation or action shapes), naming
    the env it was trained on (collect; evaluate with its own `fix`)."""
    why = []
    if policy.encoder is None and tuple(policy.observation_space.shape or ()) != tuple(obs_space.shape or ()):
        why.append(f"observations of shape {policy.observation_space.shape}, {env} has {obs_space.shape}")
    if (
        type(policy.action_space) is not type(act_space)
        or policy.action_space.shape != act_space.shape
        or getattr(policy.action_space, "n", None) != getattr(act_space, "n", None)
    ):
        why.append(f"actions in {policy.action_space}, {env} has {act_space}")
    if why:
        trained = f" was trained on {policy.env_id}" if policy.env_id else ""
        raise PolicylabError(
            f"the policy {source}{trained} and cannot act in {env}: it takes {'; '.join(why)}",
            fix
            or (
                f"pass --env {policy.env_id} (or leave --env out: collect then uses the run's env)"
                if policy.env_id
                else "collect with a policy trained on this env"
            ),
        )


def single_env_mask(env: gym.Env, info: dict[str, Any]) -> np.ndarray:
    """The allowed actions of one plain env now: its `action_masks()`, else its last info's "action_mask"."""
    if has_mask_method(env):
        return np.asarray(env.get_wrapper_attr("action_masks")())
    if "action_mask" not in info:
        raise EnvError(
            f"{env.spec.id if env.spec else 'the env'} gives no action masks, and the policy was trained with them",
            "give the env an action_masks() method or info['action_mask'] at every reset and step",
        )
    return np.asarray(info["action_mask"])


def _render_modes(env_id: str) -> list[str]:
    """The render modes an env declares (its class's `metadata`), found without making it; ["rgb_array"] where the
    env cannot be looked up that way (a `module:function` env), so that making it decides."""
    if ":" in env_id:
        return ["rgb_array"]
    try:
        creator = gym.envs.registration.load_env_creator(gym.spec(env_id).entry_point)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an Atari id, a callable entry point ...: making it decides
        return ["rgb_array"]
    modes = getattr(creator, "metadata", {}).get("render_modes", ["rgb_array"])
    return list(modes)


def record_video(policy: Policy, path: str | Path, episodes: int = 1, seed: int = 0) -> Path:
    """Render `episodes` deterministic episodes to a video file (mp4/gif, by extension)."""
    if policy.env_id is None:
        raise PolicylabError("the policy does not know its env", "load it from a run directory")
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise PolicylabError("video needs imageio", "pip install 'policylab[video]'") from None
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame-based renderers: no display needed
    os.environ.setdefault("MUJOCO_GL", "egl" if os.environ.get("DISPLAY") is None else "glfw")
    cannot = f"{policy.env_id!r} cannot render frames"
    if "rgb_array" not in _render_modes(policy.env_id):
        raise PolicylabError(f"{cannot} (it has no rgb_array render mode)", "run eval without --video")
    try:
        with warnings.catch_warnings():  # gymnasium's warning about render modes: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            env = make_single_env(policy.env_id, policy.env_kwargs, render_mode="rgb_array")
    except Exception as exc:  # noqa: BLE001 - any failure here means: no renderer
        why = exc.problem if isinstance(exc, PolicylabError) else str(exc)
        raise PolicylabError(f"{cannot}: {why}", "run eval without --video") from None
    frames = []
    try:
        for ep in range(episodes):
            obs, info = env.reset(seed=seed + ep)
            policy.reset()
            frames.append(env.render())
            done = False
            while not done:
                mask = single_env_mask(env, info) if policy.action_masks else None
                obs, reward, terminated, truncated, info = env.step(policy.act(obs, action_mask=mask))
                policy.observe([reward])
                frames.append(env.render())
                done = terminated or truncated
    except gym.error.DependencyNotInstalled as exc:
        raise PolicylabError(
            f"rendering {policy.env_id!r} needs a missing package: {exc}", "pip install 'policylab[video]'"
        ) from None
    finally:
        env.close()
    if not frames or frames[0] is None:
        raise PolicylabError(f"{policy.env_id!r} rendered no frames", "this env has no rgb_array renderer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as every output: a new folder is made
    fps = env.metadata.get("render_fps", 30)
    if path.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi"):
        timing: dict[str, float] = {"fps": fps, "macro_block_size": 1}
    else:
        timing = {"duration": 1000.0 / fps}  # gif and other image formats take ms per frame
    try:
        imageio.mimwrite(str(path), frames, **timing)  # type: ignore[call-overload]
    except Exception as exc:  # noqa: BLE001
        raise PolicylabError(
            f"cannot write video {str(path)!r}: {exc}",
            "pip install 'policylab[video]' (imageio-ffmpeg for mp4) or use a .gif path",
        ) from None
    return path
