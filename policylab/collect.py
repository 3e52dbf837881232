"""Make offline datasets: run a policy (a run directory, a random policy, a callable) in an env, with optional
exploration noise, and keep whole episodes; or turn a run's saved replay buffer into a dataset.

`collect("Pendulum-v1", policy="runs/sac-Pendulum-v1-s1", episodes=100, noise=0.3)` returns a `Dataset` (and
writes it when `out` is given). The envs step in parallel (one policy call per step for all of them);
episodes are cut from the time-major record at the end, so there is no Python work per env per step.

The metadata records how the dataset was made, and the reference returns for D4RL-style normalized scores:
`ref_min_score`, the mean return of a uniformly random policy, and `ref_max_score`, that of the collecting
policy itself acting deterministically (without the noise), each over `ref_episodes` episodes (a random
dataset has no `ref_max_score` unless given); pass them explicitly to use other references (e.g. a known
expert's return, so that datasets of one env share their scale).

Behaviour log-probabilities (for importance-sampling evaluation) are stored when the behaviour density is
known: a random policy (uniform), Gaussian noise on a deterministic policy's Box action (the density of the
unclipped Gaussian: exact wherever the action was not clipped at a bound), epsilon-greedy on Discrete actions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from policylab.data.dataset import Dataset, ReferenceWarning, write_dataset
from policylab.envs import make_vec_env
from policylab.errors import PolicylabError
from policylab.policy import Policy, check_acts_in, evaluate

ActFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
"""obs [n, ...] -> (env actions [n, ...], behaviour log-probs [n] or None)."""


def collect(
    env: str | None,
    policy: str | Path | Policy | Callable[[np.ndarray], np.ndarray] = "random",
    episodes: int = 10,
    *,
    noise: float = 0.0,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    num_envs: int = 8,
    ref_episodes: int = 10,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    name: str | None = None,
) -> Dataset:
    """Run `policy` for `episodes` episodes of `env` and return them as a Dataset (written to `out` if given).

    `env`: None takes the env of the run directory (or loaded Policy) given as `policy`.
    `policy`: "random", a run directory (its final policy; `dir/best` for the best one), a loaded `Policy`, or a
    function from a batch of observations to a batch of env actions (also as a "module:function" string).
    `noise`: for Box actions, Gaussian noise of this std in units of half the action range, clipped to the
    bounds; for Discrete actions, epsilon-greedy with epsilon = noise.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise PolicylabError(f"episodes={episodes!r}: a whole number >= 1 is needed", "pass --episodes 1 or more")
    if noise < 0:
        raise PolicylabError(f"noise={noise} must be >= 0", "pass --noise 0.1 (or 0: the policy as it acts)")
    check_references(ref_min_score, ref_max_score)
    kwargs = dict(env_kwargs or {})
    source = _describe(policy)
    loaded = _load_policy(policy)
    if isinstance(loaded, Policy) and loaded.action_masks:
        raise PolicylabError(
            "collect does not read action masks yet: this policy was trained with action_masks=true, would act "
            "without its env's masks here, and a dataset holds no masks for the algorithms that learn from it",
            "collect with a policy trained without action masks (or evaluate this one: policylab eval RUN)",
        )
    if env is None:
        if not isinstance(loaded, Policy) or loaded.env_id is None:
            raise PolicylabError(
                f"collect needs an env: the policy {source} names none", "pass --env ENV_ID (or --from-buffer RUN_DIR)"
            )
        env = loaded.env_id
    if isinstance(loaded, Policy) and loaded.env_id is not None and isinstance(policy, (str, Path)):
        kwargs = kwargs or dict(loaded.env_kwargs)
    dataset = _rollouts(
        env, kwargs, lambda space: _behaviour(loaded, space, noise, seed), episodes, seed, num_envs, (loaded, source)
    )
    dataset.env_id, dataset.env_kwargs = env, kwargs
    dataset.metadata = {
        "name": name or (Path(out).name if out is not None else f"{env}-{source}"),
        "algorithm_name": source,
        "collected_with": {"policy": source, "noise": noise, "seed": seed, "episodes": episodes},
        "description": f"{episodes} episodes of {env} from {source}" + (f" with noise {noise}" if noise else ""),
    }
    dataset.ref_min_score = (
        ref_min_score if ref_min_score is not None else _random_return(env, kwargs, ref_episodes, seed)
    )
    if ref_max_score is not None:
        dataset.ref_max_score = ref_max_score
    elif loaded != "random":  # a random dataset has no expert of its own: pass ref_max_score for scores
        dataset.ref_max_score = _policy_return(loaded, env, kwargs, ref_episodes, seed)
    _drop_inverted_reference(dataset, ref_min_score is None, ref_max_score is None)
    if out is not None:
        dataset.path = write_dataset(dataset, out, overwrite=overwrite)
    return dataset


