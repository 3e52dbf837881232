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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.llm import fast_train
from policylab.llm.fast_decode import LlamaDecoder, NumpyDecoder, causal_bias, shared_prompts


@dataclass
class Rollout:
    prompt_ids: Tensor  # [N, P], left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, T], pad after the end
    completion_mask: Tensor  # [N, T], 1 on generated tokens up to and including EOS
    logprobs: Tensor  # [N, T], behaviour log-probs (0 where the mask is 0)
    off_policy: Tensor | None = None  # [N] bool: completions not sampled from the policy (LUFFY's expert ones)
    rows: list[dict[str, Any]] | None = None  # the data rows of the prompts (what rewards read)
    tape: fast_train.Tape | None = None  # the sampler's activations (`generate(record=True)`), for training
    tool_mask: Tensor | None = None  # [N, T] the tokens tools wrote: in the context of later tokens, in no loss
    environments: list[Any] | None = None  # each completion's environment instance (llm/tools.Environments)
    final: list[str] | None = None  # with tools: each completion's text after its last tool result
    extra: dict[str, list[Any]] | None = None  # a rollout_func's other fields, one value per completion

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
            self.tape,  # used by a training pass only where these rows are the sampled ones (`Tape.usable`)
            None if self.tool_mask is None else self.tool_mask[index],
            None if self.environments is None else [self.environments[i] for i in index.tolist()],
            None if self.final is None else [self.final[i] for i in index.tolist()],
            None if self.extra is None else {k: [v[i] for i in index.tolist()] for k, v in self.extra.items()},
        )

    @property
    def span(self) -> Tensor:
        """[N, T] every token of each completion, the model's and the tools' (`completion_mask` holds the
        model's only, what the losses read)."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask | self.tool_mask

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
        tool_mask=None
        if all(r.tool_mask is None for r in rollouts)
        else torch.cat(
            [
                right((r.tool_mask if r.tool_mask is not None else torch.zeros_like(r.completion_mask)).long(), t, 0)
                for r in rollouts
            ]
        ).bool(),  # fmt: skip
        environments=None
        if any(r.environments is None for r in rollouts)
        else [e for r in rollouts for e in r.environments or []],
        final=None if any(r.final is None for r in rollouts) else [t for r in rollouts for t in r.final or []],
        extra=None
        if any(r.extra is None for r in rollouts)
        else {k: [v for r in rollouts for v in (r.extra or {})[k]] for k in rollouts[0].extra or {}},
    )


def positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _top_p_probs(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Probabilities with the tokens outside the smallest set of probability >= top_p set to 0 (not renormalized:
    sampling scales by the total; `probs` may be unnormalized, the share is of their sum)."""
    order = np.argsort(-probs, -1, kind="stable")
    ranked = np.take_along_axis(probs, order, -1)
    cumulative = np.cumsum(ranked, -1)
    ranked[cumulative - ranked >= top_p * cumulative[:, -1:]] = 0.0  # keep the token that crosses top_p
    kept = np.empty_like(probs)
    np.put_along_axis(kept, order, ranked, -1)
    return kept


@dataclass(frozen=True)
class Filters:
    """What sampling draws from, beyond softmax(logits / temperature), in transformers' order and with its
    semantics (what TRL's trainers pass to `generate`): the repetition penalty on the raw logits of every token
    already in the row (prompt and completion so far: divided by it where positive, multiplied where negative),
    then the top_k most likely tokens, the smallest set of probability >= top_p among them (renormalized), and the
    tokens of probability >= min_p times the most likely one's. 0, 1.0, 0.0 and 1.0: off."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def filtering(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def penalized(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: the logits of the tokens `seen` [B, V] in each row divided by
    `penalty` where positive and multiplied by it where negative."""
    scaled = np.where(logits > 0, logits / np.float32(penalty), logits * np.float32(penalty))
    return np.where(seen, scaled, logits).astype(np.float32)


def _filtered(probs: np.ndarray, filters: Filters) -> np.ndarray:
    """`probs` [B, V] (unnormalized) with the tokens top_k, top_p and min_p leave out set to 0."""
    if 0 < filters.top_k < probs.shape[-1]:
        kth = -np.partition(-probs, filters.top_k - 1, -1)[:, filters.top_k - 1 : filters.top_k]
        probs = np.where(probs >= kth, probs, 0.0).astype(probs.dtype)  # ties at the k-th: all kept, as transformers
    if filters.top_p < 1.0:
        probs = _top_p_probs(probs, filters.top_p)
    if filters.min_p > 0.0:
        probs = np.where(probs >= filters.min_p * probs.max(-1, keepdims=True), probs, 0.0).astype(probs.dtype)
    return probs


