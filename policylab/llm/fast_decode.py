"""Forward passes of Llama-family models without transformers' per-call machinery, for sampling and training.

A transformers forward call costs several milliseconds of Python (cache objects, mask builders, rotary
modules, output dataclasses) whatever the model's size: for the small models of CPU runs that is most of the
time of a generated token and a large share of a training step. `LlamaDecoder` runs the same arithmetic on
the model's own weights (read when it is made, so with gradients when made under grad mode): q, k and v in one
product, gate and up in one, RMSNorm in float32 as transformers does, rotary embeddings from the model's
`inv_freq`, attention through `scaled_dot_product_attention`. It applies to `LlamaForCausalLM` with default
rotary embeddings and SiLU MLPs without biases (`LlamaDecoder.supports`); other models use transformers'
forward.

Two uses. Sampling: `NumpyDecoder` runs the same forward in numpy on the same weights (float32 models), the
prefill of each distinct prompt once and then one token at a time over a preallocated KV cache, because at
these sizes a numpy call costs a fraction of a torch call; `start` / `forward` do it in torch for other
dtypes. Training
(`completion_logits`): the completions of a group share their prompt, so each distinct prompt goes through
the layers once and its keys and values are shared by the rows that repeat it (`shared_prompts`); only the
completion tokens are computed per row. With groups of 8 and prompts as long as completions this is about
half the arithmetic of a forward over every row's prompt + completion, and the gradient is the same (the
prompt's activations receive the sum of their rows' gradients). Both equal transformers' forward
(tests/test_llm.py).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def shared_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct prompt ids [U, P], their mask [U, P], the index [N] of each row's prompt among them)."""
    slots: dict[bytes, int] = {}
    firsts: list[int] = []  # the first row of each distinct prompt
    inverse = np.empty(len(prompt_ids), np.int64)
    ids, mask = prompt_ids.cpu().numpy(), prompt_mask.cpu().numpy()  # numpy: cheaper calls on rows this small
    for row, key in enumerate(np.concatenate([ids, mask.astype(np.int64)], -1)):
        slot = inverse[row] = slots.setdefault(key.tobytes(), len(firsts))
        if slot == len(firsts):
            firsts.append(row)
    if prompt_ids.device.type != "cpu":  # a model on an accelerator: its batch stays there
        rows = torch.tensor(firsts, device=prompt_ids.device)
        return prompt_ids[rows], prompt_mask[rows], torch.from_numpy(inverse).to(prompt_ids.device)
    return torch.from_numpy(ids[firsts]), torch.from_numpy(mask[firsts]), torch.from_numpy(inverse)


