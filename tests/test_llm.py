"""Language-model policies: tokenizer, generation log-probs and masks, group advantages, losses, rewards, and
learning on the built-in addition task (SFT, then RL raises exact-match accuracy)."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from policylab.cli import main
from policylab.errors import ConfigError, PolicylabError, cli_wording
from policylab.llm import LLMError
from policylab.llm.models import load_model
from policylab.llm.rollout import decode, generate, token_logprobs
from policylab.llm.tasks import TASKS, char_tokenizer, countdown_reward, get_task
from policylab.llm.trainer import HYBRID_ULD_WEIGHTS, ULD_SETTINGS, call_reward, make_config, train_llm
from policylab.objectives.advantages import GROUP_ADVANTAGES
from policylab.objectives.aggregation import aggregate
from policylab.objectives.policy import kl_penalty, pg_surrogate


def test_character_tokenizer_round_trips_and_pads_on_the_left():
    tok = char_tokenizer()
    enc = tok(["12+34=", "5+6="], padding=True, return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"].shape == (2, 6)
    assert enc["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1]
    assert tok.decode(enc["input_ids"][1], skip_special_tokens=True) == "5+6="
    assert tok.decode(tok("3*7+9")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "3*7+9"


def test_prompt_encoder_equals_the_tokenizer_and_tokenizes_each_prompt_once():
    from policylab.llm.trainer import PromptEncoder, tokenize

    tok = char_tokenizer()
    calls = []

    def counting(texts, **kwargs):
        calls.append(list(texts))
        return tok(texts, **kwargs)

    counting.pad_token_id = tok.pad_token_id  # type: ignore[attr-defined]
    fast, slow = PromptEncoder(tok), PromptEncoder(counting)  # the Rust backend's path, the tokenizer call's
    assert tokenize(tok, ["1+2="]) == [tok("1+2=", add_special_tokens=False)["input_ids"]]
    for prompts in (["12+34=", "5+6="], ["5+6=", "123+4=", "5+6="], ["1="]):
        enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        for encoder in (fast, slow):
            ids, mask = encoder(prompts)
            assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
            assert ids.dtype == enc["input_ids"].dtype and mask.dtype == enc["attention_mask"].dtype
    assert calls == [["12+34=", "5+6="], ["123+4="], ["1="]]


def test_every_text_a_run_draws_is_tokenized_before_its_first_step(tmp_path, monkeypatch):
    """As TRL maps its datasets before training: one tokenizer call at the start, none in the steps; not where
    the texts would overflow the cache."""
    import json

    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import LLMTrainer, PromptEncoder

    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(30)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for algo, overrides in (("dpo", {"pairs": str(pairs), "prompts": None}), ("sft", {}), ("grpo", {})):
        trainer = LLMTrainer(make_config(algo, {"batch_size": 4, "eval_size": 4, "max_new_tokens": 3, **overrides}))
        expected = [row["prompt"] for row in trainer.train_rows + trainer.eval_rows]
        expected += [row[key] for row in rows for key in ("prompt", "chosen", "rejected")] if algo == "dpo" else []
        expected += [row["answer"] for row in trainer.train_rows] if algo == "sft" else []
        assert set(trainer.encode_prompts.tokens) == set(expected)

        def tokenized_late(tokenizer, texts):
            raise AssertionError(f"tokenized during a step: {texts}")

        with monkeypatch.context() as patch:
            patch.setattr(trainer_module, "tokenize", tokenized_late)
            for _ in range(3):
                getattr(trainer, trainer_module.training_step(algo))()
    monkeypatch.setattr(PromptEncoder, "MAX_CACHED", 10)
    trainer = LLMTrainer(make_config("dpo", {"pairs": str(pairs), "prompts": None, "batch_size": 4, "eval_size": 4}))
    assert trainer.encode_prompts.tokens == {}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_answers_are_encoded_as_the_tokenizer_encodes_each_with_eos_and_right_padding(name):
    from policylab.llm.trainer import PromptEncoder, encode_answers

    _, tok = load_model(name)
    answers = ["42", "1234", " 7", "hello world", ""]
    ids, mask = encode_answers(tok, answers)
    cached = PromptEncoder(tok)
    for batch in (answers, answers[::-1], answers):  # the second and third from the cache
        expected_ids, expected_mask = encode_answers(tok, batch)
        got_ids, got_mask = cached.answers(batch)
        assert torch.equal(got_ids, expected_ids) and torch.equal(got_mask, expected_mask)
    for row, answer in enumerate(answers):
        expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids[row, : len(expected)].tolist() == expected and int(mask[row].sum()) == len(expected)
        assert (ids[row, len(expected) :] == tok.pad_token_id).all() and not mask[row, len(expected) :].any()


def test_sampling_draws_from_the_tempered_and_top_p_filtered_distribution():
    from policylab.llm.rollout import Filters, sample_tokens

    probs = np.array([0.1, 0.0, 0.2, 0.3, 0.4])
    logits = np.log(probs + 1e-30).astype(np.float32)[None].repeat(100_000, 0)
    generator = torch.Generator().manual_seed(0)
    cases = [(1.0, 1.0, probs), (0.5, 1.0, probs**2 / (probs**2).sum()), (1.0, 0.65, np.array([0, 0, 0, 3, 4]) / 7)]
    for temperature, top_p, expected in cases:
        tokens, logp = sample_tokens(logits, temperature, False, generator, Filters(top_p=top_p))
        assert np.abs(np.bincount(tokens, minlength=5) / len(tokens) - expected).max() < 0.01  # ~6 std errors
        tempered = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
        np.testing.assert_allclose(logp, np.log(tempered[tokens]), rtol=1e-5)  # of the unfiltered distribution
    tokens, logp = sample_tokens(logits[:3], 1.0, True, generator)
    assert tokens.tolist() == [4, 4, 4]


def test_tasks_are_deterministic_and_rewards_check_the_answer():
    addition = get_task("addition")
    rows = addition.make(5, 3)
    assert rows == addition.make(5, 3) and rows != addition.make(5, 4)
    a, b = rows[0]["prompt"].rstrip("=").split("+")
    assert rows[0]["answer"] == f"{int(a) + int(b):03d}"
    assert addition.reward(["07+05="] * 2, ["012", "12"], answer=["012", "012"]) == [1.0, 0.0]
    assert countdown_reward(["3,7,9>30:"] * 4, ["3*7+9", "9+3*7", "3+7+9", "3*"]) == [1.0, 1.0, 0.1, 0.0]
    assert countdown_reward(["9,9,9>0:"], ["9**9**9"]) == [0.0]  # powers are not expressions here
    target = TASKS["countdown"].make(3, 0)
    assert countdown_reward([r["prompt"] for r in target], [r["answer"] for r in target]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "options",
    [{"top_k": 5}, {"top_p": 0.7}, {"min_p": 0.2}, {"top_k": 8, "top_p": 0.8, "min_p": 0.05}, {"top_k": 1}],
)
def test_the_sampling_filters_keep_what_transformers_warpers_keep(options):
    """The tokens top_k, top_p and min_p leave (after a repetition penalty, at temperature 0.7) are those that
    transformers' processors, in generate's order, leave finite; the drawn tokens are among them (top_k 1: the
    most likely), and their log-probs are the unfiltered softmax's."""
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from policylab.llm.rollout import Filters, _filtered, penalized, sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 24, generator=g)
    logits[:, 5] = logits[:, 4]  # ties
    history = torch.randint(0, 24, (64, 6), generator=g)
    seen = torch.zeros(64, 24, dtype=torch.bool).scatter_(1, history, True)
    filters = Filters(**{"top_k": 0, "top_p": 1.0, "min_p": 0.0, **options}, repetition_penalty=1.5)
    penalty = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    assert np.array_equal(penalized(logits.numpy(), seen.numpy(), 1.5), penalty.numpy())
    scores = TemperatureLogitsWarper(0.7)(history, penalty)
    for key, warper in (("top_k", TopKLogitsWarper), ("top_p", TopPLogitsWarper), ("min_p", MinPLogitsWarper)):
        if key in options:
            scores = warper(options[key])(history, scores)
    drawn = penalty.numpy() / np.float32(0.7)
    ours = _filtered(np.exp(drawn - drawn.max(-1, keepdims=True)), filters)
    assert np.array_equal(ours > 0, torch.isfinite(scores).numpy())
    tokens, logp = sample_tokens(logits.numpy(), 0.7, False, g, filters, seen.numpy())
    assert torch.isfinite(scores[torch.arange(64), torch.from_numpy(tokens)]).all()
    expected = torch.log_softmax(logits / 0.7, -1)[torch.arange(64), torch.from_numpy(tokens)]
    torch.testing.assert_close(torch.from_numpy(logp), expected, atol=1e-5, rtol=1e-5)
    if options == {"top_k": 1}:
        assert np.array_equal(tokens, scores.argmax(-1).numpy())


def test_generate_with_sampling_filters_samples_what_transformers_generate_samples():
    """What `generate` draws with top_k, top_p, min_p or a repetition penalty is what transformers' generate draws
    with the same option: the total variation between the two sets of 3000 completions is within sampling noise,
    where without the option it is several times larger. top_k, top_p and min_p: each position's token
    distribution, on a model with moderately peaked next-token distributions; the penalty with the others: whole
    completions, on a sharply peaked one (whose few likely completions the penalty reorders)."""
    from collections import Counter

    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = _small_llama_config(tok, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    n = 3000
    enc = tok(["12+3="] * n, return_tensors="pt", add_special_tokens=False)
    common = dict(max_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.8)

    def ours(**options) -> torch.Tensor:
        seeded = torch.Generator().manual_seed(1)
        out = generate(model, enc["input_ids"], enc["attention_mask"], generator=seeded, **common, **options)
        return out.completion_ids

    def theirs(**options) -> torch.Tensor:
        torch.manual_seed(2)
        with torch.no_grad():
            return model.generate(**enc, do_sample=True, **common, **options)[:, enc["input_ids"].shape[1] :]

    def tv(a: Counter, b: Counter) -> float:
        return 0.5 * sum(abs(a[k] - b[k]) for k in a.keys() | b.keys()) / n

    def per_position(a: torch.Tensor, b: torch.Tensor) -> float:
        return max(tv(Counter(a[:, i].tolist()), Counter(b[:, i].tolist())) for i in range(3))

    def whole(a: torch.Tensor, b: torch.Tensor) -> float:
        return tv(Counter(map(tuple, a.tolist())), Counter(map(tuple, b.tolist())))

    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    for option in ({"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.2}):
        reference = theirs(**option)
        assert per_position(ours(**option), reference) < 0.09, option
        assert per_position(ours(), reference) > 0.15, option
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    options = {"top_k": 6, "top_p": 0.95, "min_p": 0.02, "repetition_penalty": 3.0}
    reference = theirs(**options)
    assert whole(ours(**options), reference) < 0.06
    assert whole(ours(**{**options, "repetition_penalty": 1.0}), reference) > 0.15


def test_a_runs_sampling_settings_reach_its_sampler_and_its_workers(sft_model):
    """top_k=1 leaves the most likely token only: a run's sampled completions, in the learner and in a
    generation worker, are then its greedy ones. Out-of-range values are one error naming the fix."""
    from policylab.llm.trainer import LLMTrainer

    for workers in ({}, {"generation_workers": 1, "generation_backend": "inline"}):
        settings = {"model": str(sft_model.dir), "top_k": 1, "repetition_penalty": 1.0, "batch_size": 4, **workers}
        trainer = LLMTrainer(make_config("grpo", settings))
        rows = trainer.train_rows[:6]
        sampled, greedy = trainer.rollout(rows)[1], trainer.rollout(rows, greedy=True)[1]
        assert sampled == greedy, workers
        if trainer.workers is not None:
            trainer.workers.close()
    for settings, message in (({"top_k": -1}, "top_k=-1 must be >= 0"), ({"min_p": 1.0}, r"min_p=1.0 in \[0, 1\)"),
                              ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 > 0")):  # fmt: skip
        with pytest.raises(ConfigError, match=message) as info:
            make_config("grpo", settings)
        assert "top_k=0, min_p=0 and repetition_penalty=1.0 (off)" in (info.value.fix or "")


@pytest.mark.parametrize(
    "order", [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [2, 0, 1, 0, 0, 2, 1, 0, 0]], ids=["groups", "scattered"]
)
def test_rows_attend_to_their_prompts_shared_keys_and_sample_what_transformers_does(order):
    """Rows that share a prompt (GRPO's groups, or any order and group sizes): the numpy decode's attention reads
    each prompt's keys and values once for all its rows (NumpyDecoder.shared) instead of the rows' copies. Greedy
    and sampled, with and without a context after the prompt: the tokens and log-probs of transformers' forward
    (fast=False)."""
    from policylab.llm.fast_decode import LlamaDecoder, NumpyDecoder

    model, tok = load_model("tiny-llama", seed=0)
    model.eval()
    prompts = ["12+34=", "5+6=", "99+1="]
    enc = tok([prompts[i] for i in order], padding=True, return_tensors="pt", add_special_tokens=False)
    ctx = tok([["4", "46", "1"][i % 3] for i in range(len(order))], padding=True, return_tensors="pt",
              add_special_tokens=False)  # fmt: skip
    options = {"max_new_tokens": 6, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    for context in ({}, {"context_ids": ctx["input_ids"], "context_mask": ctx["attention_mask"]}):
        for greedy, seed in ((True, 0), (False, 5)):
            runs = [generate(model, enc["input_ids"], enc["attention_mask"], greedy=greedy, fast=fast,
                             generator=torch.Generator().manual_seed(seed), **context, **options)
                    for fast in (True, False)]  # fmt: skip
            assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
            torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-5, rtol=1e-5)
    decoder = NumpyDecoder(LlamaDecoder(model, weights=False), 3, 16)
    decoder.repeat_rows(np.array(order), 6)
    assert decoder.shared is not None and decoder.shared.width == 6
    assert decoder.shared.group == max(order.count(i) for i in range(3))
    distinct = NumpyDecoder(LlamaDecoder(model, weights=False), 3, 16)
    distinct.repeat_rows(np.arange(3), 6)  # every row its own prompt: nothing to share
    assert distinct.shared is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_generation_log_probs_equal_recomputed_ones_and_masks_end_at_eos(name):
    model, tok = load_model(name, seed=0)
    model.eval()
    enc = tok(["12+34=", "5+6=", "99+1="] * 4, padding=True, return_tensors="pt", add_special_tokens=False)
    rollout = generate(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    logp, entropy = token_logprobs(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, 0.7
    )
    torch.testing.assert_close(logp, rollout.logprobs, atol=1e-5, rtol=1e-5)
    assert (entropy >= 0).all()
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        length = sum(mask)
        assert mask == [True] * length + [False] * (6 - length)
        assert tok.eos_token_id not in ids[: length - 1]  # nothing is generated after EOS
        assert length == 6 or ids[length - 1] == tok.eos_token_id
        assert all(t == tok.pad_token_id for t in ids[length:])
    # a padded prompt generates what it generates unpadded (position ids and masks ignore the padding)
    alone = tok(["5+6="], return_tensors="pt", add_special_tokens=False)
    greedy = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, greedy=True)
    batched = generate(model, enc["input_ids"][1:2], enc["attention_mask"][1:2], **greedy)
    single = generate(model, alone["input_ids"], alone["attention_mask"], **greedy)
    assert batched.completion_ids.tolist() == single.completion_ids.tolist()
    torch.testing.assert_close(batched.logprobs, single.logprobs, atol=1e-5, rtol=1e-5)


def test_stop_strings_cut_the_completion_after_their_first_occurrence():
    """`stop`: the same samples as without it (the cut draws nothing more), each cut after its first stop string,
    the tokens after it out of the mask; the sampler's tape is not kept for such a batch."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"batch_size": 2, "group_size": 4, "eval_size": 4}
    plain = LLMTrainer(make_config("grpo", settings))
    rows = [row for row in plain.train_rows[:2] for _ in range(4)]
    _, texts = plain.rollout(rows)
    stop = next(c for text in texts for c in text[1:])  # a character some completion has after its first
    stopped = LLMTrainer(make_config("grpo", {**settings, "stop": [stop]}))
    cut, cut_texts = stopped.rollout(rows)
    for before, after in zip(texts, cut_texts):
        assert after == (before[: before.index(stop) + 1] if stop in before else before)
    assert (cut.logprobs[~cut.completion_mask] == 0).all() and cut.tape is None
    assert stopped.stopped(cut).tolist() == [stop in text for text in texts]


def test_group_advantages_match_hand_computed_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # two groups of 4
    std = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    grpo = GROUP_ADVANTAGES.get("grpo")(rewards, 4)
    torch.testing.assert_close(grpo[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    torch.testing.assert_close(grpo[4:], torch.tensor([0.25, 0.25, -0.75, 0.25]) / (0.5 + 1e-4))
    dr = GROUP_ADVANTAGES.get("dr_grpo")(rewards, 4)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25]))
    rloo = GROUP_ADVANTAGES.get("rloo")(rewards, 4)
    assert rloo[0].item() == pytest.approx(1.0 - (0 + 0 + 1) / 3)  # r_i minus the mean of the others
    assert rloo[6].item() == pytest.approx(0.0 - 1.0)
    batch = GROUP_ADVANTAGES.get("grpo_batch")(rewards, 4)  # the group means; the batch's std: 5/8 ones, Bessel
    torch.testing.assert_close(batch, dr / (math.sqrt((5 * 0.375**2 + 3 * 0.625**2) / 7) + 1e-4))
    rpp = GROUP_ADVANTAGES.get("reinforce++")(rewards, 4)
    assert rpp.mean().item() == pytest.approx(0.0, abs=1e-6) and rpp.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(GROUP_ADVANTAGES.get("grpo")(torch.ones(4), 4), torch.zeros(4))  # no signal, no update


def test_steps_per_generation_samples_once_and_steps_on_each_slice_of_groups_in_turn(sft_model, monkeypatch):
    """TRL's steps_per_generation: one generation of 2 x batch_size prompts' groups, advantages over all of it, then
    an optimizer step on each slice of batch_size whole groups, in order, updates_per_batch times."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "batch_size": 2, "group_size": 4, "steps_per_generation": 2,
                "updates_per_batch": 2}  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", settings))
    drawn, seen, steps = [], [], []
    real_rows, real_step = trainer.sample_rows, trainer._step
    monkeypatch.setattr(trainer, "sample_rows", lambda n: drawn.append(n) or real_rows(n))
    monkeypatch.setattr(trainer, "_step", lambda: steps.append(len(seen)) or real_step())
    real_accumulate = trainer.accumulate

    def accumulate(rollout, advantages, scale):
        seen.append(([row["prompt"] for row in rollout.rows], advantages.clone()))
        return real_accumulate(rollout, advantages, scale)

    monkeypatch.setattr(trainer, "accumulate", accumulate)
    rollout, rewards, metrics = trainer.sample_groups()
    monkeypatch.setattr(trainer, "sample_groups", lambda: (rollout, rewards, metrics))
    trainer.rl_step()
    assert drawn == [4] and steps == [1, 2, 3, 4]  # one generation of 4 prompts; four optimizer steps
    prompts = [row["prompt"] for row in rollout.rows]
    expected = GROUP_ADVANTAGES.get("grpo")(rewards, 4)
    for i, (rows, advantages) in enumerate(seen):
        part = slice(0, 8) if i % 2 == 0 else slice(8, 16)  # slice 1, slice 2, slice 1, slice 2
        assert rows == prompts[part] and torch.equal(advantages, expected[part])


def test_rlootrainer_options_clip_the_rewards_then_whiten_the_scored_advantages(sft_model, monkeypatch):
    """TRL's RLOOConfig reward_clip_range and normalize_advantages: the rewards clipped before the group estimator,
    its advantages whitened over the scored completions (Bessel std), 0 on the unscored one."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "batch_size": 2, "group_size": 4, "reward_clip_range": [-1.0, 1.0],
                "normalize_advantages": True}  # fmt: skip
    trainer = LLMTrainer(make_config("rloo", settings))
    rollout, _, metrics = trainer.sample_groups()
    rewards = torch.tensor([2.0, -3.0, 0.5, 0.0, 1.0, float("nan"), 0.25, -0.5])
    seen = []
    monkeypatch.setattr(trainer, "sample_groups", lambda: (rollout, rewards, metrics))
    monkeypatch.setattr(trainer, "accumulate", lambda r, advantages, scale: seen.append(advantages) or {"entropy": 0})
    trainer.rl_step()
    clipped = [1.0, -1.0, 0.5, 0.0]  # group 1; group 2's scored: 1.0, 0.25, -0.5
    loo = [c - (sum(clipped) - c) / 3 for c in clipped] + [1.0 - (-0.25) / 2, 0.0, 0.25 - 0.5 / 2, -0.5 - 1.25 / 2]
    scored = [x for i, x in enumerate(loo) if i != 5]
    mean = sum(scored) / 7
    std = math.sqrt(sum((x - mean) ** 2 for x in scored) / 6)
    expected = torch.tensor([0.0 if i == 5 else (x - mean) / (std + 1e-4) for i, x in enumerate(loo)])
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ConfigError, match=r"reward_clip_range=\[1.0, 0.0\] must be \[low, high\]"):
        make_config("rloo", {"reward_clip_range": [1.0, 0.0]})


def test_kl_in_reward_subtracts_the_sequences_k1_kl_from_its_reward_as_rloo_trainer(sft_model, monkeypatch):
    """TRL's RLOOTrainer puts its KL in the reward: kl_coef x sum_t (log pi_old - log pi_ref) off each completion's
    reward before the leave-one-out advantages, and no KL term in the loss."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "batch_size": 2, "group_size": 4, "kl_coef": 0.1, "kl_in_reward": True}
    trainer = LLMTrainer(make_config("rloo", settings))
    with torch.no_grad():  # a reference apart from the policy, so that the KL is not 0
        for p in trainer.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout, rewards, metrics = trainer.sample_groups()
    mask = rollout.completion_mask
    with torch.no_grad():
        ids = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask)
        ref, _ = token_logprobs(trainer.reference, *ids)
    kl = ((rollout.logprobs - ref) * mask).sum(-1)
    assert kl.abs().max() > 0.01
    seen = []
    monkeypatch.setattr(trainer, "sample_groups", lambda: (rollout, rewards, metrics))
    monkeypatch.setattr(trainer, "accumulate", lambda r, advantages, scale: seen.append(advantages) or {"entropy": 0})
    trainer.rl_step()
    torch.testing.assert_close(seen[0], GROUP_ADVANTAGES.get("rloo")(rewards - 0.1 * kl, 4))
    assert "kl" not in trainer.policy_loss(rollout, seen[0])[1]  # not in the loss too
    with pytest.raises(ConfigError, match="kl_in_reward=True would do nothing"):
        make_config("rloo", {"kl_in_reward": True})
    with pytest.raises(ConfigError, match="which kl_estimator would not keep"):
        make_config("rloo", {"kl_coef": 0.1, "kl_in_reward": True, "kl_estimator": "k2"})


def test_sft_with_dft_weights_each_tokens_nll_by_its_held_probability_and_learns(sft_model, tmp_path, monkeypatch):
    """TRL's SFTConfig loss_type="dft" (Dynamic Fine-Tuning): the token mean of -p log p with p held constant;
    continuing from the SFT model at lr 3e-4 it raises exact match as NLL does (from random weights, where every p
    is about 1/V, it barely moves: it is a fine-tuning loss)."""
    from policylab.llm.trainer import LLMTrainer, expert_completion

    trainer = LLMTrainer(make_config("sft", {"model": str(sft_model.dir), "batch_size": 4, "sft_loss": "dft"}))
    rows = trainer.train_rows[:4]
    ids, mask = trainer.encode_prompts([row["prompt"] for row in rows])
    answer_ids, answer_mask = trainer.encode_prompts.answers([expert_completion(row) for row in rows])
    with torch.no_grad():
        logp, _ = token_logprobs(trainer.model, ids, mask, answer_ids, answer_mask)
    expected = float(-(logp.exp() * logp)[answer_mask].mean())
    monkeypatch.setattr(trainer, "sample_rows", lambda n: rows)
    assert trainer.sft_step()["loss"] == pytest.approx(expected, rel=1e-5)
    settings = {"model": str(sft_model.dir), "steps": 150, "batch_size": 64, "eval_every": 150, "lr": 3e-4,
                "sft_loss": "dft"}  # fmt: skip
    run = train_llm("sft", settings, tmp_path, verbose=False)
    assert run.final_eval["accuracy"] >= run.initial_eval["accuracy"] + 0.2, (run.initial_eval, run.final_eval)


def test_gdpo_normalizes_each_reward_in_its_group_then_the_weighted_sum_over_the_batch():
    from policylab.objectives.advantages import decoupled_group_advantages

    rewards = torch.tensor([[1.0, 0.5], [0.0, 0.1], [1.0, 0.2], [1.0, 0.6]])  # two groups of 2, two functions
    s = math.sqrt(0.5)  # Bessel std of (1, 0); (1, 1): 0; (0.5, 0.1) and (0.2, 0.6): sqrt(0.08)
    first = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0]
    second = [x / (math.sqrt(0.08) + 1e-4) for x in (0.2, -0.2, -0.2, 0.2)]
    summed = [a + 0.5 * b for a, b in zip(first, second)]
    mean = sum(summed) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in summed) / 3)
    expected = torch.tensor([(x - mean) / (std + 1e-4) for x in summed])
    torch.testing.assert_close(decoupled_group_advantages(rewards, torch.tensor([1.0, 0.5]), 2), expected)


