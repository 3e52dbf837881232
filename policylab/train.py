"""The one loop: collect -> update -> log -> evaluate -> checkpoint.

`train()` resolves the config (defaults < preset < YAML < overrides < flags),
creates or resumes the run directory, and drives the loop. A checkpoint holds
everything the loop needs to continue exactly (parameters, optimizer state,
RNG states, env state, current observations, normalization statistics,
episode statistics), so that an interrupted-and-resumed run ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab import checkpoint as ckpt
from policylab import runtime
from policylab.algos import AlgoSpec, get_algo
from policylab.algos.onpolicy import Imitation, clone_demonstrations, whole_rollouts
from policylab.collectors import (
    OffPolicySlice,
    RolloutSlice,
    RolloutWorkers,
    collect_rollout,
    collected_fields,
    normalize_obs,
    rollout_buffer,
    rollout_noise,
    track_action_masks,
    unused_masks_note,
)
from policylab.config import (
    CommonConfig,
    apply_values,
    check_resume_place,
    dump_yaml,
    format_count,
    load_yaml,
    parse_count,
    set_by,
)
from policylab.data import Batch, ReplayBuffer
from policylab.data.dataset import (
    Dataset,
    best_episodes,
    check_compatible,
    dataset_observation_space,
    load_dataset,
)
from policylab.data.her import HindsightRelabeler, her_relabeler
from policylab.data.replay import StackedFrameReplay
from policylab.data.sources import (
    BatchSource,
    Demonstrations,
    dataset_buffer,
    dataset_normalizer,
    dataset_transitions,
    return_range_scale,
)
from policylab.envs import (
    EpisodeTracker,
    ObsNormalizer,
    RewardScaler,
    RunningMeanStd,
    VecEnv,
    make_single_env,
    make_vec_env,
    resolve_env_id,
)
from policylab.envs.atari import is_atari
from policylab.envs.encode import is_image_space, needs_encoding, storage_dtype, torch_dtype
from policylab.envs.vec import StepResult
from policylab.errors import CheckpointError, ConfigError, EnvError, TrainingDiverged, for_reader
from policylab.logging import CONFIG_YAML, SUMMARY_JSON, Progress, RunLog, fixed, new_run_dir
from policylab.nets import matmul
from policylab.nets.cnn import check_not_float_image
from policylab.nets.heads import CategoricalHead, mask_logit_bias
from policylab.nets.population import PopulationActor
from policylab.policy import MAX_EVAL_EPISODE_STEPS, Policy, evaluate, space_to_json
from policylab.presets import VARIANTS, dataset_preset_name, find_preset, missing_preset


@dataclass
class IterationInfo:
    """What a `callback` sees after every iteration; return False from the callback to stop (as Ctrl-C does)."""

    step: int
    """Env steps so far (summed over the parallel envs)."""
    iteration: int
    """Iterations so far: rollouts (on-policy), or blocks of up to `log_every` steps (off-policy; offline, a block
    also ends at an evaluation or checkpoint step)."""
    elapsed: float
    """Training wall-clock seconds so far (summed over resumed sessions)."""
    mean_return: float | None
    """Mean return of the last 20 finished training episodes (fewer early on; None before the first)."""
    episodes: int
    """Training episodes finished so far."""
    metrics: dict[str, float]
    """The algorithm's latest update metrics (e.g. policy_loss, value_loss, approx_kl), as in train.csv."""
    eval_return: float | None = None
    """Mean return of the deterministic evaluation run at this iteration (None when none ran)."""


@dataclass
class Run:
    """What `pl.train` returns: the run directory, its resolved config and how it ended."""

    dir: Path
    """The run directory (config.yaml, train.csv, eval.csv, eval.json, checkpoints/, best/)."""
    algo: str
    config: CommonConfig
    """The resolved config (preset, file, overrides; on-policy `steps` rounded to whole rollouts)."""
    steps: int
    """The step the run ended at (env steps; gradient steps in an offline phase)."""
    final_eval: dict[str, Any] | None
    """The final evaluation (eval.json: return_mean, return_std, episodes, ... and `score` with reference
    returns); None for a run stopped early."""
    interrupted: bool = False
    """Stopped by Ctrl-C or a callback (a checkpoint was written: `resume=dir` continues it)."""
    notes: list[str] = field(default_factory=list)
    """The notes printed when the run started (presets, rounded budgets, resumes)."""
    best: dict[str, Any] | None = None
    """The best evaluation so far, whose policy is in `dir / "best"` (`pl.load(dir, which="best")`):
    {"step", "return_mean", "dir": "best"}; None before the first evaluation."""
    stopped: str | None = None
    """Why the run ended before its budget by a stopping rule (`stop_return`, `stop_patience`): a finished run,
    with its final evaluation; None otherwise."""


# --- config resolution -------------------------------------------------------------------------


OVERRIDES = "--set (overrides)"
"""How errors name the values of `--set`, which reach `pl.train` as `overrides` (the same path for both)."""


def resolve_config(
    spec: AlgoSpec,
    env: str | None = None,
    steps: int | str | None = None,
    seed: int | None = None,
    config: str | Path | dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    preset: str | None = "auto",
    dataset: str | Path | None = None,
    online_steps: int | str | None = None,
) -> tuple[CommonConfig, list[str]]:
    """Defaults < tuned preset for the env < YAML file (or dict) < overrides < env/steps/seed/dataset arguments.
    With a dataset and no env, the env is the one the dataset was collected in."""
    notes: list[str] = []
    if online_steps is not None and spec.kind == "on-policy":
        raise ConfigError(
            f"{spec.name} is on-policy: it has no offline phase to continue online from (--online-steps); a dataset "
            "gives it demonstrations for an imitation term instead",
            f"drop --online-steps (train {spec.name} --dataset D --steps N), or use an off-policy or offline algorithm",
        )
    cfg = spec.config_cls()
    file_values = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    dataset = dataset or (overrides or {}).get("dataset") or file_values.get("dataset")
    env_id = env or file_values.get("env") or (overrides or {}).get("env")
    recorded_env = None  # the dataset's env when read here (no env given): the dataset preset's check reuses it
    if dataset is not None and env_id is None:
        env, env_kwargs = _dataset_env(str(dataset))
        env_id = recorded_env = env
        overrides = {"env_kwargs": env_kwargs, **(overrides or {})}
    env_id = env_id or cfg.env
    resolve_env_id(str(env_id))
    found = None
    if preset not in (None, "none"):
        variant = preset if preset in VARIANTS else None
        wanted = env_id if preset == "auto" or variant else preset
        found = find_preset(spec.name, str(wanted), variant)
        name = f"{spec.name} preset for {wanted}" + (f" ({variant})" if variant else "")
        if found is not None:
            cfg = apply_values(cfg, found.values, f"the {name}")
            notes.append(f"using the tuned {name} ({found.source}); --preset none opts out")
        elif preset != "auto":
            raise missing_preset(spec.name, str(preset), variant, str(wanted))
    if preset == "auto" and dataset is not None:
        cfg = _apply_dataset_preset(spec.name, cfg, str(dataset), recorded_env, notes)
    cfg = apply_values(cfg, file_values, str(config) if isinstance(config, (str, Path)) else "the config")
    cfg = apply_values(cfg, overrides or {}, OVERRIDES)
    flags = {
        k: v
        for k, v in (
            ("env", env),
            ("steps", steps),
            ("seed", seed),
            ("dataset", dataset),
            ("online_steps", online_steps),
        )
        if v is not None
    }
    if "dataset" in flags:
        flags["dataset"] = str(flags["dataset"])
    cfg = apply_values(cfg, flags, "the arguments")
    cfg = _frames_kept_raw(cfg)
    cfg.validate()
    resolve = getattr(spec.algo_cls, "resolve_config", None)  # values read from the dataset (dt's target_return)
    if resolve is not None:
        cfg = resolve(cfg, notes)
    check_recurrent(spec.name, cfg)
    check_action_masks(spec.name, cfg)
    if found is not None:
        notes += short_budget_note(name, cfg, found.values.get("steps", 0))
    notes += rounded_budget_note(spec, cfg)
    return cfg, notes


ROUNDING_NOTE_SHARE = 0.01
"""An on-policy budget rounded up by more than this share of --steps gets a note (100k in rollouts of 256 steps
becomes 100,096: no note)."""


RECURRENT_ALGOS = ("ppo", "a2c")


def check_recurrent(algo: str, cfg: Any) -> None:
    """recurrent=true only where LSTM policies exist, and not with what they do not combine with."""
    if not cfg.recurrent:
        return
    if algo not in RECURRENT_ALGOS:
        raise ConfigError(
            f"{algo} has no recurrent policy: LSTM actor-critics exist for {' and '.join(RECURRENT_ALGOS)}",
            f"use {' or '.join(RECURRENT_ALGOS)} with recurrent=true, or drop recurrent",
        )
    for what, present in (("rollout_workers", cfg.rollout_workers), ("a dataset (imitation)", cfg.dataset)):
        if present:
            raise ConfigError(f"recurrent=true does not combine with {what} yet", "drop one of the two")


MASKABLE_ALGOS = ("ppo", "a2c", "reinforce", "trpo", "mdpo", "spo", "fixpo", "dqn", "qrdqn")
"""The algorithms that take action_masks=true: the on-policy actor-critics (categorical heads) and the Q-learning
family (acting and the target's max among the allowed actions)."""


def check_action_masks(algo: str, cfg: Any) -> None:
    """action_masks=true only where the policy's logits (or action values) take the masks, and not with what the
    masks do not reach yet."""
    if not cfg.action_masks:
        return
    if algo not in MASKABLE_ALGOS:
        raise ConfigError(
            f"{algo} does not take action masks: they exist for {', '.join(MASKABLE_ALGOS)}",
            "use one of those with action_masks=true (e.g. ppo, as SB3-contrib's MaskablePPO), or drop action_masks",
        )
    if algo in ("dqn", "qrdqn"):
        gaps = (("a dataset (datasets hold no masks)", cfg.dataset), ("rollout_workers", cfg.rollout_workers))
        for what, present in gaps:
            if present:
                raise ConfigError(f"{algo} with action masks does not combine with {what} yet", "drop one of the two")