class LlamaDecoder:
    def __init__(self, model: Any, weights: bool = True) -> None:
        """`weights=False`: the shapes and rotary tables only (for `fast_train`, which reads the parameters)."""
        cfg = model.config
        inner = model.model
        self.eps = float(cfg.rms_norm_eps)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.embed = inner.embed_tokens.weight
        self.padding_idx = inner.embed_tokens.padding_idx  # its row gets no gradient, as in nn.Embedding
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.n_layers = len(inner.layers)
        self.modules = inner.layers
        self.layers = []
        for layer in inner.layers if weights else ():
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    attn.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    mlp.down_proj.weight,
                )
            )
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.intermediate = int(cfg.intermediate_size)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = getattr(model, "config", None)
        if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
            return False
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        return (
            rope.get("rope_type", "default") == "default"
            and cfg.hidden_act == "silu"
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1
            and hasattr(model.model, "rotary_emb")
            and not _checkpointing(model)
            and not (model.training and (cfg.attention_dropout or 0.0) > 0)
        )

    # --- the arithmetic shared by both uses -------------------------------------------------------------------

    def _embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.embed, padding_idx=self.padding_idx)

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [M, 1, D] of the rotary embedding at `positions` [M]."""
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return (emb.cos() * self.rope_scale).to(dtype)[:, None], (emb.sin() * self.rope_scale).to(dtype)[:, None]

    def _project(self, layer: tuple[Tensor, ...], h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        """Queries [M, heads, D] and keys [M, kv_heads, D], both rotated (in one go), and values of tokens h [M, E]."""
        qkv = F.linear(self._rms(h, layer[0]), layer[1]).view(len(h), -1, self.head_dim)
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], 1)
        half = self.head_dim // 2
        qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin
        q, k = qk.split([self.heads, self.kv_heads], 1)
        return q, k, v

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Attention output [B * L, heads * D] of queries [B, heads, L, D] over keys / values [B, kv_heads, S, D]."""
        repeat = self.heads // self.kv_heads
        if repeat > 1:
            keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.transpose(1, 2).reshape(-1, self.heads * self.head_dim)

    def _finish(self, layer: tuple[Tensor, ...], h: Tensor, attended: Tensor) -> Tensor:
        """The layer's output for tokens h [M, E]: the residual with the attention output, then the MLP."""
        h = h + F.linear(attended, layer[2])
        gate, up = F.linear(self._rms(h, layer[3]), layer[4]).split(self.intermediate, -1)
        return h + F.linear(F.silu(gate) * up, layer[5])

    def _logits(self, h: Tensor) -> Tensor:
        return F.linear(self._rms(h, self.norm), self.lm_head)

    # --- sampling ---------------------------------------------------------------------------------------------

    def start(self, batch: int, length: int) -> None:
        """Preallocate the KV cache for `length` positions."""
        shape = (batch, self.kv_heads, length, self.head_dim)
        dtype = self.embed.dtype
        self.keys = [torch.empty(shape, dtype=dtype) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype) for _ in self.layers]

    def repeat_rows(self, index: Tensor) -> None:
        """The cache's rows taken by `index` [N] (after a prefill of each distinct prompt once)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def forward(self, tokens: Tensor, positions: Tensor, key_valid: Tensor, start: int) -> Tensor:
        """Logits [B, V] at the last of `tokens` [B, L] (written into the cache from column `start`), attending
        to the cache's first start + L columns where `key_valid` [B, start + L] is true, causally."""
        batch, length = tokens.shape
        end = start + length
        h = self._embed(tokens.reshape(-1))  # [B * L, E]
        cos, sin = self._rotary(positions.reshape(-1), h.dtype)
        mask = _causal_mask(key_valid[:, :end], start)
        for i, layer in enumerate(self.layers):
            q, k, v = self._project(layer, h, cos, sin)
            self.keys[i][:, :, start:end] = k.view(batch, length, self.kv_heads, -1).transpose(1, 2)
            self.values[i][:, :, start:end] = v.view(batch, length, self.kv_heads, -1).transpose(1, 2)
            q = q.view(batch, length, self.heads, -1).transpose(1, 2)
            attended = self._attend(q, self.keys[i][:, :, :end], self.values[i][:, :, :end], mask)
            h = self._finish(layer, h, attended)
        return self._logits(h.view(batch, length, -1)[:, -1])

    # --- training ---------------------------------------------------------------------------------------------

    def completion_logits(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, hidden: list[Tensor] | None = None
    ) -> Tensor:
        """Logits [N, T, V] of the positions that predict each completion token (the last prompt token's, then
        each completion token's but the last), computing each distinct prompt once. `hidden` (a list) receives
        the final-norm hidden states at those positions, [N, T, E]. The distinct prompts' tokens and the rows'
        completion tokens go through the per-token products together, as one [M, E] tensor; only attention
        treats them apart (a prompt attends to itself, a completion to its prompt's keys and its own)."""
        ids, mask, index = shared_prompts(prompt_ids, prompt_mask.bool())
        (distinct, width), (rows, length) = ids.shape, (completion_ids.shape[0], completion_ids.shape[1] - 1)
        split = distinct * width
        prompt_lengths = mask.long().sum(-1)
        positions = torch.cat(
            [
                (mask.long().cumsum(-1) - 1).clamp_min(0).reshape(-1),
                (prompt_lengths[index, None] + torch.arange(length)).reshape(-1),
            ]
        )
        h = self._embed(torch.cat([ids.reshape(-1), completion_ids[:, :length].reshape(-1)]))
        cos, sin = self._rotary(positions, h.dtype)
        prompt_attention = _causal_mask(mask.bool(), 0)
        key_valid = torch.cat([mask.bool()[index], torch.ones(rows, length, dtype=torch.bool)], -1)
        completion_attention = _causal_mask(key_valid, width)
        for layer in self.layers:
            q, k, v = self._project(layer, h, cos, sin)
            qp, kp, vp = (x[:split].view(distinct, width, x.shape[1], -1).transpose(1, 2) for x in (q, k, v))
            attended = self._attend(qp, kp, vp, prompt_attention)
            if length > 0:
                qc, kc, vc = (x[split:].view(rows, length, x.shape[1], -1).transpose(1, 2) for x in (q, k, v))
                # index_select: its backward is one index_add, where advanced indexing's accumulates by sorting
                keys = torch.cat([kp.index_select(0, index), kc], 2)
                values = torch.cat([vp.index_select(0, index), vc], 2)
                attended = torch.cat([attended, self._attend(qc, keys, values, completion_attention)])
            h = self._finish(layer, h, attended)
        last_prompt = h[:split].view(distinct, width, -1)[:, -1:].index_select(0, index)
        states = self._rms(torch.cat([last_prompt, h[split:].view(rows, length, -1)], 1), self.norm)
        if hidden is not None:
            hidden.append(states)
        return F.linear(states, self.lm_head)