def test_gdpo_scores_each_reward_function_and_refuses_what_it_replaces(sft_model, monkeypatch):
    """Under multi_objective_aggregation=normalize_then_sum the step's rewards are one column per reward function
    (and one for the overlong penalty), their weighted sum is the logged reward, and the advantages are GDPO's."""
    from policylab.llm.rewards import exact_match, numeric_match
    from policylab.llm.trainer import LLMTrainer
    from policylab.objectives.advantages import decoupled_group_advantages

    settings = {"model": str(sft_model.dir), "batch_size": 4, "group_size": 4, "overlong_buffer": 2,
                "rewards": ["exact_match", "numeric_match=0.5"],
                "multi_objective_aggregation": "normalize_then_sum"}  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", settings))
    rollout, rewards, metrics = trainer.sample_groups()
    rows, completions = rollout.rows, decode(trainer.tokenizer, rollout)
    prompts = [row["prompt"] for row in rows]
    answers = [row["answer"] for row in rows]
    lengths = rollout.completion_mask.sum(-1).float()
    penalty = -((lengths - (trainer.max_new_tokens - 2)) / 2).clamp(0.0, 1.0)
    expected = torch.stack([torch.tensor(exact_match(prompts, completions, answers)),
                            torch.tensor(numeric_match(prompts, completions, answers)), penalty], 1)  # fmt: skip
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(trainer.reward_weights, torch.tensor([1.0, 0.5, 1.0]))
    assert metrics["reward"] == pytest.approx(float((expected @ torch.tensor([1.0, 0.5, 1.0])).mean()), rel=1e-6)
    seen = []
    monkeypatch.setattr(trainer, "sample_groups", lambda: (rollout, rewards, metrics))
    monkeypatch.setattr(trainer, "accumulate", lambda r, advantages, scale: seen.append(advantages) or {"entropy": 0})
    trainer.rl_step()
    torch.testing.assert_close(seen[0], decoupled_group_advantages(expected, trainer.reward_weights, 4))
    for extra, message in (({"advantage": "rloo"}, "in place of advantage=rloo"),
                           ({"mix": "luffy"}, "expert completions have no reward per function"),
                           ({"multi_objective_aggregation": "sum"}, "is not one of")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            make_config("grpo", {"multi_objective_aggregation": "normalize_then_sum", **extra})


def test_dr_grpo_aggregation_divides_by_rows_times_padded_length():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((1 + 2 + 4) / 6)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)


def test_kl_estimators_average_to_the_closed_form_kl_under_the_policy():
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.5, 0.3])
    kl = (pi * (pi / ref).log()).sum()
    for estimator in ("k1", "k3"):
        estimate = (pi * kl_penalty(pi.log(), ref.log(), estimator)).sum()
        torch.testing.assert_close(estimate, kl)
    k2 = (pi * kl_penalty(pi.log(), ref.log(), "k2")).sum()
    assert k2.item() == pytest.approx((pi * 0.5 * (ref / pi).log() ** 2).sum().item())
    assert (kl_penalty(pi.log(), ref.log(), "k3") >= 0).all()


def test_grpo_with_one_update_per_batch_is_reinforce_with_the_group_mean_baseline_scaled_by_the_std():
    torch.manual_seed(0)
    weights = torch.randn(8, 5, requires_grad=True)
    logp = torch.log_softmax(weights, -1)[:, :3]  # stands for the per-token log-probs of 8 completions
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]] * 2, dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.2])
    advantages = GROUP_ADVANTAGES.get("grpo")(rewards, 4)
    loss, _ = pg_surrogate(
        logp, logp.detach(), advantages[:, None].expand_as(logp), mask=mask, aggregation="seq-mean-token-mean"
    )
    (grad,) = torch.autograd.grad(loss, weights, retain_graph=True)
    groups = rewards.view(2, 4)
    baseline = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    per_sequence = (logp * mask).sum(-1) / mask.sum(-1)
    (expected,) = torch.autograd.grad(-(per_sequence * baseline).mean(), weights)
    torch.testing.assert_close(grad, expected)


def test_a_reward_function_returns_none_where_it_does_not_apply():
    """None (TRL's "this function does not apply") is NaN: a weighted sum counts the functions that apply, and is
    NaN where none does; a NaN returned as a number is still an error."""
    from policylab.llm.rewards import checked_call, combine_rewards

    def math_only(prompts, completions, **_):
        return [1.0 if "+" in p else None for p in prompts]

    def length(prompts, completions, **_):
        return [float(len(c)) if len(c) < 3 else None for c in completions]

    values = checked_call(math_only, ["1+1=", "hi"], ["2", "yo"], {})
    assert values[0] == 1.0 and math.isnan(values[1])
    combined = combine_rewards([math_only, (length, 0.5)])(["1+1=", "hi", "2+2="], ["2", "abc", "toolong"])
    assert combined[:1] == [1.0 + 0.5 * 1.0] and math.isnan(combined[1]) and combined[2] == 1.0

    def nan(prompts, completions, **_):
        return [float("nan")] * len(completions)

    with pytest.raises(LLMError, match="nan returned NaN or inf") as info:
        checked_call(nan, ["a"], ["b"], {})
    assert "None where it does not apply" in (info.value.fix or "")


def test_every_group_advantage_leaves_unscored_completions_out_by_hand():
    from policylab.objectives.advantages import decoupled_group_advantages

    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, nan, 1.0, nan, nan, nan, 1.0])  # groups of 4: three scored, one scored
    s = math.sqrt(1 / 3)  # Bessel std of (1, 0, 1)
    grpo = [(1 / 3) / (s + 1e-4), (-2 / 3) / (s + 1e-4), 0.0, (1 / 3) / (s + 1e-4), 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(GROUP_ADVANTAGES.get("grpo")(rewards, 4), torch.tensor(grpo))
    dr = torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(GROUP_ADVANTAGES.get("dr_grpo")(rewards, 4), dr)
    rloo = [0.5, -1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]  # against the mean of the others scored; alone: 0
    torch.testing.assert_close(GROUP_ADVANTAGES.get("rloo")(rewards, 4), torch.tensor(rloo))
    torch.testing.assert_close(GROUP_ADVANTAGES.get("grpo_batch")(rewards, 4), dr / (0.5 + 1e-4))  # std of 1, 0, 1, 1
    rpp = torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3, 0.0, 0.0, 0.0, 0.0]) / (math.sqrt(2 / 9) + 1e-4)
    torch.testing.assert_close(GROUP_ADVANTAGES.get("reinforce++")(rewards, 4), rpp)
    # GDPO: two groups of 2, two functions; the second applies to the second group only
    parts = torch.tensor([[1.0, nan], [0.0, nan], [nan, 0.2], [1.0, 0.6]])
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 0.5 * 0.2 / (math.sqrt(0.08) + 1e-4)
    summed = [a, -a, -b, b]  # row 3's first function is alone in its group: 0
    std = math.sqrt(sum(x * x for x in summed) / 3)
    expected = torch.tensor([x / (std + 1e-4) for x in summed])
    torch.testing.assert_close(decoupled_group_advantages(parts, torch.tensor([1.0, 0.5]), 2), expected)
    assert torch.equal(GROUP_ADVANTAGES.get("grpo")(torch.full((4,), nan), 4), torch.zeros(4))


def test_grpo_trains_on_the_completions_a_reward_applies_to_and_the_others_refuse_none(sft_model, monkeypatch):
    """A reward that returns None for some prompts: GRPO gives those completions advantage 0 and logs the mean of
    the others; PPO, online DPO and A*-PO, which need a reward for each completion, stop with one error."""
    from policylab.llm.trainer import LLMInputs, LLMTrainer

    def odd_sums(prompts, completions, answer, **_):
        return [float(c.strip() == a) if int(a) % 2 else None for c, a in zip(completions, answer)]

    inputs = LLMInputs(rewards=[odd_sums])
    trainer = LLMTrainer(make_config("grpo", {"model": str(sft_model.dir), "batch_size": 8, "group_size": 4}), inputs)
    rollout, rewards, metrics = trainer.sample_groups()
    unscored = torch.isnan(rewards)
    assert unscored.any() and (~unscored).any()
    assert metrics["reward"] == pytest.approx(float(rewards[~unscored].mean()))
    seen = []
    monkeypatch.setattr(trainer, "sample_groups", lambda: (rollout, rewards, metrics))
    monkeypatch.setattr(trainer, "accumulate", lambda r, advantages, scale: seen.append(advantages) or {"entropy": 0})
    trainer.rl_step()
    assert torch.isfinite(seen[0]).all() and (seen[0][unscored] == 0).all()
    for algo in ("ppo", "online_dpo", "a2po"):
        with pytest.raises(LLMError, match=f"returned None .* and {algo} needs a reward for every completion"):
            run = LLMTrainer(make_config(algo, {"model": str(sft_model.dir), "batch_size": 8, "group_size": 4}), inputs)
            getattr(run, {"ppo": "ppo_step", "online_dpo": "online_dpo_step", "a2po": "a2po_step"}[algo])()


def test_a_misbehaving_reward_function_is_one_clear_error_naming_it():
    task = get_task("addition")
    rows = task.make(2, 0)

    def raises(prompts, completions, **_):
        raise KeyError("answer")

    def too_few(prompts, completions, **_):
        return [1.0]

    def not_numbers(prompts, completions, **_):
        return ["yes", "no"]

    cases = ((raises, "raised KeyError"), (too_few, "returned 1 values for 2"), (not_numbers, "returned a non-number"))
    for fn, message in cases:
        bad = type(task)(task.name, task.summary, task.make, fn, task.max_new_tokens)
        with pytest.raises(LLMError, match=f"{fn.__name__} {message}"):
            call_reward(bad, [r["prompt"] for r in rows], ["1", "2"], rows)

    def wants_level(prompts, completions, level, **_):
        return [1.0] * len(completions)

    bad = type(task)(task.name, task.summary, task.make, wants_level, task.max_new_tokens)
    with pytest.raises(LLMError, match="missing 1 required .*'level'") as info:
        call_reward(bad, [r["prompt"] for r in rows], ["1", "2"], rows)
    assert info.value.fix == (
        "give every row the fields the function takes (the rows have: answer), or pass another reward (--reward)"
    )


def test_settings_are_checked():
    with pytest.raises(Exception, match="unknown algorithm 'grpp'.*grpo"):
        make_config("grpp")
    with pytest.raises(Exception, match="unknown config key 'group'"):
        make_config("grpo", {"group": 4})
    with pytest.raises(Exception, match="compares completions within a group"):
        make_config("rloo", {"group_size": 1})
    assert make_config("dapo").clip_high == 0.28 and make_config("sft").lr == 3e-3


def test_a_missing_llm_extra_is_one_error_with_the_pip_command(monkeypatch):
    from policylab.llm import require_llm

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(LLMError, match=r"need the llm extra (?s:.)*pip install 'policylab\[llm\]'"):
        require_llm()


def test_the_control_side_imports_without_transformers():
    code = "import sys, policylab, policylab.cli; assert 'transformers' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny Llama after 300 SFT steps on addition: partly correct (about a third of the answers)."""
    overrides = {"steps": 300, "batch_size": 64, "eval_every": 300, "eval_size": 200}
    return train_llm("sft", overrides, tmp_path_factory.mktemp("runs"), verbose=False)


def headroom_closed(run) -> float:
    """The share of the way from its first evaluation's exact match to 1 that a run's training closed: a bar on it
    holds from start models of different accuracy, where a bar on the gain favours the weaker ones."""
    start = run.initial_eval["accuracy"]
    return (run.final_eval["accuracy"] - start) / (1.0 - start)


def test_max_length_keeps_each_examples_first_tokens():
    """TRL's max_length with truncation_mode keep_start, on the examples the given-completion algorithms train on:
    a completion keeps what its prompt leaves of max_length; a longer prompt its first max_length tokens and no
    completion token; an SFT batch and a DPO batch come cut so; GRPO refuses the setting (it samples)."""
    from policylab.errors import ConfigError
    from policylab.llm.trainer import LLMTrainer, truncated

    sft = LLMTrainer(make_config("sft", {"batch_size": 2, "max_length": 7}))
    prompt_ids, prompt_mask = sft.encode_prompts(["12+34=", "5+6="])
    ids, mask = sft.encode_prompts.answers(["46", "11"])
    full = (prompt_ids, prompt_mask, ids, mask)
    assert truncated(*full, None, 0) == full and truncated(*full, 9, 0) == full  # everything fits: unchanged
    p, pm, i, m = truncated(*full, 7, 0)
    assert torch.equal(p, prompt_ids) and torch.equal(i, ids)  # 6 + 1 and 4 + 3 tokens
    assert m.tolist() == [[True, False, False], [True, True, True]]
    p, pm, i, m = truncated(*full, 5, 0)  # the first prompt cut to its first 5 tokens, the second keeps one
    assert sft.tokenizer.decode(p[0][pm[0].bool()]) == "12+34" and m.tolist() == [[False], [True]]
    assert sft.tokenizer.decode(p[1][pm[1].bool()]) == "5+6=" and i.shape == (2, 1)
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "5+6=", "answer": "11"}]
    assert sft.sft_batch(rows)[3].tolist() == [[True, False, False], [True, True, True]]
    dpo = LLMTrainer(make_config("dpo", {"batch_size": 2, "max_length": 7}))
    pairs = dpo.encode_pairs([("12+34=", "46", "47"), ("5+6=", "11", "12")])
    assert pairs[3].tolist() == [[True, False, False], [True, True, True]] * 2  # chosen, then rejected
    with pytest.raises(ConfigError, match=r"grpo does not use max_length=7"):
        make_config("grpo", {"max_length": 7})


def test_sft_makes_the_tiny_model_partly_correct(sft_model):
    assert sft_model.initial_eval["accuracy"] == 0.0
    assert 0.1 <= sft_model.final_eval["accuracy"] <= 0.8
    assert (sft_model.dir / "model" / "model.safetensors").is_file()
    with open(sft_model.dir / "train.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("algo", "extra"),
    [
        ("grpo", {}),
        ("rloo", {}),
        ("grpo", {"loss": "vespo", "aggregation": "token-mean"}),
        ("grpo", {"loss": "luspo", "clip_low": 3e-4, "clip_high": 4e-4}),
        ("gmpo", {}),
        ("grpo", {"multi_objective_aggregation": "normalize_then_sum"}),
        ("grpo", {"steps_per_generation": 2}),
        ("grpo", {"replay_buffer_size": 64}),
    ],
)
def test_rl_raises_exact_match_accuracy_over_the_sft_model(sft_model, tmp_path, algo, extra):
    """60 steps close at least a quarter of the way from the SFT model's exact match to 1 (`headroom_closed`): from
    this SFT model (0.37) every configuration closed 0.52-0.64 on seeds 0 and 1, from one of another SFT seed (0.72)
    0.38-0.66, where their absolute gains there (0.11-0.19) fell under the former bar of 0.15."""
    overrides = {"model": str(sft_model.dir), "steps": 60, "batch_size": 32, "group_size": 8, "eval_every": 60}
    overrides.update(extra)
    run = train_llm(algo, overrides, tmp_path, verbose=False)
    assert run.initial_eval["accuracy"] == pytest.approx(sft_model.final_eval["accuracy"])
    assert headroom_closed(run) >= 0.25, (run.initial_eval, run.final_eval)


def test_the_progress_lines_of_a_language_model_run_show_its_accuracy(sft_model, tmp_path, capsys):
    settings = {"model": str(sft_model.dir), "steps": 2, "eval_every": 1, "batch_size": 4, "eval_size": 8}
    run = train_llm("dpo", settings, tmp_path)  # not a terminal: a progress line per 10% of the steps
    lines = [line for line in capsys.readouterr().out.splitlines() if "/2 steps" in line]
    assert lines and lines[-1].endswith(f"accuracy {run.final_eval['accuracy']:.3f}"), lines


def test_cli_trains_and_evaluates_and_refuses_a_missing_model(tmp_path, capsys):
    assert (
        main(
            [
                "llm",
                "sft",
                "--steps",
                "3",
                "--runs-dir",
                str(tmp_path),
                "--no-progress",
                "--name",
                "s",
                "--set",
                "batch_size=4",
                "--set",
                "eval_size=8",
            ]
        )
        == 0
    )
    code = "from policylab.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    argv = ["llm", "eval", str(tmp_path / "s"), "--k", "2", "--json"]
    # a fresh process: transformers' progress bars in their default state
    evaluation = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert '"pass@2"' in evaluation.stdout and "Loading weights" not in evaluation.stderr  # no bar of theirs
    assert main(["llm", "train", "grpo", "--model", str(tmp_path / "missing"), "--steps", "2"]) == 2
    assert "no model at" in capsys.readouterr().err


# --- loss variants, sampling options, mixing, prompt files -------------------------------------------------------


def test_gspo_clips_the_length_normalized_sequence_ratio():
    from policylab.objectives.policy import gspo_surrogate, sequence_log_ratio

    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.2, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(sequence_log_ratio(logp, old, mask), torch.tensor([0.2, 0.0]))
    advantages = torch.tensor([1.0, -1.0])
    loss, metrics = gspo_surrogate(logp, old, advantages, mask, clip_low=0.1, clip_high=0.1)
    # row 0: s = e^0.2 > 1.1 with A > 0 -> clipped (1.1, no gradient); row 1: s = 1 -> -(1 * -1) = 1
    assert loss.item() == pytest.approx((-1.1 * 1.0 + 1.0) / 2)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.all(logp.grad[0] == 0) and torch.allclose(logp.grad[1], torch.full((3,), 1 / 6))