def check_references(ref_min_score: float | None, ref_max_score: float | None) -> None:
    """Explicit reference returns must rise from the random one to the expert one (else every normalized score
    is upside down)."""
    if ref_min_score is not None and ref_max_score is not None and not ref_max_score > ref_min_score:
        raise PolicylabError(
            f"ref_max_score={ref_max_score:g} is not above ref_min_score={ref_min_score:g}: normalized scores "
            "would rise as returns fall",
            "pass the random policy's return as --ref-min and a better (expert) return as --ref-max",
        )


def _drop_inverted_reference(dataset: Dataset, min_measured: bool, max_measured: bool) -> None:
    """A measured reference that is not on the right side of the other is left out (with a warning): the
    collecting policy scored no better than random, so it cannot serve as the expert reference."""
    low, high = dataset.ref_min_score, dataset.ref_max_score
    if low is None or high is None or high > low:
        return
    if max_measured:
        dataset.ref_max_score = None
        warnings.warn(
            f"the collecting policy's return {high:.1f} is not above a random policy's {low:.1f}, so the dataset "
            "stores no expert reference (ref_max_score) and has no normalized scores; pass --ref-max (ref_max_score=) "
            "with an expert's return to have them",
            ReferenceWarning,
            stacklevel=3,
        )
    elif min_measured:
        dataset.ref_min_score = None
        warnings.warn(
            f"a random policy's return {low:.1f} is not below the given ref_max_score {high:.1f}, so the dataset "
            "stores no random reference (ref_min_score) and has no normalized scores; pass --ref-min (ref_min_score=) "
            "below --ref-max to have them",
            ReferenceWarning,
            stacklevel=3,
        )


def _describe(policy: Any) -> str:
    if isinstance(policy, (str, Path)):
        return str(policy)
    if isinstance(policy, Policy):
        return f"{policy.algo or 'policy'} policy"
    return getattr(policy, "__name__", "a function")


def _load_policy(policy: Any) -> Any:
    """ "random", a Policy (loaded from a run directory), or a callable."""
    if isinstance(policy, (str, Path)):
        if str(policy) == "random":
            return "random"
        if isinstance(policy, str) and ":" in policy and not Path(policy).exists():
            return _import_function(policy)
        from policylab.policy import load

        return load(policy)
    if isinstance(policy, Policy) or callable(policy):
        return policy
    raise PolicylabError(
        f"cannot collect with {policy!r}", "pass policy='random', a run directory, a Policy or a function"
    )