@dataclass
class SharedPrompts:
    """The distinct prompts' keys and values [P, kv, W, D] per layer, and where each row's queries go in a grid
    [P, G] of them (row r at (index[r], slot[r]), G the largest group; empty slots hold zeros): attention over the
    prompt is then one product per prompt, [G R L, D] x [D, W], whatever order and group sizes the rows come in."""

    index: np.ndarray
    slot: np.ndarray
    group: int
    width: int
    keys: list[np.ndarray]
    values: list[np.ndarray]

    @staticmethod
    def of(index: np.ndarray, width: int, keys: list[np.ndarray], values: list[np.ndarray]) -> SharedPrompts:
        order = np.argsort(index, kind="stable")
        starts = np.searchsorted(index[order], index[order])  # each sorted row's group start
        slot = np.empty_like(index)
        slot[order] = np.arange(len(index)) - starts
        prompt = [np.ascontiguousarray(k[:, :, :width]) for k in keys]
        return SharedPrompts(index, slot, int(slot.max()) + 1, width, prompt,
                             [np.ascontiguousarray(v[:, :, :width]) for v in values])  # fmt: skip

    def grouped(self, x: np.ndarray) -> np.ndarray:
        """Rows' [B, K, R, L, X] as [P, K, G R L, X]."""
        batch, kv, repeat, length, last = x.shape
        grid = np.zeros((len(self.keys[0]), self.group, kv, repeat * length, last), np.float32)
        grid[self.index, self.slot] = x.reshape(batch, kv, repeat * length, last)
        return grid.transpose(0, 2, 1, 3, 4).reshape(len(grid), kv, -1, last)

    def rows(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """[P, K, G R L, X] back to the rows' [B, K, R, L, X] (`shape`'s first four)."""
        batch, kv, repeat, length = shape[:4]
        grid = x.reshape(len(x), kv, self.group, repeat * length, x.shape[-1]).transpose(0, 2, 1, 3, 4)
        return grid[self.index, self.slot].reshape(batch, kv, repeat, length, -1)


class NumpyDecoder:
    """`LlamaDecoder`'s sampling forward in numpy, on its weights, with its own KV cache: the prefill of the
    distinct prompts and then one token per row at a time.

    A forward pass of a small model is a few dozen calls on arrays of a few thousand numbers, so its time is
    the calls', and a numpy call costs a fraction of a torch call (`benchmarks/llm.py --sampling` times this path
    against the torch decode of the same loop). The arithmetic is the same, in
    float32, and agrees with the torch forward to float32 rounding (tests/test_llm.py). Only for float32
    weights (`supports`)."""

    def __init__(self, decoder: LlamaDecoder, rows: int, length: int) -> None:
        self.eps, self.heads, self.kv_heads = decoder.eps, decoder.heads, decoder.kv_heads
        self.head_dim = decoder.head_dim
        self.intermediate = decoder.intermediate
        self.layers, self.lm_head = numpy_weights(decoder)
        shape = (rows, self.kv_heads, length, self.head_dim)
        self.keys = [np.empty(shape, np.float32) for _ in self.layers]
        self.values = [np.empty(shape, np.float32) for _ in self.layers]
        self.embed = decoder.embed.detach().numpy()
        self.norm = decoder.norm.detach().numpy()
        rotated = (length, self.heads + self.kv_heads, self.head_dim // 2)  # the table for every query and key head
        self.rotary = np.ascontiguousarray(np.broadcast_to(rotary_pairs(decoder, length)[:, None], rotated))
        self.scale = np.float32(self.head_dim**-0.5)
        self.tape: Any = None
        """A `fast_train.Tape` that records this decode's activations for the training pass, or None."""
        self.shared: SharedPrompts | None = None
        """Where rows share prompts (`repeat_rows`): attention over the prompt reads each prompt's keys and values
        once for all its rows' queries, one product per prompt, instead of the rows' copies one by one."""

    @staticmethod
    def supports(decoder: LlamaDecoder) -> bool:
        layer = decoder.modules[0]
        return decoder.embed.dtype == torch.float32 and all(p.dtype == torch.float32 for p in layer.parameters())

    def repeat_rows(self, index: np.ndarray, width: int | None = None) -> None:
        """The cache's rows taken by `index` [N] (after a prefill of each distinct prompt once). With the prompts'
        `width`, rows that share a prompt read its keys and values together in every later forward's attention
        (`shared`); the rows' copies stay (a tape reads them)."""
        if width and len(index) > len(self.keys[0]):
            self.shared = SharedPrompts.of(index, width, self.keys, self.values)
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]

    def _attend(self, i: int, q: np.ndarray, mask: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(attention probabilities [B, K, R, L, S], output [B, K, R, L, D]) of queries q [B, K, R, L, D] over the
        cache's first `end` columns of layer i."""
        keys, values = self.keys[i][:, :, None, :end], self.values[i][:, :, None, :end]  # [B, kv, 1, S, D]
        shared = self.shared
        if shared is None or start < shared.width:
            probs = softmax(q @ keys.swapaxes(-1, -2) + mask)
            return probs, probs @ values
        width = shared.width
        on_prompt = shared.rows(shared.grouped(q) @ shared.keys[i].swapaxes(-1, -2), q.shape)
        probs = softmax(np.concatenate([on_prompt, q @ keys[..., width:, :].swapaxes(-1, -2)], -1) + mask)
        out = shared.rows(shared.grouped(probs[..., :width]) @ shared.values[i], q.shape)
        return probs, out + probs[..., width:] @ values[..., width:, :]

    def forward(self, tokens: np.ndarray, positions: np.ndarray, bias: np.ndarray, start: int) -> np.ndarray:
        """Logits [B, V] at the last of `tokens` [B, L] (at `positions` [B, L]), whose keys and values are written
        into the cache's columns start..start+L-1; `bias` [B, L, start + L]: 0 where a query may attend to a key,
        -inf elsewhere. With a `tape`, every activation the training pass's backward reads is written into it."""
        (batch, length), heads, kv_heads, dim = tokens.shape, self.heads, self.kv_heads, self.head_dim
        end, repeat = start + length, heads // kv_heads
        rotary = self.rotary[positions.reshape(-1)]  # [B L, H + K, D / 2]
        mask = bias[:, None, None]  # [B, 1, 1, L, S]
        h = self.embed[tokens.reshape(-1)]  # [B L, E]: the products are 2-D (a 3-D one is a loop of small ones)
        for i, (w_in, w_qkv, w_out, w_post, w_gate_up, w_down) in enumerate(self.layers):
            x1, normed1, inverse1 = rms_norm(h, w_in, self.eps)
            qkv = (x1 @ w_qkv).reshape(batch * length, -1, dim)
            qk = rotate_pairs(qkv[:, : heads + kv_heads], rotary)
            k = qk[:, heads:].reshape(batch, length, kv_heads, dim)
            self.keys[i][:, :, start:end] = k.transpose(0, 2, 1, 3)
            v = qkv[:, heads + kv_heads :].reshape(batch, length, kv_heads, dim)
            self.values[i][:, :, start:end] = v.transpose(0, 2, 1, 3)
            # head j reads kv head j // repeat: queries as [B, kv_heads, repeat, L, D]
            q = qk[:, :heads].reshape(batch, length, kv_heads, repeat, dim).transpose(0, 2, 3, 1, 4) * self.scale
            probs, out = self._attend(i, q, mask, start, end)  # [B, kv_heads, repeat, L, S], [..., D]
            attended = out.transpose(0, 3, 1, 2, 4).reshape(batch * length, heads * dim)
            h = h + attended @ w_out
            x2, normed2, inverse2 = rms_norm(h, w_post, self.eps)
            gate_up = x2 @ w_gate_up
            gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            activated = silu(gate)
            act = activated * up
            if self.tape is not None:
                layer = (normed1, inverse1, x1, attended, normed2, inverse2, x2, gate, up, activated, act)
                self.tape.record_layer(i, start, layer, q, self.keys[i], self.values[i], probs)
            h = h + act @ w_down
        states, normed, inverse = rms_norm(h.reshape(batch, length, -1)[:, -1], self.norm, self.eps)
        logits = states @ self.lm_head
        if self.tape is not None:
            self.tape.record_output(start, states, normed, inverse, logits)
        return logits


_NUMPY_WEIGHTS: weakref.WeakKeyDictionary[Any, list[np.ndarray]] = weakref.WeakKeyDictionary()
"""Per model (keyed by its layers' ModuleList) the arrays `numpy_weights` copied it into last time."""


def numpy_weights(decoder: LlamaDecoder) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray]:
    """The decoder's weights for `NumpyDecoder`: per layer (input norm, [q; k; v] in `pair_order`, output,
    post-attention norm, [gate; up], down) with every matrix as an [in, out] copy (numpy's product with a
    transposed view runs at less than half the speed: benchmarks/small_ops.py), and the LM head [E, V]. The copies
    go into the arrays of the model's previous call: new arrays of a few MB cost their page faults at every
    rollout, about a tenth of a small-llama GRPO step. So a decoder's matrices are current only until the next
    decoder of the same model."""
    groups: list[list[Tensor]] = []  # the matrices of each [in, out] array
    for layer in decoder.modules:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [[attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [attn.o_proj.weight]]
        groups += [[mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.down_proj.weight]]
    groups.append([decoder.lm_head])
    shapes = [(int(group[0].shape[1]), sum(int(w.shape[0]) for w in group)) for group in groups]
    arrays = _NUMPY_WEIGHTS.get(decoder.modules)
    if arrays is None or [a.shape for a in arrays] != shapes:
        arrays = [np.empty(shape, np.float32) for shape in shapes]
        _NUMPY_WEIGHTS[decoder.modules] = arrays
    order = pair_order(decoder.heads, decoder.kv_heads, decoder.head_dim)
    for number, (array, group) in enumerate(zip(arrays, groups, strict=True)):
        rows = [w.detach().numpy() for w in group]
        if number % 4 == 0 and number < len(arrays) - 1:  # a layer's [q; k; v]
            rows = [np.concatenate(rows)[order]]
        column = 0
        for w in rows:
            _transpose_into(array[:, column : column + w.shape[0]], w)
            column += w.shape[0]
    layers: list[tuple[np.ndarray, ...]] = []
    for i, module in enumerate(decoder.modules):
        qkv, out, gate_up, down = arrays[4 * i : 4 * i + 4]
        norm_in, norm_post = module.input_layernorm.weight, module.post_attention_layernorm.weight
        layers.append((norm_in.detach().numpy(), qkv, out, norm_post.detach().numpy(), gate_up, down))
    return layers, arrays[-1]


def _transpose_into(target: np.ndarray, source: np.ndarray, tile: int = 64) -> None:
    """target[:] = source.T, `tile` rows of source at a time: 2-2.5x faster than one strided copy for the weights
    of a small Llama on an AMD EPYC Zen 3 (each tile's reads and writes stay in cache)."""
    for start in range(0, source.shape[0], tile):
        np.copyto(target[:, start : start + tile], source[start : start + tile].T)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight x / rms(x), x / rms(x), 1 / rms(x)) over the last axis: the RMS norm and what its backward reads."""
    inverse = 1.0 / np.sqrt(
        np.einsum("...i,...i->...", x, x)[..., None] * np.float32(1.0 / x.shape[-1]) + np.float32(eps)
    )
    normed = x * inverse
    return normed * weight, normed, inverse


@functools.lru_cache(maxsize=8)
def pair_order(heads: int, kv_heads: int, dim: int) -> np.ndarray:
    """The row order [(heads + 2 kv_heads) D] of a [q; k; v] weight that the numpy passes compute with: each query
    and key head's dimensions i and i + D/2 (the pair the rotary embedding turns together) side by side, values
    unchanged. Attention reads a query and a key only through their dot product, which the same order on both
    leaves as it is; the rotation is then one complex product (`rotate_pairs`)."""
    half = dim // 2
    within = np.stack([np.arange(half), np.arange(half) + half], -1).reshape(-1)  # 0, D/2, 1, D/2 + 1, ...
    rotated = (np.arange(heads + kv_heads)[:, None] * dim + within).reshape(-1)
    order = np.concatenate([rotated, np.arange((heads + kv_heads) * dim, (heads + 2 * kv_heads) * dim)])
    order.flags.writeable = False
    return order


@functools.lru_cache(maxsize=8)
def pair_order_inverse(heads: int, kv_heads: int, dim: int) -> np.ndarray:
    """`pair_order`'s inverse: a gradient of the reordered rows back in the weight's own order."""
    inverse = np.argsort(pair_order(heads, kv_heads, dim))
    inverse.flags.writeable = False
    return inverse


def rotary_pairs(decoder: LlamaDecoder, positions: int) -> np.ndarray:
    """The rotary embedding at positions 0..positions-1 as complex numbers [positions, D/2]: scale (cos + i sin) of
    each pair's angle (the decoder's `_rotary`, whose two halves repeat the same angles)."""
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * decoder.inv_freq
    return (torch.polar(torch.full_like(angles, decoder.rope_scale), angles)).numpy()


def rotate_pairs(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The rotary embedding of x [M, heads, D] in `pair_order` (its last axis contiguous), each pair (a, b) read as
    a + ib and multiplied by `table` [M, heads, D/2] (`rotary_pairs`'s rows, complex64): one pass over the numbers,
    where x cos + rot(x) sin in the model's own order costs four and a small product."""
    return (x.view(np.complex64) * table).view(np.float32)


