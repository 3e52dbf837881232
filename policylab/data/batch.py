"""Batch: named tensors that share leading dimensions; one schema for every source of experience.

Field names used across the library (all optional, by regime):
  obs, actions, rewards, next_obs   the transition
  terminated                        the episode ended in a terminal state (no bootstrap)
  episode_end                       the episode ended here (terminated or truncated)
  logp                              log-prob of `actions` under the behaviour policy
  values, next_values               V(obs), V(next state) (V(final obs) at truncations)
  advantages, returns               filled in by an advantage estimator
  mask                              1 for valid entries (tokens, padded steps), 0 otherwise
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class Batch:
    __slots__ = ("_data",)
    _data: dict[str, Tensor]

    def __init__(self, **tensors: Tensor) -> None:
        object.__setattr__(self, "_data", dict(tensors))

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"Batch has no field {name!r}; fields: {', '.join(self._data)}") from None

    def __setattr__(self, name: str, value: Tensor) -> None:
        self._data[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        first = next(iter(self._data.values()))
        return first.shape[0]

    def keys(self) -> list[str]:
        return list(self._data)

    def items(self) -> list[tuple[str, Tensor]]:
        return list(self._data.items())

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        return self._data.get(name, default)

    def select(self, index: Tensor | slice) -> Batch:
        """Rows `index` of every field (a minibatch)."""
        return Batch(**{k: v[index] for k, v in self._data.items()})

    def flatten(self, dims: int = 2) -> Batch:
        """Merge the first `dims` dimensions (e.g. time x envs -> samples)."""
        return Batch(**{k: v.flatten(0, dims - 1) for k, v in self._data.items()})

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self._data.items()})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}" for k, v in self._data.items())
        return f"Batch({fields})"