def rounded_budget_note(spec: AlgoSpec, cfg: Any) -> list[str]:
    """A run takes whole rollouts (on-policy: n_steps x num_envs) or whole vector steps (off-policy online:
    num_envs env steps at once): say so when --steps is rounded up by more than ROUNDING_NOTE_SHARE."""
    actual = _with_actual_steps(spec, cfg)
    flag, asked, total = "--steps", cfg.steps, actual.steps
    if getattr(actual, "online_steps", 0) != getattr(cfg, "online_steps", 0):
        flag, asked, total = "--online-steps", cfg.online_steps, actual.online_steps
    if total - asked <= ROUNDING_NOTE_SHARE * asked:
        return []
    if spec.kind == "on-policy":
        rollout = cfg.n_steps * cfg.num_envs
        unit = f"whole rollouts of n_steps x num_envs = {cfg.n_steps:,} x {cfg.num_envs} = {rollout:,} steps"
        finer = "a smaller n_steps or num_envs"
    else:
        unit = f"{cfg.num_envs} env steps at a time (num_envs={cfg.num_envs})"
        finer = "a multiple of num_envs, or a smaller num_envs,"
    return [
        f"note: {flag} {asked:,} is rounded up to {total:,}: {spec.name} collects {unit} ({finer} gives a finer budget)"
    ]


def _apply_dataset_preset(algo: str, cfg: Any, dataset: str, recorded: str | None, notes: list[str]) -> Any:
    """CORL's values for the D4RL dataset kind that `dataset` is named after (e.g. hopper-medium), if any, and if
    the env it was collected in (`recorded`, read here when not known yet) is that kind's."""
    kind = dataset_preset_name(dataset)
    found = find_preset(algo, kind) if kind is not None else None
    if found is None or kind is None:
        return cfg
    if recorded is None:  # the name may say hopper, the data be Pendulum's
        recorded = load_dataset(dataset, validate=False).env_id
    if recorded and not re.sub(r"[^a-z0-9]", "", recorded.lower().split("/")[-1]).startswith(kind.split("-")[0]):
        notes.append(
            f"note: {dataset} is named like a {kind} dataset but was collected in {recorded}: the {algo} preset "
            f"for {kind} datasets is not used (pass --preset {kind} to use it anyway)"
        )
        return cfg
    notes.append(f"using the {algo} preset for {kind} datasets ({found.source}); --preset none opts out")
    return apply_values(cfg, found.values, f"the {algo} preset for {kind} datasets")


def _frames_kept_raw(cfg: Any) -> Any:
    """Offline runs normalize observations with their dataset's statistics by default; a dataset of image frames
    gets normalize_obs=false instead (the CNN encoder scales frames itself). Set explicitly (by a preset, file or
    override), normalize_obs stays, and check_observations says why it does not apply."""
    if not getattr(cfg, "normalize_obs", False) or set_by(cfg, "normalize_obs") or not getattr(cfg, "dataset", None):
        return cfg
    space = dataset_observation_space(str(cfg.dataset))
    return dataclasses.replace(cfg, normalize_obs=False) if space is not None and is_image_space(space) else cfg


def _dataset_env(path: str) -> tuple[str, dict[str, Any]]:
    """The env a dataset was collected in, to train and evaluate in."""
    data = load_dataset(path, validate=False)
    if not data.env_id:
        raise ConfigError(
            f"the dataset {path} does not say which env it came from", "pass the env to evaluate in: --env ENV_ID"
        )
    return data.env_id, dict(data.env_kwargs)


SHORT_BUDGET_STEPS = 10_000
"""A run below its preset's budget that leaves fewer env steps than this after `learning_starts` gets a note."""


def short_budget_note(preset: str, cfg: Any, budget: int) -> list[str]:
    """A note for `--steps` that leaves an off-policy preset (`preset`: e.g. "sac preset for Pendulum-v1") little
    learning after its random warm-up; none when a dataset phase comes first (gradient steps, no warm-up)."""
    start = getattr(cfg, "learning_starts", None)
    offline_first = bool(getattr(cfg, "dataset", None)) and (
        getattr(cfg, "offline_ratio", None) is None or getattr(cfg, "online_steps", 0) > 0
    )
    if start is None or offline_first or cfg.steps >= budget or cfg.steps - start >= SHORT_BUDGET_STEPS:
        return []
    return [
        f"note: {cfg.steps:,} steps leave {max(cfg.steps - start, 0):,} env steps of learning after "
        f"learning_starts={start:,}, and the {preset} is tuned for {budget:,} steps: "
        f"the result may fall short (use --steps {format_count(budget)}, or --set learning_starts=N)"
    ]


def _env_and_algo(spec: AlgoSpec, cfg: Any, num_envs: int | None = None) -> tuple[VecEnv, Any]:
    env = make_vec_env(cfg.env, num_envs or cfg.num_envs, cfg.vectorization, cfg.env_kwargs, training=True)
    try:
        check_observations(cfg, env.single_observation_space)
        return env, spec.build(cfg, env.single_observation_space, env.single_action_space)
    except BaseException:
        env.close()  # e.g. an action space the algorithm cannot handle: no env processes left behind
        raise


def check_observations(cfg: Any, space: Any) -> None:
    """Settings that do not apply to the env's observations: one error naming the fix."""
    if cfg.encoder == "auto":
        check_not_float_image(space, cfg.env)
    if cfg.normalize_obs and is_image_space(space):
        raise ConfigError(
            "normalize_obs does not apply to image frames: the CNN encoder scales them to [0, 1] itself",
            "drop normalize_obs (--set normalize_obs=false)",
        )


# --- the on-policy loop ------------------------------------------------------------------------