def _import_function(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """`module:function`, a function from a batch of observations to a batch of env actions (e.g. a scripted
    expert such as policylab.envs.navigation:expert)."""
    from policylab.imports import import_user_module

    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(import_user_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PolicylabError(
            f"cannot import the policy {spec!r}: {exc}", "pass a run directory, random, or module:function"
        ) from None
    if not callable(fn):
        raise PolicylabError(f"{spec!r} is not a function", "pass module:function (obs batch -> action batch)")
    return fn  # type: ignore[no-any-return]


def _behaviour(policy: Any, space: gym.Space, noise: float, seed: int) -> ActFn:
    """The acting function: the policy (or uniform draws), noise added, with log-probs where they are known."""
    rng = np.random.default_rng(seed)
    if isinstance(space, gym.spaces.Discrete):
        n = int(space.n)
        if policy == "random":
            return lambda obs: (rng.integers(n, size=len(obs)) + space.start, np.full(len(obs), -math.log(n)))
        if noise > 1:
            raise PolicylabError(
                f"noise={noise:g}: for Discrete actions noise is epsilon-greedy's epsilon, a probability",
                "pass --noise between 0 and 1 (1: uniform actions)",
            )
        greedy_fn = _greedy(policy)

        def epsilon_greedy(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            greedy = np.asarray(greedy_fn(obs)).astype(np.int64)
            if noise == 0:
                return greedy, None
            random = rng.integers(n, size=len(obs)) + space.start
            actions = np.where(rng.random(len(obs)) < noise, random, greedy)
            logp = np.log(noise / n + (1.0 - noise) * (actions == greedy))
            return actions, logp

        return epsilon_greedy
    if not isinstance(space, gym.spaces.Box) or not np.all(np.isfinite(space.low) & np.isfinite(space.high)):
        raise PolicylabError(f"collect supports Discrete and bounded Box actions, not {space}", "use another env")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    half = (high - low) / 2.0
    if policy == "random":
        logp_uniform = -float(np.log(high - low).sum())
        return lambda obs: (rng.uniform(low, high, (len(obs), *space.shape)), np.full(len(obs), logp_uniform))
    deterministic = _greedy(policy)

    def gaussian(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        mean = np.clip(np.asarray(deterministic(obs), np.float64).reshape(len(obs), *space.shape), low, high)
        if noise == 0:
            return mean, None
        std = noise * half
        eps = rng.standard_normal(mean.shape)
        z = eps.reshape(len(obs), -1)
        logp = (-0.5 * z * z - np.log(std).reshape(1, -1) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return np.clip(mean + std * eps, low, high), logp

    return gaussian


def _greedy(policy: Any) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(policy, Policy):
        return lambda obs: policy.act(obs, deterministic=True)
    return policy  # type: ignore[no-any-return]


def _run(vec: Any, act: ActFn, episodes: int, seed: int, policy: Policy | None = None) -> dict[str, Any]:
    """Step every env until each has finished its share of the episodes; a time-major record of all steps.
    `policy`: the loaded policy `act` calls, told each step's rewards and episode ends (`Policy.observe`: a
    recurrent policy's memory, action-chunk plans and a Decision Transformer's context start over with an episode)."""
    n = vec.num_envs
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    done = np.zeros(n, np.int64)
    keys = ("obs", "actions", "rewards", "terminated", "truncated", "final_obs", "logp")
    record: dict[str, list[Any]] = {k: [] for k in keys}
    obs = vec.reset(seed=seed)
    if policy is not None:
        policy.reset()
    has_logp = True
    while (done < quota).any():
        actions, logp = act(obs)
        res = vec.step(actions.astype(vec.single_action_space.dtype))
        has_logp = has_logp and logp is not None
        final = res.final_obs if res.final_obs is not None else res.obs
        for key, value in zip(keys, (obs, actions, res.reward, res.terminated, res.truncated, final, logp)):
            record[key].append(value)
        done += res.episode_end
        if policy is not None:
            policy.observe(res.reward, res.episode_end)
        obs = res.obs
    stacked: dict[str, Any] = {k: np.stack(v) for k, v in record.items() if k != "logp"}
    stacked["logp"] = np.stack(record["logp"]) if has_logp else None
    stacked["quota"] = quota
    return stacked


def _episodes(record: dict[str, Any], obs_space: gym.Space, act_space: gym.Space) -> Dataset:
    """Cut each env's column of the record into its first `quota` episodes, env by env."""
    ends = record["terminated"] | record["truncated"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "rewards", "term", "trunc", "logp")}
    lengths = []
    for env_index, quota in enumerate(record["quota"]):
        stops = np.flatnonzero(ends[:, env_index])[:quota]
        starts = np.concatenate([[0], stops[:-1] + 1])
        for start, stop in zip(starts, stops):
            column = slice(start, stop + 1)
            obs = record["obs"][column, env_index]
            parts["obs"].append(np.concatenate([obs, record["final_obs"][stop, env_index][None]]))
            parts["actions"].append(record["actions"][column, env_index])
            parts["rewards"].append(record["rewards"][column, env_index])
            parts["term"].append(record["terminated"][column, env_index])
            parts["trunc"].append(record["truncated"][column, env_index] & ~record["terminated"][column, env_index])
            if record["logp"] is not None:
                parts["logp"].append(record["logp"][column, env_index])
            lengths.append(stop + 1 - start)
    discrete = isinstance(act_space, gym.spaces.Discrete)
    return Dataset(
        observations=np.concatenate(parts["obs"]).astype(np.float32),
        actions=np.concatenate(parts["actions"]).astype(np.int64 if discrete else np.float32),
        rewards=np.concatenate(parts["rewards"]).astype(np.float32),
        terminations=np.concatenate(parts["term"]),
        truncations=np.concatenate(parts["trunc"]),
        episode_lengths=np.asarray(lengths, np.int64),
        observation_space=obs_space,
        action_space=act_space,
        behavior_log_probs=np.concatenate(parts["logp"]).astype(np.float32) if parts["logp"] else None,
    )


def _rollouts(
    env: str,
    kwargs: dict[str, Any],
    behaviour: Callable[[gym.Space], ActFn],
    episodes: int,
    seed: int,
    num_envs: int = 8,
    policy: tuple[Any, str] | None = None,
) -> Dataset:
    """`episodes` whole episodes of `env` with the acting function `behaviour(action_space)` makes; `policy`
    ((the loaded policy, how to name it)) is first checked against the env's spaces."""
    vec = make_vec_env(env, min(num_envs, episodes), "auto", kwargs)
    loaded = policy[0] if policy is not None and isinstance(policy[0], Policy) else None
    try:
        if policy is not None and loaded is not None:
            check_acts_in(loaded, policy[1], env, vec.single_observation_space, vec.single_action_space)
        record = _run(vec, behaviour(vec.single_action_space), episodes, seed, loaded)
    finally:
        vec.close()
    return _episodes(record, vec.single_observation_space, vec.single_action_space)


def _random_return(env: str, kwargs: dict[str, Any], episodes: int, seed: int) -> float:
    behaviour = lambda space: _behaviour("random", space, 0.0, seed + 1)  # noqa: E731
    return float(_rollouts(env, kwargs, behaviour, episodes, seed + 1).episode_returns().mean())


def _policy_return(policy: Any, env: str, kwargs: dict[str, Any], episodes: int, seed: int) -> float:
    if isinstance(policy, Policy):
        return float(evaluate(policy, episodes, seed + 2, env, kwargs)["return_mean"])
    behaviour = lambda space: _behaviour(policy, space, 0.0, seed)  # noqa: E731
    return float(_rollouts(env, kwargs, behaviour, episodes, seed + 2).episode_returns().mean())


def collect_from_buffer(
    run: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
) -> Dataset:
    """A run's replay buffer (saved with `save_buffer=true`) as a dataset ("medium-replay" in D4RL's terms):
    every complete episode it still holds, in the order they were collected, actions back in env units. The
    episode cut by the ring's write head, and the one still running, are left out. The reference returns are
    given ones, else a random policy's measured return and none."""
    check_references(ref_min_score, ref_max_score)
    from policylab import checkpoint as ckpt
    from policylab.policy import space_from_json

    tensors, state, where = ckpt.load_checkpoint(run)
    if state.get("buffer") is None:
        raise PolicylabError(
            f"the checkpoint {where} holds no replay buffer",
            "train with --set save_buffer=true, or collect with --policy RUN --episodes N instead",
        )
    buffer = {k: v.numpy() for k, v in ckpt.unprefixed("buffer", tensors).items()}
    obs_space = space_from_json(state["spaces"]["observation"])
    act_space = space_from_json(state["spaces"]["action"])
    wrapped = state["buffer"]["filled"] >= len(buffer["obs"])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "rewards", "term", "lengths")}
    for env_index in range(buffer["obs"].shape[1]):
        column = {k: buffer[k][:, env_index] for k in ("obs", "actions", "rewards", "terminated", "episode_end")}
        if wrapped:  # oldest slot first: the one after the write head
            shift = -(int(buffer["ptr"][env_index]) + 1)
            column = {k: np.roll(v, shift, axis=0) for k, v in column.items()}
        stops = np.flatnonzero(column["episode_end"])
        starts = np.concatenate([[0], stops[:-1] + 2])
        for start, stop in list(zip(starts, stops))[1 if wrapped else 0 :]:
            parts["obs"].append(column["obs"][start : stop + 2])
            parts["actions"].append(column["actions"][start : stop + 1])
            parts["rewards"].append(column["rewards"][start : stop + 1])
            parts["term"].append(column["terminated"][start : stop + 1])
            parts["lengths"].append(np.array([stop + 1 - start]))
    if not parts["lengths"]:
        raise PolicylabError(f"the replay buffer of {where} holds no complete episode", "train longer, then collect")
    actions = np.concatenate(parts["actions"])
    if isinstance(act_space, gym.spaces.Box):  # the buffer holds [-1, 1] units
        actions = act_space.low + (actions + 1.0) * 0.5 * (act_space.high - act_space.low)
    terminations = np.concatenate(parts["term"])
    lengths = np.concatenate(parts["lengths"])
    last = np.cumsum(lengths) - 1
    truncations = np.zeros_like(terminations)
    truncations[last] = ~terminations[last]
    config = state["config"]
    dataset = Dataset(
        observations=np.concatenate(parts["obs"]).astype(np.float32),
        actions=actions.astype(np.float32 if isinstance(act_space, gym.spaces.Box) else np.int64),
        rewards=np.concatenate(parts["rewards"]).astype(np.float32),
        terminations=terminations,
        truncations=truncations,
        episode_lengths=lengths.astype(np.int64),
        observation_space=obs_space,
        action_space=act_space,
        env_id=config["env"],
        env_kwargs=dict(config.get("env_kwargs") or {}),
        metadata={
            "name": Path(out).name if out is not None else f"{Path(run).name}-replay",
            "algorithm_name": f"{state['algo']} replay",
            "collected_with": {"replay_of": str(where), "step": state["step"]},
            "description": f"the replay buffer of {where} at step {state['step']}",
        },
    )
    dataset.ref_max_score = ref_max_score
    dataset.ref_min_score = (
        ref_min_score if ref_min_score is not None else _random_return(dataset.env_id or "", dataset.env_kwargs, 10, 0)
    )
    _drop_inverted_reference(dataset, ref_min_score is None, False)
    if out is not None:
        dataset.path = write_dataset(dataset, out, overwrite=overwrite)
    return dataset
