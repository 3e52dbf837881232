"""Errors meant for people: each names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PolicylabError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


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