class OnPolicyLoop:
    """Collects rollouts with the current policy and hands them to `algo.update`."""

    def __init__(self, spec: AlgoSpec, cfg: Any) -> None:
        self.threads = runtime.configure(cfg.threads, cfg.seed, cfg.preferred_threads)
        matmul.set_precision(cfg.precision)
        self.cfg = cfg
        self.spec = spec
        self.dataset = training_dataset(cfg)
        """Demonstrations for the imitation term (hybrid on-policy runs); the rollouts stay on-policy."""
        # with rollout workers the learner's env is one env, for its spaces only: the workers step theirs
        self.env, self.algo = _env_and_algo(spec, cfg, 1 if cfg.rollout_workers else None)
        self.obs_space: Any = self.env.single_observation_space
        self.act_space = self.env.single_action_space
        self.net = self.algo.net
        shape: tuple[int, ...] = tuple(self.obs_space.shape or ())
        self.obs_norm = ObsNormalizer(shape, cfg.clip_obs) if cfg.normalize_obs else None
        pretrained_stats = getattr(self.algo, "pretrained_obs_norm", None)
        if pretrained_stats is not None:  # a fine-tuned policy keeps the normalization it was pretrained with
            self.obs_norm = ObsNormalizer(shape, cfg.clip_obs, frozen=True)
            self.obs_norm.rms.load({k: v.numpy() for k, v in pretrained_stats.items()})
        if self.dataset is not None:
            try:
                self.algo.imitation = self._imitation(self.dataset)
            except BaseException:
                self.env.close()
                raise
            if cfg.bc_steps and self.obs_norm is not None:  # the cloned policy sees what it was cloned on
                self.obs_norm.rms.load(dataset_normalizer(self.dataset, cfg.clip_obs).rms.state())
        self.reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward) if cfg.normalize_reward else None
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.buffer = rollout_buffer(cfg, self.net, self.obs_space, cfg.num_envs)
        self.step = 0
        self.iteration = 0
        self.notes: list[str] = []
        """What the run's start says about its env (e.g. that it offers action masks the run does not use)."""
        self.workers = _start_workers(spec, cfg, RolloutSlice, self.env)
        if self.workers is not None:
            self.obs = np.zeros(0, np.float32)  # the workers hold the observations
            return
        try:
            track_action_masks(cfg, self.env, self.net.head)
            raw = self.env.reset(seed=cfg.seed)
        except BaseException:
            self.env.close()
            raise
        self.obs = self._normalize(raw, update=True)
        self.notes += unused_masks_note(cfg, self.env)

    def pretrain(self) -> dict[str, float] | None:
        """Behaviour cloning on the demonstrations before the first rollout (`bc_steps`; algos/onpolicy.py
        `clone_demonstrations`), or None when the run has none to do. The observation statistics start from the
        dataset's (set in __init__) and keep running, as in every hybrid on-policy run: the demonstrations are
        normalized with the statistics of the moment, and the dataset's count makes the first rollouts move them
        little."""
        if not self.cfg.bc_steps or self.step:
            return None
        assert self.algo.imitation is not None
        return clone_demonstrations(self.algo.learner, self.algo.imitation.demos, self.cfg)

    def _imitation(self, dataset: Dataset) -> Imitation:
        """The demonstrations of the imitation term, checked against the env and the algorithm's head."""
        cfg, head = self.cfg, self.net.head
        check_compatible(dataset, self.obs_space, self.act_space, f"--env {cfg.env}")
        if cfg.imitation_weighting == "phi" and head.continuous:
            raise ConfigError(
                "imitation_weighting=phi needs action probabilities, but this env's actions are continuous "
                "(a density is not a probability)",
                "use imitation_weighting=uniform or advantage for Box actions",
            )
        demos = Demonstrations.from_dataset(dataset, head.from_env, cfg.gamma, self.obs_norm, cfg.device)
        return Imitation(demos, cfg)

    @property
    def steps_per_iteration(self) -> int:
        return self.cfg.n_steps * self.cfg.num_envs

    @property
    def total(self) -> int:
        """The steps the run takes (--steps in whole rollouts): the progress bar's total and the denominator of
        the annealing schedules, so that a budget rounded up anneals over the steps it runs."""
        return whole_rollouts(self.cfg)

    def score(self, return_mean: float) -> float | None:
        return _normalized_score(self.dataset, return_mean)

    def _normalize(self, raw: np.ndarray, update: bool) -> np.ndarray:
        return normalize_obs(self.obs_norm, raw, update)

    def policy(self) -> Policy:
        return _policy_of(self)

    def collect(self) -> Batch:
        cfg = self.cfg
        noise = rollout_noise(self.net, cfg.n_steps, cfg.num_envs, self.algo.generator, cfg.device)  # one RNG call
        if self.net.recurrent:  # the LSTM states at the rollout's start, from which the update replays it
            states = self.net.current_states(cfg.num_envs, torch.device(cfg.device)).clone()
        if self.workers is not None:
            last_values = self._collect_from_workers(self.workers, noise)
        else:
            self.obs, last_values = collect_rollout(
                self.net, self.env, self.buffer, noise, self.obs, self._normalize, self.tracker,
                self.reward_scaler, cfg.device,
            )  # fmt: skip
        self.step += self.steps_per_iteration
        rollout = self.buffer.finish(last_values)
        if self.workers is None:  # the observation after the last step (RND's bonus reads every next observation)
            rollout.last_obs = torch.from_numpy(self.obs).to(cfg.device)
        if self.net.recurrent:  # an episode starts at step t where step t - 1 ended one (the state was zeroed then)
            rollout.states = states
            rollout.starts = torch.cat([torch.zeros_like(rollout.episode_end[:1]), rollout.episode_end[:-1]])
        return rollout

    def _collect_from_workers(self, workers: RolloutWorkers, noise: Tensor) -> Tensor:
        """The workers' slices into the rollout buffer; their statistics and episodes into the learner's."""
        weights = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        obs_stats = None if self.obs_norm is None else self.obs_norm.rms.state()
        reward_stats = None if self.reward_scaler is None else self.reward_scaler.rms.state()
        noise_np = noise.cpu().numpy()
        slices = [{"noise": noise_np[:, start:stop]} for start, stop in workers.slices]
        parts = workers.collect(weights, slices, obs_stats=obs_stats, reward_stats=reward_stats)
        for (start, stop), part in zip(workers.slices, parts, strict=True):
            for name in collected_fields(self.buffer):
                getattr(self.buffer, name)[:, start:stop] = torch.tensor(part[name])  # Ray's arrays are read-only
            self.tracker.record(part["episode_returns"], part["episode_lengths"], part["episodes"])
            if self.obs_norm is not None:
                self.obs_norm.rms.merge(part["obs_updates"])
            if self.reward_scaler is not None:
                self.reward_scaler.rms.merge(part["reward_updates"])
        return torch.cat([torch.tensor(part["last_values"]) for part in parts]).to(self.cfg.device)

    def iterate(self) -> dict[str, Tensor]:
        """Collect one rollout and update on it."""
        self.threads.update()
        rollout = self.collect()
        metrics = self.algo.update(rollout, progress=self.step / self.total)
        metrics["threads"] = torch.tensor(float(self.threads.count))
        if self.workers is not None:
            metrics["worker_restarts"] = torch.tensor(float(sum(self.workers.restarts)))
        self.iteration += 1
        return metrics

    # checkpoint state ------------------------------------------------------------------------

    def policy_tensors(self) -> dict[str, Tensor]:
        """What `pl.load` needs: the network's parameters and the observation-normalization statistics."""
        return _policy_tensors(self.net, self.obs_norm)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = self.policy_tensors()
        optim_tensors, optim_meta = ckpt.optimizer_to_flat("optim", self.algo.optimizer)
        tensors.update(optim_tensors)
        extra_optimizers = {}  # an algorithm's own learned state beside the network (e.g. FixPO's multiplier)
        for name, module in getattr(self.algo, "modules", {}).items():
            tensors.update({f"{name}/{k}": v.detach().clone() for k, v in module.state_dict().items()})
        for name, optimizer in getattr(self.algo, "optimizers", {}).items():
            extra_tensors, extra_optimizers[name] = ckpt.optimizer_to_flat(f"optim_{name}", optimizer)
            tensors.update(extra_tensors)
        if self.reward_scaler is not None:
            tensors.update(
                {f"reward_scaler/{k}": torch.from_numpy(np.asarray(v)) for k, v in self.reward_scaler.state().items()}
            )
        if self.workers is None:
            env_json = _env_state(self.env, self.obs, self.algo.generator, tensors)
        else:
            env_json = _workers_state(self.workers, self.algo.generator, tensors)
        if self.net.rollout_state is not None:  # a recurrent policy's memory of the running episodes
            tensors["loop/lstm_state"] = self.net.rollout_state.clone()
        state = {
            "algo": self.spec.name,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "iteration": self.iteration,
            "optimizer": optim_meta,
            "optimizers": extra_optimizers,
            "env": env_json,
            "episodes": self.tracker.state(),
            "dataset": _dataset_reference(self.dataset),
            "spaces": _spaces_json(self),
        }
        return tensors, state

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> list[str]:
        ckpt.load_module_state(self.net, ckpt.unprefixed("policy", tensors), f"checkpoint at step {state['step']}")
        ckpt.optimizer_from_flat("optim", self.algo.optimizer, tensors, state["optimizer"])
        for name, module in getattr(self.algo, "modules", {}).items():
            ckpt.load_module_state(module, ckpt.unprefixed(name, tensors), f"checkpoint at step {state['step']}")
        for name, optimizer in getattr(self.algo, "optimizers", {}).items():
            ckpt.optimizer_from_flat(f"optim_{name}", optimizer, tensors, state["optimizers"][name])
        if self.obs_norm is not None:
            self.obs_norm.rms.load({k: tensors[f"obs_norm/{k}"].numpy() for k in ("mean", "var", "count")})
        if self.reward_scaler is not None:
            self.reward_scaler.load(
                {k: tensors[f"reward_scaler/{k}"].numpy() for k in ("mean", "var", "count", "returns")}
            )
        self.tracker.load(state["episodes"])
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        notes = _dataset_notes(self.dataset, state.get("dataset"))
        if self.workers is not None:
            return _load_workers_state(self.workers, self.algo.generator, state, tensors) + notes
        obs = _load_env_state(self.env, self.algo.generator, state, tensors)
        if obs is not None:
            self.obs = obs
            if "loop/lstm_state" in tensors:
                self.net.rollout_state = tensors["loop/lstm_state"].clone()
            return notes
        self.obs = self._normalize(self.env.reset(seed=self.cfg.seed + self.iteration), update=False)
        return [_ENV_RESTARTS, *notes]

    def parameters(self) -> list[Tensor]:
        return list(self.net.parameters())

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
        self.env.close()


