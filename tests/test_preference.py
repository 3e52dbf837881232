"""Preference losses (objectives/preference.py) against hand computations, and their settings in the LLM trainer:
parsing a weighted sum, the errors that name a fix, the reference model kept only where a loss reads it."""

from __future__ import annotations

import math

import pytest
import torch

from policylab.errors import ConfigError, cli_wording
from policylab.objectives.preference import (
    PREFERENCE_LOSSES,
    PreferenceSettings,
    pair_logps,
    parse_preference_loss,
    preference_loss,
)

# Two pairs of uneven lengths: token log-probs of the chosen completions, then the rejected ones.
CHOSEN = [[-0.5, -1.0, -0.25], [-2.0, -0.5]]
REJECTED = [[-1.5, -0.75], [-0.5, -1.0, -1.5, -0.25]]
REF_CHOSEN = [[-0.75, -1.0, -0.5], [-1.0, -1.0]]
REF_REJECTED = [[-1.0, -1.0], [-0.5, -0.5, -1.0, -1.0]]


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    values = torch.tensor([row + [0.0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[i < len(row) for i in range(width)] for row in rows])
    return values, mask


def _pairs(ld_alpha: float | None = None, reference: bool = True):
    logps, mask = _padded(CHOSEN + REJECTED)
    ref, _ = _padded(REF_CHOSEN + REF_REJECTED)
    return pair_logps(logps, mask, ref if reference else None, ld_alpha)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# per pair by hand: sequence sums, lengths and log-ratios
LC, LR = [-1.75, -2.5], [-2.25, -3.25]  # log pi(y_w), log pi(y_l)
NC, NR = [3, 2], [2, 4]  # |y_w|, |y_l|
C = [LC[i] - s for i, s in enumerate([-2.25, -2.0])]  # [0.5, -0.5]
R = [LR[i] - s for i, s in enumerate([-2.0, -3.0])]  # [-0.25, -0.25]
B = 0.5


def _expected(name: str, i: int) -> float:
    """The loss of pair i, from the formulas in the module docstring (beta 0.5, label smoothing as set below)."""
    c, r, d = C[i], R[i], C[i] - R[i]
    eps = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1}.get(name, 0.0)
    if name == "sigmoid":
        return -logsig(B * d)
    if name == "hinge":
        return max(0.0, 1 - B * d)
    if name == "ipo":
        return (c / NC[i] - r / NR[i] - 1 / (2 * B)) ** 2
    if name == "exo_pair":
        q = sig(B * d)
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    if name == "nca_pair":
        return -logsig(B * c) - 0.5 * logsig(-B * c) - 0.5 * logsig(-B * r)
    if name == "robust":
        return (-(1 - eps) * logsig(B * d) + eps * logsig(-B * d)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -logsig(B * c) - logsig(-B * r)
    if name == "sppo_hard":
        return (c - 1 / (2 * B)) ** 2 + (r + 1 / (2 * B)) ** 2
    if name == "aot":  # sorted over the batch: policy margins [0.5, 0.75], reference margins [-0.25, 1.0]
        x = B * ([0.5, 0.75][i] - [-0.25, 1.0][i])
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    if name == "aot_unpaired":  # sort(c) = [-0.5, 0.5], sort(r) = [-0.25, -0.25]
        return -logsig(B * ([-0.5, 0.5][i] + 0.25))
    if name == "apo_zero":
        return 1 - sig(B * c) + sig(B * r)
    if name == "apo_down":
        return sig(B * c) + 1 - sig(B * (c - r))
    if name == "discopop":
        x = B * d
        m = sig(x / 0.05)
        return -logsig(x) * (1 - m) + math.exp(-x) * m
    if name == "sigmoid_norm":
        return -logsig(B * (c / NC[i] - r / NR[i]))
    if name == "sft":
        return (0.5 + 1.0 + 0.25 + 2.0 + 0.5) / 5  # the chosen tokens' mean NLL, the same on every pair
    if name == "cpo":
        return -logsig(B * (LC[i] - LR[i]))
    if name == "simpo":  # gamma 1.0
        return -logsig(B * (LC[i] / NC[i] - LR[i] / NR[i]) - 1.0)
    if name == "orpo":
        a, b = LC[i] / NC[i], LR[i] / NR[i]
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        return -B * logsig(log_odds)
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_each_preference_loss_equals_its_formula_by_hand(name):
    eps = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1}.get(name, 0.0)
    settings = PreferenceSettings(beta=B, label_smoothing=eps)
    loss, metrics = preference_loss(name, _pairs(reference=PREFERENCE_LOSSES[name].reference), settings)
    assert loss.item() == pytest.approx((_expected(name, 0) + _expected(name, 1)) / 2, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx(0.85)


def test_the_implicit_rewards_are_the_log_ratios_or_without_a_reference_the_mean_log_probs():
    _, metrics = preference_loss("sigmoid", _pairs(), PreferenceSettings(beta=B))
    assert metrics["reward_chosen"].item() == pytest.approx(B * sum(C) / 2)
    assert metrics["reward_accuracy"].item() == 0.5  # pair 0: c > r, pair 1: c < r
    _, free = preference_loss("simpo", _pairs(reference=False), PreferenceSettings(beta=B))
    assert free["reward_rejected"].item() == pytest.approx(B * (LR[0] / 2 + LR[1] / 4) / 2)


def test_conservative_dpo_smooths_the_sigmoid_loss():
    loss, _ = preference_loss("sigmoid", _pairs(), PreferenceSettings(beta=B, label_smoothing=0.1))
    expected = [-0.9 * logsig(B * (C[i] - R[i])) - 0.1 * logsig(-B * (C[i] - R[i])) for i in (0, 1)]
    assert loss.item() == pytest.approx(sum(expected) / 2)


@pytest.mark.parametrize(
    ("divergence", "score"),
    [
        ("forward_kl", lambda u: 1 - math.exp(-u)),
        ("js_divergence", lambda u: math.log(2) + logsig(u)),
        ("alpha_divergence", lambda u: (math.exp(-0.5 * u) - 1) / -0.5),  # alpha 0.5
    ],
)
def test_f_divergences_replace_the_log_ratio_by_their_score(divergence, score):
    settings = PreferenceSettings(beta=B, f_divergence=divergence)
    loss, _ = preference_loss("sigmoid", _pairs(), settings)
    expected = [-logsig(B * (score(C[i]) - score(R[i]))) for i in (0, 1)]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_ld_alpha_weights_the_tokens_past_the_shorter_completion():
    pairs = _pairs(ld_alpha=0.5)
    # pair 0 shares 2 tokens: the chosen one's third counts half; pair 1: the rejected one's third and fourth
    torch.testing.assert_close(pairs.chosen, torch.tensor([-1.5 - 0.125, -2.5]))
    torch.testing.assert_close(pairs.rejected, torch.tensor([-2.25, -1.5 - 0.875]))
    torch.testing.assert_close(pairs.ref_chosen, torch.tensor([-1.75 - 0.25, -2.0]))
    torch.testing.assert_close(pairs.ref_rejected, torch.tensor([-2.0, -1.0 - 1.0]))
    torch.testing.assert_close(pairs.chosen_tokens, torch.tensor([3.0, 2.0]))  # lengths stay the token counts
    assert pairs.chosen_nll.item() == pytest.approx(0.85)  # and the NLL every token


def test_a_weighted_sum_of_losses_is_the_sum_of_their_means():
    assert parse_preference_loss("0.8*sigmoid + 0.2*bco_pair+sft") == (
        ("sigmoid", 0.8),
        ("bco_pair", 0.2),
        ("sft", 1.0),
    )
    settings = PreferenceSettings(beta=B)
    total, _ = preference_loss("0.8*sigmoid+0.2*bco_pair+sft", _pairs(), settings)
    parts = [preference_loss(name, _pairs(), settings)[0].item() for name in ("sigmoid", "bco_pair", "sft")]
    assert total.item() == pytest.approx(0.8 * parts[0] + 0.2 * parts[1] + parts[2])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sigmod", "'sigmod' is not a preference loss. Did you mean: sigmoid"),
        ("two*sigmoid", "the weight 'two' is not a number"),
        ("-1*ipo", "the weight of ipo must be > 0"),
        ("sigmoid+0.5*sigmoid", "names sigmoid twice"),
    ],
)
def test_a_bad_preference_loss_is_one_error_naming_it(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_preference_loss(text)
    assert info.value.fix


# --- the trainer's settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "settings", "message", "fix"),
    [
        ("dpo", {"preference_loss": "nca_pair", "f_divergence": "js_divergence"}, "has no form for nca_pair", "ipo"),
        ("dpo", {"f_divergence": "kl"}, "f_divergence='kl'", "reverse_kl"),
        ("dpo", {"preference_loss": "exo_pair"}, r"exo_pair takes label_smoothing in \(0, 1\)", "0.001"),
        ("dpo", {"preference_loss": "robust", "label_smoothing": 0.5}, r"in \[0, 0.5\)", "0.1"),
        ("dpo", {"preference_loss": "hinge", "label_smoothing": 0.1}, "share of flipped labels", "robust"),
        ("dpo", {"simpo_gamma": 0.5}, "SimPO's margin, off in this run", "preference_loss=simpo"),
        ("dpo", {"f_alpha": 0.3}, "alpha-divergence's alpha", "f_divergence=alpha_divergence"),
        ("dpo", {"ld_alpha": 1.5}, r"ld_alpha=1.5 must be in \[0, 1\]", "0.5"),
        ("dpo", {"beta": 0.0}, "beta=0.0 must be > 0", "0.1"),
        ("dpo", {"preference_loss": "aot", "use_weighting": True}, "sorted margins, not pairs", "drop use_weighting"),
        ("simpo", {"sync_ref_model": True}, "which preference_loss=simpo does not read", "preference_loss=sigmoid"),
        ("dpo", {"sync_ref_model": True, "lora_rank": 4}, "LoRA trains adapters", "drop sync_ref_model"),
        ("dpo", {"ref_model_sync_steps": 8}, "TR-DPO's reference updates, off", "sync_ref_model=true"),
        (
            "grpo",
            {"preference_loss": "ipo"},
            "preference_loss applies to dpo, online_dpo, xpo, cpo, simpo, orpo",
            "drop",
        ),
    ],
)
def test_preference_settings_a_loss_cannot_take_are_refused_naming_the_fix(algo, settings, message, fix):
    from policylab.llm.trainer import make_config

    with pytest.raises(ConfigError, match=message) as info:
        make_config(algo, settings)
    with cli_wording():  # the fragments below are the command line's
        assert fix in (info.value.fix or "")


