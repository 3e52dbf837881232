"""A sum tree over a fixed number of leaves, updated and sampled for a whole batch at once.

Leaf i holds a priority p_i; every inner node holds the sum of its children,
so sampling proportionally to p is a descent from the root: at each level go
left if the remaining mass u is below the left child's sum, else subtract it
and go right. Both `set` and `find` are O(log n) vectorized steps for a batch
(no Python loop over the batch). float64 keeps the sums exact enough for
millions of leaves.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SumTree:
    def __init__(self, leaves: int, device: torch.device | str = "cpu") -> None:
        self.size = 1 << max(0, (leaves - 1).bit_length())
        self.levels = self.size.bit_length() - 1
        self.tree = torch.zeros(2 * self.size, dtype=torch.float64, device=device)

    @property
    def total(self) -> Tensor:
        return self.tree[1]

    def get(self, index: Tensor) -> Tensor:
        return self.tree[index + self.size]

    def set(self, index: Tensor, values: Tensor) -> None:
        """Set leaves (a later duplicate index wins) and recompute their ancestors."""
        node = index + self.size
        self.tree[node] = values.to(self.tree.dtype)
        for _ in range(self.levels):
            node = torch.unique(node // 2)
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def find(self, mass: Tensor) -> Tensor:
        """Leaf indices i with sum(p[:i]) <= mass < sum(p[:i+1]), for masses in [0, total)."""
        node = torch.ones_like(mass, dtype=torch.long)
        mass = mass.to(self.tree.dtype).clone()
        for _ in range(self.levels):
            left = self.tree[2 * node]
            right = mass >= left
            mass = torch.where(right, mass - left, mass)
            node = 2 * node + right.long()
        return node - self.size