class OffPolicyLoop:
    """Off-policy training in every data regime. Online: steps the envs with the exploring policy into a
    replay buffer; every `train_freq` vector steps, `gradient_steps` updates on sampled batches. Offline (a
    `dataset`): gradient steps on dataset batches, no env steps (the envs only evaluate). Hybrid
    (`offline_ratio`): online, each batch part dataset, part replay. Offline-to-online (`online_steps`): offline
    first, then online. One iteration is `log_every` env steps (gradient steps offline); `step` counts the
    gradient steps of the offline phase, then the env steps after it."""

    def __init__(self, spec: AlgoSpec, cfg: Any) -> None:
        self.threads = runtime.configure(cfg.threads, cfg.seed, cfg.preferred_threads)
        matmul.set_precision(cfg.precision)
        self.cfg = cfg
        self.spec = spec
        self.dataset = training_dataset(cfg)
        self.env, self.algo = _env_and_algo(spec, cfg, 1 if cfg.rollout_workers else None)
        self.obs_space: Any = self.env.single_observation_space
        self.act_space = self.env.single_action_space
        if self.dataset is not None:
            try:
                check_compatible(self.dataset, self.obs_space, self.act_space, f"--env {cfg.env}")
            except BaseException:
                self.env.close()
                raise
        self.net = self.algo.net
        self.reward_env: Any = None
        """With her=true: a copy of the env whose compute_reward relabels goals."""
        self.workers: RolloutWorkers | None = None
        self.obs_norm: ObsNormalizer | None = None
        self.running_norm = cfg.normalize_obs and self.dataset is None
        """Running statistics (online runs): the buffer keeps raw observations, batches are normalized when
        drawn, with the statistics of the moment (as SB3 does). With a dataset, its statistics, fixed."""
        if cfg.normalize_obs:
            shape = tuple(self.obs_space.shape or ())
            self.obs_norm = ObsNormalizer(shape, cfg.clip_obs) if self.running_norm else None
            if self.dataset is not None:
                self.obs_norm = dataset_normalizer(self.dataset, cfg.clip_obs)
        self.reward_scale = cfg.reward_scale
        if cfg.reward_normalization == "return_range":
            assert self.dataset is not None
            self.reward_scale *= return_range_scale(self.dataset)
        """What rewards are multiplied by on their way into replay (then `reward_bias` is added)."""
        self.tracker = EpisodeTracker(cfg.num_envs)
        offline_first = self.dataset is not None and (cfg.offline_ratio is None or cfg.online_steps > 0)
        self.offline_steps = cfg.steps if offline_first else 0
        """Gradient steps on the dataset alone before any env step."""
        self.total = run_total(spec, cfg)
        seeded = self.dataset is not None and cfg.offline_ratio is None  # the dataset starts the online replay
        if seeded and cfg.online_steps and cfg.num_envs != 1:
            raise ConfigError(
                f"a replay buffer seeded with a dataset takes one env, not num_envs={cfg.num_envs}",
                "set num_envs=1, or mix the dataset into batches instead (--set offline_ratio=0.5)",
            )
        self.buffer, offline = self._buffers(seeded)
        """`buffer`: what env steps are written to (None offline only); `offline`: the dataset on its own."""
        if self.dataset is not None and hasattr(self.algo, "attach_dataset"):  # e.g. PRDC's nearest neighbours
            self.algo.attach_dataset(*dataset_transitions(self.dataset, self.algo.action_shape, self.obs_norm))
        self.offline_source = (
            BatchSource(None, offline, 1.0) if offline is not None else BatchSource(self.buffer, None, 0.0)
        )
        self.online_source = (
            BatchSource(self.buffer, offline, cfg.offline_ratio or 0.0) if self.buffer is not None else None
        )
        self.step = 0
        self.iteration = 0
        self.vec_steps = 0
        self.updates = 0
        warmup = cfg.learning_starts if not offline_first else 0
        self.random_until = self.offline_steps + (0 if getattr(cfg, "use_sde_at_warmup", False) else warmup)
        """Uniformly random actions before this step (not after an offline phase: the policy is trained; not
        with use_sde_at_warmup: gSDE explores from the start)."""
        self.updates_after = self.offline_steps + warmup
        """Online updates run once `step` exceeds this (moved on when a resumed run refills its buffer)."""
        self.base_lrs = {name: opt.param_groups[0]["lr"] for name, opt in self.algo.optimizers.items()}
        self.pending: deque[tuple[np.ndarray, StepResult]] = deque()
        """Worker transitions of the current segment not yet recorded (empty between update bursts)."""
        self.workers = _start_workers(spec, cfg, OffPolicySlice, self.env)
        if self.workers is not None:
            self.obs = np.concatenate(self.workers.call("current_obs"))
        else:
            if cfg.action_masks:
                self._track_masks()
            self.obs = self.env.reset(seed=cfg.seed)
        if self.running_norm:
            assert self.obs_norm is not None
            self.obs_norm.update(self.obs)

    def _track_masks(self) -> None:
        """Have the env read its action masks (the Q-learning family with action_masks=true)."""
        if isinstance(self.buffer, StackedFrameReplay):
            self.close()
            raise ConfigError(
                "action masks do not combine with the stacked-frame replay yet",
                "drop action_masks or frame_stack_replay",
            )
        try:
            self.env.track_action_masks()
        except BaseException:
            self.close()
            raise

    def _allowed(self) -> np.ndarray | None:
        """The allowed actions at the envs' current observations, checked (a copy: an info mask's rows are
        rewritten by the next step), or None without action masks."""
        masks = self.env.action_masks
        if masks is None:
            return None
        mask_logit_bias(CategoricalHead(self.algo.n_actions), masks, self.env.mask_description())
        return masks.copy()

    def _buffers(self, seeded: bool) -> tuple[ReplayBuffer | None, ReplayBuffer | None]:
        """(online replay, dataset buffer) for the regime: online only (replay, None); offline only (None,
        dataset); offline then online with the dataset seeding the replay (dataset + room, None); mixed batches
        (replay, dataset)."""
        if self.dataset is None:
            return self._replay_buffer(), None
        if not seeded:
            return self._replay_buffer(), self._dataset_buffer(extra_capacity=0)
        if self.cfg.online_steps:
            return self._dataset_buffer(extra_capacity=self.cfg.buffer_size), None
        return None, self._dataset_buffer(extra_capacity=0)

    def _replay_buffer(self) -> ReplayBuffer:
        cfg = self.cfg
        buffer_cls = StackedFrameReplay if self._stacked_frames() else ReplayBuffer
        buffer = buffer_cls(
            cfg.buffer_size,
            cfg.num_envs,
            tuple(self.obs_space.shape or ()),
            self.algo.action_shape,
            self.algo.action_dtype,
            n_step=cfg.n_step,
            gamma=cfg.gamma,
            prioritized=cfg.prioritized,
            alpha=cfg.per_alpha,
            beta=cfg.per_beta,
            device=cfg.device,
            next_actions=getattr(self.algo, "needs_next_actions", False),
            mc_returns=getattr(self.algo, "needs_mc_returns", False),
            action_chunk=getattr(self.algo, "action_chunk", 1),
            sequence_length=getattr(self.algo, "sequence_length", 0),
            episodes=cfg.her,
            obs_dtype=torch_dtype(storage_dtype(self.obs_space)),
            mask_size=self.algo.n_actions if cfg.action_masks else 0,
        )
        if cfg.her:
            buffer.relabeler = self._her_relabeler()
        return buffer

    def _stacked_frames(self) -> bool:
        """Whether the replay buffer stores each frame of stacked frames once (frame_stack_replay)."""
        wanted = self.cfg.frame_stack_replay
        stacks = is_image_space(self.obs_space) and len(self.obs_space.shape) == 3 and not self.cfg.her
        if wanted and not stacks:
            self.close()
            raise ConfigError(
                f"frame_stack_replay=true needs stacked uint8 frames [k, H, W] (and no her); {self.cfg.env} observes "
                f"{self.obs_space}",
                "drop frame_stack_replay, or stack frames with gymnasium.wrappers.FrameStackObservation",
            )
        return stacks and (wanted or (wanted is None and is_atari(self.cfg.env)))

    def _her_relabeler(self) -> HindsightRelabeler:
        """Hindsight relabelling with the env's own compute_reward (from one more copy of the env, kept open)."""
        cfg = self.cfg
        self.reward_env = make_single_env(cfg.env, cfg.env_kwargs)
        try:
            return her_relabeler(self.reward_env, self.env.raw_observation_space, cfg.env, cfg)
        except BaseException:
            self.close()
            raise

    def _dataset_buffer(self, extra_capacity: int) -> ReplayBuffer:
        assert self.dataset is not None
        cfg = self.cfg
        return dataset_buffer(
            self.dataset,
            self.algo.action_shape,
            self.algo.action_dtype,
            n_step=cfg.n_step,
            gamma=cfg.gamma,
            extra_capacity=extra_capacity,
            prioritized=cfg.prioritized,
            per_alpha=cfg.per_alpha,
            per_beta=cfg.per_beta,
            obs_normalizer=self.obs_norm,
            device=cfg.device,
            next_actions=getattr(self.algo, "needs_next_actions", False),
            mc_returns=getattr(self.algo, "needs_mc_returns", False),
            action_chunk=getattr(self.algo, "action_chunk", 1),
            sequence_length=getattr(self.algo, "sequence_length", 0),
            reward_scale=self.reward_scale,
            reward_bias=cfg.reward_bias,
        )

    def policy(self) -> Policy:
        return _policy_of(self)

    def parameters(self) -> list[Tensor]:
        modules = [self.net, *self.algo.modules.values()]
        return [p for m in modules for p in m.parameters()]

    def score(self, return_mean: float) -> float | None:
        return _normalized_score(self.dataset, return_mean)

    def iterate(self) -> dict[str, Tensor]:
        """Env steps with their updates (in the offline phase, gradient steps) up to the next multiple of
        `log_every`, `eval_every` or `checkpoint_every`, or to the end of the run."""
        history: dict[str, list[Tensor]] = {}
        self.threads.update()
        if self.step < self.offline_steps:
            self._offline_steps(history)
        else:
            self._online_steps(history)
        self.iteration += 1
        out = {key: torch.stack(values).mean() for key, values in history.items()}
        out["updates"] = torch.tensor(float(self.updates))
        out["threads"] = torch.tensor(float(self.threads.count))
        if self.workers is not None:
            out["worker_restarts"] = torch.tensor(float(sum(self.workers.restarts)))
        return out

    def _offline_steps(self, history: dict[str, list[Tensor]]) -> None:
        if self.cfg.anneal_lr:
            self._anneal_lr()
        end = self._block_end()  # gradient steps
        for _ in range(min(end, self.offline_steps) - self.step):
            self._update(self.offline_source, history)
            self.step += 1
            self.algo.after_step(self.step)  # offline, a step is a gradient step (e.g. DQN's target copies)

    def _online_steps(self, history: dict[str, list[Tensor]]) -> None:
        cfg, algo, env = self.cfg, self.algo, self.env
        buffer, source = self.buffer, self.online_source
        assert buffer is not None and source is not None
        norm = self.obs_norm
        stored = None if self.running_norm else norm  # what the buffer's observations are normalized with
        online_total = max(self.total - self.offline_steps, 1)
        vector_steps = max(1, -(-(self._block_end() - self.step) // cfg.num_envs))
        next_allowed = self._allowed() if self.workers is None else None  # each step's, checked once
        for k in range(vector_steps):
            if self.step >= self.total:
                break
            allowed = next_allowed
            if self.workers is not None:
                if not self.pending:
                    self._collect_segment(self.workers, min(vector_steps - k, self._steps_left()), online_total)
                actions, res = self.pending.popleft()
            else:
                masked = () if allowed is None else (allowed,)  # only the Q-learning family takes masks
                if self.step < self.random_until:
                    actions = algo.random_actions(cfg.num_envs, *masked)
                else:
                    acting_obs = self.obs if norm is None else norm(self.obs)
                    actions = algo.explore(acting_obs, (self.step - self.offline_steps) / online_total, *masked)
                res = env.step(algo.to_env(actions))
            self.tracker.update(res.reward, res.episode_end)
            obs, next_obs, final_obs = self.obs, res.obs, res.final_obs
            if stored is not None:
                obs, next_obs = stored(obs), stored(next_obs)
                final_obs = None if final_obs is None else stored(final_obs)
            reward = res.reward
            if (self.reward_scale, cfg.reward_bias) != (1.0, 0.0):
                reward = res.reward * self.reward_scale + cfg.reward_bias
            step = (obs, actions, reward, next_obs, res.terminated, res.truncated, final_obs)
            if allowed is None:
                buffer.add(*step)
            else:  # the allowed actions at obs and at next_obs (the reset's where an episode ended)
                next_allowed = self._allowed()
                buffer.add(*step, allowed, next_allowed)
            if self.running_norm:
                assert norm is not None
                norm.update(res.obs)
            self.obs = res.obs
            self.step += cfg.num_envs
            self.vec_steps += 1
            algo.after_step(self.step)
            if self.step > self.updates_after and self.vec_steps % cfg.train_freq == 0:
                self.threads.update()
                if cfg.anneal_lr:
                    self._anneal_lr()
                for _ in range(cfg.updates_per_train):
                    self._update(source, history)

    def _block_end(self) -> int:
        """Where an iteration ends: the next multiple of `log_every`, `eval_every` or `checkpoint_every`, so that
        evaluations and checkpoints happen at the steps they are asked for (online, the first vector step
        reaching it)."""
        cfg = self.cfg
        return int(
            min(_next_multiple(self.step, every) for every in (cfg.log_every, cfg.eval_every, cfg.checkpoint_every))
        )

    def _steps_left(self) -> int:
        """Vector steps to the end of the run."""
        return -(-(self.total - self.step) // self.cfg.num_envs)

    def _collect_segment(self, workers: RolloutWorkers, limit: int, online_total: int) -> None:
        """The workers' transitions up to the next update burst (at most `limit` vector steps), into `pending`:
        a segment ends where the in-process loop would update, so both act with the same weights."""
        cfg = self.cfg
        steps = min(cfg.train_freq - self.vec_steps % cfg.train_freq, limit)
        weights = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        obs_stats = None if self.obs_norm is None else self.obs_norm.rms.state()
        parts = workers.collect(
            weights, [{} for _ in workers.slices], steps=steps, first_step=self.step, random_until=self.random_until,
            offline_steps=self.offline_steps, online_total=online_total, obs_stats=obs_stats,
        )  # fmt: skip
        joined = {key: np.concatenate([part[key] for part in parts], axis=1) for key in parts[0] if key != "has_final"}
        any_final = np.any([part["has_final"] for part in parts], axis=0)
        for t in range(steps):
            final = joined["final_obs"][t] if any_final[t] else None
            outcome = (joined["reward"][t], joined["terminated"][t], joined["truncated"][t], final)
            self.pending.append((joined["actions"][t], StepResult(joined["next_obs"][t], *outcome)))

    def _update(self, source: BatchSource, history: dict[str, list[Tensor]]) -> None:
        batch = source.sample(self.cfg.batch_size, self.algo.generator, getattr(self.algo, "batch_fields", None))
        if self.running_norm:
            for name in ("obs", "next_obs"):
                if name in batch:
                    setattr(batch, name, self._normalized(getattr(batch, name)))
        metrics = self.algo.update(batch, self.updates)
        td_error = metrics.pop("td_error", None)
        if td_error is not None:
            source.update_priorities(batch, td_error)
        self.updates += 1
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)

    def _normalized(self, obs: Tensor) -> Tensor:
        """Raw replay observations normalized with the running statistics of the moment."""
        assert self.obs_norm is not None
        return self.obs_norm.tensor(obs)

    def _anneal_lr(self) -> None:
        """Every optimizer's learning rate at `1 - step / steps` of its initial value (before each update burst)."""
        remaining = max(0.0, 1.0 - self.step / self.total)
        for name, optimizer in self.algo.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.base_lrs[name] * remaining

    # checkpoint state ------------------------------------------------------------------------

    def policy_tensors(self) -> dict[str, Tensor]:
        """What `pl.load` needs: the acting network's parameters (and the dataset's observation statistics)."""
        return _policy_tensors(self.net, self.obs_norm)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = self.policy_tensors()
        for name, module in self.algo.modules.items():
            tensors.update(ckpt.prefixed(name, module.state_dict()))
        optimizers = {}
        for name, optimizer in self.algo.optimizers.items():
            optim_tensors, optimizers[name] = ckpt.optimizer_to_flat(f"optim_{name}", optimizer)
            tensors.update(optim_tensors)
        buffer_meta = None
        if self.cfg.save_buffer and self.buffer is not None:
            buffer_tensors, buffer_meta = self.buffer.state()
            tensors.update(ckpt.prefixed("buffer", buffer_tensors))
        if self.workers is None:
            env_json = _env_state(self.env, self.obs, self.algo.generator, tensors)
        else:
            env_json = _workers_state(self.workers, self.algo.generator, tensors)
        state = {
            "algo": self.spec.name,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "iteration": self.iteration,
            "vec_steps": self.vec_steps,
            "updates": self.updates,
            "updates_after": self.updates_after,
            "optimizers": optimizers,
            "buffer": buffer_meta,
            "dataset": _dataset_reference(self.dataset),
            "env": env_json,
            "episodes": self.tracker.state(),
            "spaces": _spaces_json(self),
        }
        return tensors, state

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> list[str]:
        where = f"checkpoint at step {state['step']}"
        ckpt.load_module_state(self.net, ckpt.unprefixed("policy", tensors), where)
        for name, module in self.algo.modules.items():
            ckpt.load_module_state(module, ckpt.unprefixed(name, tensors), where)
        for name, optimizer in self.algo.optimizers.items():
            ckpt.optimizer_from_flat(f"optim_{name}", optimizer, tensors, state["optimizers"][name])
        self.tracker.load(state["episodes"])
        if self.running_norm:
            assert self.obs_norm is not None
            self.obs_norm.rms.load({k: tensors[f"obs_norm/{k}"].numpy() for k in ("mean", "var", "count")})
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        self.vec_steps = int(state["vec_steps"])
        self.updates = int(state["updates"])
        self.updates_after = int(state["updates_after"])
        if self.workers is not None:
            notes = _load_workers_state(self.workers, self.algo.generator, state, tensors)
            self.obs = np.concatenate(self.workers.call("current_obs"))
        else:
            obs = _load_env_state(self.env, self.algo.generator, state, tensors)
            notes = [] if obs is not None else [_ENV_RESTARTS]
            self.obs = obs if obs is not None else self.env.reset(seed=self.cfg.seed + self.iteration)
        notes += _dataset_notes(self.dataset, state.get("dataset"))
        if state.get("buffer") is not None and self.buffer is not None:
            self.buffer.load(ckpt.unprefixed("buffer", tensors), state["buffer"])
        elif self.buffer is None or self.step <= self.offline_steps:
            pass  # nothing collected online yet: the dataset (reloaded) is all the replay there is
        else:
            refill = max(self.cfg.learning_starts, self.cfg.batch_size)
            self.updates_after = self.step + refill
            notes.append(
                f"the replay buffer was not saved (save_buffer=false): updates resume after {refill:,} new steps "
                "refill it, so this run will not match an uninterrupted one exactly"
            )
        return notes

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
        if self.reward_env is not None:
            self.reward_env.close()
        self.env.close()


# --- the population loop -----------------------------------------------------------------------


class PopulationLoop:
    """Random search (ars): each iteration runs whole episodes of the algorithm's candidate parameter vectors on
    `num_envs` env rows and hands the candidates' scores to `algo.update`. All rows act in one batched product
    (nets/population.py); a row whose episode ends takes the next one waiting, and rows with none left are not
    stepped (envs stepped one by one) or stepped and ignored (vectorized envs). The envs are reset at every
    iteration's start with a seed from the algorithm's generator, so a checkpoint (written between iterations)
    needs no env state to resume exactly."""

    def __init__(self, spec: AlgoSpec, cfg: Any) -> None:
        self.threads = runtime.configure(cfg.threads, cfg.seed, cfg.preferred_threads)
        self.cfg, self.spec = cfg, spec
        self.dataset: Dataset | None = None
        self.env, self.algo = _env_and_algo(spec, cfg)
        self.obs_space: Any = self.env.single_observation_space
        self.act_space = self.env.single_action_space
        self.net = self.algo.net
        shape: tuple[int, ...] = tuple(self.obs_space.shape or ())
        self.obs_norm = ObsNormalizer(shape, cfg.clip_obs) if cfg.normalize_obs else None
        self.actor = PopulationActor(self.net, cfg.num_envs)
        self.tracker = EpisodeTracker(cfg.num_envs)
        self.step = 0
        self.iteration = 0
        self.notes: list[str] = []

    @property
    def total(self) -> int:
        return int(self.cfg.steps)

    def score(self, return_mean: float) -> float | None:
        return None

    def policy(self) -> Policy:
        return _policy_of(self)

    def iterate(self) -> dict[str, Tensor]:
        """One iteration: the candidates' episodes, then the step; the observation statistics take the iteration's
        states afterwards (they stay frozen while its candidates act)."""
        self.threads.update()
        progress = self.step / self.total
        candidates = self.algo.candidates(progress)
        seen = None if self.obs_norm is None else RunningMeanStd(self.obs_norm.rms.mean.shape, count=0.0)
        scores, steps = self._run_episodes(candidates, seen)
        metrics = self.algo.update(scores, progress)
        if self.obs_norm is not None and seen is not None:
            self.obs_norm.rms.merge(seen.state())
        self.step += steps
        self.iteration += 1
        metrics["threads"] = torch.tensor(float(self.threads.count))
        return metrics

    def _run_episodes(self, candidates: np.ndarray, seen: RunningMeanStd | None) -> tuple[np.ndarray, int]:
        """Each candidate's score (the mean over its n_eval_episodes of return + alive_bonus_offset x length), and
        the env steps taken; `seen` gathers the statistics of the raw observations every step acted on."""
        cfg, env, actor = self.cfg, self.env, self.actor
        owner = np.repeat(np.arange(len(candidates)), cfg.n_eval_episodes)  # episode e runs candidate owner[e]
        rows = env.num_envs
        running = np.full(rows, -1)  # the episode each row runs (-1: none left for it)
        first = min(rows, len(owner))
        running[:first] = np.arange(first)
        actor.use(candidates)
        actor.assign(np.arange(first), owner[:first])
        waiting = first  # the next episode to start
        totals = np.zeros(len(candidates))
        returns, lengths = np.zeros(rows), np.zeros(rows, np.int64)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.algo.generator))
        obs = env.reset(seed=seed)
        steps = 0
        actions = np.zeros((rows, *(self.act_space.shape or ())), self.act_space.dtype)
        while True:
            active = np.flatnonzero(running >= 0)
            if not len(active):
                break
            steps += len(active)
            if seen is not None:
                seen.update(obs[active])
            acted = actor.act(obs if self.obs_norm is None else self.obs_norm(obs))
            actions[active] = acted[active]
            result = env.step(actions, None if len(active) == rows else active)
            returns[active] += result.reward[active]
            lengths[active] += 1
            ended = active[result.episode_end[active]]
            if len(ended):
                np.add.at(totals, owner[running[ended]], returns[ended] + cfg.alive_bonus_offset * lengths[ended])
                self.tracker.record(returns[ended].tolist(), lengths[ended].tolist())
                returns[ended], lengths[ended] = 0.0, 0
                starting = np.arange(waiting, min(waiting + len(ended), len(owner)))
                running[ended] = -1
                running[ended[: len(starting)]] = starting
                actor.assign(ended[: len(starting)], owner[starting])
                waiting += len(starting)
            elif lengths.max() > MAX_EVAL_EPISODE_STEPS:
                raise EnvError(
                    f"an episode of {cfg.env} ran {MAX_EVAL_EPISODE_STEPS:,} steps without ending: random search "
                    "scores whole episodes, and this env has no time limit",
                    "give the env a time limit: --set 'env_kwargs={max_episode_steps: 1000}'",
                )
            obs = result.obs
        return totals / cfg.n_eval_episodes, steps

    # checkpoint state ------------------------------------------------------------------------

    def policy_tensors(self) -> dict[str, Tensor]:
        return _policy_tensors(self.net, self.obs_norm)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = self.policy_tensors()
        tensors["rng/generator"] = self.algo.generator.get_state()
        state = {
            "algo": self.spec.name,
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "iteration": self.iteration,
            "episodes": self.tracker.state(),
            "dataset": None,
            "spaces": _spaces_json(self),
        }
        return tensors, state

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> list[str]:
        ckpt.load_module_state(self.net, ckpt.unprefixed("policy", tensors), f"checkpoint at step {state['step']}")
        if self.obs_norm is not None:
            self.obs_norm.rms.load({k: tensors[f"obs_norm/{k}"].numpy() for k in ("mean", "var", "count")})
        self.algo.generator.set_state(tensors["rng/generator"])
        self.tracker.load(state["episodes"])
        self.step = int(state["step"])
        self.iteration = int(state["iteration"])
        return []

    def parameters(self) -> list[Tensor]:
        return list(self.net.parameters())

    def close(self) -> None:
        self.env.close()