@pytest.mark.parametrize(
    ("algo", "loss", "reference"),
    [("dpo", "sigmoid", True), ("simpo", "simpo", False), ("orpo", "sft+orpo", False), ("cpo", "cpo+sft", False)],
)
def test_the_reference_model_is_kept_and_run_only_where_a_loss_reads_it(algo, loss, reference, monkeypatch):
    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import LLMTrainer, make_config

    run = LLMTrainer(make_config(algo, {"batch_size": 4, "eval_size": 4, "train_size": 8}))
    assert run.cfg.preference_loss == loss
    assert (run.reference is not None) == reference
    passes = []
    real = trainer_module.token_logprobs
    monkeypatch.setattr(
        trainer_module, "token_logprobs", lambda model, *a, **k: passes.append(model) or real(model, *a, **k)
    )
    metrics = run.dpo_step()
    assert len(passes) == (2 if reference else 1) and passes[0] is run.model
    assert math.isfinite(metrics["loss"]) and "nll" in metrics


def test_wpo_weights_each_pair_by_its_completions_mean_log_prob_over_the_policys_square_mass():
    logps, mask = _padded(CHOSEN + REJECTED)
    mass, _ = _padded([[-0.5, -0.5, -0.5], [-1.0, -1.0], [-0.25, -0.25], [-0.5, -0.5, -0.5, -0.5]])
    pairs = pair_logps(logps, mask, _padded(REF_CHOSEN + REF_REJECTED)[0], square_mass=mass)
    # w(y) = exp(mean over y's tokens of log p - log sum p^2); a pair's weight is w(y_w) w(y_l)
    w = [
        math.exp((-1.75 + 1.5) / 3),
        math.exp((-2.5 + 2.0) / 2),
        math.exp((-2.25 + 0.5) / 2),
        math.exp((-3.25 + 2) / 4),
    ]
    torch.testing.assert_close(pairs.weights, torch.tensor([w[0] * w[2], w[1] * w[3]]))
    loss, _ = preference_loss("sigmoid+sft", pairs, PreferenceSettings(beta=B))
    each = [(_expected("sigmoid", i) + _expected("sft", i)) * [w[0] * w[2], w[1] * w[3]][i] for i in (0, 1)]
    assert loss.item() == pytest.approx(sum(each) / 2, rel=1e-6)


