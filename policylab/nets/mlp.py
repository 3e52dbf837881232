"""MLPs evaluated as a stack: K independent members in one batched matmul per layer.

Actor and critic (or the members of a Q-ensemble) are members of one
`StackedMLP`, so a forward pass costs one `baddbmm` and one activation per
layer for all of them together: on small networks the cost is the number of
operator calls, not arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.nets import matmul
from policylab.nets.renorm import RenormSettings, RenormStats, StackedBatchRenorm

ACTIVATION_FNS = {"tanh": torch.tanh, "relu": torch.relu, "elu": nn.functional.elu, "silu": nn.functional.silu}
INPLACE_ACTIVATION_FNS = {"tanh": torch.tanh_, "relu": torch.relu_}
"""The same activations in place, for forward passes without autograd (e.g. target networks)."""
HIDDEN_GAINS = {"tanh": math.sqrt(2), "relu": math.sqrt(2), "elu": math.sqrt(2), "silu": math.sqrt(2)}


class StackedMLP(nn.Module):
    def __init__(
        self,
        members: int,
        in_dim: int,
        hidden_sizes: Sequence[int],
        out_dim: int,
        activation: str = "tanh",
        layer_norm: bool = False,
        batch_renorm: RenormSettings | None = None,
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_sizes, out_dim]
        self.members = members
        self.layer_norm = layer_norm
        self.activation = activation
        self._act = ACTIVATION_FNS[activation]
        # A narrowing layer (e.g. the output) is stored [K, out, in], the others [K, in, out]: MKL's
        # small-matrix kernels are several times faster for tall-skinny products in that layout.
        self.transposed = [d_out < d_in for d_in, d_out in zip(dims[:-1], dims[1:])]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(members, d_out, d_in) if t else torch.empty(members, d_in, d_out))
            for d_in, d_out, t in zip(dims[:-1], dims[1:], self.transposed)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, d_out)) for d_out in dims[1:])
        # LayerNorm before each hidden activation (per member: its own scale and shift), as critics in
        # hybrid offline-online RL use it (e.g. RLPD).
        self.norm_scales = nn.ParameterList(
            nn.Parameter(torch.ones(members, 1, d)) for d in (hidden_sizes if layer_norm else ())
        )
        self.norm_shifts = nn.ParameterList(
            nn.Parameter(torch.zeros(members, 1, d)) for d in (hidden_sizes if layer_norm else ())
        )
        # Batch renormalization before every linear layer (CrossQ's networks, nets/renorm.py): running statistics
        # unless `batch_stats` is set (by renorm.batch_statistics, for training passes).
        self.renorms: list[StackedBatchRenorm] | None = None
        self.batch_stats = False
        if batch_renorm is not None:
            self.renorm_layers = nn.ModuleList(StackedBatchRenorm(members, d, batch_renorm) for d in dims[:-1])
            self.renorms = list(self.renorm_layers)  # type: ignore[arg-type]
        # Plain lists of the same Parameter objects: ParameterList indexing costs microseconds per call.
        self._layers = list(zip(self.weights, self.biases, self.transposed))
        self._numpy_key: tuple[int, ...] = ()
        self._numpy_layers: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self._view_sources = [t for w, b, _ in self._layers for t in (w, b)] + [*self.norm_scales, *self.norm_shifts]
        """The parameters whose memory the numpy views read (a plain list: iterating a ParameterList costs
        microseconds per call, on the acting path of every step)."""
        self._numpy_norms: list[list[tuple[np.ndarray, np.ndarray]]] = []
        """LayerNorm's (scale, shift) views per hidden layer, indexed as `_numpy_layers`."""
        self.default_init()

    def default_init(self) -> None:
        """PyTorch's nn.Linear default (Kaiming-uniform weights, uniform biases), per member."""
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            bound = 1.0 / math.sqrt(self.weight(i).shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def orthogonal_init(self, output_gains: Sequence[float] | Tensor) -> None:
        """Orthogonal weights, zero biases; hidden gain sqrt(2); `output_gains` per member or per output column."""
        gains = torch.as_tensor(output_gains, dtype=torch.float32)
        last = len(self.weights) - 1
        with torch.no_grad():
            for i, b in enumerate(self.biases):
                for k in range(self.members):
                    gain = 1.0 if i == last else HIDDEN_GAINS[self.activation]
                    nn.init.orthogonal_(self.weight(i)[k].T, gain=gain)  # [out, in], as nn.Linear
                b.zero_()
            out = self.weight(last)
            if gains.dim() == 1 and gains.numel() == self.members:
                out.mul_(gains.view(-1, 1, 1))
            else:
                out.mul_(gains.view(1, 1, -1))

    def weight(self, i: int) -> Tensor:
        """Layer i's weight as a [K, in, out] tensor (a view for the layers stored transposed)."""
        w, _, transposed = self._layers[i]
        return w.transpose(1, 2) if transposed else w

    @property
    def analytic_backward(self) -> bool:
        """Whether the hand-derived steps apply (`forward_cached`, `backward`, `numpy_forward`): tanh or relu, no
        LayerNorm or batch renormalization. CrossQ's step also takes batch renormalization (`numpy_acting`)."""
        return self.numpy_acting and self.renorms is None

    @property
    def numpy_acting(self) -> bool:
        """Whether `numpy_forward` applies, and `forward_cached`/`backward` with batch renormalization: tanh or relu,
        no LayerNorm (batch renormalization acts on running statistics, which numpy reads). `numpy_forward` itself
        also takes LayerNorm (PQN acts through it), which the hand-derived steps do not."""
        return self.activation in ("tanh", "relu") and not self.layer_norm

    def forward(self, x: Tensor, members: int | None = None) -> Tensor:
        """x: [B, in] (the same input to every member) or [K, B, in]. Returns [K, B, out].
        `members=m`: only the first m members (e.g. TD3's actor loss uses the first critic), [m, B, out]."""
        return self.forward_features(x, members)[0]

    def forward_features(self, x: Tensor, members: int | None = None) -> tuple[Tensor, Tensor]:
        """`forward`'s output and the last hidden layer's activations [K, B, hidden] (the input without hidden
        layers): the features gSDE's noise reads."""
        k = self.members if members is None else members
        h = x.unsqueeze(0).expand(k, -1, -1) if x.dim() == 2 else x
        # without autograd, in place on each layer's fresh output: no allocation, the memory is in cache
        act = self._act if torch.is_grad_enabled() else INPLACE_ACTIVATION_FNS.get(self.activation, self._act)
        for i, (w, b, transposed) in enumerate(self._layers[:-1]):
            if members is not None:
                w, b = w[:k], b[:k]
            if self.renorms is not None:
                h = self.renorms[i](h, self.batch_stats)
            h = matmul.affine(b, h, w.transpose(1, 2) if transposed else w)
            if self.layer_norm:
                h = F.layer_norm(h, h.shape[-1:]) * self.norm_scales[i][:k] + self.norm_shifts[i][:k]
            h = act(h)
        w, b, transposed = self._layers[-1]
        if members is not None:
            w, b = w[:k], b[:k]
        features = h
        if self.renorms is not None:
            h = self.renorms[-1](h, self.batch_stats)
        return matmul.affine(b, h, w.transpose(1, 2) if transposed else w), features

    def numpy_forward(self, x: np.ndarray, member: int | None = None) -> np.ndarray:
        """The forward pass in numpy (tanh/relu, CPU), for acting on small batches: a numpy call costs
        about 1 us where a torch call costs about 5 us. Reads the parameters' memory through views.
        x: [B, in]; returns [K, B, out], or [B, out] of one member with `member=k` (2-D products, cheaper)."""
        return self.numpy_forward_features(x, member)[0]

    def numpy_forward_features(self, x: np.ndarray, member: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`numpy_forward`'s output and the last hidden layer's activations (as `forward_features`)."""
        layers = self._numpy_views()[member if member is not None else -1]
        h = x
        for i, (w, b) in enumerate(layers[:-1]):
            if self.renorms is not None:
                h = self.renorms[i].numpy_forward(h, member)
            h = np.matmul(h, w)
            h += b
            if self.layer_norm:
                h = self._numpy_layer_norm(h, i, member)
            if self.activation == "tanh":
                np.tanh(h, out=h)
            else:
                np.maximum(h, 0.0, out=h)
        w, b = layers[-1]
        out = np.matmul(h if self.renorms is None else self.renorms[-1].numpy_forward(h, member), w)
        out += b
        return out, h

    def _numpy_layer_norm(self, h: np.ndarray, i: int, member: int | None) -> np.ndarray:
        """F.layer_norm (eps 1e-5, biased variance) times the layer's scale plus its shift, in numpy (reductions by
        np.add.reduce: ndarray.mean costs three times as much on a few rows)."""
        scale, shift = self._numpy_norms[member if member is not None else -1][i]
        inverse_width = np.float32(1.0 / h.shape[-1])
        mean = np.add.reduce(h, -1, keepdims=True)
        mean *= inverse_width
        centered = h - mean
        variance = np.add.reduce(centered * centered, -1, keepdims=True)
        variance *= inverse_width
        variance += 1e-5
        np.sqrt(variance, out=variance)
        centered /= variance
        centered *= scale
        centered += shift
        return centered

    def _numpy_views(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per member k, its [in, out] weight and [1, out] bias views; last, all members' [K, in, out] and
        [K, 1, out] views. Rebuilt if a parameter's storage moved."""
        key = tuple(t.data_ptr() for t in self._view_sources)
        if key != self._numpy_key:
            stacked = [
                (w.detach().numpy().transpose(0, 2, 1) if transposed else w.detach().numpy(), b.detach().numpy())
                for w, b, transposed in self._layers
            ]
            per_member = [[(w[k], b[k]) for w, b in stacked] for k in range(self.members)]
            self._numpy_layers = [*per_member, stacked]
            scales = [p.detach().numpy() for p in self.norm_scales]
            shifts = [p.detach().numpy() for p in self.norm_shifts]
            stacked_norms = list(zip(scales, shifts, strict=True))
            self._numpy_norms = [
                *([(a[k], b[k]) for a, b in stacked_norms] for k in range(self.members)),
                stacked_norms,
            ]
            self._numpy_key = key
        return self._numpy_layers

    @staticmethod
    def _selection(members: int | slice | None) -> slice | None:
        return members if members is None or isinstance(members, slice) else slice(0, members)

    def _member_layers(self, members: int | slice | None) -> list[tuple[Tensor, Tensor, bool]]:
        sel = self._selection(members)
        if sel is None:
            return self._layers
        return [(w[sel], b[sel], transposed) for w, b, transposed in self._layers]

    def forward_cached(self, x: Tensor, members: int | slice | None = None) -> tuple[Tensor, list[Tensor]]:
        """Forward without autograd; returns the output and each layer's input, for `backward`.
        `members=m`: the first m members only; a slice: those members (pass the same to `backward`).

        tanh is computed as 2 sigmoid(2z) - 1, with the factor 2 folded into the
        matmul: on CPU this is about twice as fast as torch.tanh (and equal to it
        within float32 rounding).

        With batch renormalization each layer's normalization is folded into its product: y W + b with
        y = (x - mean) * gain + offset is (x - mean) (gain W) + (offset W + b), so no normalized copy of the
        activations is made. With `batch_stats` (a training pass: all members) the running statistics move as in
        `forward`, and the returned `RenormedInputs` keep the batch statistics `backward` needs.
        """
        layers = self._member_layers(members)
        h = x.unsqueeze(0).expand(len(layers[0][0]), -1, -1) if x.dim() == 2 else x
        inputs = [h] if self.renorms is None else RenormedInputs([h])
        tanh = self.activation == "tanh"
        with torch.no_grad():
            for i, (w, b, transposed) in enumerate(layers):
                if self.renorms is not None:
                    w, b, h = self._renorm_folded(i, h, w, b, transposed, members, cast(RenormedInputs, inputs))
                w = w.transpose(1, 2) if transposed else w
                if i == len(layers) - 1:
                    return matmul.baddbmm(b, h, w), inputs
                if tanh:
                    h = torch.sigmoid_(matmul.baddbmm(b, h, w, beta=2.0, alpha=2.0)).mul_(2.0).sub_(1.0)
                else:
                    h = matmul.baddbmm(b, h, w).relu_()
                inputs.append(h)
        raise AssertionError("unreachable: an MLP has an output layer")

    def _renorm_folded(
        self,
        i: int,
        h: Tensor,
        w: Tensor,
        b: Tensor,
        transposed: bool,
        members: int | slice | None,
        cache: RenormedInputs,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i's weight and bias with its renormalization folded in, and the centred input they multiply."""
        assert self.renorms is not None
        renorm = self.renorms[i]
        if self.batch_stats:
            if members is not None:
                raise ValueError("a training pass with batch statistics runs every member: pass members=None")
            stats = renorm.batch_pass(h)
            folded = w * stats.gain if transposed else w * stats.gain.transpose(1, 2)
            cache.renormed.append((stats, folded))
            centred, offset = stats.centred, stats.offset
        else:
            mean, folded, offset = self._running_fold(i, w, transposed, self._selection(members))
            cache.folded.append(folded)
            centred = h - mean
        return folded, matmul.baddbmm(b, offset, w.transpose(1, 2) if transposed else w), centred

    def _running_fold(self, i: int, w: Tensor, transposed: bool, sel: slice | None) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i's running-statistics normalization y = (x - mean) gain + shift of the members `sel` (w: theirs):
        (mean, w with gain folded in, shift)."""
        assert self.renorms is not None
        renorm = self.renorms[i]
        with torch.no_grad():
            mean, gain = renorm.running_affine()
            shift: Tensor = renorm.shift
            if sel is not None:
                mean, gain, shift = mean[sel], gain[sel], shift[sel]
            return mean, w * gain if transposed else w * gain.transpose(1, 2), shift

    def jvp(
        self,
        inputs: list[Tensor],
        w_tangents: Sequence[Tensor],
        b_tangents: Sequence[Tensor],
        members: int | slice | None = None,
    ) -> Tensor:
        """The output's derivative along a direction in the weights (per layer, shaped as the weights and biases
        of the members used), at the point `forward_cached(x, members)` kept in `inputs`; x held fixed.
        Forward mode: t' = (t W + h dW + db) * act'(z), one pass like the forward's."""
        layers = self._member_layers(members)
        tanh = self.activation == "tanh"
        t: Tensor | None = None
        with torch.no_grad():
            for i, ((w, _, transposed), dw, db) in enumerate(zip(layers, w_tangents, b_tangents)):
                dz = matmul.baddbmm(db, inputs[i], dw.transpose(1, 2) if transposed else dw)
                if t is not None:
                    dz = matmul.baddbmm(dz, t, w.transpose(1, 2) if transposed else w)
                if i == len(layers) - 1:
                    return dz
                h = inputs[i + 1]
                if tanh:
                    t = torch.ops.aten.tanh_backward.grad_input(dz, h, grad_input=dz)
                else:
                    t = torch.ops.aten.threshold_backward.grad_input(dz, h, 0.0, grad_input=dz)
        raise AssertionError("unreachable: an MLP has an output layer")

    def backward(
        self,
        inputs: list[Tensor],
        grad_out: Tensor,
        weight_grads: bool = True,
        input_grad: bool = False,
        members: int | slice | None = None,
        into: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor | None:
        """Write d(loss)/d(weights, biases) into `.grad`, given d(loss)/d(output) and `forward_cached`'s inputs.

        `weight_grads=False` only propagates (e.g. dQ/da through a critic whose weights stay fixed);
        `input_grad=True` returns d(loss)/d(input), [K, B, in]; `members`: as given to `forward_cached` (their
        entries of `.grad` are written, the others' left as they are); `into`: per layer, the (weight, bias)
        tensors to write the gradients into instead of `.grad` (shaped as the members' weights and biases).
        """
        sel = self._selection(members)
        layers = self._member_layers(members)
        if self.renorms is not None:
            if isinstance(inputs, RenormedInputs) and inputs.renormed:
                return self._batch_renorm_backward(inputs, grad_out, input_grad)
            if weight_grads:
                raise ValueError("weight gradients of a batch-renormalized MLP need a pass with batch statistics")
            if isinstance(inputs, RenormedInputs) and inputs.folded:
                folded = inputs.folded
            else:
                folded = [self._running_fold(i, w, t, sel)[1] for i, (w, _, t) in enumerate(layers)]
            layers = [(w, b, t) for w, (_, b, t) in zip(folded, layers)]
        g = grad_out
        tanh = self.activation == "tanh"
        with torch.no_grad():
            for i in range(len(layers) - 1, -1, -1):
                w, b, transposed = layers[i]
                h = inputs[i]
                if weight_grads:
                    if into is not None:
                        w_grad, b_grad = into[i]
                    else:
                        w_all, b_all, _ = self._layers[i]
                        if w_all.grad is None:
                            if sel is not None:
                                raise ValueError("weight gradients of some members need `.grad` buffers or `into`")
                            w_all.grad = torch.empty_like(w_all)
                            b_all.grad = torch.empty_like(b_all)
                        w_grad, b_grad = (w_all.grad, b_all.grad) if sel is None else (w_all.grad[sel], b_all.grad[sel])
                    if transposed:
                        matmul.bmm(g.transpose(1, 2), h, out=w_grad)
                    else:
                        matmul.bmm(h.transpose(1, 2), g, out=w_grad)
                    torch.sum(g, dim=1, keepdim=True, out=b_grad)
                if i > 0 or input_grad:
                    w_t = w if transposed else w.transpose(1, 2)
                    # one output (a critic's, a value's): an outer product, one multiply per element, the
                    # same bits as the product without its call
                    g_h = g * w_t if g.shape[-1] == 1 else matmul.bmm(g, w_t)
                    if i == 0:
                        return g_h
                    # in place: g_h is this pass's own product (no allocation, its memory is in cache)
                    if tanh:
                        g = torch.ops.aten.tanh_backward.grad_input(g_h, h, grad_input=g_h)
                    else:
                        g = torch.ops.aten.threshold_backward.grad_input(g_h, h, 0.0, grad_input=g_h)
        return None

    def _batch_renorm_backward(self, inputs: RenormedInputs, grad_out: Tensor, input_grad: bool) -> Tensor | None:
        """`backward` after a pass with batch statistics: every weight, bias, scale and shift gradient.

        Per layer, with c = x - mean the centred input, y = c gain + offset its normalization, z = y W + b and
        g = dL/dz: Q = c^T g (one product), dL/dW = gain Q + offset^T sum_B g, dL/dy = g W^T is never formed:
        sum_B dL/dy = (sum_B g) W^T and sum_B dL/dy c = rowsums of W * Q, all the normalization's backward needs
        (`RenormStats`); dL/dx = g (gain W)^T + coef c + const, one product into the normalization's own terms."""
        assert self.renorms is not None
        g = grad_out
        tanh = self.activation == "tanh"
        with torch.no_grad():
            for i in range(len(self._layers) - 1, -1, -1):
                w, b, transposed = self._layers[i]
                stats, folded = inputs.renormed[i]
                renorm = self.renorms[i]
                for p in (w, b, renorm.scale, renorm.shift):
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                assert w.grad is not None and b.grad is not None
                assert renorm.scale.grad is not None and renorm.shift.grad is not None
                grad_sum = torch.sum(g, dim=1, keepdim=True, out=b.grad)
                if transposed:  # w: [K, out, in]
                    q = matmul.bmm(g.transpose(1, 2), stats.centred)
                    grad_dot = (w * q).sum(1, keepdim=True)
                    grad_y_sum = matmul.bmm(grad_sum, w)
                    torch.mul(q, stats.gain, out=w.grad).baddbmm_(grad_sum.transpose(1, 2), stats.offset)
                else:  # w: [K, in, out]
                    q = matmul.bmm(stats.centred.transpose(1, 2), g)
                    grad_dot = (w * q).sum(2).unsqueeze(1)
                    grad_y_sum = matmul.bmm(grad_sum, w.transpose(1, 2))
                    torch.mul(q, stats.gain.transpose(1, 2), out=w.grad).baddbmm_(
                        stats.offset.transpose(1, 2), grad_sum
                    )
                grad_scale, grad_shift = stats.param_grads(grad_y_sum, grad_dot)
                renorm.scale.grad.copy_(grad_scale)
                renorm.shift.grad.copy_(grad_shift)
                if i == 0 and not input_grad:
                    return None
                coef, const = stats.input_grad_terms(grad_y_sum, grad_dot)
                base = torch.addcmul(const, stats.centred, coef)
                w_t = folded if transposed else folded.transpose(1, 2)
                g_h = base.addcmul_(g, w_t) if g.shape[-1] == 1 else matmul.baddbmm(base, g, w_t)
                if i == 0:
                    return g_h
                h = inputs[i]
                if tanh:
                    g = torch.ops.aten.tanh_backward.grad_input(g_h, h, grad_input=g_h)
                else:
                    g = torch.ops.aten.threshold_backward.grad_input(g_h, h, 0.0, grad_input=g_h)
        return None


class RenormedInputs(list[Tensor]):
    """`StackedMLP.forward_cached`'s layer inputs for a batch-renormalized MLP, with what `backward` needs of the
    normalizations: after a pass with batch statistics each layer's statistics and folded weight (`renormed`),
    after one with running statistics the folded weights (`folded`)."""

    def __init__(self, inputs: list[Tensor], folded: list[Tensor] | None = None) -> None:
        super().__init__(inputs)
        self.renormed: list[tuple[RenormStats, Tensor]] = []
        self.folded: list[Tensor] = folded or []


def member_rows(inputs: list[Tensor], k: int, rows: Tensor) -> list[Tensor]:
    """Member k's `forward_cached` inputs at `rows` of a pass over every member, for
    `backward(..., members=slice(k, k + 1))`."""
    selected = [h[k].index_select(0, rows).unsqueeze(0) for h in inputs]
    if isinstance(inputs, RenormedInputs):
        if inputs.renormed:
            raise ValueError("the rows of a pass with batch statistics cannot be back-propagated apart")
        return RenormedInputs(selected, [w[k : k + 1] for w in inputs.folded])
    return selected
