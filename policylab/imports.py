"""Importing a user's module named on the command line (`--env my_module:MyEnv`, `--reward mypkg.rewards:fn`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def import_user_module(name: str) -> ModuleType:
    """The module `name`, found as `python -m` finds it: on sys.path, else in the current directory, which a console
    script's sys.path lacks (the directory is then put first on sys.path, where `python -m` has it). A module that
    the user's module imports and that is missing raises as it is (ModuleNotFoundError naming it)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        cwd = str(Path.cwd())
        missing = exc.name or ""
        if cwd in sys.path or "" in sys.path or not (name == missing or name.startswith(missing + ".")):
            raise
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
        return importlib.import_module(name)