def test_the_fast_pass_gives_the_square_mass_of_transformers_forward():
    from policylab.llm.models import load_model
    from policylab.llm.rollout import token_logprobs

    model, tokenizer = load_model("tiny-llama")
    prompts = tokenizer(["12+34=", "5+6="], padding=True, return_tensors="pt", add_special_tokens=False)
    ids = torch.tensor([[3, 4, 5, 2], [6, 2, 0, 0]])
    mask = ids.ne(0)
    masses = []
    for fast in (True, False):
        mass: list[torch.Tensor] = []
        token_logprobs(model, prompts["input_ids"], prompts["attention_mask"].bool(), ids, mask, fast=fast,
                       square_mass=mass)  # fmt: skip
        masses.append(mass[0] * mask)
    torch.testing.assert_close(masses[0], masses[1], rtol=1e-5, atol=1e-5)
    assert (masses[1][mask] < 0).all()  # log sum p^2 < 0 for any distribution over more than one token


def test_tr_dpo_mixes_the_policy_into_the_reference_every_n_steps():
    from policylab.llm.trainer import LLMTrainer, make_config

    run = LLMTrainer(make_config("dpo", {"batch_size": 4, "eval_size": 4, "train_size": 8, "sync_ref_model": True,
                                         "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.25}))  # fmt: skip
    initial = [p.clone() for p in run.reference.parameters()]
    run.step = 1
    run.dpo_step()
    assert all(torch.equal(a, b) for a, b in zip(initial, run.reference.parameters()))  # step 1: not synced
    run.step = 2
    run.dpo_step()
    for old, ref, param in zip(initial, run.reference.parameters(), run.model.parameters()):
        torch.testing.assert_close(ref, 0.25 * param + 0.75 * old)


# --- KTO -------------------------------------------------------------------------------------------------------


def test_kto_losses_equal_their_formulas_by_hand():
    from policylab.objectives.preference import kto_kl, unpaired_loss

    u = torch.tensor([0.5, -0.25, 1.0])  # log pi(y) - log pi_ref(y)
    desirable = torch.tensor([True, False, False])
    kl = kto_kl(torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-2.5, -3.0, -1.3]))  # mean of 0.5, 0, 0.3
    assert kl.item() == pytest.approx(0.8 / 3)
    assert kto_kl(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == 0.0  # clamped at 0
    z = 0.8 / 3
    loss, metrics = unpaired_loss(u, desirable, kl, "kto", beta=B, desirable_weight=1.5, undesirable_weight=0.5)
    expected = [1.5 * (1 - sig(B * (0.5 - z))), 0.5 * (1 - sig(B * (z + 0.25))), 0.5 * (1 - sig(B * (z - 1.0)))]
    assert loss.item() == pytest.approx(sum(expected) / 3)
    assert metrics["reward_undesirable"].item() == pytest.approx(B * 0.75 / 2)
    apo, _ = unpaired_loss(u, desirable, kl, "apo_zero_unpaired", beta=B)
    assert apo.item() == pytest.approx((1 - sig(B * 0.5) + sig(-B * 0.25) + sig(B * 1.0)) / 3)


def test_bco_losses_equal_their_formula_by_hand():
    from policylab.objectives.preference import unpaired_loss

    u = torch.tensor([0.5, -0.25, 1.0])  # log pi(y) - log pi_ref(y)
    desirable = torch.tensor([True, False, False])
    delta = torch.tensor(0.05)  # the running mean of the rewards, in reward units
    loss, metrics = unpaired_loss(u, desirable, delta, "bco", beta=B, undesirable_weight=0.5)
    expected = [-logsig(B * 0.5 - 0.05), -0.5 * logsig(0.05 + B * 0.25), -0.5 * logsig(0.05 - B * 1.0)]
    assert loss.item() == pytest.approx(sum(expected) / 3)
    assert metrics["delta"].item() == pytest.approx(0.05) and "kl" not in metrics


def test_bcos_step_classifies_against_the_mean_of_every_reward_seen_and_checkpoints_it():
    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import LLMTrainer, make_config

    settings = {"batch_size": 4, "eval_size": 4, "train_size": 8, "beta": B}
    run = LLMTrainer(make_config("bco", settings))
    assert run.cfg.unpaired_loss == "bco" and run.reference is not None
    seen, passes = [], []
    real_loss, real_logprobs = trainer_module.unpaired_loss, trainer_module.token_logprobs

    def recording_loss(logratios, desirable, point, *args, **kwargs):
        seen.append((logratios.detach().clone(), float(point)))
        return real_loss(logratios, desirable, point, *args, **kwargs)

    trainer_module.unpaired_loss = recording_loss
    trainer_module.token_logprobs = lambda model, p, *a, **k: passes.append(len(p)) or real_logprobs(model, p, *a, **k)
    try:
        first, second = run.kto_step(), run.kto_step()
    finally:
        trainer_module.unpaired_loss, trainer_module.token_logprobs = real_loss, real_logprobs
    (u1, delta1), (u2, delta2) = seen
    assert delta1 == pytest.approx(float(B * u1.double().mean()), rel=1e-6)
    assert delta2 == pytest.approx(float(B * torch.cat([u1, u2]).double().mean()), rel=1e-6)  # both batches' rewards
    assert second["delta"] == pytest.approx(delta2) and math.isfinite(first["loss"])
    assert passes == [8, 8] * 2  # the policy's and the reference's pass: no mismatched pairs (KTO's KL estimate)
    state = run.checkpoint({})[1]
    assert state["bco_rewards_seen"][0] == 16
    again = LLMTrainer(make_config("bco", settings))
    again.restore(*run.checkpoint({}))
    assert again.bco_rewards_seen == run.bco_rewards_seen


def test_kto_rows_are_labelled_completions_or_pairs_unpaired():
    import numpy as np

    from policylab.llm import LLMError
    from policylab.llm.trainer import check_unpaired_rows, unpaired_examples

    rng = np.random.default_rng(0)
    assert unpaired_examples({"prompt": "p", "completion": "a", "label": False}, rng) == [("p", "a", False)]
    assert unpaired_examples({"prompt": "p", "chosen": "a", "rejected": "b"}, rng) == [
        ("p", "a", True),
        ("p", "b", False),
    ]
    (prompt, chosen, _), (_, rejected, label) = unpaired_examples({"prompt": "1+2=", "answer": "03"}, rng)
    assert (prompt, chosen, label) == ("1+2=", "03", False) and rejected != chosen
    for row in ({"prompt": "p", "completion": "a", "label": "yes"}, {"prompt": "p", "completion": "a"}):
        with pytest.raises(LLMError, match='row 1: neither "completion" with a true/false "label"'):
            check_unpaired_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}, row])