def training_dataset(cfg: Any) -> Dataset | None:
    """The run's dataset as it trains on it: loaded and checked, then its best `top_fraction` of episodes."""
    if not cfg.dataset:
        return None
    return best_episodes(load_dataset(cfg.dataset), cfg.top_fraction)


def _normalized_score(dataset: Dataset | None, return_mean: float) -> float | None:
    """The dataset's normalized score (D4RL's 100 (R - random) / (expert - random)) of a return, if known."""
    score = None if dataset is None else dataset.normalized_score(return_mean)
    return None if score is None else float(score)


def _dataset_reference(dataset: Dataset | None) -> dict[str, Any] | None:
    """How a checkpoint names its dataset: by path and checksum, never a copy; with its reference returns, so that
    `pl.load` / `policylab eval` give normalized scores without the dataset."""
    if dataset is None:
        return None
    return {
        "path": str(dataset.path),
        "sha256": dataset.checksum,
        "ref_min_score": dataset.ref_min_score,
        "ref_max_score": dataset.ref_max_score,
    }


def _dataset_notes(dataset: Dataset | None, saved: dict[str, Any] | None) -> list[str]:
    """A note when the dataset changed since the checkpoint (same path, other contents)."""
    if saved is None or dataset is None or saved.get("sha256") in (None, dataset.checksum):
        return []
    return [
        f"the dataset {saved['path']} changed since the checkpoint (sha256 {saved['sha256'][:12]}... now "
        f"{str(dataset.checksum)[:12]}...): this run will not match an uninterrupted one"
    ]