def sample_tokens(
    logits: np.ndarray,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
    filters: Filters = Filters(),
    seen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B], their log-probs under softmax(logits / temperature) [B]) from logits [B, V]: the most likely
    token with `greedy`, else one draw per row by inverting the CDF at a uniform from `generator` (so a run's
    tokens follow its seed, and resume restores the generator) from the distribution `filters` leave (`seen` [B,
    V]: the tokens already in each row, for the repetition penalty). The log-probs are of the unfiltered softmax,
    what training recomputes. In numpy: a handful of ~1 us calls a token."""
    scaled = logits.astype(np.float32) / np.float32(temperature)
    scaled -= scaled.max(-1, keepdims=True)
    probs = np.exp(scaled)
    total = probs.sum(-1, keepdims=True)
    log_probs = scaled - np.log(total)
    if greedy:
        tokens = log_probs.argmax(-1)
    else:
        kept = probs
        if filters.repetition_penalty != 1.0 and seen is not None:
            drawn = penalized(logits.astype(np.float32), seen, filters.repetition_penalty) / np.float32(temperature)
            kept = np.exp(drawn - drawn.max(-1, keepdims=True))
        kept = _filtered(kept, filters) if filters.filtering else kept
        cdf = np.cumsum(kept, -1, dtype=np.float64)
        uniform = torch.rand(len(logits), generator=generator, dtype=torch.float64).numpy()
        # the first token whose CDF exceeds u x total (a token of probability 0 never is that token)
        tokens = np.minimum((cdf <= (uniform * cdf[:, -1])[:, None]).sum(-1), logits.shape[-1] - 1)
    return tokens, log_probs[np.arange(len(tokens)), tokens]


def _cache_keyword(model: Any) -> str:
    """transformers 5.2x calls the KV cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