def test_kto_keeps_a_reference_and_refuses_what_it_cannot_take():
    from policylab.llm.trainer import LLMTrainer, make_config

    run = LLMTrainer(make_config("kto", {"batch_size": 4, "eval_size": 4, "train_size": 8}))
    assert run.reference is not None
    metrics = run.kto_step()
    assert math.isfinite(metrics["loss"]) and metrics["kl"] >= 0
    cases = [
        ({"unpaired_loss": "kt"}, "unpaired_loss='kt'. Did you mean: kto", "apo_zero_unpaired"),
        ({"desirable_weight": 0.0}, "must be > 0", "both weights to 1.0"),
        ({"batch_size": 1}, "at least 2 rows a step", "batch_size to 2"),
        ({"preference_loss": "ipo"}, "kto does not use preference_loss=ipo", "drop preference_loss"),
    ]
    for settings, message, fix in cases:
        with pytest.raises(ConfigError, match=message) as info:
            make_config("kto", settings)
        assert fix in (info.value.fix or "")
    with pytest.raises(ConfigError, match="unpaired_loss applies to kto"):
        make_config("dpo", {"unpaired_loss": "apo_zero_unpaired"})


TPO_ROWS = [
    {"prompt": "12+34=", "chosen": "46", "rejected": "47", "reference": "046"},
    {"prompt": "5+6=", "chosen": "11", "rejected": "1", "reference": "011"},
]


