"""Batched sampling of completions with the model's KV cache, returning what training needs: token ids, masks
and the behaviour log-probs of every sampled token.

Prompts are left-padded (`prompt_mask` 0 on the padding), so every row's next token is at the same column;
position ids count only real tokens. A row is finished at its EOS (kept, and counted in the mask) or at
`max_new_tokens`; after it the row holds pad tokens with mask 0. The behaviour log-prob of a token is under the
sampling distribution softmax(logits / temperature) (top-p filtering, when on, is not in it: the recomputed
log-probs of training are the same quantity, so their ratio at the same weights is exactly 1).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from policylab.llm.fast_decode import LlamaDecoder, shared_prompts


@dataclass
class Rollout:
    prompt_ids: Tensor  # [N, P], left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T], pad after the end
    completion_mask: Tensor  # [N, T], 1 on generated tokens up to and including EOS
    logprobs: Tensor  # [N, T], behaviour log-probs (0 where the mask is 0)
    off_policy: Tensor | None = None  # [N] bool: completions not sampled from the policy (LUFFY's expert ones)
    rows: list[dict[str, Any]] | None = None  # the data rows of the prompts (what rewards read)

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    def select(self, rows: Tensor) -> Rollout:
        """The rows given by an index or boolean mask."""
        index = rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows
        return Rollout(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
            self.logprobs[index],
            None if self.off_policy is None else self.off_policy[index],
            None if self.rows is None else [self.rows[i] for i in index.tolist()],
        )

    def with_mask(self, completion_mask: Tensor) -> Rollout:
        """The same tokens with fewer of them in the loss (log-probs zeroed outside the mask)."""
        return replace(self, completion_mask=completion_mask, logprobs=self.logprobs * completion_mask)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rows of several rollouts as one (prompts re-padded on the left to the widest, completions on the right)."""

    def left(x: Tensor, width: int, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def right(x: Tensor, width: int, value: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    p = max(r.prompt_ids.shape[1] for r in rollouts)
    t = max(r.completion_ids.shape[1] for r in rollouts)
    return Rollout(
        torch.cat([left(r.prompt_ids, p, pad_token_id) for r in rollouts]),
        torch.cat([left(r.prompt_mask.long(), p, 0) for r in rollouts]),
        torch.cat([right(r.completion_ids, t, pad_token_id) for r in rollouts]),
        torch.cat([right(r.completion_mask.long(), t, 0) for r in rollouts]).bool(),
        torch.cat([right(r.logprobs, t, 0.0) for r in rollouts]),
        None
        if any(r.off_policy is None for r in rollouts)
        else torch.cat([r.off_policy for r in rollouts if r.off_policy is not None]),
        None if any(r.rows is None for r in rollouts) else [row for r in rollouts for row in r.rows or []],
    )


def positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Logits with the tokens outside the smallest set of probability >= top_p set to -inf."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _cache_keyword(model: Any) -> str:
    """transformers 5.2x calls the KV cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    fast: bool = True,
) -> Rollout:
    """One completion per prompt row (repeat the rows for groups). `greedy` takes the most likely token. `fast`:
    Llama-family models run through `LlamaDecoder` (the same arithmetic without transformers' per-call cost)."""
    n, width = prompt_ids.shape
    mask = prompt_mask.long()
    decoder = LlamaDecoder(model) if fast and LlamaDecoder.supports(model) else None
    if decoder is not None:  # each distinct prompt is prefilled once, then its cache rows are repeated
        distinct, distinct_mask, index = shared_prompts(prompt_ids, mask)
        decoder.start(len(distinct), width + max_new_tokens)
        valid = torch.zeros(len(distinct), width + max_new_tokens, dtype=torch.bool)
        valid[:, :width] = distinct_mask.bool()
        logits = decoder.forward(distinct, positions(distinct_mask), valid, 0).float()[index]
        decoder.repeat_rows(index)
        key_valid = valid[index]
    else:
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        cache_keyword = _cache_keyword(model)
        cache, logits = _cache_of(out), out.logits[:, -1].float()
    next_position = mask.sum(-1)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(n, max_new_tokens)
    finished = torch.zeros(n, dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    for t in range(max_new_tokens):
        scaled = torch.log_softmax(logits / temperature, -1)
        if greedy:
            token = scaled.argmax(-1)
        else:
            sampling = scaled if top_p >= 1.0 else _filter_top_p(scaled, top_p)
            token = torch.multinomial(torch.softmax(sampling, -1), 1, generator=generator).squeeze(-1)
        active = ~finished
        tokens[:, t] = torch.where(active, token, pad_token_id)
        logprobs[:, t] = torch.where(active, scaled.gather(-1, token[:, None]).squeeze(-1), 0.0)
        lengths += active.long()
        finished |= token == eos_token_id
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        if decoder is not None:
            key_valid[:, width + t] = True
            logits = decoder.forward(tokens[:, t : t + 1], (next_position + t)[:, None], key_valid, width + t).float()
            continue
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], -1)
        out = model(
            input_ids=tokens[:, t : t + 1],
            attention_mask=mask,
            position_ids=(next_position + t)[:, None],
            use_cache=True,
            **{cache_keyword: cache},
        )
        cache, logits = _cache_of(out), out.logits[:, -1].float()
    completion_mask = torch.arange(max_new_tokens)[None, :] < lengths[:, None]
    return Rollout(prompt_ids, prompt_mask, tokens, completion_mask, logprobs)


def token_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    hidden: list[Tensor] | None = None,
    fast: bool = True,
) -> tuple[Tensor, Tensor]:
    """(log-probs [N, T] of the completion tokens under softmax(logits / temperature), the entropy [N, T] of that
    distribution) in one forward pass over prompt + completion (with gradients, for training). With `hidden` (a
    list), the last layer's states at the positions that predict the completion tokens, [N, T, H], are appended
    to it (what a value head reads: the state before each token). `fast`: Llama-family models run through
    `LlamaDecoder.completion_logits`, which computes each distinct prompt of the batch once."""
    if fast and LlamaDecoder.supports(model):
        logits = LlamaDecoder(model).completion_logits(prompt_ids, prompt_mask, completion_ids, hidden).float()
    else:
        ids = torch.cat([prompt_ids, completion_ids], -1)
        mask = torch.cat([prompt_mask.long(), completion_mask.long()], -1)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=hidden is not None
        )
        start = prompt_ids.shape[1] - 1
        if hidden is not None:
            hidden.append(out.hidden_states[-1][:, start:-1])
        logits = out.logits[:, start:-1].float()
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, -1)
    chosen = log_probs.gather(-1, completion_ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen * completion_mask, entropy


def cut_at_stop(rollout: Rollout, tokenizer: Any, stop: list[str]) -> Rollout:
    """Completions cut after the first occurrence of any stop string (the tokens after it leave the mask)."""
    if not stop:
        return rollout
    mask = rollout.completion_mask.clone()
    for row in range(len(rollout)):
        length = int(mask[row].sum())
        row_ids = rollout.completion_ids[row, :length].tolist()
        for end in range(1, length + 1):
            if any(s in tokenizer.decode(row_ids[:end], skip_special_tokens=True) for s in stop):
                mask[row, end:] = False
                break
    ids = torch.where(mask, rollout.completion_ids, rollout.completion_ids.new_tensor(tokenizer.pad_token_id))
    return replace(rollout, completion_ids=ids, completion_mask=mask, logprobs=rollout.logprobs * mask)


def decode(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The completions' text (special tokens dropped, masked tokens left out)."""
    ids, mask = rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
    rows = [[token for token, keep in zip(row, keeps) if keep] for row, keeps in zip(ids, mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
