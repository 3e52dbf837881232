"""Episode returns and lengths over N parallel envs, without per-env Python loops per step."""

from __future__ import annotations

from collections import deque

import numpy as np


class EpisodeTracker:
    def __init__(self, num_envs: int, window: int = 100) -> None:
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)
        self.recent_returns: deque[float] = deque(maxlen=window)
        self.recent_lengths: deque[int] = deque(maxlen=window)
        self.episodes = 0

    def update(self, reward: np.ndarray, episode_end: np.ndarray) -> None:
        self.returns += reward
        self.lengths += 1
        if episode_end.any():
            self.record(self.returns[episode_end].tolist(), self.lengths[episode_end].tolist())
            self.returns[episode_end] = 0.0
            self.lengths[episode_end] = 0

    def record(self, returns: list[float], lengths: list[int], episodes: int | None = None) -> None:
        """Finished episodes counted elsewhere (rollout workers, random search): their returns and lengths, and how
        many finished (`episodes`: more than the returns given where a worker kept only its latest)."""
        self.recent_returns.extend(returns)
        self.recent_lengths.extend(lengths)
        self.episodes += len(returns) if episodes is None else episodes

    def mean_return(self, last: int = 20) -> float | None:
        if not self.recent_returns:
            return None
        return float(np.mean(list(self.recent_returns)[-last:]))

    def mean_length(self, last: int = 20) -> float | None:
        if not self.recent_lengths:
            return None
        return float(np.mean(list(self.recent_lengths)[-last:]))

    def state(self) -> dict:
        return {
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
            "episodes": self.episodes,
        }

    def load(self, state: dict) -> None:
        self.returns = np.array(state["returns"], np.float64)
        self.lengths = np.array(state["lengths"], np.int64)
        self.recent_returns.clear()
        self.recent_returns.extend(state["recent_returns"])
        self.recent_lengths.clear()
        self.recent_lengths.extend(state["recent_lengths"])
        self.episodes = int(state["episodes"])