def test_gspo_token_takes_the_sequence_ratio_at_each_token_with_the_tokens_own_gradient():
    from policylab.objectives.aggregation import aggregate
    from policylab.objectives.policy import gspo_surrogate, gspo_token_surrogate

    old = torch.tensor([[-1.2, -2.2, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    per_token = torch.tensor([[2.0, -1.0, 0.0], [0.5, 1.0, -2.0]])  # advantages that differ along a sequence
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.45, -0.5, -0.55]], requires_grad=True)
    loss, metrics = gspo_token_surrogate(logp, old, per_token, mask, clip_low=0.1, clip_high=0.1)
    # s = e^0.2 (row 0) and 1 (row 1) at every token; row 0's tokens: A > 0 clipped to 1.1 (no gradient), A < 0
    # the larger of -s A and -1.1 A, e^0.2 (unclipped); row 1 unclipped: -A_t, gradient -A_t s through the
    # token's own logp
    token_losses = torch.tensor([[-1.1 * 2.0, math.exp(0.2), 0.0], [-0.5, -1.0, 2.0]])
    assert loss.item() == pytest.approx(float(aggregate(token_losses, mask, "token-mean")), rel=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(1 / 5)
    loss.backward()
    expected = torch.tensor([[0.0, math.exp(0.2), 0.0], [-0.5, -1.0, 2.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)
    # one advantage per sequence: GSPO's gradient under seq-mean-token-mean (the paper's equivalence)
    advantages = torch.tensor([-1.0, 0.5])
    grads = []
    for fn in (gspo_surrogate, gspo_token_surrogate):
        point = logp.detach().clone().requires_grad_(True)
        extra = {"aggregation": "seq-mean-token-mean"} if fn is gspo_token_surrogate else {}
        given = advantages[:, None].expand(2, 3) if fn is gspo_token_surrogate else advantages
        fn(point, old, given, mask, clip_low=0.1, clip_high=0.1, **extra)[0].backward()
        grads.append(point.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_cispo_keeps_a_gradient_on_clipped_tokens_with_a_constant_clipped_weight():
    from policylab.objectives.policy import cispo_loss

    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.1]])  # ratios e (clipped to 1.28) and e^-0.1
    loss, metrics = cispo_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([[1.28, math.exp(-0.1)]]) / 2)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)


def test_luspo_scales_each_sequences_clipped_surrogate_by_its_length():
    from policylab.objectives.policy import luspo_surrogate

    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.2, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, metrics = luspo_surrogate(logp, old, torch.tensor([1.0, -1.0]), mask, clip_low=0.1, clip_high=0.1)
    # GSPO's per-sequence losses (-1.1: clipped, 1.0) times the lengths 2 and 3, averaged over the 2 sequences
    assert loss.item() == pytest.approx((-1.1 * 2 + 1.0 * 3) / 2)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()  # row 1: d/dlogp_t of -s A |y| / 2 with s = exp(mean log r) = 1: 3 / (2 * 3) per token
    assert torch.all(logp.grad[0] == 0) and torch.allclose(logp.grad[1], torch.full((3,), 0.5))


def test_gmpo_takes_the_geometric_mean_of_the_sign_aware_log_clipped_token_ratios():
    from policylab.objectives.policy import gmpo_surrogate

    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.6, -0.2, 0.0], [0.6, -0.6, 0.3]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, metrics = gmpo_surrogate(logp, old, torch.tensor([1.0, -1.0]), mask, clip_low=0.4, clip_high=0.4)
    # row 0, A > 0: min(log r, clip) -> 0.4, -0.2: geometric mean exp(0.1); row 1, A < 0: max(log r, clip) ->
    # 0.6, -0.4, 0.3: exp(0.5 / 3); the loss -(exp(0.1) * 1 + exp(1/6) * -1) / 2
    assert loss.item() == pytest.approx(-(math.exp(0.1) - math.exp(0.5 / 3)) / 2, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 5)
    loss.backward()  # the clipped tokens have no gradient; the others -A exp(mean) / (|y| * 2)
    expected = [[0.0, -math.exp(0.1) / 4, 0.0], [math.exp(0.5 / 3) / 6, 0.0, math.exp(0.5 / 3) / 6]]
    torch.testing.assert_close(logp.grad, torch.tensor(expected))


def test_gmpo_at_one_update_per_batch_makes_grpos_update(sft_model, tmp_path):
    """At the sampled weights every ratio is 1 and GMPO's gradient -A (1/|y|) sum_t grad log pi_t is GRPO's with
    seq-mean-token-mean: the same seed's runs end with the same weights, to float32 rounding that Adam's
    normalization amplifies where a weight's gradients are tiny (3e-6 seen, against the lr of 3e-4 per step)."""
    settings = {"model": str(sft_model.dir), "steps": 3, "batch_size": 4, "group_size": 4, "eval_every": 100,
                "eval_size": 4}  # fmt: skip
    grpo = _weights(train_llm("grpo", settings, tmp_path, verbose=False).dir)
    gmpo = _weights(train_llm("gmpo", settings, tmp_path, verbose=False).dir)
    for key in grpo:
        torch.testing.assert_close(gmpo[key], grpo[key], rtol=0, atol=2e-5)


def test_vespo_weighs_reinforce_by_a_gamma_function_of_the_sequence_ratio():
    from policylab.objectives.policy import vespo_loss, vespo_weights

    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    logp = torch.tensor([[-1.0, -1.0], [-1.0 + math.log(2.0), -1.0], [-1.0, -1.0 + math.log(0.5)]], requires_grad=True)
    mask = torch.ones(3, 2, dtype=torch.bool)
    advantages = torch.tensor([1.0, 1.0, -2.0])
    # phi(w) = e^lam w^k e^(-lam w): w = 1 -> 1; w = 2, A > 0 (k 2, lam 3) -> 4 e^-3; w = 0.5, A < 0 (k 3, lam 2) -> e/8
    expected = torch.tensor([1.0, 4.0 * math.exp(-3.0), math.exp(1.0) / 8.0])
    torch.testing.assert_close(vespo_weights(logp, old, advantages, mask), expected)
    loss, _ = vespo_loss(logp, old, advantages, mask, aggregation="token-mean")
    assert loss.item() == pytest.approx(float(-(expected * advantages)[:, None].mul(logp.detach()).mean()))
    loss.backward()  # the weights are constant: REINFORCE's gradient scaled per sequence
    torch.testing.assert_close(logp.grad, -(expected * advantages)[:, None].expand(3, 2) / 6)


def test_the_entropy_and_off_policy_masks_zero_the_advantages_they_leave_out(sft_model):
    from types import SimpleNamespace

    from policylab.llm.trainer import LLMTrainer

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    entropy = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.3, 0.8, 0.2, 0.7]])  # 7 tokens; the padding's 9.0 is left out
    old = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-2.0, -2.0, -2.0, -2.0]])  # row 1: KL(old || new) 1 per token
    rollout = SimpleNamespace(completion_mask=mask, logprobs=old)
    settings = {"model": str(sft_model.dir), "eval_size": 4}
    top = LLMTrainer(make_config("grpo", {**settings, "top_entropy_quantile": 3 / 7}))
    advantages = top.masked_advantages(rollout, torch.tensor([1.0, -1.0]), logp, entropy)
    # the 3 of 7 highest entropies, 0.9, 0.8 and 0.7 (the 4/7 quantile), keep their advantage
    assert advantages.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, -1.0]]
    off = LLMTrainer(make_config("grpo", {**settings, "off_policy_mask_threshold": 0.5}))
    # row 1: A < 0 and mean KL 1 > 0.5 leaves; with A > 0 it stays, as row 0 (KL 0) does either way
    assert off.masked_advantages(rollout, torch.tensor([1.0, -1.0]), logp, entropy).tolist() == [1.0, 0.0]
    assert off.masked_advantages(rollout, torch.tensor([-1.0, 1.0]), logp, entropy).tolist() == [-1.0, 1.0]


def test_bias_corrected_kl_adds_the_estimate_times_the_score_to_the_gradient(sft_model):
    """With use_bias_correction_kl each token's k3 estimate is multiplied by its ratio pi / pi_old; at the sampled
    weights (ratio 1) the loss is the same and its gradient gains kl_coef * aggregate(sg(k3) * grad log pi)."""
    from policylab.llm.trainer import LLMTrainer

    gradients, values = [], []
    for corrected in (False, True):
        settings = {"model": str(sft_model.dir), "kl_coef": 0.5, "use_bias_correction_kl": corrected, "eval_size": 4}
        trainer = LLMTrainer(make_config("grpo", settings))
        with torch.no_grad():  # a reference away from the policy, so that k3 is not 0
            for p in trainer.reference.parameters():
                p.mul_(0.9)
        rollout, _ = trainer.rollout(trainer.train_rows[:4] * 2)
        trainer.model.zero_grad()
        loss, metrics = trainer.policy_loss(rollout, torch.zeros(8))
        loss.backward()
        gradients.append([p.grad.clone() for p in trainer.model.parameters()])
        values.append((float(loss.detach()), trainer, rollout))
    assert values[0][0] == pytest.approx(values[1][0], rel=1e-6)
    trainer, rollout = values[0][1], values[0][2]
    trainer.model.zero_grad()
    logp, _ = trainer.rollout_logprobs(rollout)
    with torch.no_grad():
        ref, _ = token_logprobs(trainer.reference, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                rollout.completion_mask)  # fmt: skip
        k3 = kl_penalty(logp, ref, "k3")
    (0.5 * aggregate(k3 * logp, rollout.completion_mask, "seq-mean-token-mean")).backward()
    for plain, corrected, p in zip(gradients[0], gradients[1], trainer.model.parameters()):
        torch.testing.assert_close(corrected, plain + p.grad, rtol=1e-4, atol=1e-6)


def test_adaptive_entropy_control_follows_trls_rule():
    from policylab.llm.trainer import EntropyControl

    cfg = make_config("grpo", {"use_adaptive_entropy": True, "entropy_coef": 0.01, "entropy_target": 0.5,
                               "entropy_coef_delta": 0.01, "entropy_coef_max": 0.02})  # fmt: skip
    control = EntropyControl(cfg)
    assert control.coefficient() == 0.0  # nothing measured yet
    coefs = []
    for entropy in (0.4, 0.3, 0.2, 0.9, 0.9, 0.9):
        control.update(entropy)
        coefs.append((round(control.coef, 6), control.coefficient()))
    # up while at or below the target (capped at 0.02), applied; down above it (floored at 0), not applied
    assert coefs == [(0.02, 0.02), (0.02, 0.02), (0.02, 0.02), (0.01, 0.0), (0.0, 0.0), (0.0, 0.0)]
    restored = EntropyControl(cfg)
    restored.load(control.state())
    assert (restored.coef, restored.last_entropy) == (control.coef, control.last_entropy)


def test_trls_grpo_loss_options_refuse_what_they_cannot_apply():
    with pytest.raises(ConfigError, match="loss=vespo weighs each sequence by its advantage's sign"):
        make_config("ppo", {"loss": "vespo"})
    with pytest.raises(ConfigError, match="top_entropy_quantile selects tokens, and loss=luspo"):
        make_config("grpo", {"loss": "luspo", "clip_low": 3e-4, "clip_high": 4e-4, "top_entropy_quantile": 0.2})
    with pytest.raises(ConfigError, match="luspo clips the sequence ratio on both sides"):
        make_config("grpo", {"loss": "luspo", "clip_low": None})
    with pytest.raises(ConfigError, match="vespo_k_pos=3.0 would do nothing"):
        make_config("grpo", {"vespo_k_pos": 3.0})
    with pytest.raises(ConfigError, match="entropy_target=1.0 would do nothing"):
        make_config("grpo", {"entropy_target": 1.0})
    with pytest.raises(ConfigError, match="use_bias_correction_kl=True would do nothing"):
        make_config("grpo", {"use_bias_correction_kl": True})
    with pytest.raises(ConfigError, match="off_policy_mask_threshold=0.0 must be > 0"):
        make_config("grpo", {"off_policy_mask_threshold": 0.0})


def test_a2po_regresses_the_implicit_reward_onto_the_optimal_advantage():
    from policylab.objectives.policy import a2po_loss, optimal_values

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # V* = beta log mean exp(r / beta): beta 0.5 -> 0.5 log((2 e^2 + 2) / 4); all zeros -> 0
    expected = [0.5 * math.log((2 * math.exp(2.0) + 2) / 4), 0.0]
    torch.testing.assert_close(optimal_values(rewards, 0.5), torch.tensor(expected))
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, 5.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, metrics = a2po_loss(logp, ref, torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5]), mask, beta=0.1)
    # implicit rewards 0.1 * 1 (the masked token's 5 left out) and 0; targets 0.75 and -0.5
    assert loss.item() == pytest.approx(((0.1 - 0.75) ** 2 + (0.0 + 0.5) ** 2) / 2)
    loss.backward()  # d/dlogp_t = beta (implicit - target) over the 2 sequences, on the mask
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.065, -0.065, 0.0], [0.05, 0.05, 0.05]]))
    assert metrics["implicit_reward"].item() == pytest.approx(0.05)


def test_a2po_raises_accuracy_over_the_sft_model_and_drops_prompts_without_signal(sft_model, tmp_path):
    """Stage 1 estimates V* of 1,000 prompts from 8 samples of the SFT model each (seed 0 dropped 241 whose samples
    all scored 0); 60 steps of stage 2 took exact match from 0.370 to 0.595 (seed 0) and 0.570 (seed 1). The bar
    is on the share of the way to 1 the two seeds close (`headroom_closed`), 0.1, which holds from SFT models of
    other seeds too (one starting at 0.72 closed 0.09-0.29 on four seeds, this one 0.21-0.38)."""
    settings = {"model": str(sft_model.dir), "steps": 60, "eval_every": 60, "train_size": 1000}
    shares = []
    for seed in (0, 1):
        run = train_llm("a2po", {**settings, "seed": seed}, tmp_path, name=f"a2po-{seed}", verbose=False)
        shares.append(headroom_closed(run))
    assert sum(shares) / len(shares) >= 0.1, shares
    from policylab.llm.trainer import LLMTrainer

    trainer = LLMTrainer(make_config("a2po", {**settings, "train_size": 200, "eval_size": 4}))
    assert 0 < len(trainer.train_rows) < 200 and trainer.notes[-1].startswith("a2po: ")
    assert {row["prompt"] for row in trainer.train_rows} <= set(trainer.optimal_values)
    with pytest.raises(LLMError, match="reference samples scored 0: A"):
        LLMTrainer(make_config("a2po", {"train_size": 20, "num_value_samples": 2, "eval_size": 4}))


