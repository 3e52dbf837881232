"""Connecting to Ray, for sweeps and rollout workers: the import with a clear error, an existing session, a
cluster address (RAY_ADDRESS honoured, checked in seconds), or a local Ray sized for the job."""

from __future__ import annotations

import os
import socket
from typing import Any

from policylab.errors import PolicylabError


def import_ray(
    purpose: str = "policylab sweep runs on Ray", fix: str = "pip install 'policylab[ray]' (or pip install ray)"
) -> Any:
    """The ray module, or one error naming what needed it and how to install it."""
    try:
        import ray
    except ImportError:
        raise PolicylabError(f"{purpose}, which is not installed", fix) from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds (not after Ray's minute of retries) when a cluster address cannot be reached."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise PolicylabError(
            f"cannot reach the Ray cluster at {address!r} ({exc})",
            "start one (`ray start --head`) or fix --address / RAY_ADDRESS (host:port, or ray://host:10001)",
        ) from None


def start_ray(address: str | None, cpus: int) -> bool:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray with `cpus` CPUs. True if this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import logging

    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=100 * 2**20, **quiet)
    return True
