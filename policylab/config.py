"""Typed dataclass configs: YAML in and out, `--set key=value` overrides, human step counts.

Every algorithm has one flat config dataclass that extends `CommonConfig` (the
run-level settings every algorithm shares). Values are resolved in this order,
later winning: algorithm defaults < tuned preset for the env id < YAML file <
`--set key=value` < the `--env/--steps/--seed` flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import yaml

from policylab.errors import ConfigError, suggest

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config dataclass (CommonConfig subclasses, the LLM config)

_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
AUTO_THREADS = "auto"


ACTIVATIONS = ("tanh", "relu", "elu", "silu")
"""The activations of the MLP networks (nets/mlp.py)."""


@dataclass
class CommonConfig:
    """Run-level settings shared by every algorithm."""

    env: str = "CartPole-v1"
    """Gymnasium env id, or `module:Class` / `module:function` for your own env."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the env constructor."""
    steps: int = 100_000
    """Total environment steps (summed over the parallel envs); in an offline run (`dataset` without
    `offline_ratio`), gradient steps on the dataset."""
    dataset: str | None = None
    """An offline dataset (a directory made by `policylab collect`, a Minari dataset directory or name, or a
    D4RL-style HDF5 file): offline training, or hybrid with `offline_ratio` (off-policy algorithms)."""
    top_fraction: float = 1.0
    """Learn from the best this share of the dataset's episodes by return (1.0: all of them); observation
    statistics are then those of the kept episodes. `bc --set top_fraction=0.1` is CORL's BC-10%."""
    seed: int = 0
    num_envs: int = 8
    vectorization: str = "auto"
    """auto (numpy-vectorized env where Gymnasium has one, else sync), sync or async."""
    gamma: float = 0.99
    normalize_obs: bool = False
    """Running mean/std observation normalization; the statistics travel with the policy."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return (training only)."""
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    """tanh, relu, elu or silu."""
    eval_every: int = 10_000
    """Evaluation every this many env steps (0: only at the end)."""
    eval_episodes: int = 10
    eval_deterministic: bool = True
    """Evaluate the deterministic policy (its mean, most likely or greedy action); false: actions sampled from the
    policy (a Q-network's: epsilon-greedy at the run's eps_final), as rl-zoo evaluates Atari games (the Atari
    presets set it), where a deterministic policy that never presses FIRE after a lost life waits out the game."""
    stop_return: float | None = None
    """End the run at the first periodic evaluation whose mean return reaches this (e.g. 475 on CartPole-v1): a
    finished run, with its final evaluation, best/ and summary, as at the end of its budget (SB3's
    StopTrainingOnRewardThreshold). Needs eval_every."""
    stop_patience: int = 0
    """End the run after this many periodic evaluations in a row without a new best (SB3's
    StopTrainingOnNoModelImprovement); 0: never. Needs eval_every."""
    checkpoint_every: int = 50_000
    """Checkpoint every this many env steps (0: only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0: all)."""
    threads: int | str = AUTO_THREADS
    """torch threads: a number, or auto: up to `preferred_threads` (1 for this family, see below), but only as
    many as the cores other processes leave free, re-checked during the run (policylab/runtime.py `Threads`)."""
    device: str = "cpu"
    precision: str = "fp32"
    """fp32, or bf16: the large products in bfloat16 with float32 accumulation (weights, gradients and optimizer
    state stay float32) on CPUs with native bfloat16 (AMX or AVX512-BF16); opt-in, it changes the results
    (nets/matmul.py; the speed and returns are in benchmarks/README.md)."""
    recurrent: bool = False
    """LSTM actor-critic (ppo, a2c; RecurrentPPO-style): hidden states carried across steps and rollouts, reset at
    episode starts, minibatches of whole sequences (nets/actor_critic.py). Its size: lstm_hidden."""
    action_masks: bool = False
    """Act only among the allowed actions (Discrete / MultiDiscrete; the on-policy actor-critics, as SB3-contrib's
    MaskablePPO, and dqn / qrdqn): the env gives them as an `action_masks()` method (SB3-contrib's convention; its
    ActionMasker wrapper adds one) or as info["action_mask"] at every reset and step (Gymnasium's, e.g. Taxi-v4).
    The forbidden actions' logits get -1e9 when acting, in the loss (their probability and gradient are exactly 0)
    and in evaluation; a Q-network acts, explores and takes its target's max among the allowed actions. The saved
    policy takes masks too (`Policy.act(obs, action_mask=...)`)."""
    encoder: str = "auto"
    """How observations reach the networks: auto (image observations, uint8 frames: Nature-CNN; vectors: the MLP),
    nature, impala (IMPALA-CNN), or mlp (frames scaled and flattened). Which algorithms take images:
    `policylab.algos.image_algorithms()` (the on-policy actor-critics, dqn, qrdqn, cql_discrete)."""
    tensorboard: bool = False
    rollout_workers: int = 0
    """Step the envs in this many rollout workers, each a slice of the envs with a copy of the acting policy
    (0: in the learner's process). policylab/collectors.py says what stays the same and what does not."""
    rollout_backend: str = "ray"
    """ray (each worker a Ray actor with one CPU), or inline (the same slices in the learner's process)."""

    preferred_threads: ClassVar[int] = 1
    """What threads=auto uses when the cores are free: 1 is fastest for the on-policy family's small networks
    (2 threads gave the same update time for the PPO CartPole preset, benchmarks/README.md)."""
    activations: ClassVar[tuple[str, ...]] = ACTIVATIONS
    """The `activation` values the algorithm's networks take."""

    def divergence_fix(self) -> str:
        """The fix line of a run that diverged: the remedies this algorithm takes (`divergence_fix`)."""
        return divergence_fix(self)

    def validate(self) -> None:
        """Reject values that type checks cannot catch; subclasses extend this."""
        positive(self, "steps", "num_envs", "eval_episodes")
        check_seed(self.seed)
        check_threads(self.threads)
        check_device(self.device)
        from policylab.nets import matmul

        matmul.check_precision(self.precision)
        from policylab.nets.cnn import ENCODERS

        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder={self.encoder!r} is not one of {', '.join(ENCODERS)}", "use encoder=auto")
        _non_negative(self, "eval_every", "checkpoint_every", "keep_checkpoints", "stop_patience")
        if (self.stop_return is not None or self.stop_patience) and not self.eval_every:
            rule = "stop_return" if self.stop_return is not None else "stop_patience"
            raise ConfigError(
                f"{rule} acts at the periodic evaluations, and eval_every=0 runs none",
                "set eval_every, e.g. eval_every=10000",
            )
        from policylab.collectors import check_workers

        check_workers(self)
        if not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(
                f"top_fraction={self.top_fraction} is outside (0, 1]",
                "set the share of the dataset's episodes to keep, e.g. top_fraction=0.1 for the best 10%",
            )
        if self.top_fraction < 1.0 and not self.dataset:
            raise ConfigError(
                f"top_fraction={self.top_fraction} selects episodes of a dataset, and this run has none",
                "pass --dataset PATH, or drop top_fraction",
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma={self.gamma} is outside [0, 1]", "set gamma to e.g. 0.99")
        if self.vectorization not in ("auto", "sync", "async"):
            raise ConfigError(
                f"vectorization={self.vectorization!r} is not one of auto, sync, async",
                "use --set vectorization=sync (or async, auto)",
            )
        if self.activation not in self.activations:
            raise ConfigError(
                f"activation={self.activation!r} is unknown",
                f"use one of: {', '.join(self.activations)}",
            )
        for name in ("clip_obs", "clip_reward"):  # normalized values are clipped to +-clip: 0 would make them all 0
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0", f"set {name} to e.g. 10 (the default)")
        if any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(
                f"hidden_sizes={self.hidden_sizes} must be a list of positive ints (empty: linear heads, e.g. on the "
                "features of an image encoder)",
                "use e.g. --set hidden_sizes=[64,64]",
            )


def check_threads(threads: int | str) -> None:
    """A positive number of threads or "auto"."""
    if threads == AUTO_THREADS or (isinstance(threads, int) and not isinstance(threads, bool) and threads > 0):
        return
    raise ConfigError(
        f"threads={threads!r} is neither a positive number nor auto",
        "use --set threads=auto (the default: as many as the free cores allow) or a number such as 1",
    )


def check_resume_place(resume: object, name: str | None, runs_dir: object) -> None:
    """A resumed run continues in its own directory: a new run's --name or --runs-dir would be ignored (an
    error naming them; both are None unless given)."""
    given = [flag for flag, value in (("--name", name), ("--runs-dir", runs_dir)) if value is not None]
    if given:
        flags = " and ".join(given)
        raise ConfigError(
            f"{flags} {'does' if len(given) == 1 else 'do'} not apply to --resume: the run continues in {resume}",
            f"drop {flags}",
        )


def check_seed(seed: int) -> None:
    """Seeds are whole numbers >= 0 (Gymnasium's and numpy's rule): one error here, not a traceback from an env."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r}: a seed is a whole number >= 0", "pass e.g. --seed 0 (or seed=0)")


DEVICES = "cpu, cuda (cuda:N for GPU N), mps"
"""The device strings a config takes (torch's names for the devices policylab runs on)."""


def check_device(device: str) -> None:
    """A device string torch knows and this machine has: one error naming the forms, or what is missing."""
    import torch

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps", device):
        raise ConfigError(f"device={device!r} is not a device: it takes {DEVICES}", "use --set device=cpu (or cuda)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise ConfigError(
                f"device={device} needs a CUDA GPU, and {why}",
                "use --set device=cpu, or a CUDA build of torch on a machine with an NVIDIA GPU",
            )
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"device={device} names GPU {index}, and this machine has {count} (cuda:0 to cuda:{count - 1})",
                "use --set device=cuda (the first GPU) or a cuda:N below the count",
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "device=mps needs Apple silicon's GPU (Metal), which this torch does not see",
            "use --set device=cpu (or cuda on a machine with an NVIDIA GPU)",
        )


def positive(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            fix = "give a positive count, e.g. --steps 100k" if name == "steps" else f"set {name} to a positive value"
            raise ConfigError(f"{name}={getattr(cfg, name)} must be > 0", fix)


def check_unit_interval(cfg: object, *names: str) -> None:
    """Each of `names` in [0, 1] (a probability, an exponent of prioritized replay ...)."""
    for name in names:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name}={getattr(cfg, name)} is outside [0, 1]", f"set {name} to a value in [0, 1]")


def _non_negative(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0", f"set {name} to 0 or more")


def parse_count(text: str | int | float) -> int:
    """'100k' -> 100000, '1e6' -> 1000000, '2_500' -> 2500, '1.5M' -> 1500000."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a count")
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        if not text.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(text)
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    match = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)([kmg]?)", s)
    if not match:
        raise ValueError(f"{text!r} is not a count (examples: 100000, 100k, 1e6, 1.5M)")
    try:
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2), 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a count (examples: 100000, 100k, 1e6, 1.5M)") from None
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def format_count(steps: int) -> str:
    """50000 -> '50k', 1000000 -> '1M', 1500 -> '1.5k': the short form `parse_count` reads back."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if steps >= size and steps % (size // 10) == 0:
            return f"{steps / size:g}{unit}"
    return str(steps)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` (a string from the command line or a YAML scalar) to the field type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "yes", "on", "1"):
            return True
        if s in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{value!r} is not a bool (use true or false)")
    if tp is int:
        if isinstance(value, str) and value.strip().startswith("-"):  # e.g. gradient_steps=-1
            return -parse_count(value.strip()[1:])
        return parse_count(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if math.isnan(number):  # no setting means anything by NaN: it would only reach the run as a divergence
            raise ValueError(f"{value!r} is not a number (NaN)")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a string")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = _yaml_value(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list (use e.g. [64,64])")
        items = []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(name, v, args[0]))
            except ValueError:
                what = "an integer layer width" if name == "hidden_sizes" else _expects(args[0])
                raise ValueError(f"item {i + 1} of {list(value)}, {v!r}, is not {what}") from None
        return items
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value)
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a mapping (use e.g. {{key: value}})")
        return dict(value)
    return value


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{text!r} is not valid YAML") from None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's type (resolved from its annotation once per class: resolving takes milliseconds). The dict is
    shared between calls: read it, do not change it."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _expects(tp: Any) -> str:
    """What a value of field type `tp` is, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _expects(a) for a in args)
    if origin is list:
        return f"a list of {_expects(args[0]).removeprefix('a ')}s" if args else "a list"
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a mapping"}
    return words.get(origin or tp, getattr(tp, "__name__", None) or str(tp).replace("typing.", ""))


def _value_fix(key: str, tp: Any, source: str) -> str:
    """The fix line for a value of `key` that does not convert to its type."""
    examples = {
        "steps": "give a positive count, e.g. --steps 100k (or 100000, 1e6)",
        "hidden_sizes": "give whole layer widths, e.g. --set hidden_sizes=[64,64]",
    }
    if key in examples and (key != "steps" or source == "the arguments"):
        return examples[key]
    hint = {int: " (e.g. 100000, 100k, 1e6)", float: " (e.g. 3e-4)"}.get(tp, "")
    return f"{key} expects {_expects(tp)}{hint}"


def algorithms_with_option(key: str, value: Any = None) -> list[str]:
    """The algorithms whose config has the field `key` (for an option given to one that lacks it); with `value`,
    only those whose own validation accepts it, with or without a dataset (e.g. use_sde=true: not the offline
    algorithms, which refuse it)."""
    from policylab.algos import ALGORITHMS  # here: the algorithms' configs import this module

    owners = [spec for spec in ALGORITHMS.values() if key in {f.name for f in fields(spec.config_cls)}]
    if value is None:
        return [spec.name for spec in owners]
    return [spec.name for spec in owners if _accepts(spec.config_cls(), key, value)]


def _accepts(cfg: CommonConfig, key: str, value: Any) -> bool:
    """Whether `cfg` with `key` set to `value` passes its validation, without a dataset or with one."""
    # validation checks that a dataset is given, not the file
    return any(_valid_with(cfg, {key: value, **extra}) for extra in ({}, {"dataset": "dataset"}))


def divergence_fix(cfg: CommonConfig) -> str:
    """The fix line for a run that diverged (NaN or inf): the remedies this algorithm's config takes, each with
    its --set (normalize_reward only where the algorithm accepts it, gradient clipping only where it is off)."""
    default_lr = next((f.default for f in fields(cfg) if f.name == "lr"), None)
    lr = getattr(cfg, "lr", None)
    remedies = []
    if isinstance(lr, float):
        lower = default_lr if isinstance(default_lr, float) and default_lr < lr else lr / 10
        remedies.append(f"lower lr (--set lr={lower:g})")
    candidates = {
        "max_grad_norm": ("clip gradients", 10.0),
        "normalize_obs": ("normalize observations", True),
        "normalize_reward": ("normalize rewards", True),
    }
    for key, (what, value) in candidates.items():
        if hasattr(cfg, key) and not getattr(cfg, key) and _valid_with(cfg, {key: value}):
            remedies.append(f"{what} (--set {key}={str(value).lower() if value is True else f'{value:g}'})")
    return ", or ".join([", ".join(remedies[:-1]), remedies[-1]] if len(remedies) > 1 else remedies)


def _valid_with(cfg: CommonConfig, values: dict[str, Any]) -> bool:
    """Whether `cfg` with `values` set passes its type checks and its validation."""
    try:
        apply_values(cfg, values, "--set").validate()
        return True
    except (ConfigError, ValueError):
        return False


def algorithm_of(cfg: object) -> str | None:
    """The name of the algorithm whose config class `cfg` is (None for other dataclasses)."""
    from policylab.algos import ALGORITHMS

    return next((name for name, spec in ALGORITHMS.items() if spec.config_cls is type(cfg)), None)


_SOURCES = "_policylab_sources"
"""The attribute where `apply_values` keeps which source set each value (see `set_by`)."""


def set_by(cfg: object, key: str) -> str | None:
    """Where the value of `key` in `cfg` came from (e.g. "the dqn preset for CartPole-v1", "--set"), or None for
    the algorithm's default."""
    sources: dict[str, str] = getattr(cfg, _SOURCES, {})
    return sources.get(key)


def _check_file_algorithm(cfg: object, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` without its `algo` entry (a saved config.yaml names its algorithm); an error when that names
    another algorithm whose keys this config does not take."""
    values = dict(values)
    file_algo, own = values.pop("algo", None), algorithm_of(cfg)
    if file_algo is None or own is None or str(file_algo) == own:
        return values
    if source.startswith("--set"):  # not a file: nothing else names the algorithm, and it was not chosen here
        raise ConfigError(
            f"{source} algo={file_algo}: the algorithm is not a config value, and this run trains {own}",
            f"train {file_algo} itself (policylab train {file_algo} ..., pl.train({file_algo!r}, ...)), and drop algo",
        )
    names = {f.name for f in fields(cfg)}  # type: ignore[arg-type]
    foreign = [key for key in values if key not in names]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ConfigError(
            f"{source} is a {file_algo} config (algo: {file_algo}), and {own} does not take its keys {shown}",
            f"train {file_algo} with it (policylab train {file_algo} --config {source}), or keep only the keys "
            f"{own} takes in a copy of the file",
        )
    return values


def apply_values(cfg: C, values: dict[str, Any], source: str) -> C:
    """Return a copy of `cfg` with `values` set, each checked against the field's type."""
    types_by_name = field_types(type(cfg))
    values = _check_file_algorithm(cfg, values, source)
    updates = {}
    for key, value in values.items():
        if key not in types_by_name and isinstance(cfg, CommonConfig):
            owners = algorithms_with_option(key, value) or algorithms_with_option(key)  # none take the value: all
            if owners:
                raise ConfigError(
                    f"{key!r} in {source} is not an option of {type(cfg).__name__}: it is one of {', '.join(owners)}",
                    f"train one of those algorithms, or drop {key}",
                )
        if key not in types_by_name:
            raise ConfigError(
                f"unknown config key {key!r} in {source}.{suggest(key, types_by_name)}",
                f"valid keys for {type(cfg).__name__}: {', '.join(sorted(types_by_name))}",
            )
        try:
            updates[key] = _coerce(key, value, types_by_name[key])
        except ValueError as exc:
            raise ConfigError(
                f"bad value for {key!r} in {source}: {exc}", _value_fix(key, types_by_name[key], source)
            ) from None
    new = dataclasses.replace(cfg, **updates)
    sources = {**getattr(cfg, _SOURCES, {}), **dict.fromkeys(updates, source)}
    object.__setattr__(new, _SOURCES, sources)  # object's: also on a frozen dataclass
    return new


def parse_set_args(pairs: list[str]) -> dict[str, str]:
    """['lr=3e-4', 'num_envs=16'] -> {'lr': '3e-4', 'num_envs': '16'}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not of the form key=value", "write e.g. --set lr=3e-4")
        out[key.strip()] = value.strip()
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", "check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}",
            "fix the YAML syntax (a mapping of key: value lines)",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping",
            "write one key: value per line, e.g. 'lr: 0.0003'",
        )
    return data  # with its `algo` entry, if any: `apply_values` checks it against the algorithm trained


def to_dict(cfg: object) -> dict[str, Any]:
    return dataclasses.asdict(cfg)  # type: ignore[call-overload]


def dump_yaml(cfg: object, algo: str) -> str:
    return yaml.safe_dump({"algo": algo, **to_dict(cfg)}, sort_keys=False)
