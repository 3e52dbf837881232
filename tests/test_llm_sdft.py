"""SDFT (self-distillation fine-tuning, TRL's SDFTTrainer) and SDPO (self-distillation policy optimization, TRL's
SDPOTrainer): the top-k divergence, the teacher's prompts, the teacher's weights (base, live, EMA), the importance
weight, exact resume, the errors, and learning from the privileged context and from successful siblings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from policylab.errors import ConfigError
from policylab.llm import LLMError
from policylab.llm.tasks import get_task
from policylab.llm.trainer import LLMInputs, LLMTrainer, make_config, train_llm
from policylab.objectives.imitation import generalized_jsd, topk_generalized_jsd
from tests.helpers import assert_synced_every_second_step

CONTEXT_FIRST = "{privileged_context}:{prompt}"
"""A teacher prompt the character tokenizer can spell: the answer, a colon, the question."""


def test_the_top_k_divergence_against_a_hand_computation():
    student = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    p = torch.softmax(student, -1)
    q = torch.softmax(teacher, -1)
    # the student's top 2 tokens are 0 and 1: both distributions renormalized over them, then KL(student || teacher)
    ps, qs = p[0, :2] / p[0, :2].sum(), q[0, :2] / q[0, :2].sum()
    reverse = float((ps * (ps / qs).log()).sum())
    assert float(topk_generalized_jsd(student, teacher, 1.0, 2)) == pytest.approx(reverse, rel=1e-5)
    # with the tail: a third category holds the rest of each distribution's mass; forward KL(teacher || student)
    pt = torch.cat([p[0, :2], 1 - p[0, :2].sum()[None]])
    qt = torch.cat([q[0, :2], 1 - q[0, :2].sum()[None]])
    forward = float((qt * (qt / pt).log()).sum())
    assert float(topk_generalized_jsd(student, teacher, 0.0, 2, tail=True)) == pytest.approx(forward, rel=1e-5)
    # k at least the vocabulary: the whole distribution, any beta
    for beta in (0.0, 0.5, 1.0):
        whole = generalized_jsd(student, teacher, beta)
        torch.testing.assert_close(topk_generalized_jsd(student, teacher, beta, 100), whole)
    m = 0.5 * ps + 0.5 * qs  # the JSD's mixture on the support
    jsd = 0.5 * float((qs * (qs / m).log()).sum()) + 0.5 * float((ps * (ps / m).log()).sum())
    assert float(topk_generalized_jsd(student, teacher, 0.5, 2)) == pytest.approx(jsd, rel=1e-5)
    assert math.isfinite(float(topk_generalized_jsd(student, student + 50.0, 0.5, 3, tail=True)))


def context_rows(n: int, seed: int, shift: int = 0) -> list[dict[str, str]]:
    """Addition rows whose privileged context is the answer (plus `shift`: a wrong one, zero-padded alike)."""
    rows = get_task("addition").make(n, seed)
    return [{**r, "privileged_context": str(int(r["answer"]) + shift).zfill(len(r["answer"]))} for r in rows]


def test_the_teacher_prompt_joins_the_privileged_context_and_rows_without_one_are_an_error(tmp_path):
    from policylab.llm.models import build_tiny_model
    from tests.test_llm_chat import chat_tokenizer, user

    context = [user("4"), {"role": "assistant"}]  # messages: their contents' text (none for the second)
    rows = [{"prompt": "1+2=", "answer": "3", "privileged_context": "3"},
            {"prompt": [user("2+2=")], "answer": "4", "privileged_context": context}]  # fmt: skip
    tok = chat_tokenizer()
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=rows)
    trainer = LLMTrainer(make_config("sdft", {"teacher_prompt_template": CONTEXT_FIRST, "eval_size": 2}), inputs)
    assert [trainer.teacher_prompt(row) for row in trainer.train_rows] == ["3:1+2=", "(4:2+2=):"]
    with pytest.raises(LLMError, match="this row has none") as info:
        LLMTrainer(make_config("sdft", {}), LLMInputs(prompts=[{"prompt": "1+2=", "answer": "3"}] * 2))
    assert "privileged_context" in (info.value.fix or "")


def test_sdft_settings_that_cannot_work_are_one_clear_error_each():
    cases = [
        ({"distillation_mode": "topk"}, "distillation_mode='topk'"),
        ({"distillation_mode": "sampled_token"}, "estimates the reverse KL"),
        ({"distillation_alpha": 1.5}, "must be in \\[0, 1\\]"),
        ({"teacher_model_kind": "frozen"}, "teacher_model_kind='frozen'"),
        ({"teacher_update_rate": 0.0}, "teacher_update_rate=0.0 in \\(0, 1\\]"),
        ({"teacher_prompt_template": "{prompt} {hint}"}, "cannot be filled"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            make_config("sdft", settings)
    with pytest.raises(ConfigError, match="sdft"):  # a setting only sdft reads
        make_config("grpo", {"distillation_topk": 5})


@pytest.mark.parametrize("kind", ["ema", "base"])
def test_the_ema_teacher_moves_toward_the_model_and_a_resumed_run_ends_with_the_uninterrupted_runs_weights(
    tmp_path, kind
):
    """The EMA teacher's update by hand; a run stopped after 3 of 6 steps and resumed ends bit for bit as the
    uninterrupted run, with the EMA teacher from the checkpoint and with the base teacher (the starting model)."""
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in context_rows(40, 0)))
    settings = {"model": "tiny-llama", "prompts": str(prompts), "steps": 6, "eval_every": 2, "batch_size": 4,
                "eval_size": 8, "teacher_prompt_template": CONTEXT_FIRST}  # fmt: skip
    if kind == "ema":
        settings.update(teacher_model_kind="ema", teacher_update_rate=0.25, teacher_sync_steps=2)
        trainer = LLMTrainer(make_config("sdft", settings))
        assert trainer.teacher is not None and trainer.moving_teacher
        assert_synced_every_second_step(trainer, trainer.teacher, trainer.sdft_step, 0.25)
    full = train_llm("sdft", settings, tmp_path, name="full", verbose=False)
    part = train_llm("sdft", settings, tmp_path, name="part", verbose=False, callback=lambda step, _: step < 3)
    resumed = train_llm(resume=part.dir, verbose=False)
    assert resumed.steps == 6
    from safetensors.torch import load_file

    a, b = (load_file(str(run.dir / "model" / "model.safetensors")) for run in (full, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def context_reader(tmp_path_factory):
    """A tiny Llama after 300 SFT steps on addition where half the prompts carry the answer before a colon: it
    copies the answer when given it and adds about a quarter of the plain prompts right."""
    rows = get_task("addition").make(4000, 0)
    mixed = [
        r if i % 2 else {"prompt": f"{r['answer']}:{r['prompt']}", "answer": r["answer"]} for i, r in enumerate(rows)
    ]
    settings = {"steps": 300, "batch_size": 64, "eval_every": 300, "eval_size": 200}
    return train_llm("sft", settings, tmp_path_factory.mktemp("runs"), verbose=False, prompts=mixed,
                     eval_prompts=get_task("addition").make(200, 99))  # fmt: skip


def test_sdft_distills_what_the_model_does_with_the_context_into_the_model_without_it(context_reader, tmp_path):
    """The teacher, the initial model given the answer, is right where the student is not: 100 SDFT steps raise
    the student's exact match on plain prompts by at least 0.1 (0.25 to 0.50, 0.41 and 0.42 with seeds 0, 1, 2;
    2026-12-07); a wrong context (the answer plus 1) does not (0.22, 0.19, 0.17; after the training pass's float32
    rounding changed, 2026-12-07 night, a scratch run: 0.225 to 0.235 with seed 0: it must stay within 0.05, 10 of
    the 200 evaluation rows, of where it started): the context drives it."""
    held_out = get_task("addition").make(200, 99)
    settings = {"model": str(context_reader.dir), "steps": 100, "batch_size": 32, "lr": 1e-3, "eval_every": 100,
                "eval_size": 200, "teacher_prompt_template": CONTEXT_FIRST, "max_new_tokens": 6}  # fmt: skip
    start = context_reader.final_eval["accuracy"]
    right = train_llm("sdft", settings, tmp_path, name="right", verbose=False, prompts=context_rows(4000, 0),
                      eval_prompts=held_out)  # fmt: skip
    assert right.initial_eval["accuracy"] == start
    assert right.final_eval["accuracy"] >= start + 0.1, (start, right.final_eval)
    wrong = train_llm("sdft", settings, tmp_path, name="wrong", verbose=False, prompts=context_rows(4000, 0, 1),
                      eval_prompts=held_out)  # fmt: skip
    assert wrong.final_eval["accuracy"] <= start + 0.05, (start, wrong.final_eval)


def test_skipped_tokens_leave_the_loss_and_generate_from_teacher_samples_from_the_teachers_prompt(monkeypatch):
    """num_loss_tokens_to_skip past every completion leaves nothing in the loss (0, and the weights as they were);
    generate_from_teacher samples from the teacher's prompt, the student still trains on the row's own."""
    rows = context_rows(16, 0)
    base = {"model": "tiny-llama", "batch_size": 4, "eval_size": 4, "teacher_prompt_template": CONTEXT_FIRST}
    trainer = LLMTrainer(make_config("sdft", {**base, "num_loss_tokens_to_skip": 100}), LLMInputs(prompts=rows))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.sdft_step()
    assert metrics["loss"] == 0.0 and metrics["tokens"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer = LLMTrainer(make_config("sdft", {**base, "generate_from_teacher": True}), LLMInputs(prompts=rows))
    sampled, encoded = [], []
    rollout, encode = trainer.rollout, trainer.encode_prompts.__call__
    monkeypatch.setattr(
        trainer, "rollout", lambda rows, **kw: (sampled.extend(r["prompt"] for r in rows), rollout(rows, **kw))[1]
    )
    monkeypatch.setattr(trainer, "encode_prompts", lambda prompts: (encoded.append(list(prompts)), encode(prompts))[1])
    assert trainer.sdft_step()["tokens"] > 0
    assert all(p.split(":", 1)[1] in {r["prompt"] for r in rows} and ":" in p for p in sampled)
    assert encoded[0] == sampled  # the sampler's: the teacher's prompts
    assert encoded[1] == [p.split(":", 1)[1] for p in sampled]  # the student's: each row's own prompt


SIBLING_FIRST = {
    "reprompt_template": "{solution}{prompt}{feedback}",
    "solution_template": "{successful_previous_attempt}:",
    "feedback_template": "{feedback_raw}?",
}
"""SDPO's teacher prompts in characters the tokenizer has: a successful sibling's answer, a colon, the question."""


def test_sdpo_reprompts_each_completion_with_a_successful_sibling_of_its_group(monkeypatch):
    """Rewards [1, 0, 0, 1 | 0, 0, 0, 0]: each completion of the first group is reprompted with the first success
    other than itself (the fourth for the first), the second group's are not (their prompts stay, out of the
    loss); without dont_reprompt_on_self_success the first shows itself; include_environment_feedback adds the
    row's privileged_context, where there is no solution only with environment_feedback_only_without_solution."""
    rows = context_rows(2, 0)
    settings = {"model": "tiny-llama", "batch_size": 2, "group_size": 4, "eval_size": 2, **SIBLING_FIRST}
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])

    def teacher_prompts(extra):
        trainer = LLMTrainer(make_config("sdpo", {**settings, **extra}), LLMInputs(prompts=rows))
        rollout, _, _ = trainer.sample_groups()
        digits = trainer.tokenizer.convert_tokens_to_ids([str(i) for i in range(8)])
        rollout.completion_ids[:] = trainer.tokenizer.pad_token_id
        rollout.completion_ids[:, :3] = torch.tensor(digits)[:, None]  # completion i: "iii"
        rollout.completion_mask[:] = False
        rollout.completion_mask[:, :3] = True
        seen, encode = [], trainer.encode_prompts.__call__
        monkeypatch.setattr(trainer, "encode_prompts", lambda prompts: (seen.append(list(prompts)), encode(prompts))[1])
        _, metrics = trainer.sdpo_term(rollout, rewards)
        return rollout.rows, seen[-1], metrics

    drawn, taught, metrics = teacher_prompts({})
    prompts = [row["prompt"] for row in drawn]
    assert taught[:4] == ["333:" + prompts[0], *("000:" + p for p in prompts[1:4])] and taught[4:] == prompts[4:]
    assert metrics == {"reprompted": 0.5, "success_groups": 0.5}
    drawn, taught, _ = teacher_prompts({"dont_reprompt_on_self_success": False})
    assert taught[0] == "000:" + drawn[0]["prompt"]
    drawn, taught, metrics = teacher_prompts({"include_environment_feedback": True})
    feedback = [row["privileged_context"] + "?" for row in drawn]
    assert taught[1] == "000:" + drawn[1]["prompt"] + feedback[1] and taught[5] == drawn[5]["prompt"] + feedback[5]
    assert metrics["reprompted"] == 1.0
    only = {"include_environment_feedback": True, "environment_feedback_only_without_solution": True}
    drawn, taught, _ = teacher_prompts(only)
    feedback = [row["privileged_context"] + "?" for row in drawn]
    assert taught[1] == "000:" + drawn[1]["prompt"] and taught[5] == drawn[5]["prompt"] + feedback[5]