@pytest.mark.parametrize(("loss", "alpha"), [("sigmoid", 1.0), ("hinge", 0.5), ("ipo", 1.0), ("simpo", 0.0)])
def test_tpos_step_is_its_reference_free_pair_loss_plus_the_gold_nll_by_hand(loss, alpha, tmp_path):
    """TPO's loss on two rows, from the model's own token log-probs of each completion and the formulas of TRL's
    TPOTrainer (sigmoid, hinge, ipo length-normalized, tpo-l = simpo with gamma 0.5), beta 0.5, plus alpha times
    the gold completions' token-mean NLL; alpha 0: the gold rows are not even in the pass."""
    import json

    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import LLMTrainer, make_config

    pairs = tmp_path / "triples.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in TPO_ROWS))
    settings = {"pairs": str(pairs), "batch_size": 2, "eval_size": 4, "train_size": 8, "beta": B, "tpo_alpha": alpha}
    run = LLMTrainer(make_config("tpo", {**settings, "preference_loss": loss}))
    assert run.reference is None

    def sequence(key: str) -> list[tuple[float, int]]:  # (log pi(y), |y| with EOS) of each row's completion
        ids, mask = run.encode_prompts([row["prompt"] for row in TPO_ROWS])
        answer_ids, answer_mask = run.encode_prompts.answers([row[key] for row in TPO_ROWS])
        with torch.no_grad():
            logp = trainer_module.token_logprobs(run.model, ids, mask, answer_ids, answer_mask)[0]
        return [(float(logp[i].sum()), int(answer_mask[i].sum())) for i in range(len(TPO_ROWS))]

    chosen, rejected, gold = sequence("chosen"), sequence("rejected"), sequence("reference")
    per_pair = []
    for (lc, nc), (lr, nr) in zip(chosen, rejected):
        per_pair.append({
            "sigmoid": -logsig(B * (lc - lr)),
            "hinge": max(0.0, 1 - B * (lc - lr)),
            "ipo": (lc / nc - lr / nr - 1 / (2 * B)) ** 2,
            "simpo": -logsig(B * (lc / nc - lr / nr) - 0.5),
        }[loss])  # fmt: skip
    gold_nll = -sum(lp for lp, _ in gold) / sum(n for _, n in gold)
    passes = []
    real = trainer_module.token_logprobs
    run_logprobs = lambda model, p, m, ids, *a, **k: passes.append(len(ids)) or real(model, p, m, ids, *a, **k)  # noqa: E731
    trainer_module.token_logprobs = run_logprobs
    try:
        run.draw_rows = lambda kind, n: TPO_ROWS  # type: ignore[method-assign]
        metrics = run.tpo_step()
    finally:
        trainer_module.token_logprobs = real
    assert metrics["loss"] == pytest.approx(sum(per_pair) / 2 + alpha * gold_nll, rel=1e-5)
    assert passes == [6 if alpha else 4]  # chosen, rejected (and gold) of both rows in one pass
    assert ("gold_nll" in metrics) == bool(alpha)


