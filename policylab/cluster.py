"""Ray for sweeps and workers: the import with a clear error, an existing session, a cluster address
(RAY_ADDRESS honoured, checked in seconds) or a local Ray sized for the job; and `WorkerPool`, the workers of one
run (rollout or generation workers) as Ray actors or inline objects, a dead actor restarted and its call repeated."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
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
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray with `cpus` CPUs. True if this call connected
    (then the caller's `ray.shutdown()` stops the local Ray, or only disconnects from a cluster)."""
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


def connect_for_workers(count: int, setting: str) -> tuple[Any, bool]:
    """(ray, whether this call started it), connected for `count` one-CPU actors: the current session (a sweep's
    task, a user's ray.init), RAY_ADDRESS, or a local Ray; an error if the machine or cluster has fewer CPUs
    (the actors would wait for them forever)."""
    backend = setting.replace("_workers", "_backend")  # rollout_backend, generation_backend
    ray = import_ray(
        f"{setting} with {backend}=ray needs Ray",
        f"pip install 'policylab[ray]', or set {backend}=inline (the same workers in this process)",
    )
    cpus = os.cpu_count() or 1
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS") and count > cpus:
        raise PolicylabError(f"{setting}={count} is more than this machine's {cpus} CPUs", f"set {setting} <= {cpus}")
    started = start_ray(None, count)
    total = int(ray.cluster_resources().get("CPU", 0))
    if count > total:
        if started:
            ray.shutdown()
        raise PolicylabError(
            f"{setting}={count} is more than the {total} CPUs of the Ray cluster", f"set {setting} <= {total}"
        )
    return ray, started


class WorkerPool:
    """`count` workers of `worker_cls`, built from `arguments(index, restarts)`: Ray actors with one CPU each
    (`backend="ray"`), or plain objects in this process (`"inline"`, the same arithmetic one after another)."""

    def __init__(
        self, worker_cls: type, arguments: Callable[[int, int], tuple[Any, ...]], count: int, backend: str, setting: str
    ) -> None:
        self.worker_cls, self.arguments = worker_cls, arguments
        self.restarts = [0] * count
        self.ray: Any = None
        self.started_ray = False
        """Whether the pool started a local Ray (then `close` stops it)."""
        if backend == "ray":
            self.ray, self.started_ray = connect_for_workers(count, setting)
        self.handles = [self._start(i) for i in range(count)]

    def _start(self, i: int) -> Any:
        args = self.arguments(i, self.restarts[i])
        if self.ray is None:
            return self.worker_cls(*args)
        return self.ray.remote(num_cpus=1, max_restarts=0)(self.worker_cls).remote(*args)

    def map(self, method: str, shared: Any, per_worker: list[dict[str, Any]], **common: Any) -> list[Any]:
        """Each worker's `method(shared, **per_worker[i], **common)`, in order (`shared` goes through Ray's object
        store once). A worker whose actor died is started again and its call repeated."""
        if self.ray is None:
            return [getattr(h, method)(shared, **kw, **common) for h, kw in zip(self.handles, per_worker, strict=True)]
        ref = self.ray.put(shared)
        calls = [getattr(h, method).remote(ref, **kw, **common) for h, kw in zip(self.handles, per_worker, strict=True)]
        out = []
        for i, call in enumerate(calls):
            while True:
                try:
                    out.append(self.ray.get(call))
                    break
                except self.ray.exceptions.RayActorError:
                    self.restarts[i] += 1
                    self.handles[i] = self._start(i)
                    call = getattr(self.handles[i], method).remote(ref, **per_worker[i], **common)
        return out

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every worker's `method(*args)`."""
        if self.ray is None:
            return [getattr(h, method)(*args) for h in self.handles]
        return self.ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def call_each(self, method: str, values: list[Any]) -> list[Any]:
        """Worker i's `method(values[i])`."""
        if self.ray is None:
            return [getattr(h, method)(v) for h, v in zip(self.handles, values, strict=True)]
        return self.ray.get([getattr(h, method).remote(v) for h, v in zip(self.handles, values, strict=True)])

    def close(self) -> None:
        if self.ray is None:
            for h in self.handles:
                h.close()
            return
        for h in self.handles:
            self.ray.kill(h)
        if self.started_ray:
            self.ray.shutdown()


def in_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (a worker of a pool with the ray backend, not inline)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None)


def one_thread_if_actor() -> None:
    """A worker actor has one CPU: one torch thread (inline workers leave the learner's threads alone)."""
    if in_ray_actor():
        import torch

        torch.set_num_threads(1)
