"""Checkpoints: safetensors (every tensor) + JSON (everything else). No pickle, ever.

A checkpoint is a directory `checkpoints/step_<N>/` holding `weights.safetensors`
and `state.json`; `checkpoints/latest` names the newest. `best/` in the run
directory has the same form and holds only the policy of the best evaluation.
Each is written into a temporary directory and renamed into place, and
`state.json` records the SHA-256 of the weights, so a crash mid-write or a
damaged file is detected and never replaces a good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from policylab.errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
STATE = "state.json"
LATEST = "latest"
BEST = "best"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0666 & ~umask, e.g. 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint_dir(final: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> Path:
    """Write `tensors` and `state` as the checkpoint directory `final`, atomically: into a temporary
    directory beside it (fsynced, the weights' checksum in state.json), then renamed into place. An
    existing `final` is replaced only by a complete new one; a failure leaves it as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        os.chmod(tmp / WEIGHTS, _file_mode())  # safetensors writes 0600: readable by others, as state.json is
        with (tmp / WEIGHTS).open("rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes the checkpoint visible
        state = {**state, "format": FORMAT_VERSION, "weights_sha256": _sha256(tmp / WEIGHTS)}
        atomic_write_text(tmp / STATE, json.dumps(state, indent=1))
        old = final.with_name(f".old-{final.name}-{os.getpid()}") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the previous one back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: Path, step: int, tensors: dict[str, Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for `step` under `root` (the run's checkpoints/ folder) and prune old ones."""
    name = f"step_{step:012d}"
    final = write_checkpoint_dir(root / name, tensors, state)
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory, its checkpoints/ folder (or its `latest` pointer) or one checkpoint directory to a
    checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist", "give a run directory such as runs/ppo-CartPole-v1-s1")
    if (path / STATE).exists() or (path / WEIGHTS).exists():
        return path
    if path.name == LATEST and path.is_file():  # checkpoints/latest, the pointer file itself: its folder
        path = path.parent
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted(p for p in root.glob("step_*") if p.is_dir())
    if not found:
        raise CheckpointError(
            f"no checkpoint found in {str(path)!r}",
            "give a run directory written by `policylab train` (it has a checkpoints/ folder)",
        )
    return found[-1]


def find_best(path: str | Path) -> Path:
    """Resolve a run directory (or its best/ directory) to the directory of its best evaluated policy."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist", "give a run directory such as runs/ppo-CartPole-v1-s1")
    if path.name == BEST and (path / STATE).exists():
        return path
    if (path / BEST).is_dir():
        return path / BEST
    raise CheckpointError(
        f"{str(path)!r} has no best/ policy (it is written at the first evaluation: every eval_every steps "
        "and at the end of the run)",
        "load the final policy (without --best / which='best'), or give a run directory that has a best/ folder",
    )


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """Read and verify a checkpoint. Returns (tensors, state, checkpoint dir)."""
    ckpt = find_checkpoint(path)
    older = f"use an older checkpoint in {ckpt.parent} (e.g. --resume {ckpt.parent}/step_...) or retrain"
    if ckpt.name == BEST:
        older = "load the final policy (without --best / which='best'); the next improvement rewrites best/"
    state_path, weights_path = ckpt / STATE, ckpt / WEIGHTS
    for p in (state_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is missing {p.name}", older)
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(state_path)!r} is corrupt (not valid JSON: {exc})", older) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{str(state_path)!r} is not a policylab checkpoint of format {FORMAT_VERSION}", older)
    if _sha256(weights_path) != state.get("weights_sha256"):
        raise CheckpointError(f"{str(weights_path)!r} is corrupt or truncated (checksum mismatch)", older)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(weights_path)!r} cannot be read: {exc}", older) from None
    return tensors, state, ckpt


# --- module and optimizer state <-> (tensors, JSON) ------------------------------------------------


def optimizer_to_flat(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{name}/{idx}/{key}"] = value
            else:
                extra.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "extra": extra}


def optimizer_from_flat(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, field = key[len(prefix) :].split("/", 1)
            state.setdefault(int(idx), {})[field] = value
    for idx, fields in meta.get("extra", {}).items():
        state.setdefault(int(idx), {}).update(fields)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def load_module_state(module: torch.nn.Module, tensors: dict[str, Tensor], where: Path | str) -> None:
    """`module.load_state_dict`, with a mismatch reported as a CheckpointError that names the checkpoint."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"the weights in {str(where)!r} do not fit the network this config builds ({first})",
            "the checkpoint was written by another policylab version or with other network settings: retrain",
        ) from None