def test_tpo_refuses_losses_with_a_reference_and_pairs_without_a_gold_completion(tmp_path):
    import json

    from policylab.llm import LLMError
    from policylab.llm.trainer import LLMTrainer, make_config

    for settings, message, fix in [
        ({"preference_loss": "bco_pair"}, "tpo takes one of the losses sigmoid, hinge, ipo, simpo", "train dpo"),
        ({"preference_loss": "cpo+sft"}, "not preference_loss=cpo\\+sft", "preference_loss=sigmoid"),
        ({"tpo_alpha": -1.0}, "tpo_alpha=-1.0 must be >= 0", "tpo_alpha=1.0"),
        ({"f_divergence": "js_divergence"}, "tpo does not use f_divergence", "drop f_divergence"),
        ({"precompute_ref_log_probs": True}, "tpo does not use precompute_ref_log_probs", "drop"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            make_config("tpo", settings)
        assert fix in (info.value.fix or "")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(LLMError, match='"reference"') as error:
        LLMTrainer(make_config("tpo", {"pairs": str(pairs), "eval_size": 4, "train_size": 8}))
    assert "tpo_alpha=0" in (error.value.fix or "")
    run = LLMTrainer(make_config("tpo", {"pairs": str(pairs), "tpo_alpha": 0.0, "batch_size": 1, "eval_size": 4}))
    assert math.isfinite(run.tpo_step()["loss"])


def test_kto_names_the_weights_that_balance_its_labelled_rows(tmp_path):
    import json

    from policylab.llm.trainer import LLMTrainer, kto_balance_note, make_config

    rows = [{"prompt": "1+1=", "completion": "2", "label": True}] + [
        {"prompt": "1+1=", "completion": str(d), "label": False} for d in (3, 4, 5)
    ]
    note = kto_balance_note(rows, make_config("kto"))
    assert note is not None and "1 desirable and 3 undesirable completions, weighted 0.33 to 1" in note
    assert "--set desirable_weight=3.5" in note  # 3.5 * 1 / 3 = 1.17, inside [1, 4/3]
    assert kto_balance_note(rows, make_config("kto", {"desirable_weight": 3.5})) is None
    assert kto_balance_note([{"prompt": "p", "chosen": "a", "rejected": "b"}], make_config("kto")) is None
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = LLMTrainer(make_config("kto", {"batch_size": 2, "eval_size": 4, "train_size": 8, "pairs": str(path)}))
    assert note in run.notes  # said before the run starts


# --- reward models ---------------------------------------------------------------------------------------------


def test_a_reward_model_learns_to_rank_answers_above_their_corruptions(tmp_path):
    from policylab.llm.trainer import train_llm

    settings = {"model": "tiny-llama", "steps": 100, "batch_size": 32, "eval_every": 1000, "eval_size": 200}
    run = train_llm("reward_model", settings, tmp_path, verbose=False)
    assert run.initial_eval["accuracy"] == 0.0  # a zero head scores every completion alike: none ranked above
    assert run.final_eval["accuracy"] >= 0.6 and run.final_eval["reward"] > 0.3, run.final_eval


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])  # GPT-2's has dropout: evaluation turns it off
def test_the_saved_reward_model_scores_what_training_scored(tmp_path, model):
    import json

    from policylab.llm import LLMError
    from policylab.llm.models import load_model
    from policylab.llm.rewards import reward_model
    from policylab.llm.trainer import LLMTrainer, make_config

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1), "margin": 0.5}
            for a in range(5) for b in range(4)]  # fmt: skip
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = {"model": model, "pairs": str(pairs), "batch_size": 8, "eval_size": 4}
    trainer = LLMTrainer(make_config("reward_model", settings))
    assert len(trainer.pair_rows) == 16 and [p[0] for p in trainer.eval_pairs] == ["4+0=", "4+1=", "4+2=", "4+3="]
    for _ in range(5):
        metrics = trainer.reward_step()
    assert math.isfinite(metrics["loss"])
    trainer.save(tmp_path)
    score = reward_model(str(tmp_path / "model"))  # transformers' sequence classifier, as --reward model:DIR
    evaluation = trainer.evaluate()
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.pair_rewards(trainer.eval_pairs)
    assert evaluation["reward"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-6)
    prompts = [p for p, *_ in trainer.eval_pairs]
    torch.testing.assert_close(torch.tensor(score(prompts, [c for _, c, _, _ in trainer.eval_pairs])), chosen)
    torch.testing.assert_close(torch.tensor(score(prompts, [r for _, _, r, _ in trainer.eval_pairs])), rejected)
    with pytest.raises(LLMError, match="is a sequence classifier") as info:
        load_model(tmp_path / "model")
    assert "--reward model:" in (info.value.fix or "")