class _Decoding:
    """One model's incremental decode of a batch of left-padded prompt rows (`generate`'s three ways: the numpy
    decode, `LlamaDecoder`'s torch forward, transformers' forward with its KV cache): `logits` [N, V] for the next
    token, `advance` feeds the column of tokens drawn at step t. `prompt_ids` and `mask` are the rows as decoded:
    a context the numpy decode cannot take is concatenated to its prompt."""

    def __init__(
        self,
        model: Any,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        context_ids: Tensor | None,
        context_mask: Tensor | None,
        max_new_tokens: int,
        fast: bool,
        record: bool,
    ) -> None:
        self.model = model
        decoder = LlamaDecoder(model, weights=False) if fast and LlamaDecoder.supports(model) else None
        if context_ids is not None and context_mask is not None:
            if not bool(context_mask[:, -1].all()):
                raise ValueError("each row's context must end in a token: left-pad the contexts, none empty")
            if decoder is None or not NumpyDecoder.supports(decoder):
                prompt_ids, prompt_mask = (
                    torch.cat([prompt_ids, context_ids], -1),
                    torch.cat([prompt_mask, context_mask], -1),
                )
                context_ids = context_mask = None
        self.prompt_ids, self.prompt_mask, self.context_ids, self.context_mask = (
            prompt_ids, prompt_mask, context_ids, context_mask
        )  # fmt: skip
        n, width = prompt_ids.shape
        self.width, self.extra = width, 0 if context_ids is None else context_ids.shape[1]
        self.mask = prompt_mask.long()
        self.in_numpy: NumpyDecoder | None = None
        self.decoder = decoder
        self.logits: np.ndarray
        if decoder is not None:  # each distinct prompt is prefilled once, then its cache rows are repeated
            distinct, distinct_mask, index = shared_prompts(prompt_ids, self.mask)
            valid = torch.zeros(len(distinct), width + self.extra + max_new_tokens, dtype=torch.bool)
            valid[:, :width] = distinct_mask.bool()
            self.key_valid = valid.index_select(0, index)
            if NumpyDecoder.supports(decoder):
                self._start_numpy(decoder, distinct, distinct_mask, index, n, max_new_tokens, record)
            else:
                self.decoder = decoder = LlamaDecoder(model)  # the torch forward reads its concatenated weights
                decoder.start(len(distinct), valid.shape[1])
                logits = decoder.forward(distinct, positions(distinct_mask), valid, 0).float().index_select(0, index)
                self.logits = logits.numpy()
                decoder.repeat_rows(index)
        else:
            out = model(input_ids=prompt_ids, attention_mask=self.mask, position_ids=positions(self.mask),
                        use_cache=True)  # fmt: skip
            self.cache_keyword = _cache_keyword(model)
            self.cache, self.logits = _cache_of(out), out.logits[:, -1].float().numpy()
        self.next_position = self.mask.sum(-1).numpy()
        if context_mask is not None:
            self.next_position = self.next_position + context_mask.sum(-1).numpy()

    def _start_numpy(
        self,
        decoder: LlamaDecoder,
        distinct: Tensor,
        distinct_mask: Tensor,
        index: Tensor,
        rows: int,
        max_new_tokens: int,
        record: bool,
    ) -> None:
        """The numpy decode's prefill: each distinct prompt once (recording the sampler's tape with `record`), its
        cache rows repeated for the rows that share it, then each row's context over its prompt's cache."""
        width, extra = self.width, self.extra
        self.in_numpy = in_numpy = NumpyDecoder(decoder, len(distinct), self.key_valid.shape[1])
        if record and max_new_tokens > 1 and not extra and fast_train.supports(self.model):
            weights = fast_train.parameters_of(self.model)
            in_numpy.tape = fast_train.Tape(in_numpy, weights, index.numpy(), distinct.numpy(), rows, max_new_tokens)
        prefill_bias = causal_bias(distinct_mask.bool().numpy(), 0)
        prefilled = in_numpy.forward(distinct.numpy(), positions(distinct_mask).numpy(), prefill_bias, 0)
        self.logits = prefilled[index.numpy()]
        in_numpy.repeat_rows(index.numpy(), width)
        self.bias = np.where(self.key_valid.numpy(), np.float32(0.0), np.float32(-np.inf))
        if self.context_ids is not None and self.context_mask is not None:  # each row's context over its prompt's
            own = self.context_mask.bool().numpy()
            self.bias[:, width : width + extra] = np.where(own, np.float32(0.0), np.float32(-np.inf))
            at = self.mask.sum(-1, keepdim=True).numpy() + np.maximum(own.cumsum(-1) - 1, 0)
            keys = np.concatenate([self.key_valid[:, :width].numpy(), own], -1)
            self.logits = in_numpy.forward(self.context_ids.numpy(), at, causal_bias(keys, width), width)

    def advance(self, tokens: np.ndarray, t: int) -> np.ndarray:
        """The next logits after the tokens [N, 1] drawn at step t (finished rows hold the pad token)."""
        at = (self.next_position + t)[:, None]
        if self.in_numpy is not None:
            column = self.width + self.extra + t
            self.bias[:, column] = 0.0
            self.logits = self.in_numpy.forward(tokens, at, self.bias[:, None, : column + 1], column)
        elif self.decoder is not None:
            self.key_valid[:, self.width + t] = True
            self.logits = (
                self.decoder.forward(torch.from_numpy(tokens), torch.from_numpy(at), self.key_valid, self.width + t)
                .float()
                .numpy()
            )
        else:
            self.mask = torch.cat([self.mask, torch.ones(len(self.mask), 1, dtype=self.mask.dtype)], -1)
            out = self.model(
                input_ids=torch.from_numpy(tokens),
                attention_mask=self.mask,
                position_ids=torch.from_numpy(at),
                use_cache=True,
                **{self.cache_keyword: self.cache},
            )
            self.cache, self.logits = _cache_of(out), out.logits[:, -1].float().numpy()
        return self.logits