SOFTMAX_FLOOR = np.float32(np.exp(-60.0))
"""The smallest row sum `softmax` accepts from its shared shift (below it, the row's largest score is more than 60
under the array's, where float32's exp nears its underflow: the row is shifted by its own maximum instead)."""


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of attention scores (a few to a few dozen keys per row), shifted by the whole
    array's maximum rather than each row's: one reduction over contiguous memory instead of one per row. Each row's
    shift cancels in its normalization, so the result is the per-row one to float32 rounding; a row whose sum falls
    under SOFTMAX_FLOOR (its maximum far under the array's) is redone with its own. On the rows of a small model's
    attention torch's softmax kernel costs 2-11x this (`benchmarks/small_ops.py`)."""
    if not scores.size:  # no query (a pass with no completion position) or no key
        return np.empty_like(scores)
    probs = np.subtract(scores, scores.max())
    np.exp(probs, out=probs)
    totals = np.einsum("...i->...", probs)[..., None]
    if totals.min() < SOFTMAX_FLOOR:
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        totals = probs.sum(-1, keepdims=True)
    probs /= totals
    return probs


def silu(x: np.ndarray) -> np.ndarray:
    """x sigmoid(x) by torch's kernel: numpy's float32 tanh and exp cost 3-4 ns a number here, torch's about 1."""
    return F.silu(torch.from_numpy(x)).numpy()


def causal_bias(key_valid: np.ndarray, start: int) -> np.ndarray:
    """`_causal_mask` as an additive bias [B, L, start + L] (0 allowed, -inf not), for `NumpyDecoder.forward`."""
    end = key_valid.shape[1]
    query = np.arange(start, end)[:, None]
    column = np.arange(end)[None, :]
    allowed = (key_valid[:, None, :] & (column <= query)[None]) | (column == query)[None]
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))


def _causal_mask(key_valid: Tensor, start: int) -> Tensor:
    """[B, 1, L, start + L] boolean attention mask of queries at columns start..start+L-1: the valid keys up to
    each query, and the query itself (so a padding query still attends to something)."""
    end = key_valid.shape[1]
    query = torch.arange(start, end)[:, None]
    column = torch.arange(end)[None, :]
    allowed = (key_valid[:, None, :] & (column <= query)[None]) | (column == query)[None]
    return allowed[:, None]


def _checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on: then transformers' forward does the recomputation.
    Read from the modules transformers marks in a Llama model (the base model and its decoder layers), not
    from `is_activation_checkpointing`, which walks every module (twice a training step)."""
    inner = model.model
    return any(getattr(m, "gradient_checkpointing", False) for m in (model, inner, *inner.layers))
