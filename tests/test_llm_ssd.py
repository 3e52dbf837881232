"""SSD (simple self-distillation; TRL 1.10's SSDTrainer): the step's loss against a hand computation on
its own samples, the stub filter, and what it does to the model: its next-token distributions sharpen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policylab.llm.rollout import token_logprobs
from policylab.llm.trainer import LLMTrainer, is_stub, make_config, train_llm
from policylab.objectives.aggregation import aggregate


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny Llama after 200 SFT steps on addition: partly right, its answers' digits still uncertain."""
    run = train_llm("sft", {"steps": 200, "batch_size": 64, "eval_every": 200, "eval_size": 20},
                    tmp_path_factory.mktemp("runs"), verbose=False)  # fmt: skip
    return str(run.dir / "model")


def test_is_stub_is_trls_filter():
    assert is_stub("") and is_stub("  \n ") and is_stub("093") and is_stub("return x")
    assert not is_stub("0123456789") and not is_stub("a\nb")


@pytest.mark.parametrize("filter_empty", [False, True])
def test_an_ssd_step_is_the_nll_of_its_own_samples_at_temperature_1(sft_dir, filter_empty, monkeypatch):
    import policylab.llm.trainer as trainer_module

    stubs = {"093", "111"}  # the filter's rule is tested above; here two answers stand for stubs
    monkeypatch.setattr(trainer_module, "is_stub", lambda text: text in stubs)
    settings = {"model": sft_dir, "batch_size": 16, "temperature": 0.5, "eval_size": 4, "filter_empty": filter_empty}
    trainer = LLMTrainer(make_config("ssd", settings))
    sampled = []
    rollout_of = trainer.rollout

    def recording_rollout(rows, greedy=False):
        out = rollout_of(rows, greedy)
        sampled.append(out)
        return out

    trainer.rollout = recording_rollout
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.ssd_step()
    trainer.model.load_state_dict(before)
    (rollout, texts), = sampled  # fmt: skip
    kept = torch.tensor([not (filter_empty and text in stubs) for text in texts])
    mask = rollout.completion_mask & kept[:, None]
    with torch.no_grad():  # the plain forward at temperature 1 (the samples were drawn at 0.5)
        logits = trainer.model(torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
                               attention_mask=torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1),
                               ).logits  # fmt: skip
    width = rollout.completion_ids.shape[1]
    logp = F.log_softmax(logits[:, -width - 1 : -1], -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    assert metrics["tokens"] == float(mask.sum())
    assert metrics["active_sample_ratio"] == pytest.approx(float(kept.float().mean()))
    assert metrics["loss"] == pytest.approx(float(-aggregate(logp, mask, "token-mean")), rel=1e-5)


def test_ssd_sharpens_the_models_next_token_distributions(sft_dir, tmp_path):
    """Fine-tuning on its own samples at temperature 0.5 concentrates the model on its likelier tokens: the mean
    entropy of its next-token distributions along its greedy answers to held-out prompts falls (on addition it does
    not raise exact match: scratch runs lost some, the task has no distractor tail for SSD to cut)."""

    def greedy_entropy(model_dir: str) -> float:
        trainer = LLMTrainer(make_config("ssd", {"model": model_dir, "eval_size": 100}))
        with torch.no_grad():
            rollout, _ = trainer.rollout(trainer.eval_rows, greedy=True)
            _, entropy = token_logprobs(trainer.model, rollout.prompt_ids, rollout.prompt_mask,
                                        rollout.completion_ids, rollout.completion_mask)  # fmt: skip
        return float(aggregate(entropy, rollout.completion_mask, "token-mean"))

    settings = {"model": sft_dir, "steps": 30, "eval_every": 30, "temperature": 0.5, "lr": 3e-4, "eval_size": 20}
    run = train_llm("ssd", settings, tmp_path, verbose=False)
    start, end = greedy_entropy(sft_dir), greedy_entropy(str(run.dir / "model"))
    assert end < 0.9 * start, (start, end)
