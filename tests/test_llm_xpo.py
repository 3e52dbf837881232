"""XPO and Nash-MD (TRL's XPOTrainer and NashMDTrainer): their losses against hand computations, XPO's pairs, the
geometric-mixture sampler against the two models' forwards, the steps' use of both samplers, and their errors.
Their learning and exact resume are in test_llm.py, beside the other algorithms' (its SFT fixture)."""

from __future__ import annotations

import math

import pytest
import torch

from policylab.errors import ConfigError
from policylab.llm.models import load_model
from policylab.llm.rollout import generate
from policylab.llm.trainer import LLMInputs, LLMTrainer, make_config, xpo_pairs
from policylab.objectives.preference import nash_md_loss, xpo_exploration


def test_xpo_pairs_choose_the_higher_reward_and_drop_ties():
    own = torch.tensor([1.0, 0.0, 1.0, 0.5])
    reference = torch.tensor([0.0, 1.0, 1.0, 0.2])
    # prompt 0: the policy's sample (row 0) wins; 1: the reference's (row 4 + 1 = 5); 2 ties; 3: the policy's
    assert xpo_pairs(own, reference).tolist() == [0, 5, 3, 4, 1, 7]


def test_the_xpo_term_is_alpha_times_the_mean_log_prob_of_the_reference_samples():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, -1.0], [-0.25, -0.25, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool()
    from_reference = torch.tensor([True, False, False, True])  # pair 0: row 0 vs 2; pair 1: row 1 vs 3
    # the reference's samples: row 0 (-3) and row 3 (-0.5); two pairs
    assert float(xpo_exploration(logp, mask, from_reference, 0.1)) == pytest.approx(0.1 * (-3.0 - 0.5) / 2)


def test_the_nash_md_loss_and_its_gradient_against_a_hand_computation():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]]).bool()
    preference = torch.tensor([1 / (1 + math.exp(-1.0)), 0.5])  # rewards 1 against 0; a tie
    beta = 0.2
    loss, metrics = nash_md_loss(logp, ref, mask, preference, beta)
    # row 0: beta (0.5 (-1) + (-1)(-2)) - (s(1) - 0.5)(-3); row 1: beta (0 (-0.5)) - 0
    p = 1 / (1 + math.exp(-1.0))
    expected = (beta * (0.5 * -1.0 + -1.0 * -2.0) - (p - 0.5) * -3.0 + 0.0) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx((0.5 - 1.0 + 0.0) / 2)
    loss.backward()
    # d/dlogp_t: (beta sg(log ratio_t) - (P - 1/2)) / 2 on masked tokens, 0 off the mask
    grad = torch.tensor([[beta * 0.5 - (p - 0.5), beta * -1.0 - (p - 0.5)], [0.0, 0.0]]) / 2
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, grad)