def geometric_mixture(logits: np.ndarray, other: np.ndarray, coef: float) -> np.ndarray:
    """(1 - coef) logits + coef other: softmax of it is the geometric mixture pi^(1 - coef) pi_other^coef,
    normalized (Nash-MD's sampling policy; each model's own normalizer is a per-row constant that softmax drops)."""
    return (np.float32(1.0 - coef) * logits.astype(np.float32)) + np.float32(coef) * other.astype(np.float32)


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
    record: bool = False,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    context_ids: Tensor | None = None,
    context_mask: Tensor | None = None,
    mixture: tuple[Any, float] | None = None,
) -> Rollout:
    """One completion per prompt row (repeat the rows for groups), after the row's `context_ids` where given
    (tokens each row already has after its prompt, left-padded, each row at least one: a tool's result after the
    completion so far). With a context the numpy decode still prefills each distinct prompt once and then only the
    rows' contexts over their prompt's cache (a group's continuations share a long prompt); the other paths run on
    prompt and context concatenated. `greedy` takes the most likely token. `fast`:
    Llama-family models run through `LlamaDecoder` (the same arithmetic without transformers' per-call cost):
    each distinct prompt prefilled once, then one token at a time, in numpy (`NumpyDecoder`) for float32 weights.
    The loop's own bookkeeping is numpy too. `record`: the numpy decode writes its activations into the rollout's
    `tape`, which the training pass at the same weights reads instead of computing its forward again. `top_k`,
    `top_p`, `min_p` and `repetition_penalty` are transformers' (`Filters`); the behaviour log-probs stay those of
    softmax(logits / temperature). `mixture` (another model of the same tokenizer, coef): the tokens are drawn from
    the `geometric_mixture` of the two models' logits (each decoded beside the other), and the log-probs are the
    mixture's (no tape)."""
    decoding = _Decoding(
        model, prompt_ids, prompt_mask, context_ids, context_mask, max_new_tokens, fast, record and mixture is None
    )
    other = None
    next_logits = decoding.logits
    if mixture is not None:
        other = _Decoding(mixture[0], prompt_ids, prompt_mask, context_ids, context_mask, max_new_tokens, fast, False)
        next_logits = geometric_mixture(next_logits, other.logits, mixture[1])
    n = len(decoding.prompt_ids)
    filters = Filters(top_k, top_p, min_p, repetition_penalty)
    seen = None
    if repetition_penalty != 1.0 and not greedy:  # the tokens in each row so far: its prompt's, then each drawn one
        seen = np.zeros((n, next_logits.shape[-1]), bool)
        for ids, held in ((prompt_ids, prompt_mask), (context_ids, context_mask)):
            if ids is not None and held is not None:
                rows, columns = held.bool().numpy().nonzero()
                seen[rows, ids.numpy()[rows, columns]] = True
    tokens = np.full((n, max_new_tokens), pad_token_id, dtype=np.int64)
    logprobs = np.zeros((n, max_new_tokens), dtype=np.float32)
    finished = np.zeros(n, dtype=bool)
    lengths = np.zeros(n, dtype=np.int64)
    for t in range(max_new_tokens):
        token, logp = sample_tokens(next_logits, temperature, greedy, generator, filters, seen)
        active = ~finished
        if seen is not None:
            seen[np.arange(n)[active], token[active]] = True
        tokens[:, t] = np.where(active, token, pad_token_id)
        logprobs[:, t] = np.where(active, logp, 0.0)
        lengths += active
        finished |= token == eos_token_id
        if finished.all() or t == max_new_tokens - 1:
            break
        next_logits = decoding.advance(tokens[:, t : t + 1], t)
        if other is not None and mixture is not None:
            next_logits = geometric_mixture(next_logits, other.advance(tokens[:, t : t + 1], t), mixture[1])
    completion_mask = torch.arange(max_new_tokens)[None, :] < torch.from_numpy(lengths)[:, None]
    tape = None if decoding.in_numpy is None else decoding.in_numpy.tape
    if tape is not None:
        tape.finish(tokens, lengths)
    return Rollout(
        decoding.prompt_ids,
        decoding.prompt_mask,
        torch.from_numpy(tokens),
        completion_mask,
        torch.from_numpy(logprobs),
        tape=tape,
    )


