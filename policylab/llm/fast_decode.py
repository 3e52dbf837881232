"""Sampling-time forward passes of Llama-family models without transformers' per-call machinery.

A transformers forward call costs several milliseconds of Python (cache objects, mask builders, rotary
modules, output dataclasses) whatever the model's size: for the small models of CPU runs that is most of the
time of a generated token. `LlamaDecoder` runs the same arithmetic on the model's own weights (read at each
`generate` call, so it always sees the current parameters): q, k and v in one product, gate and up in one,
RMSNorm in float32 as transformers does, rotary embeddings from the model's `inv_freq`, attention through
`scaled_dot_product_attention` over a preallocated KV cache. It applies to `LlamaForCausalLM` with default
rotary embeddings and SiLU MLPs without biases (`LlamaDecoder.supports`); other models use transformers'
forward. Its log-probs equal the recomputed ones of a transformers forward (tests/test_llm.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class LlamaDecoder:
    def __init__(self, model: Any) -> None:
        cfg = model.config
        inner = model.model
        self.eps = float(cfg.rms_norm_eps)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.embed = inner.embed_tokens.weight
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        for layer in inner.layers:
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
        )

    def start(self, batch: int, length: int) -> None:
        """Preallocate the KV cache for `length` positions."""
        shape = (batch, self.kv_heads, length, self.head_dim)
        dtype = self.embed.dtype
        self.keys = [torch.empty(shape, dtype=dtype) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype) for _ in self.layers]

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def forward(self, tokens: Tensor, positions: Tensor, key_valid: Tensor, start: int) -> Tensor:
        """Logits [B, V] at the last of `tokens` [B, L] (written into the cache from column `start`), attending
        to the cache's first start + L columns where `key_valid` [B, start + L] is true, causally."""
        batch, length = tokens.shape
        end = start + length
        h = F.embedding(tokens, self.embed)  # [B, L, E]
        freqs = positions[..., None].float() * self.inv_freq  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], -1)
        cos = (emb.cos() * self.rope_scale).to(h.dtype)[:, None]  # [B, 1, L, D]
        sin = (emb.sin() * self.rope_scale).to(h.dtype)[:, None]
        query_pos = torch.arange(start, end)[:, None]
        allowed = key_valid[:, None, :end] & (torch.arange(end)[None, :] <= query_pos)[None]  # [B, L, end]
        allowed = allowed | (torch.arange(end)[None, :] == query_pos)[None]  # padding queries see themselves
        mask = allowed[:, None]  # [B, 1, L, end]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        repeat = self.heads // self.kv_heads
        for i, (norm_in, w_qkv, w_o, norm_post, w_gate_up, w_down) in enumerate(self.layers):
            qkv = F.linear(self._rms(h, norm_in), w_qkv)
            q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
            q = self._rotate(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            if repeat > 1:
                keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = h + F.linear(attn.transpose(1, 2).reshape(batch, length, q_size), w_o)
            gate, up = F.linear(self._rms(h, norm_post), w_gate_up).split(self.intermediate, -1)
            h = h + F.linear(F.silu(gate) * up, w_down)
        return F.linear(self._rms(h[:, -1], self.norm), self.lm_head)
