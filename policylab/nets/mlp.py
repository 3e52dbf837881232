"""MLPs evaluated as a stack: K independent members in one batched matmul per layer.

Actor and critic (or the members of a Q-ensemble) are members of one
`StackedMLP`, so a forward pass costs one `baddbmm` and one activation per
layer for all of them together: on small networks the cost is the number of
operator calls, not arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATION_FNS = {"tanh": torch.tanh, "relu": torch.relu, "elu": nn.functional.elu, "silu": nn.functional.silu}
HIDDEN_GAINS = {"tanh": math.sqrt(2), "relu": math.sqrt(2), "elu": math.sqrt(2), "silu": math.sqrt(2)}


class StackedMLP(nn.Module):
    def __init__(
        self,
        members: int,
        in_dim: int,
        hidden_sizes: Sequence[int],
        out_dim: int,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_sizes, out_dim]
        self.members = members
        self.activation = activation
        self._act = ACTIVATION_FNS[activation]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(members, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, d_out)) for d_out in dims[1:])
        self.default_init()

    def default_init(self) -> None:
        """PyTorch's nn.Linear default (Kaiming-uniform weights, uniform biases), per member."""
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def orthogonal_init(self, output_gains: Sequence[float] | Tensor) -> None:
        """Orthogonal weights, zero biases; hidden gain sqrt(2); `output_gains` per member or per output column."""
        gains = torch.as_tensor(output_gains, dtype=torch.float32)
        last = len(self.weights) - 1
        with torch.no_grad():
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                for k in range(self.members):
                    gain = 1.0 if i == last else HIDDEN_GAINS[self.activation]
                    nn.init.orthogonal_(w[k].T, gain=gain)
                b.zero_()
            out = self.weights[last]
            if gains.dim() == 1 and gains.numel() == self.members:
                out.mul_(gains.view(-1, 1, 1))
            else:
                out.mul_(gains.view(1, 1, -1))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in] (the same input to every member) or [K, B, in]. Returns [K, B, out]."""
        h = x.unsqueeze(0).expand(self.members, -1, -1) if x.dim() == 2 else x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self._act(h)
        return h