def token_logprobs(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    hidden: list[Tensor] | None = None,
    fast: bool = True,
    tape: fast_train.Tape | None = None,
    square_mass: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(log-probs [N, T] of the completion tokens under softmax(logits / temperature), the entropy [N, T] of that
    distribution) in one forward pass over prompt + completion (with gradients, for training). With `hidden` (a
    list), the last layer's states at the positions that predict the completion tokens, [N, T, H], are appended
    to it (what a value head reads: the state before each token). `fast`: Llama-family models run through
    `LlamaDecoder.completion_logits`, which computes each distinct prompt of the batch once (float32: in numpy,
    `fast_train`, whose forward is the sampler's `tape` where that holds these completions at these weights).
    With `square_mass` (a list), log sum_v p_v^2 of each position's distribution [N, T] (WPO's weights; no
    gradient) is appended to it. The fast passes stop at the batch's last masked-in position: the columns after it
    come back as zeros."""
    fast = fast and LlamaDecoder.supports(model)
    used = int(completion_mask.any(0).nonzero().max()) + 1 if fast and completion_mask.any() else 1
    if fast and used < completion_ids.shape[1]:
        inner: list[Tensor] | None = [] if hidden is not None else None
        mass: list[Tensor] | None = [] if square_mass is not None else None
        chosen, entropy = token_logprobs(model, prompt_ids, prompt_mask, completion_ids[:, :used],
                                         completion_mask[:, :used], temperature, inner, fast, tape, mass)  # fmt: skip
        missing = completion_ids.shape[1] - used
        if hidden is not None and inner is not None:
            hidden.append(F.pad(inner[0], (0, 0, 0, missing)))
        if square_mass is not None and mass is not None:
            square_mass.append(F.pad(mass[0], (0, missing)))
        return F.pad(chosen, (0, missing)), F.pad(entropy, (0, missing))
    logits = _completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, hidden, fast, tape)
    logits = logits / temperature
    log_probs = torch.log_softmax(logits, -1)
    chosen = log_probs.gather(-1, completion_ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    if square_mass is not None:
        with torch.no_grad():
            square_mass.append(torch.logsumexp(2.0 * log_probs, -1))
    return chosen * completion_mask, entropy


def _completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    hidden: list[Tensor] | None,
    fast: bool,
    tape: fast_train.Tape | None,
) -> Tensor:
    """The float logits [N, T, V] at the positions that predict each completion token, in one pass over prompt +
    completion: `fast_train`'s numpy pass, `LlamaDecoder`'s torch pass or the model's own forward (`fast` False,
    or a model neither supports)."""
    if fast and fast_train.supports(model):
        return fast_train.completion_logits(model, prompt_ids, prompt_mask, completion_ids, hidden, tape)
    if fast:
        return LlamaDecoder(model).completion_logits(prompt_ids, prompt_mask, completion_ids, hidden).float()
    ids = torch.cat([prompt_ids, completion_ids], -1)
    reach = completion_mask.long().flip(-1).cummax(-1).values.flip(-1)  # up to the last token in the loss, tools'
    mask = torch.cat([prompt_mask.long(), reach], -1)  # results before it included
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=hidden is not None
    )
    start = prompt_ids.shape[1] - 1
    if hidden is not None:
        hidden.append(out.hidden_states[-1][:, start:-1])
    return out.logits[:, start:-1].float()


def completion_logits(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    tape: fast_train.Tape | None = None,
) -> Tensor:
    """The logits [N, T, V] of the next-token distributions that produce each completion token (with gradients,
    for training; what distillation compares), through the same passes as `token_logprobs`. The columns after
    the batch's last masked-in position are not computed: they come back as zeros."""
    fast = LlamaDecoder.supports(model)
    used = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 1
    if not fast or used == completion_ids.shape[1]:
        return _completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, None, fast, tape)
    logits = _completion_logits(model, prompt_ids, prompt_mask, completion_ids[:, :used], completion_mask[:, :used],
                                None, fast, tape)  # fmt: skip
    return F.pad(logits, (0, 0, 0, completion_ids.shape[1] - used))


def decode(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The completions' text (special tokens dropped, masked tokens left out; tool results in)."""
    ids, mask = rollout.completion_ids.tolist(), rollout.span.tolist()
    return decode_lists(
        tokenizer, [[token for token, keep in zip(row, keeps) if keep] for row, keeps in zip(ids, mask)]
    )


def tokenize(tokenizer: Any, texts: list[str], special: bool = False) -> list[list[int]]:
    """Token ids of each text, no special tokens (`special`: the tokenizer's own, as its call adds them, e.g. a
    Llama's BOS): a fast tokenizer's Rust backend directly (what its batch call runs, without ~0.2 ms of Python
    around it, or per text ~50 us), the tokenizer's call otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None:  # its own padding is undone by the mask
        encodings = backend.encode_batch(texts, add_special_tokens=special)
        return [[i for i, real in zip(e.ids, e.attention_mask) if real] for e in encodings]
    return list(tokenizer(texts, add_special_tokens=special)["input_ids"])


def decode_lists(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """The text of each list of token ids (special tokens dropped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.batch_decode(rows, skip_special_tokens=True)
    # a fast tokenizer's Rust backend directly: `batch_decode` first walks every token in Python (to_py_obj)
    texts = backend.decode_batch(rows, skip_special_tokens=True)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        texts = [tokenizer.clean_up_tokenization(text) for text in texts]
    return texts
