"""Language-model policies: tokenizer, generation log-probs and masks, group advantages, losses, rewards, and
learning on the built-in addition task (SFT, then RL raises exact-match accuracy)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from policylab.cli import main
from policylab.llm import LLMError
from policylab.llm.models import load_model
from policylab.llm.rollout import cut_at_stop, decode, generate, token_logprobs
from policylab.llm.tasks import TASKS, char_tokenizer, countdown_reward, get_task
from policylab.llm.trainer import call_reward, make_config, train_llm
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
    model, tok = load_model("tiny-llama")
    enc = tok(["1+1="] * 8, padding=True, return_tensors="pt", add_special_tokens=False)
    rollout = generate(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(1),
    )
    texts = decode(tok, rollout)
    stop = next(c for text in texts for c in text[1:])  # a character some completion has after its first
    cut = cut_at_stop(rollout, tok, [stop])
    for before, after in zip(texts, decode(tok, cut)):
        assert after == (before[: before.index(stop) + 1] if stop in before else before)
    assert (cut.logprobs[~cut.completion_mask] == 0).all()


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
    rpp = GROUP_ADVANTAGES.get("reinforce++")(rewards, 4)
    assert rpp.mean().item() == pytest.approx(0.0, abs=1e-6) and rpp.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(GROUP_ADVANTAGES.get("grpo")(torch.ones(4), 4), torch.zeros(4))  # no signal, no update


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
    with pytest.raises(LLMError, match=r"need the llm extra .*pip install 'policylab\[llm\]'"):
        require_llm()


def test_the_control_side_imports_without_transformers():
    code = "import sys, policylab, policylab.cli; assert 'transformers' not in sys.modules; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny Llama after 300 SFT steps on addition: partly correct (about a third of the answers)."""
    overrides = {"steps": 300, "batch_size": 64, "eval_every": 300, "eval_size": 200}
    return train_llm("sft", overrides, tmp_path_factory.mktemp("runs"), verbose=False)


def test_sft_makes_the_tiny_model_partly_correct(sft_model):
    assert sft_model.initial_eval["accuracy"] == 0.0
    assert 0.1 <= sft_model.final_eval["accuracy"] <= 0.8
    assert (sft_model.dir / "model" / "model.safetensors").is_file()
    with open(sft_model.dir / "train.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_rl_raises_exact_match_accuracy_over_the_sft_model(sft_model, tmp_path, algo):
    overrides = {"model": str(sft_model.dir), "steps": 60, "batch_size": 32, "group_size": 8, "eval_every": 60}
    run = train_llm(algo, overrides, tmp_path, verbose=False)
    assert run.initial_eval["accuracy"] == pytest.approx(sft_model.final_eval["accuracy"])
    assert run.final_eval["accuracy"] >= run.initial_eval["accuracy"] + 0.15, (run.initial_eval, run.final_eval)


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
    assert main(["llm", "eval", str(tmp_path / "s"), "--k", "2", "--json"]) == 0
    assert '"pass@2"' in capsys.readouterr().out
    assert main(["llm", "train", "grpo", "--model", str(tmp_path / "missing"), "--steps", "2"]) == 2
    assert "no model at" in capsys.readouterr().err
