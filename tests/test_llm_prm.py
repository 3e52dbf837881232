"""Process reward models (`prm`; TRL 1.10's PRMTrainer): stepwise rows, their tokens and labelled
positions by hand, the saved token classifier against the training pass, `--reward prm:DIR`, learning, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from policylab.llm import LLMError
from policylab.llm.rewards import load_reward
from policylab.llm.trainer import LLMTrainer, make_config, stepwise_example, train_llm


def test_stepwise_examples_are_given_rows_or_an_answers_characters_with_one_changed():
    row = {"prompt": "1+2=", "completions": ["0", "3"], "labels": [True, False]}
    assert stepwise_example(row, np.random.default_rng(0)) == ("1+2=", ["0", "3"], [True, False])
    rng, seen = np.random.default_rng(0), set()
    for _ in range(40):
        prompt, steps, labels = stepwise_example({"prompt": "85+26=", "answer": "111"}, rng)
        assert prompt == "85+26=" and len(steps) == 3
        wrong = labels.index(False) if False in labels else 3
        assert labels == [i < wrong for i in range(3)]  # right up to the changed step, wrong from it on
        assert steps[:wrong] == list("111"[:wrong]) and (wrong == 3 or steps[wrong] != "1")
        seen.add(wrong)
    assert seen == {0, 1, 2, 3}
    for bad in ({"prompt": "1=", "completions": ["1"], "labels": [True, False]},
                {"prompt": "1=", "completions": ["1"], "labels": ["yes"]}):  # fmt: skip
        with pytest.raises(LLMError, match="completions and labels do not match"):
            stepwise_example(bad, rng)


def test_a_stepwise_batch_is_trls_tokens_with_each_steps_label_at_its_separator():
    settings = {"eval_size": 4, "step_separator": ":"}
    trainer = LLMTrainer(make_config("prm", settings))
    tok = trainer.tokenizer
    examples = [("1+2=", ["0", "3"], [True, False]), ("5=", ["12"], [True])]
    prompt_ids, prompt_mask, ids, mask, rows, columns, labels = trainer.stepwise_batch(examples, every_step=True)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert prompt_ids[0][prompt_mask[0].bool()].tolist() == [tok.bos_token_id, *encode("1+2=")]
    assert ids[0][mask[0]].tolist() == encode("0:3:") and ids[1][mask[1]].tolist() == encode("12:")
    assert rows.tolist() == [0, 0, 1] and columns.tolist() == [1, 3, 2] and labels.tolist() == [1, 0, 1]
    last = LLMTrainer(make_config("prm", {**settings, "train_on_last_step_only": True}))
    *_, rows, columns, labels = last.stepwise_batch(examples, every_step=False)
    assert rows.tolist() == [0, 1] and columns.tolist() == [3, 2] and labels.tolist() == [0, 1]
    assert last.stepwise_batch(examples, every_step=True)[-1].tolist() == [1, 0, 1]  # evaluation reads every step
    cut = LLMTrainer(make_config("prm", {**settings, "max_length": 7}))  # BOS + 4 prompt tokens leave 2
    *_, ids, mask, rows, columns, labels = cut.stepwise_batch(examples, every_step=True)
    assert ids[0][mask[0]].tolist() == encode("0:") and labels.tolist() == [1, 1]  # "3:" cut off with its label


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
    """200 steps of 32 rows of the addition task made stepwise (an answer's digits, half of them with one digit
    changed), from random weights."""
    return train_llm("prm", {"steps": 200, "eval_every": 200, "batch_size": 32}, tmp_path_factory.mktemp("runs"),
                     verbose=False)  # fmt: skip


def test_a_prm_learns_which_steps_are_right(prm_run):
    """From a zero head (every step at probability 1/2, all classified wrong: 0.36 of the held-out steps are), the
    held-out step accuracy rose to 0.815 on this machine; labelling every step right would score 0.64."""
    assert prm_run.initial_eval["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert prm_run.final_eval["accuracy"] >= 0.75 and prm_run.final_eval["loss"] < 0.5


def test_the_saved_token_classifier_scores_as_the_training_pass_and_serves_as_a_reward(prm_run):
    """The saved model is a transformers token classifier: run over each held-out example's tokens (unpadded), its
    cross-entropy at the steps' separators equals the run's final evaluation loss (the training pass's states and
    head). `--reward prm:DIR` loads it; as a reward (the smallest of a completion's steps' probabilities of being
    right) it ranks each answer above a copy with one digit changed more often than not: always where the hundreds digit
    (0 or 1) changed, about half the time for the others after 200 steps from random weights."""
    from transformers import AutoModelForTokenClassification

    classifier = AutoModelForTokenClassification.from_pretrained(prm_run.dir / "model").eval()
    config = json.loads((prm_run.dir / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["step_separator"] == "\n"
    same_rows = LLMTrainer(make_config("prm", {"steps": 200, "batch_size": 32}))  # the run's held-out examples
    losses = []
    for example in same_rows.eval_steps:
        prompt_ids, prompt_mask, ids, mask, _, columns, labels = same_rows.stepwise_batch([example], every_step=True)
        tokens = torch.cat([prompt_ids[0][prompt_mask[0].bool()], ids[0][mask[0]]])[None]
        with torch.no_grad():
            logits = classifier(input_ids=tokens).logits[0, columns + int(prompt_mask.sum())]
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    assert float(torch.cat(losses).mean()) == pytest.approx(prm_run.final_eval["loss"], rel=1e-4)
    with pytest.raises(LLMError, match="is a token classifier") as error:  # given as a policy
        LLMTrainer(make_config("grpo", {"model": str(prm_run.dir / "model")}))
    assert error.value.fix == f"use it as a reward: --reward prm:{prm_run.dir / 'model'}"
    score, weight = load_reward(f"prm:{prm_run.dir / 'model'}")
    assert weight == 1.0 and score.__name__.startswith("process reward model")
    rows = same_rows.eval_rows[:100]
    prompts = [r["prompt"] for r in rows]
    right = score(prompts, ["\n".join(r["answer"]) for r in rows])
    ranked = 0
    for i in range(3):  # each answer digit changed in turn
        changed = [r["answer"][:i] + str((int(r["answer"][i]) + 5) % 10) + r["answer"][i + 1 :] for r in rows]
        ranked += sum(a > b for a, b in zip(right, score(prompts, ["\n".join(c) for c in changed])))
    assert ranked >= 0.6 * 300  # 0.69 on this machine: every changed hundreds digit, about half of the others


def test_prm_refuses_rows_and_settings_it_cannot_take(tmp_path):
    rows = tmp_path / "steps.jsonl"
    rows.write_text(json.dumps({"prompt": "1=", "completions": ["1", "2"], "labels": [True]}) + "\n")
    with pytest.raises(LLMError, match="completions and labels do not match") as error:
        LLMTrainer(make_config("prm", {"pairs": str(rows), "eval_size": 4}))
    assert '"labels"' in (error.value.fix or "")
    from policylab.errors import ConfigError

    with pytest.raises(ConfigError, match="grpo does not use step_separator"):
        make_config("grpo", {"step_separator": ":"})
    with pytest.raises(LLMError, match="no process reward model"):
        load_reward(f"prm:{tmp_path}")
