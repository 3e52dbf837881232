"""The prompt-shared training pass of a float32 Llama-family model in numpy, with its backward written out.

`LlamaDecoder.completion_logits` runs the training forward in torch and leaves the backward to autograd. For the
small models that run on a CPU both are a few hundred calls on arrays of a few thousand to a hundred thousand
numbers, with attention on hundreds of tiny problems (a row's 8 queries over 14 keys): the calls, the graph and
the elementwise passes cost as much as the products. `NumpyLlamaPass` is one `torch.autograd.Function` whose inputs
are the model's own parameters: its forward computes the logits and final-norm states of `completion_logits` (each
distinct prompt once, its keys and values read by every row of its group) in numpy, its backward takes their
gradients and returns every parameter's, so the losses, the optimizer and every caller stay in torch. Gradients
equal autograd's through transformers' forward to float32 rounding (tests/test_llm.py); `benchmarks/llm.py
--training` times this pass against the torch one. The last layer computes past attention only at the rows the
pass reads (`Stream.read`): of the other prompt tokens the pass needs only their keys and values there.

An RL step's first update runs at the weights its completions were just sampled with, and the numpy decode
computed every activation of this forward already: with `generate(record=True)` it writes them into a `Tape`,
and the pass reads the tape instead of computing its forward wherever the tape is `usable` (the same parameters,
unmodified since, and the same rows).

Shapes in the comments: M tokens in the stream (the P distinct prompts' W tokens each, then the N rows' L
completion tokens but the last), E hidden, H query heads and K key/value heads of D numbers, R = H / K, I the
MLP's width. Attention runs on queries [B, K, R, Q, D] (head j reads key head j // R) and keys and values
[B, K, 1, S, D]. Queries and keys are computed in `pair_order` (the rows of the [q; k] weights reordered so that
each pair the rotary embedding turns sits side by side), which leaves their dot products as they are and makes
the rotation and its backward one complex product each; the sampler computes in the same order, so a tape's
queries and keys are the pass's."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policylab.llm.fast_decode import (
    LlamaDecoder,
    causal_bias,
    pair_order,
    pair_order_inverse,
    rms_norm,
    rotary_pairs,
    rotate_pairs,
    shared_prompts,
    silu,
    softmax,
)

F32 = np.float32


def supports(model: Any) -> bool:
    """A float32 Llama-family model on the CPU whose parameters `parameters_of` reads directly."""
    return (
        LlamaDecoder.supports(model)
        and type(model.model.embed_tokens).__name__ == "Embedding"
        and all(p.dtype is torch.float32 and p.is_cpu for p in parameters_of(model))
    )


def parameters_of(model: Any) -> list[Tensor]:
    """The parameters `NumpyLlamaPass` takes, in its order: the embedding; per layer the input norm, q, k, v, o,
    the post-attention norm, gate, up, down; the final norm; the LM head. Read each call (a module swapped in since
    is seen) through the modules' own dicts, not `nn.Module.__getattr__`, ten times slower (a DPO step makes four
    calls)."""
    inner = _child(model, "model")
    weights = [_weight(inner, "embed_tokens")]
    for layer in _child(inner, "layers")._modules.values():
        attn, mlp = _child(layer, "self_attn"), _child(layer, "mlp")
        weights += [_weight(layer, "input_layernorm"), _weight(attn, "q_proj"), _weight(attn, "k_proj"),
                    _weight(attn, "v_proj"), _weight(attn, "o_proj"), _weight(layer, "post_attention_layernorm"),
                    _weight(mlp, "gate_proj"), _weight(mlp, "up_proj"), _weight(mlp, "down_proj")]  # fmt: skip
    return weights + [_weight(inner, "norm"), _weight(model, "lm_head")]


def _child(module: Any, name: str) -> Any:
    return module._modules[name]


def _weight(module: Any, name: str) -> Tensor:
    return module._modules[name]._parameters["weight"]


PER_LAYER = 9


@dataclass
class Stream:
    """One batch as a token stream: the distinct prompts' tokens, then each row's completion tokens but the last
    (the positions that predict the next completion token), with the rotary tables and attention biases. Where
    rows share no prompt, or so few that copying them pays (`_copying_prompts_pays`: SFT's rows), and no tape is
    read, each row is one whole "prompt" instead, its completion tokens but the last after its prompt's (`whole`):
    one attention per row, where the split layout runs two and the copies and sums that join them."""

    tokens: np.ndarray  # [M]
    rotary: np.ndarray  # [M, H + K, D / 2] complex: the rotary table of every query and key head (`rotate_pairs`)
    prompt_bias: np.ndarray  # [P, 1, 1, W, W]: 0 where a prompt token may attend, -inf elsewhere
    completion_bias: np.ndarray  # [N, 1, 1, L, W + L]
    index: np.ndarray  # [N]: each row's distinct prompt
    scatter: np.ndarray  # [P, N]: one-hot of `index`, so that summing each prompt's rows is one product
    distinct: int
    width: int
    rows: int
    length: int  # L: each row's completion positions (the batch's completion length, less one)
    whole: bool = False  # each row laid out whole (W includes its L completion positions; no completion part)

    @property
    def tail(self) -> int:
        """The positions at the end of each prompt the pass reads: the last (it predicts the first completion
        token), or with `whole` rows the last L + 1."""
        return self.length + 1 if self.whole else 1

    @property
    def split(self) -> int:
        """Where the completion tokens start in the stream."""
        return self.distinct * self.width

    @cached_property
    def unrotate(self) -> np.ndarray:
        """The rotary table's conjugate: the rotation's backward (a rotation's transpose is its inverse)."""
        return np.conj(self.rotary)

    @cached_property
    def read(self) -> np.ndarray:
        """The stream's rows whose last-layer outputs the pass reads: each prompt's last `tail` tokens, then every
        completion position."""
        ends = np.arange(self.width, self.split + 1, self.width)[:, None]
        tails = (ends - self.tail + np.arange(self.tail)).reshape(-1)
        return np.concatenate([tails, np.arange(self.split, len(self.tokens))])


def token_stream(
    decoder: LlamaDecoder, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, whole: bool = False
) -> Stream:
    """The batch's `Stream`, built in numpy: its arrays are a few hundred numbers, where each torch call costs more
    than numpy's. `whole`: rows laid out whole where copying their prompts pays (`Stream.whole`)."""
    ids, mask, index = (t.numpy() for t in shared_prompts(prompt_ids, prompt_mask.bool()))
    (distinct, width), (rows, length) = ids.shape, (completion_ids.shape[0], completion_ids.shape[1] - 1)
    completions = completion_ids[:, :length].numpy()
    if whole and _copying_prompts_pays(distinct, rows, width, length):
        ids = np.concatenate([prompt_ids.numpy(), completions], -1)
        mask = np.concatenate([prompt_mask.numpy().astype(bool), np.ones((rows, length), bool)], -1)
        index, distinct, completions, width = np.arange(rows), rows, completions[:, :0], width + length
    positions = np.maximum(mask.cumsum(-1) - 1, 0).reshape(-1)
    if completions.size:
        positions = np.concatenate([positions, (mask.sum(-1)[index, None] + np.arange(length)).reshape(-1)])
    table = rotary_table(decoder, int(positions.max(initial=0)) + 1)
    rotated = (len(positions), decoder.heads + decoder.kv_heads, decoder.head_dim // 2)
    key_valid = np.concatenate([mask[index], np.ones(completions.shape, bool)], -1)
    return Stream(
        tokens=np.concatenate([ids.reshape(-1), completions.reshape(-1)]),
        rotary=np.ascontiguousarray(np.broadcast_to(table[positions][:, None], rotated)),
        prompt_bias=causal_bias(mask, 0)[:, None, None],
        completion_bias=causal_bias(key_valid, width)[:, None, None],
        index=index,
        scatter=(np.arange(distinct)[:, None] == index[None, :]).astype(F32),
        distinct=distinct,
        width=width,
        rows=rows,
        length=length,
        whole=not completions.size and length > 0,
    )


def _copying_prompts_pays(distinct: int, rows: int, width: int, length: int) -> bool:
    """Whether to lay rows out whole, each with its own copy of its prompt: where that adds at most an eighth more
    tokens than sharing each distinct prompt (SFT's rows: a prompt drawn twice now and then), not where sharing
    saves more (DPO's pairs, RL's groups)."""
    return length > 0 and 8 * (rows - distinct) * width <= distinct * width + rows * length


_ROTARY: list[tuple[tuple[Any, ...], np.ndarray]] = []
"""The latest `rotary_table`: the decoder's rotary settings and its table."""


def rotary_table(decoder: LlamaDecoder, positions: int) -> np.ndarray:
    """The rotary embedding [T >= positions, D / 2] at positions 0..T-1 (`rotary_pairs`, as the sampler's table),
    kept for the next batch: a stream takes its rows by position."""
    key = (decoder.rope_scale, decoder.inv_freq.numpy().tobytes())
    if not _ROTARY or _ROTARY[0][0] != key or len(_ROTARY[0][1]) < positions:
        _ROTARY[:] = [(key, rotary_pairs(decoder, max(positions, 64)))]
    return _ROTARY[0][1]


_LAST_STREAM: list[tuple[tuple[Tensor, ...], tuple[int, ...], tuple[Any, ...], Stream]] = []
"""The latest `shared_stream`: its batch tensors (held, so their identity stays theirs), their versions, the
decoder's attention shapes and rotary table it was built for, the stream."""


def shared_stream(
    decoder: LlamaDecoder, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, whole: bool = False
) -> Stream:
    """`token_stream`, the previous one again where the same batch tensors (unmodified since: version counters) come
    with the same attention shapes and rotary table, and `whole` asks for its layout (a split stream whose rows
    would not pay to copy serves either): DPO's policy and reference passes read one batch, so do an RL step's
    policy pass (with its tape: split) and its reference's (without: whole where it pays), and building its
    stream took 0.65 ms of a 10 ms tiny-llama DPO step (AMD EPYC Zen 3)."""
    tensors = (prompt_ids, prompt_mask, completion_ids)
    versions = tuple(t._version for t in tensors)
    shapes = (decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.rope_scale)
    if _LAST_STREAM:
        held, held_versions, (*held_shapes, inv_freq), stream = _LAST_STREAM[0]
        if (
            all(a is b for a, b in zip(held, tensors, strict=True))
            and held_versions == versions
            and tuple(held_shapes) == shapes
            and torch.equal(inv_freq, decoder.inv_freq)
            and (
                stream.whole == whole
                or (
                    not stream.whole
                    and not _copying_prompts_pays(stream.distinct, stream.rows, stream.width, stream.length)
                )
            )
        ):
            return stream
    stream = token_stream(decoder, prompt_ids, prompt_mask, completion_ids, whole)
    _LAST_STREAM[:] = [(tensors, versions, (*shapes, decoder.inv_freq.clone()), stream)]
    return stream


# --- pieces and their backward ---------------------------------------------------------------------------------


def _rms_backward(
    grad: np.ndarray, normed: np.ndarray, inverse: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(gradient of the input, of the weight) of `rms_norm` from its output's gradient [rows, E]."""
    scaled = grad * weight
    d_input = normed * (np.einsum("ij,ij->i", scaled, normed)[:, None] * F32(1.0 / grad.shape[-1]))
    np.subtract(scaled, d_input, out=d_input)
    d_input *= inverse
    return d_input, np.einsum("ij,ij->j", grad, normed)


def _softmax_backward(grad: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The scores' gradient p (g - sum(g p)) over the last axis (in numpy: torch's kernel costs 1.6-7x at attention's
    shapes, `benchmarks/small_ops.py`)."""
    weighted = grad * probs
    weighted -= probs * np.einsum("...i->...", weighted)[..., None]
    return weighted


def _heads(x: np.ndarray, batch: int, count: int, heads: int, repeat: int) -> np.ndarray:
    """Tokens' heads [B * count, heads * repeat, D] (or flat, [B * count, heads * repeat * D]) as
    [B, heads, repeat, count, D]."""
    dim = x.shape[-1] if x.ndim == 3 else x.shape[-1] // (heads * repeat)  # explicit: count may be 0
    return x.reshape(batch, count, heads, repeat, dim).transpose(0, 2, 3, 1, 4)


def _tokens(x: np.ndarray) -> np.ndarray:
    """[B, heads, repeat, count, D] back to tokens' heads [B * count, heads * repeat, D]."""
    b, heads, repeat, count, dim = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b * count, heads * repeat, dim)


@dataclass
class Attention:
    """One softmax attention's inputs and probabilities (queries pre-scaled)."""

    queries: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    probs: np.ndarray

    @staticmethod
    def run(
        queries: np.ndarray, keys: np.ndarray, values: np.ndarray, bias: np.ndarray
    ) -> tuple[np.ndarray, Attention]:
        probs = softmax(queries @ keys.swapaxes(-1, -2) + bias)
        return probs @ values, Attention(queries, keys, values, probs)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gradients of the (scaled) queries, the keys and the values, the latter two summed over R."""
        d_scores = _softmax_backward(grad @ self.values.swapaxes(-1, -2), self.probs)
        d_keys = (d_scores.swapaxes(-1, -2) @ self.queries).sum(2, keepdims=True)
        d_values = (self.probs.swapaxes(-1, -2) @ grad).sum(2, keepdims=True)
        return d_scores @ self.keys, d_keys, d_values


@dataclass
class Layer:
    """What one decoder layer's backward reads from its forward."""

    normed1: np.ndarray
    inverse1: np.ndarray
    x1: np.ndarray
    prompts: Attention
    completions: Attention | None  # None: the stream's rows are `whole`
    attended: np.ndarray
    normed2: np.ndarray
    inverse2: np.ndarray
    x2: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    silu: np.ndarray
    act: np.ndarray
    read: np.ndarray | None = None  # the last layer's: the stream rows it computed past attention (`Stream.read`)


def _at_rows(x: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """[count, ...] zeros with x at `rows`."""
    out = np.zeros((count, *x.shape[1:]), x.dtype)
    out[rows] = x
    return out


def _layer_forward(
    h: np.ndarray, w: list[np.ndarray], stream: Stream, shapes: LlamaDecoder, last: bool = False
) -> tuple[np.ndarray, Layer]:
    """(the layer's output, what its backward reads). The `last` layer computes its output at `Stream.read`'s rows
    only (the others' keys and values are all the pass needs of them): past attention, a prompt of W tokens costs
    its last one's rows, not W."""
    w_in, wq, wk, wv, wo, w_post, wg, wu, wd = w
    heads, kv, dim, split = shapes.heads, shapes.kv_heads, shapes.head_dim, stream.split
    p, n, repeat = stream.distinct, stream.rows, heads // kv
    x1, normed1, inverse1 = rms_norm(h, w_in, shapes.eps)
    qkv = (x1 @ np.concatenate([wq, wk, wv])[pair_order(heads, kv, dim)].T).reshape(len(h), -1, dim)
    qk = rotate_pairs(qkv[:, : heads + kv], stream.rotary)
    q, k, v = qk[:, :heads] * F32(dim**-0.5), qk[:, heads:], qkv[:, heads + kv :]
    kp, vp = _heads(k[:split], p, stream.width, kv, 1), _heads(v[:split], p, stream.width, kv, 1)
    queries, bias = _heads(q[:split], p, stream.width, kv, repeat), stream.prompt_bias
    if last:
        queries, bias = queries[..., -stream.tail :, :], bias[..., -stream.tail :, :]
    out_p, prompts = Attention.run(queries, kp, vp, bias)
    attended, completions = _tokens(out_p), None
    if not stream.whole:  # a completion row attends to its prompt's keys and values, then to its own
        keys = np.concatenate([kp[stream.index], _heads(k[split:], n, stream.length, kv, 1)], 3)
        values = np.concatenate([vp[stream.index], _heads(v[split:], n, stream.length, kv, 1)], 3)
        out_c, completions = Attention.run(_heads(q[split:], n, stream.length, kv, repeat), keys, values,
                                           stream.completion_bias)  # fmt: skip
        attended = np.concatenate([attended, _tokens(out_c)])
    attended = attended.reshape(len(attended), -1)
    read = stream.read if last else None
    h = (h if read is None else h[read]) + attended @ wo.T
    x2, normed2, inverse2 = rms_norm(h, w_post, shapes.eps)
    gate, up = x2 @ wg.T, x2 @ wu.T
    act_silu = silu(gate)
    act = act_silu * up
    saved = Layer(normed1, inverse1, x1, prompts, completions, attended, normed2, inverse2, x2, gate, up, act_silu, act,
                  read)  # fmt: skip
    return h + act @ wd.T, saved


def _layer_backward(
    dh: np.ndarray, w: list[np.ndarray], saved: Layer, stream: Stream, shapes: LlamaDecoder
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(gradient of the layer's input, its parameters' gradients in `parameters_of` order) from its output's (at
    `saved.read`'s rows where the forward computed only those)."""
    w_in, wq, wk, wv, wo, w_post, wg, wu, wd = w
    heads, kv, dim, split, width = shapes.heads, shapes.kv_heads, shapes.head_dim, stream.split, stream.width
    repeat, queried = heads // kv, width if saved.read is None else stream.tail  # each prompt's query positions
    d_act = dh @ wd
    d_up = d_act * saved.silu
    d_gate = torch.ops.aten.silu_backward(torch.from_numpy(d_act * saved.up), torch.from_numpy(saved.gate)).numpy()
    d_x2, d_post = _rms_backward(d_gate @ wg + d_up @ wu, saved.normed2, saved.inverse2, w_post)
    dh2 = dh + d_x2
    d_attended = dh2 @ wo
    prompt_rows = stream.distinct * queried
    d_qp, d_kp, d_vp = saved.prompts.backward(_heads(d_attended[:prompt_rows], stream.distinct, queried, kv, repeat))
    d_qkv = np.empty((len(stream.tokens), heads + 2 * kv, dim), F32)
    if saved.read is None:
        d_qkv[:split, :heads] = _tokens(d_qp)
    else:  # only each prompt's last `tail` positions were queries
        d_qkv[:split, :heads] = 0.0
        by_prompt = d_qkv[:split].reshape(stream.distinct, width, heads + 2 * kv, dim)
        by_prompt[:, width - queried :, :heads] = _tokens(d_qp).reshape(stream.distinct, queried, heads, dim)
    if saved.completions is not None:
        d_qc, d_keys, d_values = saved.completions.backward(
            _heads(d_attended[prompt_rows:], stream.rows, stream.length, kv, repeat)
        )
        # the rows' gradients of their prompt's keys and values, summed per prompt
        d_kp += (stream.scatter @ d_keys[:, :, :, :width].reshape(stream.rows, -1)).reshape(d_kp.shape)
        d_vp += (stream.scatter @ d_values[:, :, :, :width].reshape(stream.rows, -1)).reshape(d_vp.shape)
        d_qkv[split:, :heads] = _tokens(d_qc)
        d_qkv[split:, heads : heads + kv] = _tokens(d_keys[..., width:, :])
        d_qkv[split:, heads + kv :] = _tokens(d_values[..., width:, :])
    d_qkv[:, :heads] *= F32(dim**-0.5)
    d_qkv[:split, heads : heads + kv], d_qkv[:split, heads + kv :] = _tokens(d_kp), _tokens(d_vp)
    pairs = d_qkv[:, : heads + kv].view(np.complex64)  # the rotary embedding's backward
    pairs *= stream.unrotate
    d_flat = d_qkv.reshape(len(d_qkv), -1)
    w_qkv = np.concatenate([wq, wk, wv])[pair_order(heads, kv, dim)]
    d_w_qkv = (d_flat.T @ saved.x1)[pair_order_inverse(heads, kv, dim)]  # the weights' own row order
    d_x1, d_in = _rms_backward(d_flat @ w_qkv, saved.normed1, saved.inverse1, w_in)
    q_rows, k_rows = wq.shape[0], wk.shape[0]
    grads = [d_in, d_w_qkv[:q_rows], d_w_qkv[q_rows : q_rows + k_rows], d_w_qkv[q_rows + k_rows :],
             dh2.T @ saved.attended, d_post, d_gate.T @ saved.x2, d_up.T @ saved.x2, dh.T @ saved.act]  # fmt: skip
    if saved.read is None:
        return dh2 + d_x1, grads
    d_x1[saved.read] += dh2
    return d_x1, grads


_POOL: dict[tuple, tuple[weakref.ref, dict[str, list[np.ndarray]]]] = {}
"""The arrays of the latest tapes by shape. A tape's arrays are a few MB that the decode writes once: new arrays
cost their page faults on that first write (more than the writes), so a new tape of the same shapes takes the
previous one's arrays, and that one becomes unusable (its training pass computes its forward)."""
POOL_SIZE = 4


def _buffers(owner: Tape, shapes: dict[str, list[Any]]) -> dict[str, list[np.ndarray]]:
    """Arrays of these shapes for `owner`: the pool's (their previous tape made unusable) or new zeros. Positions
    a decode does not reach hold finite numbers either way (the backward multiplies them by zero gradients)."""
    key = tuple((name, tuple(s)) for name, s in shapes.items())
    previous, buffers = _POOL.pop(key, (None, None))
    if previous is not None and (tape := previous()) is not None:
        tape.retire()
    if buffers is None:
        buffers = {name: [np.zeros(shape, F32) for shape in group] for name, group in shapes.items()}
        while len(_POOL) >= POOL_SIZE:
            _POOL.pop(next(iter(_POOL)))
    _POOL[key] = (weakref.ref(owner), buffers)
    return buffers


class Tape:
    """The sampler's activations laid out as the training pass's token stream, so that a training pass at the
    weights the completions were sampled with (GRPO's and RLOO's one update per batch, the first of several)
    skips its forward: the decode already computed every number of it, the prompts' in the prefill and each
    completion token's at its step (`NumpyDecoder.tape`). Used only at the same parameters (the same tensors,
    unmodified in place since: their version counters) and the same token stream (`usable`); any other pass
    computes its forward. Recording costs a copy of each activation into its place, in arrays reused from the
    previous tape of the same shapes (`_buffers`)."""

    def __init__(self, decoder: Any, weights: list[Tensor], index: np.ndarray, distinct_ids: np.ndarray, rows: int,
                 max_new_tokens: int) -> None:  # fmt: skip
        self.weights, self.versions = weights, [w._version for w in weights]
        self.index, self.distinct_ids = index, distinct_ids
        self.distinct, self.width = (int(n) for n in distinct_ids.shape)
        self.rows, self.length = rows, max_new_tokens - 1
        self.split = self.distinct * self.width
        tokens, embed = self.split + rows * self.length, int(decoder.embed.shape[1])
        heads, kv, dim, width = decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.intermediate
        widths: tuple[int, ...] = (embed, 1, embed, heads * dim, embed, 1, embed, width, width, width, width)
        layers, vocab = len(decoder.layers), int(decoder.lm_head.shape[1])
        shapes: dict[str, list[Any]] = {
            "arrays": [(tokens, n) for n in widths] * layers,
            "queries": [(rows, kv, heads // kv, self.length, dim)] * layers,
            "probs": [(rows, kv, heads // kv, self.length, self.width + self.length)] * layers,
            "outputs": [(rows, self.length + 1, n) for n in (embed, embed, 1, vocab)],
        }
        buffers = _buffers(self, shapes)
        self.arrays = [buffers["arrays"][i * len(widths) : (i + 1) * len(widths)] for i in range(layers)]
        self.queries, self.probs = buffers["queries"], buffers["probs"]
        self.states, self.normed, self.inverse, self.logits = buffers["outputs"]
        self.prompts: list[Attention | None] = [None] * len(decoder.layers)
        self.keys: list[np.ndarray] = [np.empty(0, F32)] * layers
        self.values: list[np.ndarray] = [np.empty(0, F32)] * layers
        self.recorded = -1  # the last position whose logits are recorded (-1: not even the prefill's)
        self.needed = 0  # the last position whose logits a loss reads: the longest completion's last token
        self.tokens: np.ndarray | None = None
        self.retired = False

    def record_layer(self, i: int, start: int, layer: tuple[np.ndarray, ...], queries: np.ndarray, keys: np.ndarray,
                     values: np.ndarray, probs: np.ndarray) -> None:  # fmt: skip
        """Layer i's activations of the decode's forward from cache column `start` (0: the prefill); `keys` and
        `values`: the layer's whole cache [B, K, columns, D]."""
        if start == 0:
            for target, value in zip(self.arrays[i], layer, strict=True):
                target[: self.split] = value
            prompt_keys, prompt_values = keys[:, :, None, : self.width], values[:, :, None, : self.width]
            self.prompts[i] = Attention(queries, prompt_keys, prompt_values, probs)
            return
        step = start - self.width
        if step >= self.length:
            return
        at = slice(self.split + step, None, self.length)  # each row's completion token `step`
        for target, value in zip(self.arrays[i], layer, strict=True):
            target[at] = value
        self.queries[i][:, :, :, step] = queries[:, :, :, 0]
        self.probs[i][:, :, :, step, : start + 1] = probs[:, :, :, 0]
        self.probs[i][:, :, :, step, start + 1 :] = 0.0  # the keys after this query's, as softmax gives
        self.keys[i], self.values[i] = keys, values

    def record_output(self, start: int, states: np.ndarray, normed: np.ndarray, inverse: np.ndarray,
                      logits: np.ndarray) -> None:  # fmt: skip
        """The final norm's output and the logits at the last position of the decode's forward."""
        step = 0 if start == 0 else start - self.width + 1
        if step > self.length:
            return
        rows = self.index if start == 0 else slice(None)  # the prefill computed each distinct prompt once
        self.states[:, step], self.normed[:, step] = states[rows], normed[rows]
        self.inverse[:, step], self.logits[:, step] = inverse[rows], logits[rows]
        self.recorded = step

    def retire(self) -> None:
        """Another tape took this one's arrays: unusable from now on (and an error in a backward still to run)."""
        self.tokens, self.retired = None, True

    def finish(self, completion_ids: np.ndarray, lengths: np.ndarray) -> None:
        """After the decode: its completions [N, T] and their lengths [N]."""
        if self.recorded < 1:  # every row ended at its first token: no completion position was computed
            return
        self.tokens = np.concatenate([self.distinct_ids.reshape(-1), completion_ids[:, : self.length].reshape(-1)])
        self.needed = int(lengths.max()) - 1
        columns = self.width + self.length
        for i, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            keys[:, :, self.width + self.recorded :] = 0.0  # columns never written: finite, as above
            values[:, :, self.width + self.recorded :] = 0.0
            self.keys[i], self.values[i] = keys[:, :, None, :columns], values[:, :, None, :columns]

    def shorten(self, length: int) -> None:
        """Keep each row's first `length` completion positions (the training pass leaves out the columns after the
        batch's longest completion: `rollout.token_logprobs`); the later positions' activations are dropped, in
        place. Exact: no kept position attends to a dropped one."""
        if self.tokens is None:  # the decode ended every row at its first token: `finish` kept nothing to cut
            return
        old, split, end = self.length, self.split, self.split + self.rows * length
        for group in self.arrays:
            for j, array in enumerate(group):
                array[split:end] = array[split:].reshape(self.rows, old, -1)[:, :length].reshape(end - split, -1)
                group[j] = array[:end]
        columns = self.width + length
        self.queries = [q[..., :length, :] for q in self.queries]
        self.probs = [p[..., :length, :columns] for p in self.probs]
        self.keys = [k[..., :columns, :] for k in self.keys]
        self.values = [v[..., :columns, :] for v in self.values]
        self.states, self.normed, self.inverse, self.logits = (
            x[:, : length + 1] for x in (self.states, self.normed, self.inverse, self.logits)
        )
        if self.tokens is not None:
            completions = self.tokens[split:].reshape(self.rows, old)[:, :length]
            self.tokens = np.concatenate([self.tokens[:split], completions.reshape(-1)])
        self.length, self.needed = length, min(self.needed, length)

    def usable(self, weights: tuple[Tensor, ...], stream: Stream) -> bool:
        return (
            self.tokens is not None
            and self.recorded >= self.needed
            and len(weights) == len(self.weights)
            and all(a is b and a._version == v for a, b, v in zip(weights, self.weights, self.versions))
            and (stream.distinct, stream.width, stream.rows, stream.length)
            == (self.distinct, self.width, self.rows, self.length)
            and np.array_equal(stream.tokens, self.tokens)
            and np.array_equal(stream.index, self.index)
        )

    def layers(self) -> list[Layer]:
        layers = []
        for i, (normed1, inverse1, x1, attended, normed2, inverse2, x2, gate, up, act_silu, act) in enumerate(
            self.arrays
        ):
            prompts = self.prompts[i]
            assert prompts is not None
            completions = Attention(self.queries[i], self.keys[i], self.values[i], self.probs[i])
            layers.append(Layer(normed1, inverse1, x1, prompts, completions, attended, normed2, inverse2, x2, gate, up,
                                act_silu, act))  # fmt: skip
        return layers


# --- the pass ----------------------------------------------------------------------------------------------------


def _forward(w: list[np.ndarray], stream: Stream, shapes: LlamaDecoder, with_logits: bool = True) -> tuple:
    """(the layers' saved activations, final-norm states, their normed input and inverse RMS, logits; without
    `with_logits` an empty array: the LM head's product skipped)."""
    h = w[0][stream.tokens]  # [M, E]
    layers = []
    for i in range(shapes.n_layers):
        weights = w[1 + PER_LAYER * i : 1 + PER_LAYER * (i + 1)]
        h, saved = _layer_forward(h, weights, stream, shapes, last=i == shapes.n_layers - 1)
        layers.append(saved)
    p, n, length = stream.distinct, stream.rows, stream.length  # h: `Stream.read`'s rows
    if stream.whole:  # each row's last L + 1 positions, in order
        selected = h.reshape(n, length + 1, h.shape[-1])
    else:  # [N, L + 1, E]
        selected = np.concatenate([h[:p][stream.index][:, None], h[p:].reshape(n, length, h.shape[-1])], 1)
    states, normed, inverse = rms_norm(selected, w[-2], shapes.eps)
    return layers, states, normed, inverse, states @ w[-1].T if with_logits else np.zeros((0,), F32)


class NumpyLlamaPass(torch.autograd.Function):
    """(logits [N, L + 1, V], final-norm states [N, L + 1, E]) of `LlamaDecoder.completion_logits` from the
    parameters (`parameters_of`'s order); `with_logits` False: the states and an empty logits tensor (a reward
    model reads the states only)."""

    @staticmethod
    def forward(
        ctx: Any, shapes: LlamaDecoder, stream: Stream, tape: Tape | None, with_logits: bool, *weights: Tensor
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if tape is not None and not tape.retired and stream.length < tape.length:
            tape.shorten(stream.length)
        used = tape if tape is not None and tape.usable(weights, stream) else None
        ctx.tape = used
        if used is not None:
            layers, states, normed, inverse, logits = used.layers(), used.states, used.normed, used.inverse, used.logits
        else:
            arrays = [t.detach().numpy() for t in weights]
            layers, states, normed, inverse, logits = _forward(arrays, stream, shapes, with_logits)
            ctx.arrays = arrays
        ctx.save_for_backward(*weights)
        ctx.numpy = (shapes, stream, layers, states, normed, inverse)
        ctx.set_materialize_grads(False)
        return torch.from_numpy(logits), torch.from_numpy(states)

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor | None, grad_states: Tensor | None) -> tuple:  # type: ignore[override]
        shapes, stream, layers, states, normed, inverse = ctx.numpy
        if ctx.tape is not None and ctx.tape.retired:
            raise RuntimeError(
                "the sampler tape this forward read was overwritten by a later generate(record=True) of the same "
                "shapes before its backward: run the backward first, or generate without record"
            )
        saved = ctx.saved_tensors  # (autograd's check that none was modified in place since the forward)
        w = ctx.arrays if hasattr(ctx, "arrays") else [t.detach().numpy() for t in saved]
        embed_dim = w[0].shape[1]
        grads: list[np.ndarray | None] = [None] * len(w)
        d_states = np.zeros_like(states) if grad_states is None else grad_states.numpy().copy()
        if grad_logits is not None and grad_logits.numel():
            g = grad_logits.numpy().reshape(-1, w[-1].shape[0])
            grads[-1] = g.T @ states.reshape(-1, embed_dim)
            d_states += (g @ w[-1]).reshape(d_states.shape)
        d_selected, grads[-2] = _rms_backward(d_states.reshape(-1, embed_dim), normed.reshape(-1, embed_dim),
                                              inverse.reshape(-1, 1), w[-2])  # fmt: skip
        d_selected = d_selected.reshape(stream.rows, stream.length + 1, embed_dim)
        # at `Stream.read`'s rows: each prompt's last token (its rows' sum), then the completion positions
        if stream.whole:
            dh = d_selected.reshape(-1, embed_dim)
        else:
            dh = np.concatenate([stream.scatter @ d_selected[:, 0], d_selected[:, 1:].reshape(-1, embed_dim)])
        if layers and layers[-1].read is None:  # a tape's last layer computed every row
            dh = _at_rows(dh, stream.read, len(stream.tokens))
        for i in reversed(range(shapes.n_layers)):
            start = 1 + PER_LAYER * i
            dh, grads[start : start + PER_LAYER] = _layer_backward(
                dh, w[start : start + PER_LAYER], layers[i], stream, shapes
            )
        d_embed = torch.zeros(w[0].shape).index_add_(0, torch.from_numpy(stream.tokens), torch.from_numpy(dh))
        if shapes.padding_idx is not None:
            d_embed[shapes.padding_idx] = 0.0  # as nn.Embedding: the padding row gets no gradient
        return (
            None,
            None,
            None,
            None,
            d_embed,
            *(None if g is None else torch.from_numpy(np.ascontiguousarray(g)) for g in grads[1:]),
        )


def completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    hidden: list[Tensor] | None = None,
    tape: Tape | None = None,
) -> Tensor:
    """`LlamaDecoder.completion_logits` through `NumpyLlamaPass` (for models where `supports(model)`); with the
    `tape` of the sampling that produced these completions, its forward is the tape's where it is `usable`."""
    decoder = LlamaDecoder(model, weights=False)
    stream = shared_stream(decoder, prompt_ids, prompt_mask, completion_ids, whole=tape is None)
    logits, states = NumpyLlamaPass.apply(decoder, stream, tape, True, *parameters_of(model))
    if hidden is not None:
        hidden.append(states)
    return logits


def completion_states(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor) -> Tensor:
    """The final-norm states [N, T, E] of `completion_logits` (those that predict each completion token) without
    the LM head's product: what a reward model's score reads."""
    decoder = LlamaDecoder(model, weights=False)
    stream = shared_stream(decoder, prompt_ids, prompt_mask, completion_ids, whole=True)
    return NumpyLlamaPass.apply(decoder, stream, None, False, *parameters_of(model))[1]