def test_the_margin_and_centring_terms_of_the_reward_model_loss(monkeypatch):
    from policylab.llm.trainer import LLMTrainer, make_config

    trainer = LLMTrainer(make_config("reward_model", {"batch_size": 2, "eval_size": 4, "train_size": 8,
                                                      "center_rewards_coefficient": 0.1}))  # fmt: skip
    scores = (torch.tensor([1.0, 0.5], requires_grad=True), torch.tensor([0.0, 1.5], requires_grad=True))
    monkeypatch.setattr(trainer, "pair_rewards", lambda pairs: scores)
    monkeypatch.setattr(trainer, "draw_rows", lambda kind, n: [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                                "margin": 0.25}] * 2)  # fmt: skip
    monkeypatch.setattr(trainer, "_optimize", lambda loss: None)
    metrics = trainer.reward_step()
    expected = (-logsig(1.0 - 0.25) - logsig(-1.0 - 0.25)) / 2 + 0.1 * (1.0**2 + 2.0**2) / 2
    assert metrics["loss"] == pytest.approx(expected)
    assert metrics["reward_accuracy"] == 0.5
    with pytest.raises(ConfigError, match="center_rewards_coefficient=-1.0 must be >= 0"):
        make_config("reward_model", {"center_rewards_coefficient": -1.0})