def test_sdpo_can_show_a_demonstration_without_its_thinking(monkeypatch):
    """remove_thinking_from_demonstration: the successful sibling's <think>...</think> blocks leave its text."""
    from policylab.llm.models import build_tiny_model
    from policylab.llm.tasks import CHARACTERS, char_tokenizer

    tok = char_tokenizer(CHARACTERS + "<>/think")
    rows = [{"prompt": "1+2=", "answer": "3"}]
    settings = {"batch_size": 1, "group_size": 2, "eval_size": 1, "remove_thinking_from_demonstration": True,
                **SIBLING_FIRST}  # fmt: skip
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=rows)
    trainer = LLMTrainer(make_config("sdpo", settings), inputs)
    rollout, _, _ = trainer.sample_groups()
    shown = tok("<think>1</think>3", add_special_tokens=False)["input_ids"]
    rollout.completion_ids[:] = tok.pad_token_id
    rollout.completion_ids[:, : len(shown)] = torch.tensor(shown)
    rollout.completion_mask[:] = False
    rollout.completion_mask[:, : len(shown)] = True
    seen, encode = [], trainer.encode_prompts.__call__
    monkeypatch.setattr(trainer, "encode_prompts", lambda prompts: (seen.append(list(prompts)), encode(prompts))[1])
    trainer.sdpo_term(rollout, torch.tensor([1.0, 0.0]))
    assert seen[-1] == ["1+2=", "3:1+2="]  # the failure is shown the success's answer alone


