"""Which rows a language-model step trains on: shuffled epochs, as TRL's trainers (and every Hugging Face
`Trainer`) walk a dataset, rather than draws with replacement (which leave about a third of the rows unseen
in each pass over the data)."""

from __future__ import annotations

from typing import Any

import numpy as np

STREAMS = {"train": 0, "expert": 1, "pairs": 2}
"""One independent order per kind of row a run draws, so that, e.g., CHORD's expert batches do not shift
the prompts' order."""


class ShuffledEpochs:
    """Row indices of a table of `size` rows: each row once per epoch, every epoch in a fresh order. A batch
    that runs past an epoch's last row continues in the next epoch's order, so batches are always full (a
    row can then appear twice in that one batch). Epoch e's order is a function of (seed, stream, e) alone,
    so the state to save for an exact resume is two integers."""

    def __init__(self, size: int, seed: int, stream: str) -> None:
        if size < 1:
            raise ValueError(f"no rows to draw from for {stream!r}")
        self.size, self.seed, self.stream = size, seed, stream
        self.epoch = self.position = 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, STREAMS[self.stream], epoch]).permutation(self.size)

    def draw(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            take = min(n, self.size - self.position)
            parts.append(self.order[self.position : self.position + take])
            self.position += take
            n -= take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def epochs_done(self) -> float:
        """Passes over the rows so far (TRL's logged `epoch`)."""
        return self.epoch + self.position / self.size

    def state(self) -> dict[str, int]:
        return {"size": self.size, "epoch": self.epoch, "position": self.position}

    def load(self, state: dict[str, Any]) -> None:
        """Continue where `state()` was taken (the caller checks that the table's size is the same)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = self._order(self.epoch)