def test_the_states_only_pass_gives_the_full_pass_states_and_gradients():
    from policylab.llm import fast_train
    from policylab.llm.models import load_model
    from policylab.llm.rollout import token_logprobs

    model, tokenizer = load_model("tiny-llama")
    prompts = tokenizer(["12+34=", "5+6="], padding=True, return_tensors="pt", add_special_tokens=False)
    ids = torch.tensor([[3, 4, 5, 2], [6, 2, 7, 8]])
    weights = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = []
    for states_only in (False, True):
        model.zero_grad()
        if states_only:
            states = fast_train.completion_states(model, prompts["input_ids"], prompts["attention_mask"].bool(), ids)
        else:
            hidden: list[torch.Tensor] = []
            token_logprobs(
                model, prompts["input_ids"], prompts["attention_mask"].bool(), ids, ids.ne(-1), hidden=hidden
            )
            states = hidden[0]
        (states * weights).sum().backward()
        results.append((states.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for full, only in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(full, only, rtol=0, atol=0)


def test_precomputed_reference_log_probs_train_as_the_reference_pass_does(tmp_path, monkeypatch):
    import json

    from policylab.llm import LLMError
    from policylab.llm import trainer as trainer_module
    from policylab.llm.trainer import LLMTrainer, make_config

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b) + "1"} for a in range(4) for b in range(5)
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = {"pairs": str(pairs), "prompts": None, "batch_size": 6, "eval_size": 4, "ld_alpha": 0.5}
    plain = LLMTrainer(make_config("dpo", settings))
    precomputed = LLMTrainer(make_config("dpo", {**settings, "precompute_ref_log_probs": True}))
    assert precomputed.reference is None and precomputed.reference_sums.shape == (20, 2)  # the memory back
    passes = []
    real = trainer_module.token_logprobs
    monkeypatch.setattr(
        trainer_module, "token_logprobs", lambda model, *a, **k: passes.append(model) or real(model, *a, **k)
    )
    for _ in range(5):  # across the end of the first pass over the 20 rows
        a, b = plain.dpo_step(), precomputed.dpo_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["reward_margin"] == pytest.approx(
            a["reward_margin"], rel=1e-4, abs=1e-6
        )
    assert passes.count(plain.reference) == 5 and all(
        model is precomputed.model or model is plain.model or model is plain.reference for model in passes
    )
    for p, q in zip(plain.model.parameters(), precomputed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    with pytest.raises(LLMError, match="needs fixed pairs") as info:
        LLMTrainer(make_config("dpo", {"precompute_ref_log_probs": True, "batch_size": 4, "eval_size": 4}))
    assert "overrides={'pairs': FILE}" in info.value.fix
    for extra, message in (
        ({"preference_loss": "simpo"}, "reads no reference"),
        ({"sync_ref_model": True}, "moves the reference"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_config("dpo", {"precompute_ref_log_probs": True, **extra})