@pytest.mark.parametrize(("name", "fast"), [("tiny-llama", True), ("tiny-llama", False), ("tiny-gpt2", True)])
def test_the_mixture_sampler_draws_from_the_normalized_geometric_mixture_of_both_models(name, fast):
    """Each sampled token's log-prob is that of softmax((1 - m) z + m z_ref) from the two models' full forwards
    over the row so far (the numpy decode, LlamaDecoder's torch forward, transformers' cache), and m = 0 and 1
    sample what each model alone samples with the same generator."""
    model, tok = load_model(name, seed=0)
    reference, _ = load_model(name, seed=1)
    model.eval(), reference.eval()
    enc = tok(["12+34=", "5+6=", "99+1="] * 2, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    options = {"max_new_tokens": 5, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "fast": fast}

    def sample(m: float | None, which=model):
        generator = torch.Generator().manual_seed(3)
        mixture = None if m is None else (reference, m)
        return generate(which, ids, mask, generator=generator, mixture=mixture, **options)

    mixed = sample(0.3)
    full_ids = torch.cat([mixed.prompt_ids, mixed.completion_ids], -1)
    full_mask = torch.cat([mixed.prompt_mask.long(), mixed.completion_mask.long()], -1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        z = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
        z_ref = reference(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    width = mixed.prompt_ids.shape[1]
    logits = (0.7 * z + 0.3 * z_ref)[:, width - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, mixed.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(mixed.logprobs, expected * mixed.completion_mask, atol=1e-4, rtol=1e-4)
    assert torch.equal(sample(0.0).completion_ids, sample(None).completion_ids)
    assert torch.equal(sample(1.0).completion_ids, sample(None, reference).completion_ids)


def test_xpo_samples_beside_the_reference_and_nash_md_beside_the_mixture(monkeypatch):
    """Each step samples the batch twice: first from the policy, then from the reference model (XPO) or from the
    geometric mixture of the policy and the reference at mixture_coef (Nash-MD)."""
    import policylab.llm.trainer as trainer_module

    real = trainer_module.generate
    for algo, expected in (("xpo", ("reference", None)), ("nash_md", ("policy", 0.25))):
        settings = {"batch_size": 4, "eval_size": 4, "mixture_coef": 0.25} if algo == "nash_md" else {"batch_size": 4}
        trainer = LLMTrainer(make_config(algo, {**settings, "eval_size": 4}))
        calls = []

        def spy(model, *args, trainer=trainer, calls=calls, real=real, **kwargs):
            named = {id(trainer.model): "policy", id(trainer.reference): "reference"}
            mixture = kwargs.get("mixture")
            assert mixture is None or mixture[0] is trainer.reference
            calls.append((named[id(model)], None if mixture is None else mixture[1]))
            return real(model, *args, **kwargs)

        monkeypatch.setattr(trainer_module, "generate", spy)
        getattr(trainer, f"{algo}_step")()
        assert calls == [("policy", None), expected], algo


def test_bad_xpo_and_nash_md_settings_are_one_error_each():
    with pytest.raises(ConfigError, match="mixture_coef=1.5 in"):
        make_config("nash_md", {"mixture_coef": 1.5})
    with pytest.raises(ConfigError, match="alpha=-1.0 must be >= 0"):
        make_config("xpo", {"alpha": -1.0})
    with pytest.raises(ConfigError, match=r"grpo does not use mixture_coef=0.3.*applies to nash_md"):
        make_config("grpo", {"mixture_coef": 0.3})
    with pytest.raises(ConfigError, match=r"nash_md does not use alpha=0.1.*applies to xpo"):
        make_config("nash_md", {"alpha": 0.1})
    with pytest.raises(ConfigError, match="rollout_func makes every completion itself"):
        LLMTrainer(make_config("xpo", {"batch_size": 2}), LLMInputs(rollout_func=lambda prompts, trainer: {}))


def test_missing_eos_penalty_lowers_the_reward_of_completions_cut_before_their_eos():
    """TRL's OnlineDPOConfig option: a completion without its EOS (cut at max_new_tokens) scores the penalty less;
    the others as they are. Read by online_dpo, xpo and nash_md only."""
    from policylab.llm.rollout import Rollout

    trainer = LLMTrainer(make_config("xpo", {"batch_size": 2, "missing_eos_penalty": 0.75}))
    eos = trainer.tokenizer.eos_token_id
    digits = trainer.tokenizer("12", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*digits, eos], [*digits, digits[0]]])  # "12" then EOS; "121" cut at 3 tokens
    rollout = Rollout(torch.tensor([[1], [1]]), torch.ones(2, 1, dtype=torch.long), ids, torch.ones(2, 3).bool(),
                      torch.zeros(2, 3))  # fmt: skip
    rows = [{"prompt": "5+7=", "answer": "12"}, {"prompt": "5+7=", "answer": "12"}]
    rewards = trainer.score(rollout, ["12", "121"], rows)
    assert rewards.tolist() == [1.0, -0.75]  # exact match 1 and 0; the second lacks its EOS
    with pytest.raises(ConfigError, match="missing_eos_penalty=-1.0 must be >= 0"):
        make_config("online_dpo", {"missing_eos_penalty": -1.0})
    with pytest.raises(ConfigError, match=r"grpo does not use missing_eos_penalty=1.0.*online_dpo, xpo, nash_md"):
        make_config("grpo", {"missing_eos_penalty": 1.0})
