"""Errors meant for people: each names the problem and the fix."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

_CLI: ContextVar[bool] = ContextVar("policylab_cli_wording", default=False)
"""True while the command line runs: errors then name its flags; elsewhere (the Python API) the arguments."""


@contextlib.contextmanager
def cli_wording() -> Iterator[None]:
    """Errors raised and shown inside name the command line's flags (`--set lr=3e-4`), as written in the code."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


_FLAGS = {
    "steps": "steps", "env": "env", "seed": "seed", "dataset": "dataset", "preset": "preset", "resume": "resume",
    "online-steps": "online_steps", "runs-dir": "runs_dir", "name": "name", "workers": "workers",
    "address": "address", "seeds": "seeds", "expert": "expert", "model": "model", "prompts": "prompts",
    "pairs": "pairs", "episodes": "episodes", "policy": "policy", "noise": "noise",
}  # fmt: skip
"""The command line's flags and the arguments of the Python functions they set (`pl.train`, `pl.sweep`,
`pl.collect`, `train_llm`). Flags whose text does not read as the argument's Python value (`--grid lr=1e-3,3e-4`,
`--reward module:function`) keep the command line's wording."""
_NUMBERS = {"steps", "seed", "online_steps", "workers", "episodes", "noise"}
_COMMAND = re.compile(r"`policylab [^`]*`|policylab (?:train|eval|llm|sweep|collect|dataset|ope|report)\b[^,;)\n]*")
_SET = re.compile(r"--set '([A-Za-z_]\w*)=([^']*)'|--set ([A-Za-z_]\w*)=(\{[^}]*\}|\[[^\]]*\]|[^\s,;)`]+)")
_FLAG = re.compile(r"--(" + "|".join(_FLAGS) + r")(?![\w-])(?: ('[^']*'|[^\s,;)`]+))?")
_FLAG_VALUE = re.compile(r"[A-Z][A-Z_]*|auto|none|rl-zoo|.*[\d/.:-].*")
"""What a flag's value looks like (a number, a path, an env id, a placeholder, a preset's name): `--env out` in
a sentence about the flag is not a value."""
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|\.\.\.")
_COUNT = re.compile(r"(\d+(?:\.\d+)?)([kM])")


def _python_value(text: str) -> str:
    """A command-line value as Python source: numbers, true/false/null, lists and mappings as literals, an
    upper-case placeholder (N, PATH) as it is, anything else a string."""
    text = text.strip()
    text = text if text == "..." else text.rstrip(".")
    if _PLACEHOLDER.fullmatch(text):
        return text
    count = _COUNT.fullmatch(text)
    if count:
        return f"{int(float(count[1]) * (1_000 if count[2] == 'k' else 1_000_000)):_}"
    try:
        float(text)  # a number as written (3e-4 stays 3e-4), which Python reads alike
        return text
    except ValueError:
        pass
    import yaml  # the command line's own parser for lists and mappings

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return repr(text)
    return repr(value)


def python_wording(text: str) -> str:
    """`text` with the command line's flags as the Python API's arguments: `--set k=v` as `overrides={'k': v}`,
    `--steps 100k` as `steps=100_000` (and `--env`, `--seed`, `--dataset`, ... in `_FLAGS`), a flag named in a
    sentence ("leave --env out") as its argument's name; whole `policylab ...` commands are left as they are
    (they are commands to run)."""
    protected = [(m.start(), m.end()) for m in _COMMAND.finditer(text)]

    def outside(match: re.Match[str]) -> bool:
        return not any(start <= match.start() < end for start, end in protected)

    def setting(match: re.Match[str]) -> str:
        if not outside(match):
            return match[0]
        key, value = (match[1], match[2]) if match[1] else (match[3], match[4])
        return f"overrides={{{key!r}: {_python_value(value)}}}"

    def flag(match: re.Match[str]) -> str:
        if not outside(match):
            return match[0]
        name, text = _FLAGS[match[1]], match[2] or ""
        quoted = len(text) > 1 and text[0] == text[-1] == "'"
        value = text[1:-1] if quoted else text.rstrip(".:")
        after = "" if quoted else text[len(value) :]
        if not _FLAG_VALUE.fullmatch(value):  # the flag named in a sentence ("leave --env out"): its argument
            return f"{name} {text}" if text else name
        if name in _NUMBERS:
            return f"{name}={_python_value(value)}{after}"
        return f"{name}={value if _PLACEHOLDER.fullmatch(value) else repr(value)}{after}"

    text = _SET.sub(setting, text).replace("} overrides={", ", ")  # `--set a=1 --set b=2`: one dict
    protected = [(m.start(), m.end()) for m in _COMMAND.finditer(text)]  # again: the settings moved the commands
    return _FLAG.sub(flag, text)


def for_reader(text: str) -> str:
    """A message (a run's note) worded for where it is read: as written inside the CLI, else `python_wording`."""
    return text if _CLI.get() else python_wording(text)


class PolicylabError(Exception):
    """A user-facing error. The CLI prints its message without a traceback. `problem` and `fix` name the command
    line's flags where the CLI runs (`cli_wording`) and the Python API's arguments elsewhere (`python_wording`)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self._problem = problem
        self._fix = fix
        super().__init__(problem, fix)

    @property
    def problem(self) -> str:
        return self._problem if _CLI.get() else python_wording(self._problem)

    @property
    def fix(self) -> str | None:
        if self._fix is None or _CLI.get():
            return self._fix
        return python_wording(self._fix)

    def __str__(self) -> str:
        return self.problem if self.fix is None else f"{self.problem}\n  fix: {self.fix}"


class ConfigError(PolicylabError):
    """A bad config key, value, YAML file or preset."""


class EnvError(PolicylabError):
    """An unknown environment or an unsupported space."""


class CheckpointError(PolicylabError):
    """A missing, corrupt or incompatible checkpoint."""


class DatasetError(PolicylabError):
    """A missing, unreadable, malformed or incompatible offline dataset."""


class TrainingDiverged(PolicylabError):
    """A NaN or inf appeared in a loss or in the parameters."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for close matches, or '' when there are none."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