def test_the_importance_weight_is_the_clipped_ratio_to_the_sampler():
    """distillation_is_clip: each token's loss times min(pi / pi_sampler, clip), held: a sampler 3x less likely
    than the model on every token doubles the loss at clip 2; equal log-probs leave it as it was."""
    trainer = LLMTrainer(
        make_config("sdpo", {"model": "tiny-llama", "eval_size": 2}), LLMInputs(prompts=context_rows(4, 0))
    )
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    ids, mask = torch.randint(0, 24, (2, 3)), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    own = torch.log_softmax(student, -1).gather(-1, ids[..., None]).squeeze(-1)
    plain = trainer.self_distillation_loss(student, teacher, ids, mask)
    torch.testing.assert_close(trainer.self_distillation_loss(student, teacher, ids, mask, own), plain)
    torch.testing.assert_close(
        trainer.self_distillation_loss(student, teacher, ids, mask, own - math.log(3.0)), 2 * plain
    )


def test_sdpo_self_distillation_alone_raises_exact_match(context_reader, tmp_path):
    """No policy gradient at all (distillation_weight 1): 150 steps of distilling the starting model reprompted with
    a successful sibling's answer (the full-vocabulary JSD) raise exact match by at least 0.05 (0.25 to 0.335,
    0.34 and 0.37 over seeds 0-2, 2026-12-07)."""
    settings = {"model": str(context_reader.dir), "steps": 150, "batch_size": 32, "group_size": 8, "eval_every": 150,
                "eval_size": 200, "max_new_tokens": 6, "distillation_mode": "full_logits", "distillation_alpha": 0.5,
                "teacher_model_kind": "base", **SIBLING_FIRST}  # fmt: skip
    run = train_llm("sdpo", settings, tmp_path, verbose=False, prompts=get_task("addition").make(4000, 0),
                    eval_prompts=get_task("addition").make(200, 99))  # fmt: skip
    start = context_reader.final_eval["accuracy"]
    assert run.initial_eval["accuracy"] == start
    assert run.final_eval["accuracy"] >= start + 0.05, (start, run.final_eval)