def test_overlong_penalty_and_eos_detection():
    from policylab.llm.rollout import Rollout
    from policylab.llm.trainer import ended_with_eos, overlong_penalty

    tok = char_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = torch.tensor([[5, eos, pad, pad], [5, 6, 7, eos], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    rollout = Rollout(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), ids, mask, torch.zeros(3, 4))
    assert ended_with_eos(rollout, tok).tolist() == [True, True, False]
    torch.testing.assert_close(overlong_penalty(rollout, 4, 2, 1.0), torch.tensor([0.0, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(rollout, 5, 2, 0.5), torch.tensor([0.0, -0.25, -0.25]))
    assert overlong_penalty(rollout, 4, 0, 1.0).abs().sum() == 0


def test_dynamic_sampling_trains_only_on_groups_with_a_reward_spread(sft_model):
    from policylab.llm.trainer import LLMTrainer

    cfg = make_config("dapo", {"model": str(sft_model.dir), "batch_size": 8, "group_size": 4, "eval_size": 8})
    trainer = LLMTrainer(cfg)
    rollout, rewards, metrics = trainer.sample_groups()
    groups = rewards.view(-1, 4)
    assert len(rollout) == len(rewards) == 4 * len(groups) and len(groups) <= 8
    assert (groups.std(1) > 0).all()  # no uniform group is left
    assert 0 < metrics["groups_kept"] <= 1 and 1 <= metrics["sampling_rounds"] <= cfg.max_sampling_rounds


def test_chord_mixes_the_expert_nll_into_the_rl_loss_with_the_scheduled_weight(sft_model):
    from policylab.llm.trainer import LLMTrainer

    overrides = {"model": str(sft_model.dir), "mix": "chord", "batch_size": 4, "eval_size": 8, "seed": 3}
    trainer = LLMTrainer(make_config("grpo", overrides))
    rl = torch.tensor(2.0)
    state = trainer.orders["expert"].state()
    loss, metrics = trainer.with_expert_term(rl, 0.25)
    assert loss.item() == pytest.approx(0.75 * 2.0 + 0.25 * metrics["imitation_loss"].item())
    trainer.orders["expert"].load(state)  # the same expert rows: the NLL of their answers, by hand
    rows = trainer.draw_rows("expert", 4)
    from policylab.llm.trainer import encode_answers

    p, pm = trainer.encode_prompts([r["prompt"] for r in rows])
    a, am = encode_answers(trainer.tokenizer, [r["answer"] for r in rows])
    logp, _ = token_logprobs(trainer.model, p, pm, a, am)
    assert metrics["imitation_loss"].item() == pytest.approx(-(logp[am].mean()).item(), rel=1e-5)
    with pytest.raises(LLMError, match='no "completion"'):
        make = make_config("grpo", {**overrides, "expert": str(_jsonl(sft_model.dir / "x.jsonl", [{"prompt": "1"}]))})
        LLMTrainer(make)


def _jsonl(path, rows):
    import json

    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


SCRATCH = {"task": "small-addition", "batch_size": 32, "group_size": 4, "lr": 3e-3, "eval_size": 200}


def test_grpo_alone_stays_below_the_mixing_bar_from_random_weights(tmp_path):
    """A random model almost never samples a right answer, so GRPO's advantages are almost all zero: after 100
    steps it stays below the accuracy CHORD reaches from the same start (seeds 0-4: 0.065, 0.08, 0, 0, 0)."""
    run = train_llm("grpo", {**SCRATCH, "steps": 100, "eval_every": 100}, tmp_path, verbose=False)
    assert run.final_eval["accuracy"] < 0.1


@pytest.mark.parametrize(("mix", "steps", "bar", "seeds"), [("chord", 100, 0.1, [0]), ("luffy", 250, 0.05, [0, 1])])
def test_expert_data_lets_rl_learn_addition_from_random_weights(tmp_path, mix, steps, bar, seeds):
    """CHORD's expert term (mu from 0.5 down to 0.02) or LUFFY's expert completion in every group gives RL the
    signal that on-policy samples of a random model almost never have (one-digit sums). Over seeds 0-4, CHORD
    reached 0.16-0.38 after 100 steps; LUFFY is slower and noisier: 0.07-0.34 after 250 steps
    (at this code, seeds 0-5: 0.105, 0.05, 0.14, 0.145, 0.13, 0.295), so its bar is on the mean of two seeds. A
    run's path changes with the last bits of its products (seed 0's CHORD run gave 0.37, then 0.16 after a change
    of product shapes), so the bars sit under those spreads."""
    accuracies = []
    for seed in seeds:
        settings = {**SCRATCH, "mix": mix, "steps": steps, "eval_every": steps, "seed": seed}
        accuracies.append(
            train_llm("grpo", settings, tmp_path, name=f"{mix}-{seed}", verbose=False).final_eval["accuracy"]
        )
    assert sum(accuracies) / len(accuracies) >= bar, accuracies


def test_policy_shaping_gradient_is_gamma_p_over_p_plus_gamma_squared():
    from policylab.objectives.policy import policy_shaping_loss

    logp = torch.tensor([-3.0, -0.1], requires_grad=True)
    advantages = torch.tensor([1.0, 2.0])
    policy_shaping_loss(logp, advantages, gamma=0.1).sum().backward()
    p = logp.detach().exp()
    torch.testing.assert_close(logp.grad, -advantages * 0.1 * p / (p + 0.1) ** 2)


def test_luffy_puts_the_expert_answer_last_in_every_group(sft_model):
    from policylab.llm.trainer import LLMTrainer

    trainer = LLMTrainer(
        make_config(
            "grpo", {"model": str(sft_model.dir), "mix": "luffy", "batch_size": 3, "group_size": 4, "eval_size": 8}
        )
    )
    rollout, rewards, _ = trainer.sample_groups()
    mixed, mixed_rewards = trainer.with_expert_completions(rollout, rewards)
    assert mixed.off_policy.tolist() == [False, False, False, True] * 3
    texts = decode(trainer.tokenizer, mixed)
    for i in (3, 7, 11):
        assert texts[i] == mixed.rows[i]["answer"] and mixed_rewards[i] == 1.0
        assert (mixed.logprobs[i] == 0).all()
    torch.testing.assert_close(mixed_rewards[:3], rewards[:3])


def test_luffy_takes_each_prompts_completion_from_the_expert_file(sft_model, tmp_path):
    """With --expert, LUFFY's expert completion of a group is the expert file's row of the same prompt (it took
    the prompts' own answers whatever the file said); a prompt the file lacks is an error before training."""
    from policylab.llm.tasks import TASKS
    from policylab.llm.trainer import LLMTrainer

    rows = TASKS["addition"].make(12, 0)
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    expert_rows = [{"prompt": r["prompt"], "completion": f"9{i}9"} for i, r in enumerate(rows)]
    experts = _jsonl(tmp_path / "e.jsonl", expert_rows)
    base = {"model": str(sft_model.dir), "mix": "luffy", "batch_size": 3, "group_size": 4, "prompts": str(prompts)}
    trainer = LLMTrainer(make_config("grpo", {**base, "expert": str(experts)}))
    rollout, rewards, _ = trainer.sample_groups()
    mixed, _ = trainer.with_expert_completions(rollout, rewards)
    by_prompt = {r["prompt"]: f"9{i}9" for i, r in enumerate(rows)}
    texts = decode(trainer.tokenizer, mixed)
    for i in (3, 7, 11):
        assert texts[i] == by_prompt[mixed.rows[i]["prompt"]]
    short = _jsonl(tmp_path / "short.jsonl", [{"prompt": rows[0]["prompt"], "completion": "1"}])
    with pytest.raises(LLMError, match="mix=luffy needs an expert completion of every training prompt"):
        LLMTrainer(make_config("grpo", {**base, "expert": str(short)}))


def test_prompt_files_and_reward_specs(tmp_path):
    from policylab.llm.rewards import combine_rewards, load_prompts, load_reward

    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(10)])
    rows = load_prompts(path)
    assert len(rows) == 10 and rows[3] == {"prompt": "3+0=", "answer": "3"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1"}\n{"answer": "2"}\n')
    with pytest.raises(LLMError, match=r"bad.jsonl, line 2: no \"prompt\" string"):
        load_prompts(bad)
    fn, weight = load_reward("numeric_match=0.5")
    assert weight == 0.5 and fn(["p"] * 3, ["x 042", "41", ""], answer=["42", "42", "42"]) == [1.0, 0.0, 0.0]
    combined = combine_rewards(["exact_match", "policylab.llm.tasks:countdown_reward=0.5"])
    assert combined(["1,2,3>6:"], ["1+2+3"], answer=["1+2+3"]) == [1.5]
    for spec, message in (
        ("nope", "neither a built-in"),
        ("os:nothing_here", "has no nothing_here"),
        ("no_such_module_x:f", "cannot import"),
    ):
        with pytest.raises(LLMError, match=message):
            load_reward(spec)
    run = train_llm(
        "grpo",
        {
            "prompts": str(path),
            "rewards": ["numeric_match"],
            "steps": 2,
            "batch_size": 2,
            "group_size": 2,
            "max_new_tokens": 3,
            "eval_size": 10,
        },
        tmp_path,
        verbose=False,
    )
    assert set(run.final_eval) == {"accuracy", "reward"}


# --- PPO with a value head, DPO, online DPO ----------------------------------------------------------------------


def test_token_gae_puts_the_sequence_reward_on_the_last_token():
    from policylab.llm.trainer import token_gae

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    values = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.5]])
    advantages, returns = token_gae(torch.tensor([1.0, 2.0]), values, mask, gamma=1.0, lam=1.0)
    # lambda = 1, gamma = 1: every token's advantage is R - V(s_t), its return R
    torch.testing.assert_close(advantages, torch.tensor([[0.9, 0.8, 0.7, 0.0], [2.0, 2.0, 2.0, 1.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    half, _ = token_gae(torch.tensor([1.0, 2.0]), values, mask, gamma=1.0, lam=0.5)
    deltas = [0.2 - 0.1, 0.3 - 0.2, 1.0 - 0.3]  # V(s_{t+1}) - V(s_t), the reward on the last token
    assert half[0, 0].item() == pytest.approx(deltas[0] + 0.5 * deltas[1] + 0.25 * deltas[2])


def test_dpo_pairs_come_from_a_file_or_from_one_changed_character():
    import numpy as np

    from policylab.llm.trainer import preference_pair

    rng = np.random.default_rng(0)
    for _ in range(20):
        prompt, chosen, rejected = preference_pair({"prompt": "12+34=", "answer": "046"}, rng)
        assert (prompt, chosen) == ("12+34=", "046") and len(rejected) == 3
        assert sum(a != b for a, b in zip(chosen, rejected)) == 1
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert preference_pair(row, rng) == ("p", "a", "b")
    with pytest.raises(LLMError, match='needs "chosen" and "rejected"'):
        preference_pair({"prompt": "p", "chosen": "a"}, rng)


def test_rows_are_drawn_in_shuffled_epochs_that_resume_where_they_stopped():
    from policylab.llm.epochs import ShuffledEpochs

    order = ShuffledEpochs(10, seed=3, stream="train")
    first, second = order.draw(4), order.draw(4)
    state = order.state()
    tail = order.draw(6)  # crosses into the second epoch: 2 rows of the first, then 4 of the second
    assert sorted([*first, *second, *tail[:2]]) == list(range(10))  # each row once in the epoch
    assert order.epoch == 1 and order.position == 4 and order.epochs_done == pytest.approx(1.4)
    assert not np.array_equal(order.order, ShuffledEpochs(10, seed=3, stream="train").order)  # a fresh order
    again = ShuffledEpochs(10, seed=3, stream="train")
    again.load(state)
    assert np.array_equal(again.draw(6), tail)
    assert not np.array_equal(
        ShuffledEpochs(10, seed=3, stream="expert").draw(10), ShuffledEpochs(10, 3, "train").draw(10)
    )
    assert len(ShuffledEpochs(3, 0, "pairs").draw(7)) == 7


def test_sft_and_dpo_see_every_row_once_before_any_row_twice(sft_model):
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "train_size": 12, "batch_size": 4, "eval_size": 8}
    for algo, step in (("sft", "sft_step"), ("dpo", "dpo_step")):
        trainer = LLMTrainer(make_config(algo, settings))
        seen: list[str] = []
        draw = trainer.draw_rows

        def spy(kind, n, seen=seen, draw=draw):
            rows = draw(kind, n)
            seen.extend(row["prompt"] for row in rows)
            return rows

        trainer.draw_rows = spy
        for _ in range(3):
            getattr(trainer, step)()
        assert sorted(seen) == sorted(row["prompt"] for row in trainer.train_rows), algo
        assert trainer.epochs_done == 1.0


@pytest.mark.parametrize(
    ("algo", "overrides", "seeds", "gain"),
    [
        ("ppo", {"steps": 40}, [0, 1], 0.15),
        ("dpo", {"steps": 60, "batch_size": 32, "beta": 0.5}, [0, 1], 0.05),
        ("online_dpo", {"steps": 40, "batch_size": 32}, [0], 0.1),
        ("xpo", {"steps": 40}, [0, 1], 0.07),
        ("nash_md", {"steps": 40}, [0, 1], 0.07),
        ("simpo", {"steps": 60, "batch_size": 32}, [0, 1], 0.1),
        ("orpo", {"steps": 60, "batch_size": 32}, [0, 1], 0.2),
        ("cpo", {"steps": 60, "batch_size": 32}, [0, 1], 0.2),
        ("kto", {"steps": 60, "batch_size": 32, "beta": 0.5}, [0, 1], 0.1),  # on headroom_closed, as PPO
        ("bco", {"steps": 60, "batch_size": 32, "beta": 0.5}, [0, 1], 0.15),  # on headroom_closed too
        ("tpo", {"steps": 60, "batch_size": 32}, [0, 1], 0.2),
    ],
)
def test_ppo_and_the_preference_algorithms_raise_accuracy_over_the_sft_model(
    sft_model, tmp_path, algo, overrides, seeds, gain
):
    """DPO's offline pairs (the answer against a one-character corruption) move exact match less than on-policy
    RL, and more noisily, so its gain is the mean over two seeds and its bar 0.05. beta 0.5, not the default
    0.1: at 0.1 the tiny model drifts from its reference and, depending on the seed, loses what it gains (more
    steps made that worse), where at 0.5 every seed tried gained. SimPO (no reference) at its defaults gained
    0.15-0.18 on both seeds; ORPO and CPO, whose NLL term keeps training on the chosen answers, 0.33-0.44; KTO
    (beta 0.5, as DPO: at 0.1 it moved neither seed in 60 steps) 0.14 and 0.26, but from an SFT fixture of 0.425
    (the same SFT under another float rounding of the attention softmax) 0.075 and 0.105, so its bar, as PPO's,
    is on `headroom_closed` (0.27 and 0.36 from the 0.37 fixture, 0.13 and 0.18 from 0.425); TPO, whose gold NLL
    trains on the answers too, 0.33 and 0.37 (these figures from the 0.37 fixture). PPO's bar is on the share of
    the way to 1 it closes: from the 0.37 fixture seeds 0-3 closed 0.25-0.41, from one of another SFT seed (0.72)
    0.29-0.43, where its absolute gains (0.08-0.12) fell under a bar of 0.1 that the first model's (0.16-0.26)
    cleared. XPO and Nash-MD (64 prompts, one sample of the policy and one of the reference or the mixture each,
    40 steps) gained 0.095-0.185 and 0.08-0.155 over seeds 0-3 (scratch runs), so their bar is a mean of 0.07.
    BCO at KTO's settings closed 0.21-0.47 of the headroom over seeds 0-3 (scratch runs from the 0.375 fixture)."""
    gains = []
    for seed in seeds:
        settings = {"model": str(sft_model.dir), "eval_every": 1000, "seed": seed, **overrides}
        run = train_llm(algo, settings, tmp_path, name=f"{algo}-{seed}", verbose=False)
        gain_of_run = run.final_eval["accuracy"] - run.initial_eval["accuracy"]
        gains.append(headroom_closed(run) if algo in ("ppo", "kto", "bco") else gain_of_run)
    assert sum(gains) / len(gains) >= gain, gains


# --- distillation -------------------------------------------------------------------------------------------------


def test_generalized_jsd_equals_the_hand_computed_divergences():
    from policylab.objectives.imitation import generalized_jsd

    p_student, p_teacher = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    student, teacher = torch.tensor(p_student).log(), torch.tensor(p_teacher).log()

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    assert float(generalized_jsd(student, teacher, 0.0)) == pytest.approx(kl(p_teacher, p_student), rel=1e-5)
    assert float(generalized_jsd(student, teacher, 1.0)) == pytest.approx(kl(p_student, p_teacher), rel=1e-5)
    for beta in (0.5, 0.9):
        m = [(1 - beta) * a + beta * b for a, b in zip(p_student, p_teacher)]
        expected = beta * kl(p_teacher, m) + (1 - beta) * kl(p_student, m)
        assert float(generalized_jsd(student, teacher, beta)) == pytest.approx(expected, rel=1e-5)
    # temperature 2 halves the logits; a batch keeps its shape; a token with probability 0 adds nothing
    hot = [math.sqrt(p) / sum(math.sqrt(x) for x in p_student) for p in p_student]
    hot_t = [math.sqrt(p) / sum(math.sqrt(x) for x in p_teacher) for p in p_teacher]
    assert float(generalized_jsd(student, teacher, 1.0, temperature=2.0)) == pytest.approx(kl(hot, hot_t), rel=1e-5)
    assert generalized_jsd(torch.zeros(4, 5, 3), torch.zeros(4, 5, 3), 0.5).shape == (4, 5)
    masked = torch.tensor([0.0, 0.0, -math.inf])
    assert float(generalized_jsd(masked, torch.tensor([0.0, 0.0, 0.0]), 1.0)) == pytest.approx(math.log(1.5))
    with pytest.raises(ConfigError, match="beta=1.5 must be in"):
        generalized_jsd(student, teacher, 1.5)


@pytest.mark.parametrize(("algo", "bar", "seeds"), [("distill", 0.15, [0]), ("gkd", 0.15, [0, 1, 2, 3, 4, 5])])
def test_distillation_teaches_a_random_model_the_teachers_answers(sft_model, tmp_path, algo, bar, seeds):
    """The teacher answers about a third right; a randomly initialized tiny Llama, none. Distilled for 300 steps
    (distill: on its own samples only, reverse KL; gkd: half the steps on the answers, JSD), it reached 0.205 and
    0.405 (seed 0); SFT for 300 steps on the answers themselves gave the teacher. GKD's final exact match spreads
    widely over seeds (some are still on a plateau at 300 steps): 0.18-0.425 over seeds 0-5 from one SFT fixture,
    0.095-0.415 from another (a teacher of 0.425 instead of 0.37), 0.06-0.39 from a third (a teacher of 0.45; scratch
    runs of seeds 0-5: 0.085, 0.06, 0.145, 0.30, 0.355, 0.39, mean 0.22), so its bar is on the mean of six seeds."""
    finals = []
    for seed in seeds:
        settings = {"teacher": str(sft_model.dir), "steps": 300, "eval_every": 1000, "seed": seed}
        run = train_llm(algo, settings, tmp_path, name=f"{algo}-{seed}", verbose=False)
        assert run.initial_eval["accuracy"] == 0.0
        finals.append(run.final_eval["accuracy"])
    assert sum(finals) / len(finals) >= bar, finals
    with open(run.dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    on_policy = [float(row["on_policy"]) for row in rows]
    assert set(on_policy) == ({1.0} if algo == "distill" else {0.0, 1.0})
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])


def test_sampled_distillation_advantages_and_iw_opds_prefix_weights():
    from policylab.objectives.imitation import sampled_distillation_advantages

    teacher = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    behaviour = torch.tensor([[-2.0, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    plain = sampled_distillation_advantages(teacher, behaviour, mask)
    assert plain.tolist() == [[1.0, -1.0, 0.0, 0.0]]  # log p_teacher - log p_behaviour; the padding 0
    # |a| = 1, 1, 0 (total 2): prefix sums before each token 0, 1, 2 -> weights 1 + 0.5 (1 - 0, 1 - 1/2, 1 - 1)
    weighted = sampled_distillation_advantages(teacher, behaviour, mask, iw_gamma=0.5)
    torch.testing.assert_close(weighted, torch.tensor([[1.5, -1.25, 0.0, 0.0]]))


@pytest.mark.parametrize("loss", ["sampled", "iw_opd"])
def test_sampled_token_distillation_brings_the_model_toward_the_teacher(sft_model, tmp_path, loss):
    """Reading only the teacher's log-prob of each sampled token, the signal is noisier than the whole
    distribution's: from random weights, 150 steps bring the per-token reverse-KL sample down (the mean of the
    last 20 steps' under 0.75 of the first 20's, on the mean of two seeds), long before exact match moves. That
    ratio spreads over seeds and over the float rounding of the SFT teacher: 0.45-0.66 over seeds 0-2 and both
    losses with one teacher, 0.47-0.79 over seeds 0-5 with another (exact match 0.425 and 0.375, 2026-12-07)."""
    ratios = []
    for seed in (0, 1):
        settings = {"teacher": str(sft_model.dir), "steps": 150, "eval_every": 1000, "eval_size": 8,
                    "distill_loss": loss, "seed": seed}  # fmt: skip
        run = train_llm("distill", settings, tmp_path, name=f"distill-{seed}", verbose=False)
        with open(run.dir / "train.csv") as f:
            kl = [float(row["reverse_kl"]) for row in csv.DictReader(f)]
        ratios.append(sum(kl[-20:]) / sum(kl[:20]))
    assert sum(ratios) / len(ratios) < 0.75, ratios


def test_reverse_kl_advantages_are_minillms_discounted_rewards_by_hand():
    from policylab.objectives.imitation import reverse_kl_advantages

    teacher = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    student = torch.tensor([[-2.0, -1.0, -1.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    r = [1.0, -1.0, 1.0]  # log p_teacher - log pi; the masked position is 0
    torch.testing.assert_close(reverse_kl_advantages(teacher, student, mask), torch.tensor([[*r, 0.0]]))
    g = 0.5
    sums = [r[0] + g * r[1] + g * g * r[2], r[1] + g * r[2], r[2]]
    counts = [1 + g + g * g, 1 + g, 1.0]
    torch.testing.assert_close(reverse_kl_advantages(teacher, student, mask, g, False), torch.tensor([[*sums, 0.0]]))
    normalized = [a / n for a, n in zip(sums, counts)]
    torch.testing.assert_close(reverse_kl_advantages(teacher, student, mask, g), torch.tensor([[*normalized, 0.0]]))


def test_minillms_step_adds_the_reverse_kl_advantage_and_the_single_step_kl(sft_model, monkeypatch):
    """One update's teacher terms by hand from each model's logits on the sampled batch: the advantages the policy
    loss receives are the group advantages plus each token's reverse-KL advantage (gamma 0: log p_teacher(y_t) -
    log pi(y_t)), and the gradient is the policy loss's plus that of the token-mean KL(pi || p_teacher)."""
    from policylab.llm.rollout import completion_logits
    from policylab.llm.trainer import LLMTrainer
    from policylab.objectives.aggregation import aggregate

    settings = {"model": "tiny-llama", "teacher": str(sft_model.dir), "batch_size": 2, "group_size": 4,
                "eval_size": 4, "seed": 2}  # fmt: skip
    trainer = LLMTrainer(make_config("minillm", settings))
    received, backward = [], []
    backward_of = trainer._backward
    monkeypatch.setattr(trainer, "accumulate", lambda rollout, adv, **k: received.append((rollout, adv)) or {})
    monkeypatch.setattr(trainer, "_backward", lambda loss: backward.append(float(loss.detach())) or backward_of(loss))
    monkeypatch.setattr(trainer, "_step", lambda: None)
    metrics = trainer.rl_step()
    (rollout, advantages), = received  # fmt: skip
    assert advantages.shape == rollout.completion_ids.shape  # per token now
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():
        student = torch.log_softmax(completion_logits(trainer.model, *args), -1)
        teacher = torch.log_softmax(completion_logits(trainer.teacher, *args), -1)
    mask, ids = rollout.completion_mask, rollout.completion_ids[..., None]
    kl = aggregate((student.exp() * (student - teacher)).sum(-1), mask, "token-mean")
    assert backward == [pytest.approx(float(kl), rel=1e-5)] and metrics["single_step_kl"] == pytest.approx(backward[0])
    rkl = (teacher.gather(-1, ids) - student.gather(-1, ids))[..., 0] * mask
    group = advantages - rkl  # what is left is one group advantage per completion, over its tokens
    assert torch.allclose(group * mask, group[:, :1] * mask, atol=1e-5)
    with pytest.raises(ConfigError, match="no teacher was given"):
        make_config("minillm")


def test_minillm_moves_a_random_model_toward_its_teacher(sft_model, tmp_path):
    """From random weights with the SFT model as the teacher, 100 steps at lr 3e-3 halve the single-step reverse
    KL (3.96 to 1.75 and 3.88 to 1.94 over seeds 0-1 in scratch runs). Exact match barely moves at MiniLLM's
    defaults from random weights (0.01-0.04 after 300 steps in scratch runs, against distill's 0.2; without the
    reverse-KL advantage, 0.10-0.18): the per-token advantages outweigh the 0/1 rewards' group advantages."""
    settings = {"teacher": str(sft_model.dir), "model": "tiny-llama", "steps": 100, "eval_every": 1000, "lr": 3e-3}
    run = train_llm("minillm", settings, tmp_path, verbose=False)
    with open(run.dir / "train.csv") as f:
        kl = [float(row["single_step_kl"]) for row in csv.DictReader(f)]
    assert sum(kl[-10:]) / 10 < 0.6 * sum(kl[:10]) / 10, kl[::10]


def test_distilling_from_a_copy_of_the_model_starts_at_zero_loss_and_leaves_the_teacher_as_it_was(tmp_path):
    """The first step's loss on the model's own samples (their pass read from the sampler's tape) and on the
    answers is 0 to float32 rounding (after it, Adam turns the rounding's gradients into lr-sized steps)."""
    import copy

    for lmbda in (1.0, 0.0):
        model, tokenizer = load_model("tiny-llama", 3)
        teacher = copy.deepcopy(model)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        settings = {"steps": 2, "batch_size": 4, "eval_size": 4, "lmbda": lmbda, "beta": 0.3}
        run = train_llm("gkd", settings, tmp_path, verbose=False, model=model, tokenizer=tokenizer, teacher=teacher)
        with open(run.dir / "train.csv") as f:
            rows = list(csv.DictReader(f))
        assert float(rows[0]["on_policy"]) == lmbda and abs(float(rows[0]["loss"])) < 1e-6, rows
        assert float(rows[1]["loss"]) > 1e-6  # the model moved; the teacher did not
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, before[key])


@pytest.mark.parametrize("teacher_name", ["tiny-gpt2", "small-llama"])
def test_a_teacher_of_another_architecture_or_size_gives_its_own_next_token_logits(tmp_path, teacher_name):
    """GPT-2 runs through its own forward, a wider Llama through the fast pass: either way the teacher's logits at
    the completion positions are those of its transformers forward over prompt + completion."""
    from policylab.llm.rollout import completion_logits
    from policylab.llm.trainer import LLMTrainer

    trainer = LLMTrainer(make_config("distill", {"teacher": teacher_name, "batch_size": 4, "eval_size": 4}))
    rollout, _ = trainer.rollout(trainer.train_rows[:4])
    with torch.no_grad():
        logits = completion_logits(trainer.teacher, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                   rollout.completion_mask)  # fmt: skip
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        attention = torch.cat([rollout.prompt_mask.long(), rollout.completion_mask.long()], 1)
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        full = trainer.teacher(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    width, mask = rollout.prompt_ids.shape[1], rollout.completion_mask
    expected = full[:, width - 1 : -1]
    torch.testing.assert_close(logits[mask], expected[mask], rtol=1e-4, atol=1e-4)
    metrics = trainer.distill_step()
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0


def test_distillation_refuses_a_missing_or_mismatched_teacher(sft_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ConfigError, match="no teacher was given"):
        make_config("distill")
    with pytest.raises(ConfigError, match="seq_kd=True would do nothing"):
        make_config("distill", {"teacher": str(sft_model.dir), "seq_kd": True})
    with pytest.raises(ConfigError, match="beta=2.0 and lmbda=1.0 must be in"):
        make_config("gkd", {"teacher": str(sft_model.dir), "beta": 2.0, "lmbda": 1.0})
    with pytest.raises(ConfigError, match="iw_opd_gamma=0.2 would do nothing"):
        make_config("distill", {"teacher": str(sft_model.dir), "iw_opd_gamma": 0.2})
    with pytest.raises(ConfigError, match="beta=0.5 would do nothing: it is the divergence of distill_loss=jsd"):
        make_config("distill", {"teacher": str(sft_model.dir), "distill_loss": "sampled", "beta": 0.5})
    with pytest.raises(ConfigError, match="distill_loss='sample'"):
        make_config("distill", {"teacher": str(sft_model.dir), "distill_loss": "sample"})
    with pytest.raises(ConfigError, match="dynamic_sampling applies to the algorithms that sample and reward"):
        make_config("distill", {"teacher": str(sft_model.dir), "dynamic_sampling": True})
    model, tokenizer = load_model(str(sft_model.dir))
    wider = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "vocab_size": model.config.vocab_size + 1}))
    with pytest.raises(LLMError, match="the teacher's output layer has"):
        train_llm("distill", {"steps": 1}, tmp_path, verbose=False, model=model, tokenizer=tokenizer, teacher=wider)
    with pytest.raises(LLMError, match="the teacher given is the model being trained"):
        train_llm("distill", {"steps": 1}, tmp_path, verbose=False, model=model, tokenizer=tokenizer, teacher=model)
    assert main(["llm", "train", "distill", "--steps", "1", "--runs-dir", str(tmp_path)]) == 2


def test_the_cli_distills_from_a_run_directory(sft_model, tmp_path, capsys):
    argv = ["llm", "train", "gkd", "--teacher", str(sft_model.dir), "--steps", "2", "--set", "batch_size=4",
            "--set", "eval_size=4", "--set", "seq_kd=true", "--runs-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    run_dir = next(tmp_path.iterdir())
    config = (run_dir / "config.yaml").read_text()
    assert f"teacher: {sft_model.dir}" in config and "seq_kd: true" in config
    assert "run directory:" in capsys.readouterr().out


def test_bema_averages_the_weights_as_trls_callback_does():
    from policylab.llm.trainer import WeightAverage

    cfg = make_config("grpo", {"bema": True, "bema_update_freq": 2, "bema_update_after": 1, "bema_lag": 3})
    param = torch.zeros(1)
    bema = WeightAverage([param], cfg)
    theta0 = ema = None
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        param.fill_(value)
        bema.after_step(step)
        if step == 1:  # the snapshot
            theta0 = ema = value
        elif (step - 1) % 2 == 0:  # steps 3 and 5: beta = (3 + t)^-0.5, alpha = (3 + t)^-0.2
            beta, alpha = (3 + step) ** -0.5, (3 + step) ** -0.2
            ema = (1 - beta) * ema + beta * value
            assert float(bema.current[0]) == pytest.approx(ema + alpha * (value - theta0), rel=1e-6)
    assert float(bema.ema[0]) == pytest.approx(ema, rel=1e-6)


def test_a_bema_run_saves_its_averaged_model_and_resumes_it_exactly(sft_model, tmp_path):
    settings = {"model": str(sft_model.dir), "steps": 6, "eval_every": 2, "batch_size": 4, "group_size": 4,
                "eval_size": 8, "bema": True, "bema_update_freq": 2}  # fmt: skip
    full = train_llm("grpo", settings, tmp_path, name="full", verbose=False)
    part = train_llm("grpo", settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 3)
    resumed = train_llm(resume=part.dir, verbose=False)
    from safetensors.torch import load_file

    a, b = (load_file(str(run.dir / "model_bema" / "model.safetensors")) for run in (full, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    final = _weights(full.dir)
    assert any(not torch.equal(a[key], final[key]) for key in a)  # an average, not the last weights
    from policylab.llm.trainer import evaluate_llm

    # a plain save_pretrained directory, evaluated as users will (`policylab llm eval RUN/model_bema`)
    assert 0.0 <= evaluate_llm(str(full.dir / "model_bema"), eval_size=8)["accuracy"] <= 1.0
    dpo = {"model": str(sft_model.dir), "steps": 6, "eval_every": 2, "batch_size": 4, "eval_size": 8, "bema": True,
           "bema_update_freq": 2, "bema_update_ref_model": True, "bema_ref_model_update_freq": 4}  # fmt: skip
    full = train_llm("dpo", dpo, tmp_path, name="dpo-full", verbose=False)
    part = train_llm("dpo", dpo, tmp_path, name="dpo-part", verbose=False, callback=lambda step, _: step < 5)
    resumed = train_llm(resume=part.dir, verbose=False)  # needs the reference BEMA moved at step 4
    a, b = _weights(full.dir), _weights(resumed.dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    from policylab.llm.trainer import LLMTrainer

    trainer = LLMTrainer(make_config("dpo", {**dpo, "bema_ref_model_update_freq": 1}))
    trainer.step = 1
    trainer.dpo_step()
    trainer.after_step(1)
    assert trainer.bema is not None and trainer.reference is not None
    for ref, weights in zip(trainer.reference.parameters(), trainer.bema.current, strict=True):
        assert torch.equal(ref, weights)
    with pytest.raises(LLMError, match="bema_update_ref_model=true moves the reference model, and this grpo run"):
        LLMTrainer(make_config("grpo", {"model": str(sft_model.dir), "bema": True, "bema_update_ref_model": True}))
    with pytest.raises(ConfigError, match="bema=true needs full weights"):
        make_config("grpo", {"bema": True, "lora_rank": 4})
    with pytest.raises(ConfigError, match="bema_lag=3 would do nothing"):
        make_config("grpo", {"bema_lag": 3})


# --- memory options: micro-batches, gradient checkpointing, LoRA --------------------------------------------------


def _gradients_of_one_update(model_dir, **overrides) -> list[torch.Tensor]:
    """The gradient of one RL update on a fixed rollout (the same seed draws the same prompts and samples), every
    third completion cut to 2 tokens (the SFT model's are all 4: an answer's 3 digits and EOS) and the advantages
    drawn at random (under the sampled 0/1 rewards a batch may have none)."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(model_dir), "batch_size": 4, "group_size": 4, "eval_size": 8, "seed": 5, **overrides}
    trainer = LLMTrainer(make_config("grpo", settings))
    rollout, _, _ = trainer.sample_groups()
    rollout.completion_mask[1::3, 2:] = False
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(0))
    trainer.optimizer.zero_grad()
    trainer.accumulate(rollout, advantages)
    grads = [p.grad.clone() for p in trainer.optimizer.params if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0
    return grads


def test_an_rl_step_reading_the_sampler_tape_takes_the_gradients_of_computing_every_forward(sft_model, monkeypatch):
    """Two updates on one batch: the first reads the sampler's tape, the second (the optimizer has changed the
    weights in place) must compute its forward; both gradients equal those of computing every forward."""
    from policylab.llm.trainer import LLMTrainer

    def gradients_of_one_step(record: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(LLMTrainer, "trains_on_sampled_batch", property(lambda self: record))
        settings = {"model": str(sft_model.dir), "batch_size": 4, "group_size": 4, "eval_size": 8, "seed": 2,
                    "updates_per_batch": 2, "lr": 1e-2}  # fmt: skip
        trainer = LLMTrainer(make_config("grpo", settings))
        grads: list[torch.Tensor] = []
        step = trainer._step

        def recording_step() -> None:
            grads.extend(p.grad.clone() for p in trainer.optimizer.params)
            step()

        trainer._step = recording_step  # type: ignore[method-assign]
        trainer.rl_step()
        return grads

    taped, computed_grads = gradients_of_one_step(True), gradients_of_one_step(False)
    assert (
        min(float(g.abs().max()) for g in computed_grads[:3]) > 0
    )  # seed 2's groups have mixed rewards (5's had none)
    # the first update's gradients to float32 rounding (within 5e-6 of each tensor's largest); the second's are
    # at weights one Adam step (lr 1e-2) apart by that rounding, which Adam's normalization amplifies where a
    # gradient is near zero (within 2.8e-3 with the SFT model of 2026-12-07, a scratch run)
    first = len(taped) // 2
    for i, (with_tape, computed) in enumerate(zip(taped, computed_grads, strict=True)):
        scale = (1e-4 if i < first else 1e-2) * float(computed.abs().max())
        torch.testing.assert_close(with_tape, computed, rtol=1e-3, atol=scale)


@pytest.mark.parametrize(
    "settings",
    [
        *({"aggregation": mode} for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")),
        *(
            {"loss": loss, "clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "token-mean"}
            for loss in ("gspo", "luspo", "gspo_token")
        ),
        {"loss": "gmpo", "clip_low": 0.4, "clip_high": 0.4, "aggregation": "token-mean"},
    ],
    ids=lambda settings: next(iter(settings.values())),
)
def test_micro_batches_give_the_full_batchs_gradient(sft_model, settings):
    """Each chunk's loss weighted by its share of the batch: its tokens under token-mean, its rows for the
    per-sequence modes and the per-sequence losses (gspo, luspo, gmpo: aggregation does not apply to them, and
    under token-mean luspo's and gmpo's chunks were weighted by their tokens)."""
    full = _gradients_of_one_update(sft_model.dir, **settings)
    micro = _gradients_of_one_update(sft_model.dir, **settings, micro_batch_size=3)
    assert len(full) == len(micro) > 0
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradient(sft_model):
    from policylab.llm.trainer import LLMTrainer

    model = LLMTrainer(make_config("grpo", {"model": str(sft_model.dir), "gradient_checkpointing": True})).model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    plain = _gradients_of_one_update(sft_model.dir)
    checkpointed = _gradients_of_one_update(sft_model.dir, gradient_checkpointing=True)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_trains_only_the_adapters_and_saves_a_merged_model(sft_model, tmp_path):
    from policylab.llm.trainer import LLMTrainer

    trainer = LLMTrainer(make_config("grpo", {"model": str(sft_model.dir), "lora_rank": 4, "eval_size": 8}))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    run = train_llm(
        "grpo",
        {"model": str(sft_model.dir), "lora_rank": 4, "steps": 2, "batch_size": 4, "eval_size": 8},
        tmp_path,
        verbose=False,
    )
    model, _ = load_model(run.dir)
    assert not any("lora" in n for n, _ in model.named_parameters())


# --- exact resume ------------------------------------------------------------------------------------------------


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


TR_DPO = {"sync_ref_model": True, "ref_model_sync_steps": 2, "use_weighting": True}
"""DPO whose reference moves (TR-DPO: at steps 2, 4, 6), with WPO's weights: the resumed run needs the reference
of step 2 from the checkpoint."""


def test_grpo_moves_its_kl_reference_toward_the_policy_every_n_steps(sft_model):
    """TRL's GRPOConfig sync_ref_model: after every ref_model_sync_steps-th step the KL term's reference becomes
    alpha * policy + (1 - alpha) * reference; without kl_coef there is no reference to move, an error."""
    from policylab.llm.trainer import LLMTrainer
    from tests.helpers import assert_synced_every_second_step

    settings = {"model": str(sft_model.dir), "batch_size": 4, "group_size": 4, "kl_coef": 0.1,
                "sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.25}  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", settings))
    assert trainer.reference is not None and trainer.moving_reference
    assert_synced_every_second_step(trainer, trainer.reference, trainer.rl_step, 0.25)
    with pytest.raises(ConfigError, match="kl_coef=0 keeps none") as info:
        make_config("grpo", {"sync_ref_model": True})
    assert "kl_coef" in (info.value.fix or "")


@pytest.mark.parametrize(
    ("algo", "extra"),
    [
        ("grpo", {"group_size": 4}),
        ("ppo", {"group_size": 4}),
        ("dpo", TR_DPO),
        ("gkd", {"group_size": 2, "seq_kd": True, "model": "tiny-llama"}),  # the student's and the teacher's samples
        ("grpo", {"group_size": 4, "use_adaptive_entropy": True, "entropy_coef": 0.01, "entropy_target": 9.0}),
        ("grpo", {"group_size": 4, "kl_coef": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 2}),  # its KL ref
        ("a2po", {"num_value_samples": 4}),
        ("sdpo", {"group_size": 4}),  # its EMA teacher from the checkpoint
        ("xpo", {}),
        ("nash_md", {}),  # the mixture's draws from the run's generator
        ("ssd", {}),
        ("bco", {}),  # its running mean of the rewards from the checkpoint
        ("sft", {"neftune_noise_alpha": 0.5}),  # its noise from the run's generator
        ("prm", {}),  # its head, and the stepwise rows' corruptions from the numpy generator
        ("grpo", {"group_size": 4, "replay_buffer_size": 2}),  # its kept groups and their scores
        ("gold", {"model": "tiny-llama-pairs", "use_uld_loss": True, "uld_use_hybrid_loss": True}),  # another tokenizer
    ],
)
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(sft_model, tmp_path, algo, extra):
    settings = {
        **({"teacher": str(sft_model.dir)} if algo in ("gkd", "gold") else {}),
        "model": str(sft_model.dir),
        "steps": 6,
        "eval_every": 2,
        "batch_size": 4,
        "eval_size": 8,
        "train_size": 10,  # the part stops 2 rows into the second epoch of prompts
        **extra,
    }
    full = train_llm(algo, settings, tmp_path, name="full", verbose=False)
    part = train_llm(algo, settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 3)
    assert part.steps == 3
    resumed = train_llm(resume=part.dir, verbose=False)
    assert resumed.steps == 6
    a, b = _weights(full.dir), _weights(resumed.dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with open(resumed.dir / "train.csv") as f:
        assert [int(float(row["step"])) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    if algo == "grpo":  # a checkpoint without the rows' epoch positions cannot resume exactly: it says so
        import json

        for state_file in (part.dir / "checkpoints").glob("*/state.json"):
            state = json.loads(state_file.read_text())
            del state["row_orders"]
            state_file.write_text(json.dumps(state))
        with pytest.raises(LLMError, match="before policylab drew rows in shuffled epochs"):
            train_llm(resume=part.dir, verbose=False)


def test_sapo_gate_gives_reinforces_gradient_at_ratio_one_and_fades_away_from_it():
    from policylab.objectives.policy import sapo_loss

    old = torch.tensor([[0.0, 0.0, -2.0]])
    logp = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)  # ratios 1, 1, e^2
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    loss, _ = sapo_loss(logp, old, advantages, torch.ones(1, 3, dtype=torch.bool), aggregation="seq-mean-token-sum")
    loss.backward()
    # d/dlogp of -sigmoid(tau (r - 1)) 4 / tau * A = -4 sigmoid' (tau (r - 1)) r A
    r = math.exp(2.0)
    fading = -4 * (1 / (1 + math.exp(-(r - 1)))) * (1 - 1 / (1 + math.exp(-(r - 1)))) * r
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 1.0, fading]]))
    assert abs(fading) < 0.1  # far from the old policy, little gradient


def _small_llama_config(tok, **values):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, pad_token_id=tok.pad_token_id, **values
    )


def test_a_sequence_classification_model_scores_completions_as_a_reward(tmp_path):
    from transformers import LlamaForSequenceClassification

    from policylab.llm.rewards import load_reward

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = _small_llama_config(tok, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fn, weight = load_reward(f"model:{tmp_path / 'rm'}=0.5")
    scores = fn(["1+1=", "12+30="], ["2", "42"])
    assert weight == 0.5 and len(scores) == 2 and all(math.isfinite(x) for x in scores)
    assert fn(["12+30="], ["42"]) == pytest.approx(scores[1:], abs=1e-5)  # padding does not change a score
    with pytest.raises(LLMError, match="no reward model"):
        load_reward(f"model:{tmp_path / 'missing'}")


def test_the_numpy_attention_softmax_and_its_backward_equal_torchs_with_rows_far_apart():
    """fast_decode.softmax shifts the whole array by its maximum (one reduction): a row whose scores are far under
    the others' (here 200 lower, where exp underflows) is redone with its own shift; -inf keys get 0. Both it and
    fast_train's backward match torch's softmax and its autograd gradient."""
    from policylab.llm.fast_decode import softmax
    from policylab.llm.fast_train import _softmax_backward

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 2, 1, 4, 5)).astype(np.float32)
    scores[1] -= 200.0
    assert np.exp(scores[1] - scores.max()).sum() == 0  # the shared shift alone would divide by zero
    scores[..., 0, 3:] = -np.inf  # masked keys
    grad = rng.normal(size=scores.shape).astype(np.float32)
    expected = torch.from_numpy(scores).requires_grad_(True)
    probs = torch.softmax(expected, -1)
    probs.backward(torch.from_numpy(grad))
    ours = softmax(scores)
    np.testing.assert_allclose(ours, probs.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert (ours[..., 0, 3:] == 0).all() and np.isfinite(ours).all()
    assert expected.grad is not None
    np.testing.assert_allclose(_softmax_backward(grad, ours), expected.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["numpy", "whole", "tape", "torch"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_prompt_shared_training_forward_equals_transformers_forward_with_gradients(monkeypatch, path, tied):
    """The prompt-shared training pass computes each distinct prompt once (groups share theirs), in numpy with its
    backward written out (fast_train, float32; `tape`: its forward read from the sampler's recorded activations;
    `whole`: rows that share no prompt but one, each laid out whole, `Stream.whole`) or in torch
    (LlamaDecoder.completion_logits, other dtypes): the log-probs, entropies, value-head states and every
    parameter's gradient equal those of transformers' forward over each row's prompt + completion in float64, as
    closely as transformers' own float32 pass does (grouped-query attention, left-padded prompts, completions of
    several lengths, tied or separate embeddings)."""
    import copy

    from transformers import LlamaForCausalLM

    from policylab.llm import fast_train

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = _small_llama_config(
        tok, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied
    )
    model = LlamaForCausalLM(config).train()
    prompts = ["12+34=", "5+6=", "99+1="] * 3
    if path == "whole":  # one prompt twice: copying it costs less than sharing saves
        prompts = ["12+34=", "5+6=", "99+1=", "7+8=", "45+45=", "3+60=", "88+9=", "1+1=", "12+34="]
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    generator = torch.Generator().manual_seed(1)
    rollout = generate(model, enc["input_ids"], enc["attention_mask"], generator=generator, record=True, **kwargs)
    lengths = torch.tensor([6, 3, 1] * 3)
    rollout = rollout.with_mask(rollout.completion_mask & (torch.arange(6) < lengths[:, None]))
    assert fast_train.supports(model)
    stream = fast_train.token_stream(fast_train.LlamaDecoder(model, weights=False), rollout.prompt_ids,
                                     rollout.prompt_mask, rollout.completion_ids, whole=True)  # fmt: skip
    assert stream.whole == (path == "whole")
    if path == "torch":  # (and the numpy pass must not run)
        monkeypatch.setattr(fast_train, "supports", lambda model: False)
        monkeypatch.setattr(fast_train, "_forward", lambda *args: pytest.fail("the numpy pass ran"))
    if path == "tape":  # the pass must not compute its forward
        monkeypatch.setattr(fast_train, "_forward", lambda *args: pytest.fail("the tape was not used"))
    tape = rollout.tape if path == "tape" else None

    def outputs(model, fast):
        model.zero_grad()
        hidden: list[torch.Tensor] = []
        mask = rollout.completion_mask
        logp, entropy = token_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask, 0.9, hidden, fast, tape
        )
        states = hidden[0] * mask[..., None]
        (logp.sum() + (entropy * mask).sum() + states.square().sum()).backward()
        return [logp, entropy * mask, states, *(p.grad for p in model.parameters())]

    exact = [x.float() for x in outputs(copy.deepcopy(model).double(), fast=False)]
    for ours, theirs, reference in zip(outputs(model, True), outputs(model, False), exact, strict=True):
        bound = (theirs - reference).abs().max() + 1e-4 * reference.abs().max()
        assert (ours - reference).abs().max() <= 2 * bound


def test_the_sampler_tape_serves_only_the_weights_and_tokens_it_was_recorded_with(sft_model):
    """A rollout's tape stands in for the training forward only at the same parameters, unmodified since the
    sampling (an optimizer step changes them in place), and on the same rows (a sub-batch or changed tokens fall
    back to computing the forward), and until a later recording of the same shapes reuses its arrays. A decode
    that stopped early (every row ended) serves as well: the positions after the longest completion are masked in
    every loss, and the pass's gradients equal the computed ones."""
    from policylab.llm import fast_train

    model, tok = load_model(str(sft_model.dir))
    enc = tok(["12+34=", "5+6="] * 4, padding=True, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, record=True)
    rollout = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=3, **kwargs)

    def usable(r):
        decoder = fast_train.LlamaDecoder(model, weights=False)
        stream = fast_train.token_stream(decoder, r.prompt_ids, r.prompt_mask, r.completion_ids)
        return r.tape is not None and r.tape.usable(tuple(fast_train.parameters_of(model)), stream)

    assert usable(rollout) and usable(rollout.with_mask(rollout.completion_mask & False))
    assert not usable(rollout.select(torch.arange(4)))
    changed = rollout.completion_ids.clone()
    changed[0, 0] = tok.eos_token_id if changed[0, 0] != tok.eos_token_id else tok.pad_token_id
    assert not usable(replace(rollout, completion_ids=changed))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # same values, a new version
    assert not usable(rollout)

    rollout = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40, greedy=True, **kwargs)
    assert rollout.completion_mask.sum(1).max() < 39 and usable(rollout)  # every row ended well before 40 tokens
    results = []
    for tape, fast in ((rollout.tape, True), (None, True), (None, False)):  # transformers' pass: every column
        model.zero_grad()
        mask = rollout.completion_mask
        logp, _ = token_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, mask, tape=tape, fast=fast
        )
        logp.sum().backward()
        results.append([logp.detach(), *(p.grad.clone() for p in model.parameters())])
    assert rollout.tape.length == int(rollout.completion_mask.sum(1).max()) - 1  # the pass left out the tail
    for with_tape, computed, full in zip(*results, strict=True):
        torch.testing.assert_close(with_tape, computed, atol=1e-4 * float(computed.abs().max()), rtol=1e-4)
        torch.testing.assert_close(computed, full, atol=1e-4 * float(full.abs().max()), rtol=1e-4)
    again = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=40, greedy=True, **kwargs)
    assert usable(again) and not usable(rollout)  # a later tape of the same shapes took this one's arrays


def test_a_tape_whose_rows_all_ended_at_their_first_token_leaves_the_pass_to_compute_its_forward():
    """Every row's first token its EOS (the EOS row of the tied output layer along the prompt's last state, top_k
    1): the decode records only the prefill, and the training pass on those completions computes its own
    forward instead of shortening a tape that holds no completion position."""
    model, tok = load_model("tiny-llama", seed=0)
    enc = tok(["12+34="] * 4, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        state = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[tok.eos_token_id] = 50.0 * state / state.norm()
    rollout = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=4, top_k=1, record=True,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert rollout.completion_mask.sum(1).tolist() == [1, 1, 1, 1] and rollout.tape is not None
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with_tape, _ = token_logprobs(model, *args, tape=rollout.tape)
    torch.testing.assert_close(with_tape, token_logprobs(model, *args)[0])


def test_the_fast_llama_decoder_samples_what_transformers_forward_samples(monkeypatch):
    """LlamaDecoder (no transformers per-call machinery) against transformers' own forward, with grouped-query
    attention and left padding: the same tokens from the same seed, the same log-probs."""
    from transformers import LlamaForCausalLM

    from policylab.llm.fast_decode import LlamaDecoder, NumpyDecoder

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = _small_llama_config(
        tok, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0
    )
    model = LlamaForCausalLM(config).eval()
    assert LlamaDecoder.supports(model)
    enc = tok(["12+34=", "5+6=", "99+1="] * 3, padding=True, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.9)
    fast = generate(
        model, enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(4), **kwargs
    )
    slow = generate(
        model, enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(4), fast=False, **kwargs
    )
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)
    # float32 weights decode in numpy (NumpyDecoder); others through LlamaDecoder's torch forward: the same here
    monkeypatch.setattr(NumpyDecoder, "supports", staticmethod(lambda decoder: False))
    in_torch = generate(
        model, enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(4), **kwargs
    )
    assert torch.equal(in_torch.completion_ids, slow.completion_ids)
    torch.testing.assert_close(in_torch.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [1, 3])
def test_the_training_pass_takes_completions_of_one_token(width):
    """Completions that all end at their first token (every row's EOS first, or max_new_tokens=1): the pass has no
    completion position to run, only each prompt's last; log-probs and gradients as transformers' pass."""
    model, tok = load_model("tiny-llama")
    enc = tok(["12+34=", "5+6="], padding=True, return_tensors="pt", add_special_tokens=False)
    ids = torch.full((2, width), tok.pad_token_id)
    ids[:, 0] = tok.eos_token_id
    mask = torch.zeros((2, width), dtype=torch.bool)
    mask[:, 0] = True
    results = []
    for fast in (True, False):
        model.zero_grad()
        logp, _ = token_logprobs(model, enc["input_ids"], enc["attention_mask"], ids, mask, fast=fast)
        logp.sum().backward()
        results.append([logp.detach(), *(p.grad.clone() for p in model.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)


def test_the_training_pass_reuses_a_batchs_token_stream_only_while_the_batch_is_unchanged(sft_model):
    """DPO's policy and reference passes read one batch: the second gets the first's stream; a batch changed in
    place, another batch, a model with other attention shapes, or another layout (rows whole, `Stream.whole`,
    where that pays and no tape is read) get a new one."""
    from policylab.llm import fast_train

    model, tok = load_model(str(sft_model.dir))
    decoder = fast_train.LlamaDecoder(model, weights=False)
    enc = tok(["12+34=", "5+6="], padding=True, return_tensors="pt", add_special_tokens=False)
    ids = torch.tensor([[5, 6, tok.eos_token_id], [7, tok.eos_token_id, tok.pad_token_id]])
    batch = (enc["input_ids"], enc["attention_mask"], ids)
    first = fast_train.shared_stream(decoder, *batch)
    assert fast_train.shared_stream(decoder, *batch) is first
    ids[1, 2] = tok.eos_token_id  # in place: a new version
    changed = fast_train.shared_stream(decoder, *batch)
    assert changed is not first and changed.tokens[-1] == tok.eos_token_id
    assert fast_train.shared_stream(decoder, batch[0], batch[1], ids.clone()) is not changed
    other = fast_train.LlamaDecoder(model, weights=False)
    other.heads, other.kv_heads = other.heads * 2, other.kv_heads * 2
    assert fast_train.shared_stream(other, *batch) is not fast_train.shared_stream(decoder, *batch)
    # a pass without a tape may take the rows whole (two distinct prompts: it pays), one with a tape may not
    split = fast_train.shared_stream(decoder, *batch)
    whole = fast_train.shared_stream(decoder, *batch, whole=True)
    assert whole.whole and not split.whole and fast_train.shared_stream(decoder, *batch, whole=True) is whole
    assert not fast_train.shared_stream(decoder, *batch).whole
    # rows in groups of a prompt (an RL step's): the split stream serves the passes with a tape and without
    grouped = tuple(t.repeat_interleave(4, 0) for t in batch)
    first = fast_train.shared_stream(decoder, *grouped)
    assert fast_train.shared_stream(decoder, *grouped, whole=True) is first and not first.whole


def test_the_numpy_decoder_reads_the_weights_of_the_moment():
    """NumpyDecoder copies the weights into the arrays of the model's previous decode: after an in-place change (an
    optimizer step), the next decode samples what transformers' forward samples with the new weights."""
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    config = _small_llama_config(tok, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    enc = tok(["12+34=", "5+6="] * 2, padding=True, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def both() -> tuple:
        return tuple(
            generate(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                generator=torch.Generator().manual_seed(1),
                fast=fast,
                **kwargs,
            )  # fmt: skip
            for fast in (True, False)
        )

    before, _ = both()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fast, slow = both()
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast.logprobs, before.logprobs)


# --- Python objects instead of names and paths ------------------------------------------------------------------


def _addition_dataset(n: int, seed: int):
    from datasets import Dataset

    from policylab.llm.tasks import get_task

    return Dataset.from_list([{**row, "level": "two-digit"} for row in get_task("addition").make(n, seed)])


def test_train_llm_takes_a_model_object_a_dataset_and_reward_functions(sft_model, tmp_path):
    """The model and tokenizer as objects, the prompts as a datasets.Dataset, the reward as a Python function
    (it receives the dataset's columns): GRPO raises accuracy as it does from paths, the model object is the
    one trained, and config.yaml records what was given."""
    import yaml

    model, tokenizer = load_model(sft_model.dir)
    calls = []

    def digits_match(prompts, completions, answer, **columns):
        calls.append(sorted(columns))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    overrides = {"steps": 60, "batch_size": 32, "group_size": 8, "eval_every": 60, "eval_size": 200}
    run = train_llm(
        "grpo",
        overrides,
        tmp_path,
        verbose=False,
        model=model,
        tokenizer=tokenizer,
        prompts=_addition_dataset(2000, 0),
        eval_prompts=_addition_dataset(200, 1_000_003),
        rewards=[(digits_match, 1.0)],
    )
    assert run.final_eval["accuracy"] >= run.initial_eval["accuracy"] + 0.15, (run.initial_eval, run.final_eval)
    assert calls and calls[0] == ["level"]  # the dataset's other columns reach the function
    saved, trained = _weights(run.dir), model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)
    config = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert config["model"] == "python:LlamaForCausalLM" and config["prompts"] == "python:Dataset"
    assert config["rewards"] == ["python:digits_match=1.0"]


def test_a_run_given_python_objects_resumes_exactly_when_they_are_given_again(sft_model, tmp_path):
    def make_inputs():
        model, tokenizer = load_model(sft_model.dir)
        return {"model": model, "tokenizer": tokenizer, "prompts": _addition_dataset(200, 0).to_list()}

    settings = {"steps": 6, "eval_every": 2, "batch_size": 4, "group_size": 4, "eval_size": 8}
    full = train_llm("grpo", settings, tmp_path, name="full", verbose=False, **make_inputs())
    part = train_llm(
        "grpo", settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 3, **make_inputs()
    )
    expected = r"Python objects for model, prompts(.|\n)*train_llm\(resume=RUN, model=\.\.\., prompts"
    with pytest.raises(LLMError, match=expected):
        train_llm(resume=part.dir, verbose=False)
    resumed = train_llm(resume=part.dir, verbose=False, **make_inputs())
    a, b = _weights(full.dir), _weights(resumed.dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_python_inputs_that_cannot_work_are_one_clear_error_each(sft_model, tmp_path):
    model, tokenizer = load_model(sft_model.dir)
    settings = {"steps": 1, "eval_size": 8}
    cases = [
        ({"model": model}, "without its tokenizer"),
        ({"model": object(), "tokenizer": tokenizer}, "not a transformers causal LM"),
        ({"prompts": [{"question": "1+1="}]}, 'prompts, row 0: no "prompt" string'),
        ({"prompts": 42}, "prompts is a int"),
        ({"rewards": [3]}, "reward 3 is not callable"),
    ]
    for given, message in cases:
        with pytest.raises(LLMError, match=message):
            train_llm("grpo", settings, tmp_path, verbose=False, **given)


def test_modes_switch_for_sampling_only_where_dropout_makes_them_differ():
    from policylab.llm.trainer import has_dropout

    model, _ = load_model("tiny-llama")
    assert not has_dropout(model)
    model.config.attention_dropout = 0.1  # Llama applies it functionally: no module shows it
    assert has_dropout(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.2))
    assert has_dropout(model)


# --- generation workers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


WORKER_RUN = {"steps": 4, "eval_every": 2, "batch_size": 4, "group_size": 4, "eval_size": 8, "generation_workers": 2}


def test_generation_workers_on_ray_compute_the_inline_run(sft_model, tmp_path, local_ray):
    runs = {}
    for backend in ("ray", "inline"):
        settings = {"model": str(sft_model.dir), **WORKER_RUN, "generation_backend": backend}
        runs[backend] = train_llm("grpo", settings, tmp_path, name=backend, verbose=False)
    a, b = _weights(runs["ray"].dir), _weights(runs["inline"].dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with open(runs["ray"].dir / "train.csv") as f, open(runs["inline"].dir / "train.csv") as g:
        assert [r["reward"] for r in csv.DictReader(f)] == [r["reward"] for r in csv.DictReader(g)]


def test_generation_workers_sample_from_the_learners_current_weights(sft_model):
    """After two updates the workers' behaviour log-probs equal the learner's model's log-probs of the same
    completions: the weights reached every worker."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), **WORKER_RUN, "generation_backend": "inline", "lr": 3e-3}
    trainer = LLMTrainer(make_config("grpo", settings))
    assert trainer.workers is not None
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.rl_step()
    trainer.rl_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    rows = [row for row in trainer.sample_rows(3) for _ in range(4)]
    rollout, _ = trainer.rollout(rows)
    trainer.model.eval()
    logp, _ = token_logprobs(
        trainer.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
    )
    mask = rollout.completion_mask
    torch.testing.assert_close(logp[mask], rollout.logprobs[mask], rtol=0, atol=2e-5)
    assert rollout.completion_ids.shape == (12, trainer.max_new_tokens)


def test_a_run_with_generation_workers_resumes_exactly(sft_model, tmp_path):
    settings = {"model": str(sft_model.dir), **WORKER_RUN, "steps": 6, "generation_backend": "inline"}
    full = train_llm("grpo", settings, tmp_path, name="full", verbose=False)
    part = train_llm("grpo", settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 3)
    resumed = train_llm(resume=part.dir, verbose=False)
    a, b = _weights(full.dir), _weights(resumed.dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_killed_generation_worker_is_restarted_and_the_run_completes(sft_model, tmp_path, local_ray):
    import os
    import signal

    from tests.helpers import ray_process_pids

    killed: list[int] = []

    def kill_after_first_step(step: int, _metrics: dict) -> bool:
        if step == 1:
            pid = ray_process_pids("ray::GenerationWorker")[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return True

    settings = {"model": str(sft_model.dir), **WORKER_RUN, "generation_backend": "ray"}
    run = train_llm("grpo", settings, tmp_path, verbose=False, callback=kill_after_first_step)
    assert killed and run.steps == 4
    with open(run.dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(row["step"])) for row in rows] == [1, 2, 3, 4]
    assert [float(row["worker_restarts"]) for row in rows] == [0.0, 1.0, 1.0, 1.0]


def test_bad_generation_worker_settings_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="generation_workers=-1 must be >= 0"):
        make_config("grpo", {"generation_workers": -1}).validate()
    with pytest.raises(ConfigError, match="generation_backend='gpu' is not one of ray, inline"):
        make_config("grpo", {"generation_workers": 1, "generation_backend": "gpu"}).validate()
    monkeypatch.setitem(sys.modules, "ray", None)
    from policylab.llm.trainer import LLMTrainer

    with pytest.raises(PolicylabError, match="generation_workers with generation_backend=ray needs Ray") as info:
        LLMTrainer(make_config("grpo", {"generation_workers": 2, "eval_size": 8}))
    assert "generation_backend=inline" in info.value.fix


# --- what a user of the command line sees: resume, messages, run directories --------------------------------------

SMALL = {"steps": 2, "eval_every": 1, "batch_size": 4, "group_size": 4, "eval_size": 8}


def test_algorithms_that_sample_nothing_refuse_generation_workers_and_sampling_settings_first(
    tmp_path, monkeypatch, capsys
):
    """SFT and offline DPO sample no completions: generation_workers > 0 (which started Ray for nothing) and the
    other sampling settings away from their defaults are a config error naming the algorithms that sample,
    raised before a model loads or a worker starts. Their defaults, max_new_tokens (the evaluation decodes with
    it) and a saved config (what a resume passes) are accepted."""
    from dataclasses import asdict

    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import ALGOS, SAMPLING_ALGOS, SAMPLING_SETTINGS

    def must_not_start(*args, **kwargs):
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(trainer_module, "GenerationWorkers", must_not_start)
    monkeypatch.setattr(trainer_module, "load_model", must_not_start)
    assert set(SAMPLING_ALGOS) == set(ALGOS) - {
        "sft",
        "dpo",
        "cpo",
        "simpo",
        "orpo",
        "tpo",
        "kto",
        "bco",
        "reward_model",
        "prm",
    }
    takers = (
        r"the algorithms that sample: grpo, dr_grpo, dapo, gspo, cispo, sapo, gmpo, rloo, reinforce\+\+, ppo, "
        r"online_dpo"
    )
    runs = tmp_path / "runs"
    for algo in ("sft", "dpo"):
        message = rf"{algo} does not use generation_workers=2: it trains on .* samples no completions, so it would"
        applies = rf" do nothing; generation_workers applies to {takers}(.|\n)*drop generation_workers"
        with pytest.raises(ConfigError, match=message + applies):
            train_llm(algo, {"generation_workers": 2, "steps": 2}, runs, verbose=False)
    assert _cli("sft", "--set", "generation_workers=2", "--steps", 2, "--runs-dir", runs, "--no-progress") == 2
    assert "sft does not use generation_workers=2" in capsys.readouterr().err
    assert _cli("train", "dpo", "--group-size", 4, "--steps", 2, "--runs-dir", runs, "--no-progress") == 2
    assert "dpo does not use group_size=4" in capsys.readouterr().err
    others = {
        "generation_backend": "inline",
        "group_size": 4,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "updates_per_batch": 2,
        "dynamic_sampling": True,
        "max_sampling_rounds": 2,
        "overlong_filter": True,
        "overlong_buffer": 2,
        "overlong_penalty": 0.5,
    }
    assert set(others) | {"generation_workers"} == set(SAMPLING_SETTINGS)
    for algo in ("sft", "dpo", "orpo"):
        for name, value in others.items():
            with pytest.raises(ConfigError, match=rf"does not use {name}={value}:(.|\n)*drop {name}"):
                make_config(algo, {name: value})
        with pytest.raises(ConfigError, match=r"use generation_workers=1, temperature=0.5:(.|\n)*drop generation_"
                           r"workers and temperature, or train one of those"):  # fmt: skip
            make_config(algo, {"generation_workers": 1, "temperature": 0.5})
        make_config(algo, {"max_new_tokens": 8, "group_size": 8, "generation_workers": 0})  # the defaults' values
        make_config(algo, asdict(make_config(algo)))  # a saved config.yaml holds every key
    assert not runs.exists()
    for algo in SAMPLING_ALGOS:
        teacher = {"teacher": "runs/sft"} if algo in ("distill", "gkd", "gold", "minillm") else {}
        assert make_config(algo, {"generation_workers": 2, "temperature": 0.7, **teacher}).generation_workers == 2


POLICY_GRADIENT = (
    r"the policy-gradient algorithms: grpo, dr_grpo, dapo, gspo, cispo, sapo, gmpo, rloo, reinforce\+\+, ppo, minillm, "
    r"sdpo"
)
GROUP_ADVANTAGE = (
    r"the group-advantage algorithms: grpo, dr_grpo, dapo, gspo, cispo, sapo, gmpo, rloo, reinforce\+\+, minillm, "
    r"sdpo"
)
UNUSED = {
    "sft": [
        ("kl_coef", 0.1, POLICY_GRADIENT),
        ("clip_high", 0.28, POLICY_GRADIENT),
        ("loss", "cispo", POLICY_GRADIENT),
        ("aggregation", "token-mean", POLICY_GRADIENT),
        ("entropy_coef", 0.01, POLICY_GRADIENT),
        ("micro_batch_size", 4, POLICY_GRADIENT),
        ("advantage", "rloo", GROUP_ADVANTAGE),
        ("mix", "chord", GROUP_ADVANTAGE),
        ("beta", 0.5, "dpo, online_dpo, xpo, nash_md, cpo, simpo, orpo, tpo, kto, bco, distill, gkd, gold"),
        ("vf_coef", 1.0, "ppo"),
        ("pairs", "p.jsonl", "dpo, cpo, simpo, orpo, tpo, kto, bco, reward_model, prm"),
    ],
    "dpo": [
        ("kl_coef", 0.1, POLICY_GRADIENT),
        ("dual_clip", 3.0, POLICY_GRADIENT),
        ("micro_batch_size", 4, POLICY_GRADIENT),
        ("mix", "chord", GROUP_ADVANTAGE),
        ("expert", "e.jsonl", GROUP_ADVANTAGE),
        ("gae_lambda", 0.9, "ppo"),
    ],
    "online_dpo": [
        ("updates_per_batch", 2, POLICY_GRADIENT),
        ("clip_low", 0.1, POLICY_GRADIENT),
        ("kl_coef", 0.1, POLICY_GRADIENT),
        ("micro_batch_size", 4, POLICY_GRADIENT),
        ("overlong_filter", True, GROUP_ADVANTAGE),
        ("mix", "luffy", GROUP_ADVANTAGE),
        ("pairs", "p.jsonl", "dpo, cpo, simpo, orpo, tpo, kto, bco, reward_model, prm"),
    ],
    "ppo": [
        ("advantage", "rloo", GROUP_ADVANTAGE),
        ("mix", "chord", GROUP_ADVANTAGE),
        ("overlong_filter", True, GROUP_ADVANTAGE),
        ("shaping_gamma", 0.5, GROUP_ADVANTAGE),
        ("beta", 0.5, "dpo, online_dpo, xpo, nash_md, cpo, simpo, orpo, tpo, kto, bco, distill, gkd, gold"),
        ("pairs", "p.jsonl", "dpo, cpo, simpo, orpo, tpo, kto, bco, reward_model, prm"),
    ],
    "grpo": [
        ("vf_coef", 1.0, "ppo"),
        ("gamma", 0.99, "ppo, minillm"),
        ("beta", 0.5, "dpo, online_dpo, xpo, nash_md, cpo, simpo, orpo, tpo, kto, bco, distill, gkd, gold"),
        ("label_smoothing", 0.1, "dpo, online_dpo, xpo, cpo, simpo, orpo, tpo"),
        ("pairs", "p.jsonl", "dpo, cpo, simpo, orpo, tpo, kto, bco, reward_model, prm"),
    ],
    "cispo": [
        ("gae_lambda", 0.9, "ppo"),
        ("beta", 0.2, "dpo, online_dpo, xpo, nash_md, cpo, simpo, orpo, tpo, kto, bco, distill, gkd, gold"),
    ],
    "orpo": [
        ("kl_coef", 0.1, POLICY_GRADIENT),
        ("entropy_coef", 0.01, POLICY_GRADIENT),
        ("mix", "chord", GROUP_ADVANTAGE),
        ("teacher", "runs/sft", "distill, gkd, gold, minillm"),
    ],
    "distill": [
        ("kl_coef", 0.1, POLICY_GRADIENT),
        ("mix", "chord", GROUP_ADVANTAGE),
        (
            "dynamic_sampling",
            True,
            r"the algorithms that sample and reward groups: grpo, .*, ppo, online_dpo, minillm, sdpo",
        ),
        (
            "overlong_buffer",
            2,
            r"the algorithms that sample and reward: grpo, .*, ppo, online_dpo, xpo, nash_md, minillm, sdpo",
        ),
        ("pairs", "p.jsonl", "dpo, cpo, simpo, orpo, tpo, kto, bco, reward_model, prm"),
    ],
}
"""(setting, a value other than the default, the algorithms the error names as reading it) per algorithm."""
EVERY_ALGORITHM = {
    "algo": None,
    "model": "tiny-gpt2",
    "task": "countdown",
    "steps": 3,
    "seed": 1,
    "lr": 1e-3,
    "batch_size": 2,
    "max_new_tokens": 4,
    "max_grad_norm": 0.5,
    "gradient_checkpointing": True,
    "lora_rank": 4,
    "lora_alpha": 8,
    "eval_every": 1,
    "eval_size": 4,
    "train_size": 10,
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval.jsonl",
    "rewards": ["exact_match", "numeric_match=0.5"],
    "disable_dropout": True,
    "tensorboard": True,
    "stop": ["7"],
    "tools": ["calculator"],
    "environment": "mypkg.envs:Game",
    "tool_results": "tags",
    "chat_template_kwargs": {"enable_thinking": False},
    "rollout_func": "mypkg.rollouts:play",
    "max_tool_calling_iterations": 2,
    "tool_call_start": "[",
    "tool_call_end": "]",
    "tool_response_start": "{",
    "tool_response_end": "}",
    "threads": 2,
}
"""The settings every algorithm reads (the model, rows, rewards, optimizer, evaluation) with values other than
the defaults: none of them is ever refused (algo aside: it picks the algorithm)."""
EVERY_ALGORITHM_BEMA = {
    "bema": True,
    "bema_update_ref_model": True,
    "bema_ref_model_update_freq": 20,
    "bema_ref_model_update_after": 3,
    "bema_update_freq": 10,
    "bema_ema_power": 0.4,
    "bema_bias_power": 0.3,
    "bema_lag": 5,
    "bema_update_after": 2,
    "bema_multiplier": 2.0,
    "bema_min_ema_multiplier": 0.1,
}
"""BEMA's settings, which every algorithm reads too (without LoRA: BEMA averages full weights)."""
READ = {
    "generation_workers": (2,),
    "generation_backend": ("inline",),
    "group_size": (6,),
    "temperature": (0.7,),
    "top_p": (0.9,),
    "top_k": (20,),
    "steps_per_generation": (2,),
    "reward_clip_range": ([-1.0, 1.0],),
    "normalize_advantages": (True,),
    "sft_loss": ("dft",),
    "assistant_only_loss": (True,),
    "dataset_text_field": ("content",),
    "completion_only_loss": (False,),
    "filter_empty": (True,),
    "rkl_advantage": (False,),
    "single_step_decomposition": (False,),
    "kd_temperature": (2.0,),
    "length_normalization": (False,),
    "step_separator": (":",),
    "replay_buffer_size": (8,),
    "neftune_noise_alpha": (0.5,),
    "train_on_last_step_only": (True,),
    "num_generations_eval": (4,),
    "log_completions": (True,),
    "num_completions_to_print": (3,),
    "importance_sampling_correction": (True,),
    "importance_sampling_mode": ("sequence_truncate",),
    "importance_sampling_clip_min": (0.1,),
    "importance_sampling_clip_max": (2.0,),
    "kl_in_reward": (True,),
    "multi_objective_aggregation": ("normalize_then_sum",),
    "min_p": (0.05,),
    "repetition_penalty": (1.1,),
    "updates_per_batch": (3,),
    "dynamic_sampling": (True, False),
    "max_sampling_rounds": (2,),
    "overlong_filter": (True,),
    "overlong_buffer": (2,),
    "overlong_penalty": (0.5,),
    "loss": ("sapo", "ppo"),
    "clip_low": (0.1,),
    "clip_high": (0.3,),
    "dual_clip": (3.0,),
    "tau_pos": (0.5,),
    "tau_neg": (0.5,),
    "aggregation": ("seq-mean-token-sum", "token-mean"),
    "kl_coef": (0.1,),
    "kl_estimator": ("k1",),
    "entropy_coef": (0.01,),
    "use_bias_correction_kl": (True,),
    "top_entropy_quantile": (0.2,),
    "off_policy_mask_threshold": (0.5,),
    "use_adaptive_entropy": (True,),
    "entropy_target": (1.0,),
    "entropy_coef_delta": (0.01,),
    "entropy_coef_min": (0.001,),
    "entropy_coef_max": (0.5,),
    "vespo_k_pos": (3.0,),
    "vespo_lambda_pos": (2.0,),
    "vespo_k_neg": (2.0,),
    "vespo_lambda_neg": (3.0,),
    "micro_batch_size": (4,),
    "advantage": ("rloo", "grpo"),
    "mix": ("chord",),
    "mix_weight": ("cosine:0.4->0.01",),
    "mix_phi": (True,),
    "shaping_gamma": (0.2,),
    "expert": ("e.jsonl",),
    "expert_batch_size": (4,),
    "vf_coef": (1.0,),
    "gamma": (0.99,),
    "gae_lambda": (0.9,),
    "beta": (0.5, 0.2),
    "teacher": ("runs/other",),
    "lmbda": (0.3,),
    "seq_kd": (True,),
    "distill_loss": ("sampled",),
    "iw_opd_gamma": (0.2,),
    "distillation_mode": ("full_logits",),
    "distillation_alpha": (1.0, 0.5),
    "distillation_topk": (5,),
    "distillation_add_tail": (True,),
    "num_loss_tokens_to_skip": (1,),
    "teacher_model_kind": ("ema", "base"),
    "teacher_update_rate": (0.5,),
    "teacher_sync_steps": (2,),
    "generate_from_teacher": (True,),
    "teacher_prompt_template": ("{privileged_context}:{prompt}",),
    "distillation_weight": (0.5,),
    "distillation_is_clip": (1.5,),
    "use_successful_as_teacher": (False,),
    "success_reward_threshold": (0.5,),
    "dont_reprompt_on_self_success": (False,),
    "reprompt_template": ("{solution}{prompt}{feedback}",),
    "solution_template": ("{successful_previous_attempt}:",),
    "feedback_template": ("{feedback_raw}!",),
    "include_environment_feedback": (True,),
    "environment_feedback_only_without_solution": (True,),
    "remove_thinking_from_demonstration": (True,),
    "num_value_samples": (4,),
    "alpha": (0.1,),
    "missing_eos_penalty": (1.0,),
    "max_length": (512,),
    "use_uld_loss": (True,),
    "use_extended_uld": (False,),
    "uld_token_merge_strategy": ("bayesian",),
    "uld_use_hybrid_loss": (True,),
    "uld_hybrid_matched_weight": (0.5,),
    "uld_hybrid_unmatched_weight": (0.5,),
    "uld_crossentropy_weight": (0.1,),
    "uld_distillation_weight": (0.5,),
    "uld_student_temperature": (2.0,),
    "uld_teacher_temperature": (2.0,),
    "uld_skip_student_eos": (False,),
    "uld_skip_teacher_eos": (False,),
    "teacher_tokenizer": ("runs/tok",),
    "mixture_coef": (0.3,),
    "beta1": (0.3,),
    "beta2": (0.01,),
    "filter_all_incorrect": (False,),
    "label_smoothing": (0.1,),
    "preference_loss": ("ipo",),
    "f_divergence": ("js_divergence",),
    "f_alpha": (0.3,),
    "ld_alpha": (0.5,),
    "simpo_gamma": (0.5, 0.8),
    "discopop_tau": (0.1,),
    "use_weighting": (True,),
    "sync_ref_model": (True,),
    "ref_model_sync_steps": (4,),
    "ref_model_mixup_alpha": (0.5,),
    "unpaired_loss": ("apo_zero_unpaired",),
    "desirable_weight": (1.5,),
    "undesirable_weight": (0.5,),
    "center_rewards_coefficient": (0.01,),
    "tpo_alpha": (0.5,),
    "precompute_ref_log_probs": (True,),
    "pairs": ("p.jsonl",),
}
"""Non-default values of the settings only some algorithms read (the second where the first is an algorithm's
default)."""


def test_each_algorithm_refuses_the_settings_its_training_step_never_reads(tmp_path, monkeypatch, capsys):
    """Beyond the sampling settings of SFT and DPO: a setting that an algorithm's training step never reads (SFT
    and DPO: the policy-gradient loss's, the group advantages' and mixing's, PPO's value head's; online DPO:
    updates_per_batch (one DPO update per batch), the policy-gradient loss's; PPO: advantage, mix, overlong_filter;
    the group-advantage algorithms: PPO's and DPO's) set away from the algorithm's default is a config error that
    names it, says the algorithm does not use it and names the algorithms that do, before a model loads."""
    from policylab.llm import trainer as trainer_module

    for algo, cases in UNUSED.items():
        for name, value, readers in cases:
            with pytest.raises(ConfigError) as info:
                make_config(algo, {name: value})
            assert re.fullmatch(
                rf"{algo} does not use {name}={value}: it .*, so it would do nothing; {name} applies to {readers}",
                info.value.problem,
            ), info.value.problem
            assert info.value.fix == f"drop {name}, or train one of those algorithms"
    with pytest.raises(ConfigError) as info:  # settings read by different algorithms: each group named
        make_config("sft", {"beta": 0.5, "temperature": 0.5, "kl_coef": 0.1})
    assert info.value.problem.endswith(
        "so they would do nothing; temperature applies to the algorithms that sample: grpo, dr_grpo, dapo, gspo, "
        "cispo, sapo, gmpo, rloo, reinforce++, ppo, online_dpo, xpo, nash_md, distill, gkd, gold, a2po, minillm, "
        "sdft, ssd, "
        "sdpo; "
        "kl_coef applies to the policy-gradient "
        "algorithms: grpo, dr_grpo, dapo, gspo, cispo, sapo, gmpo, rloo, reinforce++, ppo, minillm, sdpo; beta applies "
        "to dpo, "
        "online_dpo, xpo, nash_md, cpo, simpo, orpo, tpo, kto, bco, distill, gkd, gold"
    ), info.value.problem
    assert info.value.fix.startswith("drop temperature, kl_coef and beta, or train one of those algorithms")

    def must_not_start(*args, **kwargs):
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(trainer_module, "load_model", must_not_start)
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="ppo does not use mix=chord"):
        train_llm("ppo", {"mix": "chord", "steps": 2}, runs, verbose=False, expert=[{"prompt": "1+1=", "answer": "2"}])
    assert _cli("train", "online_dpo", "--set", "updates_per_batch=2", "--runs-dir", runs, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "online_dpo does not use updates_per_batch=2: it makes one preference update per batch" in err
    assert not runs.exists()


COMPANIONS: dict[str, dict[str, object]] = {
    "num_completions_to_print": {"log_completions": True},
    **dict.fromkeys(
        ("importance_sampling_mode", "importance_sampling_clip_min", "importance_sampling_clip_max"),
        {"importance_sampling_correction": True},
    ),
    **dict.fromkeys(
        ("label_smoothing", "f_divergence", "sync_ref_model", "precompute_ref_log_probs"),
        {"preference_loss": "sigmoid"},
    ),
    **dict.fromkeys(
        ("ref_model_sync_steps", "ref_model_mixup_alpha"), {"preference_loss": "sigmoid", "sync_ref_model": True}
    ),
    "f_alpha": {"preference_loss": "sigmoid", "f_divergence": "alpha_divergence"},
    "simpo_gamma": {"preference_loss": "simpo"},
    "discopop_tau": {"preference_loss": "discopop"},
    "expert": {"mix": "chord"},
    **dict.fromkeys(("mix_weight", "mix_phi", "expert_batch_size"), {"mix": "chord"}),
    **dict.fromkeys(("tau_pos", "tau_neg"), {"loss": "sapo"}),
    "shaping_gamma": {"mix": "luffy", "loss": "ppo"},
    "kl_estimator": {"kl_coef": 0.05},
    "kl_in_reward": {"kl_coef": 0.05},
    "use_bias_correction_kl": {"kl_coef": 0.05},
    "top_entropy_quantile": {"loss": "ppo"},  # a token-level loss (gspo's ratio is per sequence)
    "lora_alpha": {"lora_rank": 4},
    "seq_kd": {"lmbda": 0.5},
    "iw_opd_gamma": {"distill_loss": "iw_opd"},
    **dict.fromkeys(("teacher_update_rate", "teacher_sync_steps"), {"teacher_model_kind": "ema"}),
    **dict.fromkeys(("distillation_topk", "distillation_add_tail"), {"distillation_mode": "topk_logits"}),
    "distillation_alpha": {"distillation_mode": "full_logits"},  # sampled_token takes 1 only
    **dict.fromkeys(ULD_SETTINGS, {"use_uld_loss": True}),
    **dict.fromkeys(
        HYBRID_ULD_WEIGHTS,
        {
            "use_uld_loss": True,
            "uld_use_hybrid_loss": True,
            "uld_hybrid_matched_weight": 0.5,
            "uld_hybrid_unmatched_weight": 0.5,
        },
    ),  # fmt: skip
    **dict.fromkeys(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), {"loss": "vespo"}),
    **dict.fromkeys(
        ("entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"), {"use_adaptive_entropy": True}
    ),
}
"""The settings read only under another one, and that one (a value of it that turns them on)."""


def test_settings_read_only_under_another_are_refused_without_it():
    """SAPO's temperatures without loss=sapo, CHORD's and LUFFY's settings without their mix, the KL estimator at
    kl_coef 0 and LoRA's alpha at rank 0 did nothing, silently; each is now an error naming what turns it on."""
    cases = [
        ("grpo", {"tau_pos": 0.5}, "tau_pos=0.5 would do nothing: it is SAPO's gate temperatures", "--set loss=sapo"),
        ("grpo", {"mix_weight": "0.1", "mix_phi": True}, "mix_weight=0.1, mix_phi=True would do nothing: they are "
         "CHORD's mixing", "--set mix=chord"),
        ("grpo", {"shaping_gamma": 0.5}, "LUFFY's policy shaping", "--set mix=luffy"),
        ("grpo", {"kl_estimator": "k1"}, "kl_estimator=k1 would do nothing", "--set kl_coef=0.05"),
        ("sft", {"lora_alpha": 32}, "lora_alpha=32 would do nothing: it is LoRA's scale", "--set lora_rank=8"),
        ("orpo", {"label_smoothing": 0.1}, "the share of flipped labels", "--set preference_loss=sigmoid"),
        ("orpo", {"discopop_tau": 0.1}, "DiscoPOP's temperature", "--set preference_loss=discopop"),
        ("sdft", {"teacher_update_rate": 0.5}, "the EMA teacher's schedule", "--set teacher_model_kind=ema"),
        ("sdft", {"distillation_mode": "full_logits", "distillation_topk": 5}, "the top-k divergence's",
         "--set distillation_mode=topk_logits"),
    ]  # fmt: skip
    for algo, values, problem, switch in cases:
        with pytest.raises(ConfigError) as info:
            make_config(algo, values)
        with cli_wording():  # the command line's wording, as the cases give it
            assert problem in info.value.problem and switch in info.value.fix, (algo, values)
    from policylab.llm.trainer import PREFERENCE_SETTINGS

    for name, on in COMPANIONS.items():  # with what turns it on, each is taken
        value = {"tau_pos": 0.5, "tau_neg": 0.5, "mix_weight": "0.1", "mix_phi": True, "expert_batch_size": 4,
                 "use_bias_correction_kl": True, "vespo_k_pos": 3.0, "vespo_lambda_pos": 2.0, "vespo_k_neg": 2.0,
                 "vespo_lambda_neg": 3.0, "entropy_target": 1.0, "entropy_coef_delta": 0.01, "entropy_coef_min": 0.001,
                 "kl_in_reward": True,
                 "entropy_coef_max": 0.5, "top_entropy_quantile": 0.2, "iw_opd_gamma": 0.2,
                 "shaping_gamma": 0.5, "kl_estimator": "k1", "lora_alpha": 32, "expert": "e.jsonl",
                 "label_smoothing": 0.1, "f_divergence": "js_divergence", "f_alpha": 0.3, "simpo_gamma": 0.5,
                 "discopop_tau": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 4,
                 "ref_model_mixup_alpha": 0.5, "precompute_ref_log_probs": True, "seq_kd": True,
                 "num_completions_to_print": 3, "importance_sampling_mode": "sequence_truncate",
                 "importance_sampling_clip_min": 0.1, "importance_sampling_clip_max": 2.0,
                 "teacher_update_rate": 0.5, "teacher_sync_steps": 2, "distillation_topk": 5,
                 "distillation_add_tail": True, "distillation_alpha": 0.2, "use_extended_uld": False,
                 "uld_token_merge_strategy": "bayesian", "uld_use_hybrid_loss": True,
                 "uld_crossentropy_weight": 0.1, "uld_distillation_weight": 0.5, "uld_student_temperature": 2.0,
                 "uld_teacher_temperature": 2.0, "uld_skip_student_eos": False, "uld_skip_teacher_eos": False,
                 "teacher_tokenizer": "runs/tok", "uld_hybrid_matched_weight": 0.5,
                 "uld_hybrid_unmatched_weight": 0.5}[name]  # fmt: skip
        preference = name in PREFERENCE_SETTINGS or name == "precompute_ref_log_probs"
        algo = "orpo" if preference else "distill" if name in ("seq_kd", "iw_opd_gamma") else "grpo"  # all off
        algo = "sdft" if name.startswith(("teacher_", "distillation_")) else algo
        algo = "gold" if name.startswith(("uld_", "use_extended_uld", "teacher_tokenizer")) else algo
        teacher = {"teacher": "runs/sft"} if algo in ("distill", "gold") else {}
        assert getattr(make_config(algo, {name: value, **on, **teacher}), name) == value


def test_every_algorithm_accepts_the_settings_it_reads_and_its_saved_config():
    """The settings every algorithm reads, the ones its step reads (SETTING_READERS), its defaults and a saved
    config.yaml (every key, what a resume passes) are accepted; each algorithm's step is a trainer method, and
    the algorithms whose step samples are SAMPLING_ALGOS."""
    from dataclasses import asdict, fields

    import yaml

    from policylab.llm.trainer import (
        ALGOS,
        POLICY_LOSS_STEPS,
        REFERENCE_SYNC_SETTINGS,
        SAMPLING_ALGOS,
        SAMPLING_STEPS,
        SETTING_READERS,
        STEP_SUMMARIES,
        LLMConfig,
        LLMTrainer,
        setting_readers,
        training_step,
    )

    decided = set(SETTING_READERS) | set(EVERY_ALGORITHM) | set(EVERY_ALGORITHM_BEMA)
    assert {f.name for f in fields(LLMConfig)} == decided  # each one decided
    assert set(READ) == set(SETTING_READERS)
    assert SAMPLING_ALGOS == tuple(algo for algo in ALGOS if training_step(algo) in SAMPLING_STEPS)
    for algo in ALGOS:
        assert callable(getattr(LLMTrainer, training_step(algo)))
        assert training_step(algo) in STEP_SUMMARIES  # what a refusal of an unused setting says it does
        teacher = {"teacher": "runs/sft"} if training_step(algo) == "distill_step" or algo == "minillm" else {}
        universal = {name: value for name, value in EVERY_ALGORITHM.items() if name != "algo"}
        configs = [make_config(algo, teacher), make_config(algo, {**universal, **teacher})]
        configs.append(make_config(algo, {**teacher, **EVERY_ALGORITHM_BEMA}))
        defaults = make_config(algo, teacher)
        for name, values in READ.items():
            if algo not in setting_readers(name):
                continue
            value = next(v for v in values if v != getattr(defaults, name))
            companion = COMPANIONS.get(name, {})  # the setting it is read under (DEPENDENT_SETTINGS)
            if name == "replay_buffer_size":  # not with dapo's dynamic sampling: both fill the flat groups
                companion = {"dynamic_sampling": False}
            if name in REFERENCE_SYNC_SETTINGS and training_step(algo) in POLICY_LOSS_STEPS:  # the KL's reference
                companion = {"kl_coef": 0.05, **({"sync_ref_model": True} if name != "sync_ref_model" else {})}
            configs.append(make_config(algo, {**teacher, name: value, **companion}))
            assert getattr(configs[-1], name) == value
        for cfg in configs:  # a resume: config.yaml's every key through make_config
            saved = yaml.safe_load(yaml.safe_dump(asdict(cfg), sort_keys=False))
            assert make_config(saved.pop("algo"), saved) == cfg


def _cli(*argv):
    return main(["llm", *map(str, argv)])


def test_resuming_a_finished_run_reports_its_final_evaluation_and_says_it_has_finished(sft_model, tmp_path, capsys):
    import json

    run = train_llm("grpo", {"model": str(sft_model.dir), **SMALL}, tmp_path, name="done", verbose=False)
    # the checkpoint's starting evaluation made unmistakable: a resume that reported it would show -1
    for state_file in (run.dir / "checkpoints").glob("step_*/state.json"):
        state = json.loads(state_file.read_text())
        state["initial"] = {"accuracy": -1.0, "reward": -1.0}
        state_file.write_text(json.dumps(state))
    written = {p: p.stat().st_mtime_ns for p in [run.dir / "eval.json", *(run.dir / "model").iterdir()]}
    assert _cli("train", "--resume", run.dir, "--no-progress") == 0  # no algo: the run's
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written} == written  # complete: nothing rewritten
    assert "has already finished (step 2 of 2): nothing to train" in out, out
    assert f"-> {run.final_eval['accuracy']:.3f}" in out and f"run directory: {run.dir}" in out
    assert json.loads((run.dir / "eval.json").read_text())["accuracy"] == run.final_eval["accuracy"]
    # a checkpoint from before checkpoints kept the last evaluation: the weights are evaluated again
    for state_file in (run.dir / "checkpoints").glob("step_*/state.json"):
        state = json.loads(state_file.read_text())
        del state["last"]
        state_file.write_text(json.dumps(state))
    again = train_llm("grpo", resume=run.dir, verbose=False)
    assert again.steps == 2 and again.final_eval == run.final_eval


def test_resume_takes_more_steps_and_refuses_other_changes(sft_model, tmp_path, capsys):
    import re

    import yaml

    run = train_llm("grpo", {"model": str(sft_model.dir), **SMALL}, tmp_path, name="r", verbose=False)
    assert _cli("train", "grpo", "--resume", run.dir, "--steps", 3, "--no-progress") == 0
    assert "done: 3 steps" in capsys.readouterr().out
    with open(run.dir / "train.csv") as f:
        assert [int(float(row["step"])) for row in csv.DictReader(f)] == [1, 2, 3]
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["steps"] == 3  # a later resume goes on to 3
    for argv, message in (
        (["train", "rloo", "--resume", run.dir], "is a grpo run, not rloo(.|\n)*llm train grpo --resume"),
        (["sft", "--resume", run.dir], "is a grpo run, not sft"),
        (["train", "--resume", run.dir, "--steps", 2], "at step 3, past steps=2(.|\n)*--steps 3 or more"),
        (["train", "--resume", run.dir, "--set", "lr=1"], "--set cannot change it(.|\n)*only --steps may change"),
        (["train", "--resume", run.dir, "--seed", 0], "--seed cannot change it"),
        (["train"], "no algorithm given(.|\n)*--resume RUN"),
        # where a new run's directory goes: a resumed run stays in its own, so given, they are errors
        (
            ["train", "--resume", run.dir, "--runs-dir", tmp_path / "elsewhere"],
            f"--runs-dir does not apply to --resume: the run continues in {re.escape(str(run.dir))}\n"
            "  fix: drop --runs-dir$",
        ),
        (
            ["train", "--resume", run.dir, "--name", "other"],
            "--name does not apply to --resume(.|\n)*fix: drop --name$",
        ),
        (["sft", "--resume", run.dir, "--runs-dir", "runs", "--name", "r"], "--name and --runs-dir do not apply"),
    ):
        assert _cli(*argv) == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ConfigError, match="lr cannot change"):
        train_llm(overrides={"lr": 1.0}, resume=run.dir, verbose=False)


def test_evaluations_are_exact_fractions_and_a_prompts_run_is_named_after_its_prompts(sft_model, tmp_path, capsys):
    """Accuracy is hits / n as a Python float (1/6, not float32's 0.1666666716337204), in eval.json too; a run
    on a prompts file goes by its stem, on rows given in Python by `prompts`: header, directory and config."""
    import json

    import yaml

    rows = get_task("addition").make(30, 0)  # the last 6 rows evaluate
    right = rows[-1]["prompt"]

    def one_right(prompts, completions, **_):
        return [1.0 if p == right else 0.1 for p in prompts]

    settings = {"model": str(sft_model.dir), **SMALL, "steps": 1}
    run = train_llm("grpo", settings, tmp_path, verbose=False, prompts=rows, rewards=[one_right])
    assert run.final_eval["accuracy"] == 1 / 6 and run.initial_eval["accuracy"] == 1 / 6
    assert run.final_eval["reward"] == pytest.approx(1.5 / 6, abs=1e-15)
    assert json.loads((run.dir / "eval.json").read_text())["accuracy"] == 1 / 6
    assert run.dir.name == "grpo-prompts-s0"
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["task"] == "prompts"
    path = _jsonl(tmp_path / "arith.jsonl", rows)
    run = train_llm("grpo", {**settings, "prompts": str(path)}, tmp_path)
    assert run.dir.name == "grpo-arith-s0" and "grpo arith" in capsys.readouterr().out
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["task"] == "arith"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(sft_model, tmp_path):
    """Rewards that fail on the evaluation rows or only in training, rows without the fields a run needs: an
    error, and nothing left under runs/ (not even runs/ itself when the call made it). A resumed run that fails
    keeps its directory."""
    runs = tmp_path / "runs"
    settings = {"model": str(sft_model.dir), **SMALL}
    rows = get_task("addition").make(30, 0)

    def raises(prompts, completions, **_):
        raise ValueError("boom")

    def fails_in_training(prompts, completions, **_):  # evaluation: 6 completions; a training step: 16
        return [1.0] * min(len(completions), 6)

    cases = [
        ({"rewards": [raises]}, "raises raised ValueError: boom"),
        ({"rewards": [fails_in_training]}, "returned 6 values for 16 completions"),
    ]
    for given, message in cases:
        with pytest.raises(LLMError, match=message):
            train_llm("grpo", settings, runs, verbose=False, prompts=rows, **given)
        assert not runs.exists(), given
    no_answer = _jsonl(tmp_path / "no_answer.jsonl", [{"prompt": f"{i}+0="} for i in range(10)])
    with pytest.raises(LLMError, match=r'no_answer.jsonl, line 1: no "answer" field(.|\n)*--reward'):
        train_llm("grpo", {**settings, "prompts": str(no_answer)}, runs, verbose=False)
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2="}])
    with pytest.raises(LLMError, match=r'pairs.jsonl, line 2: no "chosen" field(.|\n)*"rejected"'):
        dpo = {key: value for key, value in settings.items() if key != "group_size"}  # DPO samples nothing
        train_llm("dpo", {**dpo, "pairs": str(pairs)}, runs, verbose=False)
    with pytest.raises(LLMError, match=r'expert, row 1: no "completion" \(or "answer"\)'):
        train_llm("grpo", {**settings, "mix": "chord"}, runs, verbose=False, expert=[rows[0], {"prompt": "1+1="}])
    assert not runs.exists()
    runs.mkdir()
    (runs / "other").mkdir()  # what was there before stays
    with pytest.raises(LLMError):
        train_llm("grpo", settings, runs, verbose=False, prompts=rows, rewards=[fails_in_training])
    assert [p.name for p in runs.iterdir()] == ["other"]
    part = train_llm("grpo", settings, runs, verbose=False, prompts=rows, callback=lambda step, _: False)
    with pytest.raises(LLMError, match="returned 6 values"):
        train_llm(resume=part.dir, verbose=False, prompts=rows, rewards=[fails_in_training])
    assert (part.dir / "config.yaml").is_file() and (part.dir / "checkpoints").is_dir()


def test_ctrl_c_before_the_first_checkpoint_leaves_no_directory_and_after_it_keeps_the_run(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C (KeyboardInterrupt) in a training step: before the run's first checkpoint the directory it made goes,
    as after a failure, and the interrupt goes on (the command exits 130, `aborted`); after it the directory stays,
    and the run resumes from it."""
    from policylab.llm.trainer import LLMTrainer

    runs = tmp_path / "runs"
    rl_step = LLMTrainer.rl_step

    def interrupted_at(step):
        def step_fn(self):
            if self.step == step:
                raise KeyboardInterrupt
            return rl_step(self)

        return step_fn

    monkeypatch.setattr(LLMTrainer, "rl_step", interrupted_at(1))
    with pytest.raises(KeyboardInterrupt):
        train_llm("grpo", SMALL, runs, verbose=False)
    assert not runs.exists()
    small = [a for key, value in SMALL.items() if key != "steps" for a in ("--set", f"{key}={value}")]
    assert _cli("train", "grpo", "--runs-dir", runs, "--steps", 2, *small, "--no-progress") == 130
    assert "aborted" in capsys.readouterr().err and not runs.exists()
    runs.mkdir()
    (runs / "other").mkdir()  # what was there before stays
    with pytest.raises(KeyboardInterrupt):
        train_llm("grpo", SMALL, runs, verbose=False)
    assert [p.name for p in runs.iterdir()] == ["other"]
    monkeypatch.setattr(LLMTrainer, "rl_step", interrupted_at(2))  # after step 1's checkpoint (eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_llm("grpo", SMALL, runs, name="kept", verbose=False)
    assert (runs / "kept" / "config.yaml").is_file() and (runs / "kept" / "checkpoints").is_dir()
    monkeypatch.setattr(LLMTrainer, "rl_step", rl_step)
    assert train_llm(resume=runs / "kept", verbose=False).steps == 2


def test_inputs_a_run_would_ignore_or_misread_are_errors_or_notes(sft_model, tmp_path, capsys):
    settings = {"model": str(sft_model.dir), **SMALL}
    expert = _jsonl(tmp_path / "expert.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    with pytest.raises(ConfigError, match="expert rows were given but mix is none(.|\n)*'chord'} or overrides={'mix'"):
        make_config("grpo", {"expert": str(expert)})
    with pytest.raises(ConfigError, match="mix='foo' is not one of none, chord, luffy"):
        make_config("grpo", {"mix": "foo"})
    with pytest.raises(ConfigError, match=r"mix_weight='cosine:0.5-0.02'(.|\n)*fix: write e.g. mix_weight=cosine"):
        make_config("grpo", {"mix": "chord", "mix_weight": "cosine:0.5-0.02"})
    assert _cli("eval", sft_model.dir, "--k", 0) == 2
    assert "k=0 must be >= 1" in capsys.readouterr().err
    few = _jsonl(tmp_path / "few.jsonl", get_task("addition").make(3, 0))
    run = train_llm("grpo", {**settings, "prompts": str(few), "steps": 1}, tmp_path, progress=False)
    out = capsys.readouterr().out
    assert "the prompts have 3 rows, too few to hold a fifth out" in out and "evaluation uses the training rows" in out
    assert f"run directory: {run.dir}" in out and "/1 steps" not in out  # no progress lines, the result still


def test_a_reward_module_in_the_current_directory_is_found_as_python_m_finds_it(tmp_path, monkeypatch):
    from policylab.llm.rewards import load_reward

    package = tmp_path / "mypkg_cwd_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text("def fmt(prompts, completions, **_):\n    return [0.5] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mypkg_cwd_rewards", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg_cwd_rewards.rewards", raising=False)
    fn, weight = load_reward("mypkg_cwd_rewards.rewards:fmt=0.2")
    assert weight == 0.2 and fn(["p"], ["c"]) == [0.5]
    import re
    from pathlib import Path

    with pytest.raises(
        LLMError, match=rf"cannot import nothere_x(.|\n)*current directory \({re.escape(str(Path.cwd()))}\)"
    ):
        load_reward("nothere_x.rewards:f")
    sys.modules.pop("mypkg_cwd_rewards", None)
    sys.modules.pop("mypkg_cwd_rewards.rewards", None)


def test_num_generations_eval_adds_pass_at_k_and_the_samples_mean_reward_to_each_evaluation(sft_model, tmp_path):
    from policylab.llm.rewards import exact_match
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "eval_size": 20, "num_generations_eval": 4}
    trainer = LLMTrainer(make_config("grpo", settings))
    state = trainer.generator.get_state()
    result = trainer.evaluate()
    assert torch.equal(trainer.generator.get_state(), state)  # the training samples' stream is left as it was
    rows = [row for row in trainer.eval_rows for _ in range(4)]
    with trainer.evaluation_stream():  # the same evaluation samples again
        _, sampled = trainer.rollout(rows)
    hits = exact_match([], sampled, [row["answer"] for row in rows])
    assert result["sampled_reward"] == pytest.approx(sum(hits) / len(hits))
    assert result["pass@4"] == sum(any(hits[i : i + 4]) for i in range(0, len(hits), 4)) / 20
    assert set(trainer.evaluate(1)) == {"accuracy", "reward"}  # 1: the greedy evaluation only
    with_workers = LLMTrainer(
        make_config("grpo", {**settings, "generation_workers": 1, "generation_backend": "inline"})
    )
    assert with_workers.workers is not None
    states = [s.copy() for s in with_workers.workers.get_state()]
    assert with_workers.evaluate()["pass@4"] == result["pass@4"]  # sampled in the learner, on the same stream
    assert all((a == b).all() for a, b in zip(with_workers.workers.get_state(), states))
    run = train_llm("grpo", {**settings, "steps": 2, "eval_every": 1, "batch_size": 4}, tmp_path, verbose=False)
    with open(run.dir / "eval.csv") as f:
        assert [set(row) for row in csv.DictReader(f)] == [
            {"step", "accuracy", "reward", "pass@4", "sampled_reward"}
        ] * 3
    with pytest.raises(ConfigError, match="num_generations_eval=0 must be >= 1"):
        make_config("grpo", {"num_generations_eval": 0})


def test_disable_dropout_takes_every_dropout_of_the_model_and_its_reference_to_zero():
    """TRL's defaults: on for DPO (GPT-2 has dropout 0.1), off for GRPO; with it, two training-mode passes agree."""
    from policylab.llm.trainer import LLMTrainer

    ids = torch.tensor([[5, 6, 7, 8]])
    for algo, off in (("dpo", True), ("grpo", False), ("grpo", True)):
        settings = {"model": "tiny-gpt2", "eval_size": 4}
        if algo == "grpo":
            settings.update(kl_coef=0.05, disable_dropout=off)  # a reference too
        trainer = LLMTrainer(make_config(algo, settings))
        rates = {
            m.p
            for model in (trainer.model, trainer.reference)
            for m in model.modules()
            if isinstance(m, torch.nn.Dropout)
        }
        assert rates == ({0.0} if off else {0.1}), (algo, off, rates)
        assert trainer.model.training
        first, second = trainer.model(ids).logits, trainer.model(ids).logits
        assert torch.equal(first, second) == off


def test_log_completions_writes_each_steps_completions_and_resumes_without_repeating_them(sft_model, tmp_path):
    import json

    from policylab.llm.rewards import exact_match

    settings = {"model": str(sft_model.dir), "steps": 3, "eval_every": 1, "batch_size": 2, "group_size": 4,
                "eval_size": 8, "log_completions": True}  # fmt: skip

    def rows_of(run):
        return [json.loads(line) for line in (run.dir / "completions.jsonl").read_text().splitlines()]

    full = rows_of(train_llm("grpo", settings, tmp_path, name="full", verbose=False))
    assert [row["step"] for row in full] == [1] * 8 + [2] * 8 + [3] * 8
    answers = [row["prompt"] for row in full]  # the prompts' answers are their sums
    rewards = exact_match([], [row["completion"] for row in full], [_sum_of(p) for p in answers])
    assert [row["reward"] for row in full] == rewards
    expected = GROUP_ADVANTAGES.get("grpo")(torch.tensor(rewards), 4)
    torch.testing.assert_close(torch.tensor([row["advantage"] for row in full]), expected)
    part = train_llm("grpo", settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 2)
    resumed = train_llm(resume=part.dir, verbose=False)
    assert rows_of(resumed) == full
    few = train_llm("ppo", {**settings, "steps": 1, "num_completions_to_print": 3}, tmp_path, verbose=False)
    assert [set(row) for row in rows_of(few)] == [{"step", "prompt", "completion", "reward"}] * 3


def _sum_of(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return f"{int(a) + int(b):03d}"


def test_a_language_model_run_plots_its_reward_and_accuracy_and_writes_tensorboard(sft_model, tmp_path):
    from policylab.plot import load_run, plot_runs

    settings = {"model": str(sft_model.dir), "steps": 3, "eval_every": 1, "batch_size": 4, "eval_size": 8,
                "tensorboard": True}  # fmt: skip
    run = train_llm("grpo", settings, tmp_path, verbose=False)
    assert load_run(run.dir).language_model and load_run(run.dir).env == "addition"
    notes: list[str] = []
    assert plot_runs([run.dir], tmp_path / "train.png", notes=notes).read_bytes().startswith(b"\x89PNG")
    assert plot_runs([run.dir], tmp_path / "eval.png", source="eval").read_bytes().startswith(b"\x89PNG")
    from policylab.plot import default_metric

    assert default_metric([load_run(run.dir)], "train") == "reward"
    assert default_metric([load_run(run.dir, "eval")], "eval") == "accuracy"
    assert default_metric([load_run(sft_model.dir)], "train") == "loss"
    assert any((run.dir / "tb").glob("events.out.tfevents.*"))
    from policylab.report import report

    other = train_llm("grpo", {**settings, "seed": 1, "tensorboard": False}, tmp_path, verbose=False)
    result = report([run.dir, other.dir], tmp_path / "report", reps=200)  # multi-seed: exact match, target 1
    assert (result.metric, result.threshold) == ("accuracy", 1.0)
    scores = sorted(float(v) for v in result.score_set.matrices["grpo"].ravel())
    assert scores == sorted([run.final_eval["accuracy"], other.final_eval["accuracy"]])


def test_sampler_correction_weights_match_hand_computed_ratios():
    from policylab.objectives.policy import sampler_correction_weights

    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    token = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, math.exp(1.7), 1.0]])
    sequence = torch.tensor([math.exp(-0.5), math.exp(1.7)])
    torch.testing.assert_close(
        sampler_correction_weights(trainer, sampler, mask, "token_truncate"), token.clamp(max=3.0)
    )
    torch.testing.assert_close(
        sampler_correction_weights(trainer, sampler, mask, "token_mask", 0.5, 3.0),
        torch.where((token < 0.5) | (token > 3.0), 0.0, token),
    )
    torch.testing.assert_close(
        sampler_correction_weights(trainer, sampler, mask, "sequence_truncate", 0.7), sequence.clamp(0.7, 3.0)
    )
    torch.testing.assert_close(
        sampler_correction_weights(trainer, sampler, mask, "sequence_mask"), torch.tensor([math.exp(-0.5), 0.0])
    )


def test_importance_sampling_correction_reweighs_a_mismatched_samplers_batch(sft_model):
    """A sampler whose log-probs are 0.3 above the trainer's on every token: the ratio's old log-probs become the
    trainer's, each sequence's weight exp(-0.3 x its tokens); with our own sampler the weights are 1."""
    from policylab.llm.trainer import LLMTrainer

    settings = {"model": str(sft_model.dir), "batch_size": 2, "group_size": 4, "eval_size": 4,
                "importance_sampling_correction": True, "importance_sampling_mode": "sequence_truncate",
                "importance_sampling_clip_min": 0.0}  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", settings))
    rollout, _ = trainer.rollout([row for row in trainer.train_rows[:2] for _ in range(4)])
    advantages = torch.arange(1.0, 9.0)
    metrics: dict[str, float] = {}
    same, weighted = trainer.corrected_for_sampler(rollout, advantages, metrics)
    torch.testing.assert_close(weighted, advantages, atol=1e-4, rtol=1e-4)  # our sampler's log-probs are the trainer's
    torch.testing.assert_close(same.logprobs, rollout.logprobs, atol=1e-5, rtol=1e-5)
    shifted = replace(rollout, logprobs=(rollout.logprobs + 0.3) * rollout.completion_mask)
    corrected, weighted = trainer.corrected_for_sampler(shifted, advantages, metrics)
    lengths = rollout.completion_mask.sum(-1).float()
    torch.testing.assert_close(weighted, advantages * torch.exp(-0.3 * lengths), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(corrected.logprobs, rollout.logprobs, atol=1e-5, rtol=1e-5)
    assert metrics["is_ratio_max"] < 1.0 and set(metrics) == {"is_ratio_mean", "is_ratio_min", "is_ratio_max"}
    assert math.isfinite(trainer.rl_step()["is_ratio_mean"])
    with pytest.raises(ConfigError, match="weighs tokens, and loss=gspo is a sequence-level loss"):
        make_config("gspo", {"importance_sampling_correction": True, "importance_sampling_mode": "token_mask"})


def test_a_tiny_models_vocabulary_takes_every_character_of_the_given_rows(tmp_path):
    """Characters beyond the built-in tasks' (in prompts, evaluation, expert or pairs rows) get tokens of their own
    instead of reading as padding."""
    from policylab.llm.trainer import LLMInputs, LLMTrainer

    prompts = [{"prompt": f"q{i}?", "answer": "a"} for i in range(6)]
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q1?", "chosen": "yes!", "rejected": "no~"}])
    trainer = LLMTrainer(make_config("dpo", {"pairs": str(pairs), "eval_size": 2}), LLMInputs(prompts=prompts))
    tok = trainer.tokenizer
    for text in ("q1?", "yes!", "no~", "a"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.pad_token_id not in ids and tok.decode(ids) == text