def _policy_tensors(net: torch.nn.Module, obs_norm: ObsNormalizer | None) -> dict[str, Tensor]:
    tensors = ckpt.prefixed("policy", net.state_dict())
    if obs_norm is not None:
        tensors.update({f"obs_norm/{k}": torch.from_numpy(np.asarray(v)) for k, v in obs_norm.rms.state().items()})
    return tensors


def _policy_of(loop: Loop) -> Policy:
    """The loop's acting policy, as `pl.load` would rebuild it (it encodes the env's own observations too)."""
    cfg = loop.cfg
    return Policy(
        loop.net, loop.obs_space, loop.act_space, loop.obs_norm, cfg.env, cfg.env_kwargs,
        raw_observation_space=loop.env.raw_observation_space, action_masks=cfg.action_masks,
    )  # fmt: skip


def _spaces_json(loop: Loop) -> dict[str, Any]:
    out = {"observation": space_to_json(loop.obs_space), "action": space_to_json(loop.act_space)}
    if needs_encoding(loop.env.raw_observation_space):  # a Discrete / Tuple env, encoded (envs/encode.py)
        out["raw_observation"] = space_to_json(loop.env.raw_observation_space)
    return out


def _env_state(env: VecEnv, obs: np.ndarray, generator: torch.Generator, tensors: dict[str, Tensor]) -> Any:
    """RNG states, current observations and the env's own state into `tensors`; returns the env's JSON part."""
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["loop/obs"] = torch.from_numpy(obs.copy())
    env_state = env.get_state()
    if env_state is None:
        return None
    env_json, env_tensors = _split_arrays(env_state)
    tensors.update(ckpt.prefixed("env", env_tensors))
    return env_json


_ENV_RESTARTS = "this env's state cannot be saved, so its episodes restart on resume (not bit-exact)"


def _start_workers(spec: AlgoSpec, cfg: Any, slice_cls: type, env: VecEnv) -> RolloutWorkers | None:
    """The run's rollout workers (None without `rollout_workers`); on failure the learner's env is closed."""
    if not cfg.rollout_workers:
        return None
    try:
        return RolloutWorkers(spec.name, cfg, slice_cls)
    except BaseException:
        env.close()
        raise


def _workers_state(workers: RolloutWorkers, generator: torch.Generator, tensors: dict[str, Tensor]) -> Any:
    """`_env_state` of a run with rollout workers: the learner's RNG states, and each worker's envs,
    observations, episode counters and reward returns."""
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    states, parts = _split_arrays(workers.get_state())
    tensors.update(ckpt.prefixed("workers", parts))
    return {"workers": states}


def _load_workers_state(
    workers: RolloutWorkers, generator: torch.Generator, state: dict[str, Any], tensors: dict[str, Tensor]
) -> list[str]:
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    saved = (state.get("env") or {}).get("workers")
    if saved is None:
        raise CheckpointError(
            "this checkpoint was written without rollout workers", "resume with --set rollout_workers=0"
        )
    states = _join_arrays(saved, ckpt.unprefixed("workers", tensors))
    workers.set_state(states)
    return [_ENV_RESTARTS] if any(s["env"] is None for s in states) else []


def _load_env_state(
    env: VecEnv, generator: torch.Generator, state: dict[str, Any], tensors: dict[str, Tensor]
) -> np.ndarray | None:
    """The inverse of `_env_state`: the saved current observations, or None if the env could not be saved
    (the caller resets it, and says so)."""
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    if state.get("env") is None:
        return None
    env.set_state(_join_arrays(state["env"], ckpt.unprefixed("env", tensors)))
    return tensors["loop/obs"].numpy().copy()


def _split_arrays(obj: Any, path: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Move numpy arrays out of a nested snapshot into tensors; leave {'__array__': key} markers."""
    if isinstance(obj, np.ndarray):
        key = path.strip("/")
        return {"__array__": key}, {key: torch.from_numpy(obj.copy())}
    if isinstance(obj, dict):
        out, tensors = {}, {}
        for k, v in obj.items():
            out[k], sub = _split_arrays(v, f"{path}/{k}")
            tensors.update(sub)
        return out, tensors
    if isinstance(obj, list):
        out_list, tensors = [], {}
        for i, v in enumerate(obj):
            item, sub = _split_arrays(v, f"{path}/{i}")
            out_list.append(item)
            tensors.update(sub)
        return out_list, tensors
    return obj, {}


def _join_arrays(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return tensors[obj["__array__"]].numpy().copy()
        return {k: _join_arrays(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, tensors) for v in obj]
    return obj


# --- driving a run -----------------------------------------------------------------------------


class _StopFlag:
    """Ctrl-C sets the flag (the loop saves a checkpoint and exits); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: finishing this iteration, saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


Loop = OnPolicyLoop | OffPolicyLoop | PopulationLoop
LOOPS: dict[str, Callable[[AlgoSpec, Any], Loop]] = {
    "on-policy": OnPolicyLoop,
    "off-policy": OffPolicyLoop,
    "population": PopulationLoop,
}


def _check_resume_online(online_steps: Any) -> None:
    """A resumed run keeps the online phase it was started with (only its total, --steps, may change)."""
    if online_steps is not None:
        raise ConfigError(
            "--online-steps does not apply to --resume: the run keeps the online phase it was started with",
            "drop --online-steps (only --steps may change: the run's new total)",
        )


def run_total(spec: AlgoSpec, cfg: Any) -> int:
    """The step a run ends at, as its loop counts (known without building the loop): on-policy, --steps in whole
    rollouts; off-policy, `steps`, or an offline phase's gradient steps and then `online_steps` env steps."""
    if spec.kind == "on-policy":
        return whole_rollouts(cfg)
    if spec.kind == "population":
        return int(cfg.steps)
    return int(cfg.steps + cfg.online_steps if _offline_first(cfg) else cfg.steps)


def _with_actual_steps(spec: AlgoSpec, cfg: Any) -> Any:
    """The config with the budget the run actually takes: on-policy runs collect whole rollouts, so --steps 20000
    in rollouts of 128 x 8 is 20,224; off-policy runs step all num_envs envs at once, so their env steps (`steps`,
    or `online_steps` after an offline phase) are a multiple of num_envs. config.yaml and the checkpoints then
    record the run's total, and a resume that reads it back ends at the same step (rounding is idempotent)."""
    if spec.kind == "on-policy":
        return dataclasses.replace(cfg, steps=whole_rollouts(cfg))
    if spec.kind == "population":  # whole iterations: the last one ends past `steps` (the env steps it took)
        return cfg
    if _offline_first(cfg):
        return dataclasses.replace(cfg, online_steps=_whole_vector_steps(cfg.online_steps, cfg.num_envs))
    return dataclasses.replace(cfg, steps=_whole_vector_steps(cfg.steps, cfg.num_envs))


def _offline_first(cfg: Any) -> bool:
    """Whether an off-policy run starts with an offline phase (`steps` gradient steps on its dataset)."""
    return bool(cfg.dataset) and (cfg.offline_ratio is None or cfg.online_steps > 0)


def _whole_vector_steps(steps: int, num_envs: int) -> int:
    return int(-(-steps // num_envs) * num_envs)


def _finite_check(loop: Loop, metrics: dict[str, Tensor], last_ckpt: Path | None) -> None:
    bad = [k for k, v in metrics.items() if not torch.isfinite(v).all()]
    norms = torch._foreach_norm(loop.parameters())
    if not torch.isfinite(torch.stack(norms)).all():
        bad.append("parameters")
    if bad:
        kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged at step {loop.step}: {', '.join(bad)} became NaN or inf; {kept}",
            loop.cfg.divergence_fix(),
        )


def train(
    algo: str,
    env: str | None = None,
    steps: int | str | None = None,
    seed: int | None = None,
    *,
    dataset: str | Path | None = None,
    online_steps: int | str | None = None,
    config: str | Path | dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    preset: str | None = "auto",
    resume: str | Path | None = None,
    name: str | None = None,
    runs_dir: str | Path | None = None,
    callback: Callable[[IterationInfo], bool | None] | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> Run:
    """Train `algo` and return the Run (its directory, config and final evaluation).

    `pl.train("ppo", env="CartPole-v1", steps=100_000, seed=1)` uses the tuned
    preset for the env when there is one. Without `env` (and without a dataset) the algorithm's default env
    trains (CartPole-v1 for most; `policylab list`), without `steps` the preset's or the config's budget, without
    `seed` seed 0. `overrides` is a dict of config values (`--set`). A new run's directory is
    `runs_dir`/`name` (default ./runs/<algo>-<env>-s<seed>). `resume=run_dir` continues a run in its directory.
    `dataset=path`: offline training for `steps` gradient steps in the dataset's env (`online_steps`: then
    online), or hybrid with `overrides={"offline_ratio": p}` (see OffPolicyConfig).
    `callback(info)` runs after every iteration; returning False stops the run
    with a checkpoint, as Ctrl-C does. `progress`: None shows a live bar on a
    terminal (lines otherwise), False prints no progress.
    """
    say = print if verbose else (lambda *a, **k: None)
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(
            f"overrides is a {type(overrides).__name__}: it takes a dict of config values",
            'pass e.g. overrides={"lr": 3e-4, "num_envs": 16}',
        )
    if resume is not None:
        if env is not None or seed is not None or overrides or config is not None or dataset is not None:
            raise ConfigError(
                "--resume continues a run with its saved config",
                "drop --env/--seed/--set/--config (only --steps may change)",
            )
        check_resume_place(resume, name, runs_dir)
        _check_resume_online(online_steps)
        point = _ResumePoint.load(algo, resume, steps)
        complete = point.complete_run()
        if complete is not None:
            say(for_reader(complete.notes[-1]))
            return complete
        session = _Session.resumed(point)
    else:
        data = {"dataset": dataset, "online_steps": online_steps}
        session = _Session.new(algo, env, steps, seed, config, overrides, preset, name, runs_dir or "runs", data)
    session.notes[:] = [for_reader(note) for note in session.notes]  # as printed, so in `Run.notes`
    for note in session.notes:
        say(note)
    cfg, loop = session.cfg, session.loop
    bar = Progress(
        loop.total, f"{session.spec.name} {cfg.env}", enabled=progress if verbose else False, start=loop.step
    )
    try:
        with _StopFlag() as stop:
            while loop.step < loop.total and session.stopped is None:
                info = session.iterate()
                bar.update(loop.step, info.metrics["fps"], info.mean_return, session.last_evaluation())
                if stop.requested or (callback is not None and callback(info) is False):
                    break
        session.last_ckpt = session.save()
    finally:
        bar.close()
        loop.close()
    run = session.finish()
    if run.interrupted:
        say(f"stopped at step {loop.step:,}; checkpoint {session.last_ckpt}")
        say(f"resume with: policylab train {session.spec.name} --resume {run.dir}")
    elif run.final_eval is not None:
        if run.stopped is not None:
            say(f"ended early at step {loop.step:,} of {loop.total:,}: {run.stopped}")
        say(
            f"done: {loop.step:,} steps; evaluation over {run.final_eval['episodes']} episodes: "
            f"return {fixed(run.final_eval['return_mean'])} +/- {fixed(run.final_eval['return_std'])}"
            + (f", normalized score {fixed(run.final_eval['score'])}" if "score" in run.final_eval else "")
        )
        if run.best is not None:
            which = " (the final policy)" if run.best["step"] == loop.step else ""
            best_score = loop.score(run.best["return_mean"])
            say(
                f"best policy: step {run.best['step']:,}{which}, evaluation return {fixed(run.best['return_mean'])}"
                + (f", normalized score {fixed(best_score)}" if best_score is not None else "")
                + f" (saved in {run.dir / run.best['dir']}; policylab eval {run.dir} --best, "
                f'pl.load(run.dir, which="best"))'
            )
        say(f"run directory: {run.dir}")
    return run


@dataclass
class _ResumePoint:
    """A run's latest checkpoint, read for --resume, with the config it continues with (--steps applied)."""

    spec: AlgoSpec
    cfg: Any
    tensors: dict[str, Tensor]
    state: dict[str, Any]
    run_dir: Path

    @classmethod
    def load(cls, algo: str, resume: str | Path, steps: int | str | None) -> _ResumePoint:
        tensors, state, ckpt_dir = ckpt.load_checkpoint(resume)
        if "iteration" not in state:
            raise CheckpointError(
                f"{str(ckpt_dir)!r} holds only a policy (the best evaluated one), not a training checkpoint",
                f"resume the run directory: --resume {ckpt_dir.parent}",
            )
        spec = get_algo(state["algo"])
        if algo and spec.name != algo.lower():
            raise ConfigError(
                f"{str(resume)!r} is a {spec.name} run, not {algo}",
                f"run `policylab train {spec.name} --resume {resume}`",
            )
        cfg = apply_values(spec.config_cls(), state["config"], str(ckpt_dir / ckpt.STATE))
        run_dir = ckpt_dir.parent.parent
        if steps is not None:
            cfg = _with_actual_steps(spec, dataclasses.replace(cfg, steps=parse_count(steps)))
            step = int(state["step"])
            if run_total(spec, cfg) < step:
                raise ConfigError(
                    f"{run_dir} is at step {step:,}, past --steps {steps}",
                    f"pass --steps {step} or more (more trains longer), or leave --steps out",
                )
        return cls(spec, cfg, tensors, state, run_dir)

    def complete_run(self) -> Run | None:
        """The run as it ended, when it is already at its total and its final evaluation is written (eval.json at
        its last step): nothing to train, evaluate or write. None when there is something to do."""
        step, stopped = int(self.state["step"]), self.state.get("stopped")
        if step < run_total(self.spec, self.cfg) and stopped is None:
            return None
        try:
            summary = json.loads((self.run_dir / SUMMARY_JSON).read_text())
        except (OSError, ValueError):
            return None  # stopped before its final evaluation was written: the resume writes it
        if not isinstance(summary, dict) or summary.get("steps") != step:
            return None
        if stopped is None:
            note = (
                f"{self.run_dir} is already complete at {step:,} steps: nothing to train (to train longer: "
                f"policylab train {self.spec.name} --resume {self.run_dir} --steps N, with N above {step:,})"
            )
        else:
            note = (
                f"{self.run_dir} is already complete: it ended early at step {step:,} ({stopped}); nothing to "
                "train (to train on, start a new run without that setting)"
            )
        final_eval, best = summary.get("final_eval"), summary.get("best")
        return Run(self.run_dir, self.spec.name, self.cfg, step, final_eval, False, [note], best, stopped)


class _Session:
    """One training session of a run: the loop, its run directory and logs, the eval/checkpoint schedule."""

    def __init__(
        self, spec: AlgoSpec, cfg: Any, loop: Loop, run_dir: Path, notes: list[str], state: dict[str, Any]
    ) -> None:
        self.spec, self.cfg, self.loop, self.dir, self.notes = spec, cfg, loop, run_dir, notes
        resumed = bool(state)
        self.log = RunLog(run_dir, cfg.tensorboard, resume_step=loop.step if resumed else None)
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.last_ckpt: Path | None = ckpt.find_checkpoint(run_dir) if resumed else None
        self.best: dict[str, Any] | None = _best_so_far(run_dir, state, notes) if resumed else None
        """{"step", "return_mean"} of the best evaluation so far, whose policy is in best/."""
        self.next_eval = _next_multiple(loop.step, cfg.eval_every)
        self.next_ckpt = _next_multiple(loop.step, cfg.checkpoint_every)
        self.start_time = time.perf_counter()
        self.start_step = loop.step
        self.latest_eval: dict[str, Any] | None = None
        self.pretraining: dict[str, float] | None = state.get("pretraining")
        """What the loop's pretraining did before step 0 (e.g. behaviour cloning: its losses and seconds), if any."""
        self.stopped: str | None = state.get("stopped")
        """Why a stopping rule ended the run (`stop_return`, `stop_patience`); None while it goes on."""
        self.evals_since_best = int(state.get("evals_since_best", 0))
        """Periodic evaluations in a row without a new best (what `stop_patience` counts)."""

    @classmethod
    def new(
        cls,
        algo: str,
        env: str | None,
        steps: int | str | None,
        seed: int | None,
        config: str | Path | dict[str, Any] | None,
        overrides: dict[str, Any] | None,
        preset: str | None,
        name: str | None,
        runs_dir: str | Path,
        data: dict[str, Any],
    ) -> _Session:
        spec = get_algo(algo)
        cfg, notes = resolve_config(spec, env, steps, seed, config, overrides, preset, **data)
        cfg = _with_actual_steps(spec, cfg)
        loop = LOOPS[spec.kind](spec, cfg)  # env and networks first: a failed start leaves no run directory behind
        notes += getattr(loop, "notes", [])
        run_dir = new_run_dir(
            runs_dir, name or f"{spec.name}-{cfg.env.replace('/', '_').replace(':', '_')}-s{cfg.seed}"
        )
        ckpt.atomic_write_text(run_dir / CONFIG_YAML, dump_yaml(cfg, spec.name))
        session = cls(spec, cfg, loop, run_dir, notes, {})
        try:
            session.pretrain()
        except BaseException:
            loop.close()
            raise
        return session

    @classmethod
    def resumed(cls, point: _ResumePoint) -> _Session:
        spec, cfg, state = point.spec, point.cfg, point.state
        loop = LOOPS[spec.kind](spec, cfg)
        try:
            notes = [f"resuming {point.run_dir} from step {state['step']:,}", *loop.load_state(point.tensors, state)]
            if cfg.steps != state["config"]["steps"]:  # --steps moved the total: config.yaml records the new one
                ckpt.atomic_write_text(point.run_dir / CONFIG_YAML, dump_yaml(cfg, spec.name))
        except BaseException:
            loop.close()
            raise
        return cls(spec, cfg, loop, point.run_dir, notes, state)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def pretrain(self) -> None:
        """A new run's pretraining before the first env step (on-policy `bc_steps`), if the loop has one; its policy
        is then evaluated (with eval_every) and checkpointed (with checkpoint_every) as step 0, so that a curve
        starts at the pretrained policy and `pl.load(<run>/checkpoints/step_000000000000)` gives it."""
        pretrain = getattr(self.loop, "pretrain", None)
        result = None if pretrain is None else pretrain()
        if result is None:
            return
        self.pretraining = {**result, "seconds": self.elapsed}
        self.notes.append(
            f"behaviour cloning: {self.cfg.bc_steps:,} steps in {self.pretraining['seconds']:.1f} s, loss "
            f"{result['bc_loss_first']:.3f} -> {result['bc_loss_last']:.3f}"
        )
        if self.cfg.eval_every:
            evaluation = self._evaluate(self.cfg.seed + 10_000)
            self.log.log_eval(_eval_row(0, self.pretraining["seconds"], evaluation))
            self._keep_if_best(evaluation)
        if self.cfg.checkpoint_every:
            self.last_ckpt = self.save()

    def iterate(self) -> IterationInfo:
        """One collect -> update -> log -> evaluate -> checkpoint iteration."""
        loop, cfg = self.loop, self.cfg
        metrics = loop.iterate()
        _finite_check(loop, metrics, self.last_ckpt)
        values = {k: float(v) for k, v in metrics.items()}
        elapsed = self.elapsed
        values["fps"] = (loop.step - self.start_step) / max(elapsed - self.elapsed_before, 1e-9)
        mean_ret = loop.tracker.mean_return()
        self.log.log_train(
            {
                "step": loop.step,
                "time": elapsed,
                "return_mean": mean_ret,
                "length_mean": loop.tracker.mean_length(),
                "episodes": loop.tracker.episodes,
                **values,
            }
        )
        eval_return = None
        if cfg.eval_every and self.next_eval <= loop.step < loop.total:
            result = self._evaluate(cfg.seed + 10_000 + loop.iteration)
            self.log.log_eval(_eval_row(loop.step, elapsed, result))
            self.next_eval = _next_multiple(loop.step, cfg.eval_every)
            eval_return = float(result["return_mean"])
            self.stopped = self._stopping_rule(eval_return, improved=self._keep_if_best(result))
        if cfg.checkpoint_every and self.next_ckpt <= loop.step < loop.total:
            self.last_ckpt = self.save()
            self.next_ckpt = _next_multiple(loop.step, cfg.checkpoint_every)
        return IterationInfo(loop.step, loop.iteration, elapsed, mean_ret, loop.tracker.episodes, values, eval_return)

    def _evaluate(self, seed: int) -> dict[str, Any]:
        """An evaluation (deterministic unless `eval_deterministic` is off); with a dataset that has reference
        returns, also its normalized score."""
        result = evaluate(self.loop.policy(), self.cfg.eval_episodes, seed, deterministic=self.cfg.eval_deterministic)
        score = self.loop.score(result["return_mean"])
        if score is not None:
            result["score"] = score
        self.latest_eval = result
        return result

    def last_evaluation(self) -> str | None:
        """The latest evaluation as the progress line shows it where no training episode has ended (offline)."""
        result = self.latest_eval
        if result is None:
            return None
        score = f", normalized {result['score']:.1f}" if "score" in result else ""
        return f"{result['return_mean']:.1f} (evaluation{score})"

    def save(self) -> Path:
        tensors, state = self.loop.state()
        state["elapsed"] = self.elapsed
        state["best"] = self.best
        state["pretraining"] = self.pretraining
        state["evals_since_best"] = self.evals_since_best
        state["stopped"] = self.stopped
        return ckpt.save_checkpoint(self.dir / "checkpoints", self.loop.step, tensors, state, self.cfg.keep_checkpoints)

    def _stopping_rule(self, eval_return: float, improved: bool) -> str | None:
        """Why the run ends at this periodic evaluation (`stop_return`, `stop_patience`), or None."""
        cfg, step = self.cfg, self.loop.step
        self.evals_since_best = 0 if improved else self.evals_since_best + 1
        if cfg.stop_return is not None and eval_return >= cfg.stop_return:
            return f"stop_return={cfg.stop_return:g} reached, evaluation return {fixed(eval_return)} at step {step:,}"
        if cfg.stop_patience and self.evals_since_best >= cfg.stop_patience:
            assert self.best is not None
            return (
                f"stop_patience={cfg.stop_patience}: {self.evals_since_best} evaluations in a row without a new best "
                f"(the best: {fixed(self.best['return_mean'])} at step {self.best['step']:,})"
            )
        return None

    def _keep_if_best(self, result: dict[str, Any]) -> bool:
        """Write the policy just evaluated to best/ if its mean return beats the best so far (the first always
        does); returns whether it did. Only the policy (weights, observation statistics), not the state needed to
        resume from it."""
        ret = float(result["return_mean"])
        if not math.isfinite(ret) or (self.best is not None and not ret > self.best["return_mean"]):
            return False
        loop = self.loop
        state = {
            "algo": self.spec.name,
            "config": dataclasses.asdict(self.cfg),
            "step": loop.step,
            "spaces": _spaces_json(loop),
            "eval": {k: result[k] for k in ("return_mean", "return_std", "episodes")},
            "dataset": _dataset_reference(getattr(loop, "dataset", None)),
        }
        ckpt.write_checkpoint_dir(self.dir / ckpt.BEST, loop.policy_tensors(), state)
        self.best = {"step": loop.step, "return_mean": ret}
        return True

    def finish(self) -> Run:
        """The final evaluation (it competes for best/) and summary (skipped when the run was interrupted; a stopping
        rule's end is a finished run)."""
        loop, cfg = self.loop, self.cfg
        interrupted = loop.step < loop.total and self.stopped is None
        final_eval = None
        if not interrupted:
            final_eval = self._evaluate(cfg.seed + 20_000)
            self.log.log_eval(_eval_row(loop.step, self.elapsed, final_eval))
            self._keep_if_best(final_eval)
        best = None if self.best is None else {**self.best, "dir": ckpt.BEST}
        if final_eval is not None:
            self.log.write_summary(
                {
                    "algo": self.spec.name,
                    "env": cfg.env,
                    "seed": cfg.seed,
                    "steps": loop.step,
                    "wall_clock_s": self.elapsed,
                    "final_eval": final_eval,
                    "best": best,
                    **({} if self.pretraining is None else {"pretraining": self.pretraining}),
                    **({} if self.stopped is None else {"stopped": self.stopped}),
                }
            )
        self.log.close()
        return Run(self.dir, self.spec.name, cfg, loop.step, final_eval, interrupted, self.notes, best, self.stopped)


def _best_so_far(run_dir: Path, state: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """The best evaluation of a resumed run so far: the one whose policy is in best/. That is the one the
    checkpoint records (`state["best"]`), or a later one (an evaluation after the checkpoint, before a crash;
    the final evaluation of a run continued with more steps). Without a readable best/, the next evaluation
    writes a new one."""
    recorded = state.get("best")
    try:
        _, best, _ = ckpt.load_checkpoint(run_dir / ckpt.BEST)
        return {"step": int(best["step"]), "return_mean": float(best["eval"]["return_mean"])}
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        if recorded is not None:
            why = exc.problem if isinstance(exc, CheckpointError) else f"its state.json lacks {exc}"
            notes.append(f"best/ (step {recorded['step']:,}) cannot be read ({why}): the next evaluation replaces it")
        return None


def _next_multiple(step: int, every: int) -> int:
    return math.inf if not every else (step // every + 1) * every  # type: ignore[return-value]


def _eval_row(step: int, wall: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "time": wall, **{k: v for k, v in result.items() if k != "returns"}}
