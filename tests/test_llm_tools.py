"""Tool calling inside completions: the call protocol, the runner's token bookkeeping, SFT on traces with the
tools' results out of the loss, and the calculator task, where answers come from the tool and RL learns to call
it."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from policylab.errors import ConfigError
from policylab.llm import LLMError
from policylab.llm.rollout import decode
from policylab.llm.tasks import CHARACTERS, char_tokenizer, multiplication_rows
from policylab.llm.tools import (
    ToolFormat,
    ToolRunner,
    Turn,
    calculator,
    call_tool,
    first_marker,
    padded_turns,
    parse_call,
    tool_table,
    trace_tokens,
)
from policylab.llm.trainer import LLMInputs, LLMTrainer, make_config, tokenize, train_llm

TAGS = {"tool_call_start": "[", "tool_call_end": "]", "tool_response_start": "{", "tool_response_end": "}"}


def add(a: int, b: int = 0) -> int:
    return a + b


def test_a_call_is_json_a_python_call_or_one_tools_argument_and_a_bad_one_is_an_error_result():
    tools = tool_table(["calculator", add])
    assert parse_call('{"name": "add", "arguments": {"a": 2, "b": 3}}', tools) == (add, [], {"a": 2, "b": 3})
    assert parse_call(" add(2, b=3) ", tools) == (add, [2], {"b": 3})
    assert call_tool("calculator('6*(3+4)')", tools) == ("42", False, "calculator")
    assert call_tool("6*7", {"calculator": calculator}) == (
        "42",
        False,
        "calculator",
    )  # one tool: the body is its argument
    failures = {
        "6*7": "no tool named '6*7'",  # two tools: the body must name one
        "search(1)": "no tool named 'search'",
        "add(x)": "not Python literals",
        '{"name": "add", "arguments": [1]}': '"arguments": {...}',
        "{not json": "not valid JSON",
        "add(1, c=2)": "unexpected keyword argument 'c'",  # the tool's own error
        "calculator('2**99')": "not an expression",
    }
    for body, message in failures.items():
        result, failed, _ = call_tool(body, tools)
        assert failed and result.startswith("error: ") and message in result, (body, result)
    with pytest.raises(LLMError, match="two tools are named 'add'"):
        tool_table([add, add])
    with pytest.raises(LLMError, match="neither a built-in"):
        tool_table(["search"])
    with pytest.raises(LLMError, match="has no nothing"):
        tool_table(["policylab.llm.tools:nothing"])


def test_first_marker_is_the_shortest_prefix_holding_a_marker():
    tok = char_tokenizer(CHARACTERS + "[]{}")
    ids = tok("12[3*4]56]", add_special_tokens=False)["input_ids"]

    def decode(x):
        return tok.decode(x)

    for markers in (["]"], ["5", "]"], ["*4"], ["9"]):
        linear = next(
            ((n, decode(ids[:n])) for n in range(1, len(ids) + 1) if any(m in decode(ids[:n]) for m in markers)), None
        )
        assert first_marker(decode, ids, markers) == linear, markers


class ScriptedSampler:
    """A stand-in for the trainer's sampler: each context's continuation is a scripted text (by the context's
    last characters), with log-prob -1 a token; records what it was asked."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def __call__(self, ids, mask, own, own_mask, room):
        rows, masks = torch.cat([ids, own], -1), torch.cat([mask, own_mask], -1)
        contexts = [self.tok.decode(row[m.bool()].tolist()) for row, m in zip(rows, masks)]
        self.calls.append((contexts, room))
        turns = []
        for context in contexts:
            text = next(v for k, v in self.script.items() if context.endswith(k))
            tokens = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            tokens = tokens[:room]
            turns.append(Turn(tokens, [True] * len(tokens), [-1.0] * len(tokens)))
        return turns


@pytest.mark.parametrize("fast", [True, False])
def test_sampling_after_a_context_equals_sampling_after_the_rows_it_completes(fast):
    """A tool call's continuation: each row's context (its completion so far and the result) after its prompt. The
    numpy decode prefills each distinct prompt once (two rows share one here) and then the contexts over its cache;
    other paths run on prompt and context concatenated. Either way: the tokens and log-probs of sampling after the
    whole rows, left-padded as one."""
    from policylab.llm.models import load_model
    from policylab.llm.rollout import generate
    from policylab.llm.tools import left_padded

    model, tok = load_model("tiny-llama", seed=0)
    model.eval()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, contexts = [encode("12+34="), encode("12+34="), encode("7+8=")], [encode("4"), encode("46{"), encode("1")]
    options = {"max_new_tokens": 5, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "fast": fast}
    ids, mask = left_padded(prompts, tok.pad_token_id)
    own, own_mask = left_padded(contexts, tok.pad_token_id)
    whole, whole_mask = left_padded([p + c for p, c in zip(prompts, contexts)], tok.pad_token_id)
    for greedy, seed in ((True, 0), (False, 3)):
        after = generate(model, ids, mask, context_ids=own, context_mask=own_mask, greedy=greedy,
                         generator=torch.Generator().manual_seed(seed), **options)  # fmt: skip
        rows = generate(model, whole, whole_mask, greedy=greedy, generator=torch.Generator().manual_seed(seed),
                        **options)  # fmt: skip
        assert torch.equal(after.completion_ids, rows.completion_ids)
        torch.testing.assert_close(after.logprobs, rows.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must end in a token"):
        generate(model, ids, mask, context_ids=own.flip(-1), context_mask=own_mask.flip(-1), **options)


def test_the_runner_appends_each_result_samples_on_and_masks_the_results_out_of_the_loss():
    tok = char_tokenizer(CHARACTERS + "[]{}")
    fmt = ToolFormat("[", "]", "{", "}")
    runner = ToolRunner(tok, fmt, [], max_iterations=2, calls=True)
    calc = [{"calculator": calculator}] * 3
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode("6*7="), encode("2*3="), encode("1+1=")]
    first_texts = ["[6*7]9999", "[2*3]", "2"]  # what the first sampling wrote (after a call, to be dropped)
    first = [Turn(encode(t), [True] * len(t), [-0.5] * len(t)) for t in first_texts]
    first[2].ids.append(tok.eos_token_id), first[2].trained.append(True), first[2].logprobs.append(-0.5)
    sampler = ScriptedSampler(tok, {"{42}": "42", "{6}": "[6*2]", "{12}": "12"})
    turns, stats = runner.run(prompts, first, sampler, 20, calc)
    texts = [tok.decode(t.ids, skip_special_tokens=True) for t in turns]
    assert texts == ["[6*7]{42}42", "[2*3]{6}[6*2]{12}12", "2"]
    assert (stats.calls, stats.failures) == (3, 0)
    assert [c for c, _ in sampler.calls] == [["6*7=[6*7]{42}", "2*3=[2*3]{6}"], ["2*3=[2*3]{6}[6*2]{12}"]]
    ids, trained, logprobs, tool = padded_turns(turns, 20, tok.pad_token_id)
    row = "[6*7]{42}42"
    assert tool[0, : len(row) + 1].tolist() == [c in "{}" or (5 <= i <= 8) for i, c in enumerate(row)] + [False]
    assert trained[0, : len(row) + 1].all() == False  # noqa: E712 - the result's tokens are not the model's
    assert (trained[0] == (~tool[0] & (torch.arange(20) <= len(row)))).all()
    assert logprobs[0, :5].tolist() == [-0.5] * 5 and (logprobs[0, 5:9] == 0).all() and logprobs[0, 9] == -1.0
    # the limit on calls: the second row's second call is not run after max_iterations=1
    once = ToolRunner(tok, fmt, [], max_iterations=1, calls=True)
    first = [Turn(encode(t), [True] * len(t), [-0.5] * len(t)) for t in first_texts[:2]]
    turns, stats = once.run(prompts[:2], first, ScriptedSampler(tok, sampler.script), 20, calc)
    assert [tok.decode(t.ids, skip_special_tokens=True) for t in turns] == ["[6*7]{42}42", "[2*3]{6}[6*2]"]
    assert stats.calls == 2
    # a result that does not fit in the budget is not appended: the row ends at its call
    first = [Turn(encode("[6*7]"), [True] * 5, [-0.5] * 5)]
    turns, _ = runner.run(prompts[:1], first, ScriptedSampler(tok, sampler.script), 8, calc)
    assert tok.decode(turns[0].ids) == "[6*7]"


def test_sft_on_traces_leaves_the_tools_results_out_of_its_loss(tmp_path):
    from policylab.llm.rollout import token_logprobs
    from policylab.objectives.aggregation import aggregate

    tok = char_tokenizer(CHARACTERS + "[]{}")
    ids, trained = trace_tokens(lambda texts: tokenize(tok, texts), "[6*7]{42}42", ToolFormat("[", "]", "{", "}"))
    assert tok.decode(ids) == "[6*7]{42}42" and trained == [True] * 5 + [False] * 4 + [True] * 2
    trainer = LLMTrainer(make_config("sft", {"task": "calculator", "batch_size": 4, "eval_size": 4}))
    rows = trainer.train_rows[:4]
    trainer.sample_rows = lambda n: rows
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.sft_step()
    trainer.model.load_state_dict(before)
    p, pm = trainer.encode_prompts([r["prompt"] for r in rows])
    a, am, tool = trainer.encode_completions([r["completion"] for r in rows])
    assert int(am.sum()) == metrics["tokens"] and not (am & tool).any()
    assert int(tool.sum()) == sum(len(r["answer"]) + 2 for r in rows)  # {answer} in each
    with torch.no_grad():
        logp, _ = token_logprobs(trainer.model, p, pm, a, am)
    assert metrics["loss"] == pytest.approx(-float(aggregate(logp, am, "token-mean")), rel=1e-5)


@pytest.fixture(scope="module")
def calculator_model(tmp_path_factory):
    """A tiny Llama after 100 SFT steps on the calculator task's traces: it calls the tool on the prompt's two
    numbers and copies the result (exact match 0.99-1.0 at 80-300 steps)."""
    settings = {"task": "calculator", "steps": 100, "batch_size": 64, "eval_every": 100, "eval_size": 100}
    return train_llm("sft", settings, tmp_path_factory.mktemp("runs"), verbose=False)


def test_the_calculator_tasks_answers_come_from_the_tool(calculator_model, tmp_path):
    """The SFT model multiplies by calling the calculator: given a calculator that lies (adds 1), the same model on
    the same prompts answers nothing right, and every completion's text holds the lie."""
    assert calculator_model.final_eval["accuracy"] >= 0.9
    rows = multiplication_rows(50, 7)

    def liar(expression: str) -> str:
        return str(int(calculator(expression)) + 1)

    base = {"model": str(calculator_model.dir), "eval_size": 50, "max_new_tokens": 20}
    honest = LLMTrainer(make_config("grpo", {**base, **TAGS}), _inputs(rows, [calculator]))
    lying = LLMTrainer(make_config("grpo", {**base, **TAGS}), _inputs(rows, [liar]))
    assert honest.evaluate()["accuracy"] >= 0.9
    assert lying.evaluate()["accuracy"] <= 0.05  # 0 at seed 0; a miscopied result could hit
    _, texts = lying.rollout(rows[:5], greedy=True)
    for row, text in zip(rows[:5], texts):
        assert "{" + str(int(row["answer"]) + 1) + "}" in text, text


def _inputs(rows, tools):
    return LLMInputs(prompts=rows, eval_prompts=rows, tools=tools)


def test_rl_learns_to_call_the_calculator(tmp_path):
    """SFT on rows that call the calculator 15% of the time and otherwise guess the product (which a tiny model
    cannot compute): the model seldom calls it. 60 GRPO steps raise the calls per completion from 0.08 to 0.98
    and exact match from 0.01 to 0.215 (seed 0; the copying the few traces taught stays imperfect). Over GRPO
    seeds 0-2 from this SFT model and from one of SFT seed 1: calls in the first 5 steps 0.11-0.31, in the last
    10 0.94-0.98, exact match +0.20 to +0.63."""
    rng = np.random.default_rng(0)
    rows = [r if rng.random() < 0.15 else {**r, "completion": r["answer"]} for r in multiplication_rows(4000, 1)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sft = {"prompts": str(path), "tools": ["calculator"], **TAGS, "steps": 400, "batch_size": 64, "eval_every": 400}
    model = train_llm("sft", {**sft, "eval_size": 200, "max_new_tokens": 20}, tmp_path, verbose=False)
    settings = {"model": str(model.dir), "task": "calculator", "steps": 60, "eval_every": 60, "batch_size": 16}
    run = train_llm("grpo", settings, tmp_path, verbose=False)
    with open(run.dir / "train.csv") as f:
        calls = [float(row["tool_calls"]) for row in csv.DictReader(f)]
    assert np.mean(calls[:5]) < 0.5 and np.mean(calls[-10:]) > 0.8, calls
    assert run.final_eval["accuracy"] >= run.initial_eval["accuracy"] + 0.1, (run.initial_eval, run.final_eval)


def test_a_run_with_a_python_tool_resumes_exactly_when_it_is_given_again(calculator_model, tmp_path):
    rows = multiplication_rows(64, 3)
    settings = {"model": str(calculator_model.dir), **TAGS, "max_new_tokens": 20, "steps": 4, "eval_every": 2,
                "batch_size": 4, "group_size": 4, "eval_size": 8}  # fmt: skip
    full = train_llm("grpo", settings, tmp_path, name="full", verbose=False, prompts=rows, tools=[calculator])
    part = train_llm("grpo", settings, tmp_path, name="part", verbose=False, prompts=rows, tools=[calculator],
                     callback=lambda step, _: step < 2)  # fmt: skip
    with pytest.raises(LLMError, match=r"Python objects for tools(.|\n)*tools=\.\.\."):
        train_llm(resume=part.dir, verbose=False, prompts=rows)
    resumed = train_llm(resume=part.dir, verbose=False, prompts=rows, tools=[calculator])
    from safetensors.torch import load_file

    a, b = (load_file(run.dir / "model" / "model.safetensors") for run in (full, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with open(full.dir / "train.csv") as f:
        assert all(float(row["tool_calls"]) > 0.5 for row in csv.DictReader(f))


def test_tool_settings_without_tools_or_out_of_range_are_errors():
    with pytest.raises(ConfigError, match="tool_call_start and max_tool_calling_iterations would do nothing"):
        LLMTrainer(make_config("grpo", {"tool_call_start": "[", "max_tool_calling_iterations": 2, "eval_size": 4}))
    with pytest.raises(ConfigError, match="max_tool_calling_iterations=0 must be >= 1"):
        LLMTrainer(make_config("grpo", {"task": "calculator", "max_tool_calling_iterations": 0, "eval_size": 4}))
    with pytest.raises(ConfigError, match="a tool tag is empty"):
        LLMTrainer(make_config("grpo", {"task": "calculator", "tool_call_end": "", "eval_size": 4}))


class Counter:
    """An environment: its completion's calculator, counting the calls; its reward is their number."""

    made = 0

    def __init__(self):
        Counter.made += 1
        self.calls, self.answer = 0, None

    def reset(self, prompt, answer, **_):
        self.calls, self.answer = 0, answer

    def calculator(self, expression):
        self.calls += 1
        return calculator(expression)

    def get_reward(self):
        return float(self.calls)


def test_an_environment_gives_each_completion_its_own_instance_tools_and_reward(calculator_model):
    """Each completion's calls go to its own instance (its count is that completion's calls), the instances are
    made once and reset for every rollout, get_reward is the reward (alone, then added to --reward's), and reward
    functions receive the instances."""
    rows = multiplication_rows(8, 5)
    base = {"model": str(calculator_model.dir), **TAGS, "max_new_tokens": 20, "batch_size": 2, "group_size": 4}
    seen = []

    def spy(prompts, completions, environments, **_):
        seen.append(environments)
        return [0.0] * len(completions)

    for rewards, extra in ((None, 0.0), (["exact_match"], 1.0)):
        Counter.made = 0
        inputs = LLMInputs(prompts=rows, eval_prompts=rows, environment=Counter, rewards=rewards)
        trainer = LLMTrainer(make_config("grpo", {**base, "eval_size": 8}), inputs)
        for _ in range(2):
            rollout, reward, metrics = trainer.sample_groups()
            counts = [e.calls for e in rollout.environments]
            texts = decode(trainer.tokenizer, rollout)
            # every call made (its result shown, or left out where it would not fit in max_new_tokens)
            assert counts == [len(re.findall(r"\[[^\]]*\]", text)) for text in texts] and sum(counts) > 0
            assert len({id(e) for e in rollout.environments}) == 8
            hits = [float(t.rsplit("}", 1)[-1] == r["answer"]) for t, r in zip(texts, rollout.rows)]
            torch.testing.assert_close(reward, torch.tensor(counts, dtype=torch.float32) + extra * torch.tensor(hits))
            assert metrics["tool_calls"] == sum(counts) / 8
        assert Counter.made == 8  # the probe, then the pool grew to the batch once
    trainer = LLMTrainer(make_config("grpo", {**base, "eval_size": 8}),
                         LLMInputs(prompts=rows, eval_prompts=rows, environment=Counter, rewards=[spy]))  # fmt: skip
    trainer.sample_groups()
    assert len(seen[-1]) == 8 and all(isinstance(e, Counter) for e in seen[-1])


def test_environments_that_cannot_work_are_one_clear_error_each():
    from policylab.llm.tools import EnvironmentKind, load_environment

    class NoReset:
        def act(self):
            return 1

    class NoTools:
        def reset(self, **_):
            return None

    class BadObservation(NoTools):
        def act(self):
            return 1

        def reset(self, **_):
            return 3

    def broken():
        raise RuntimeError("no GPU")

    for factory, message in ((NoReset, "no reset method"), (NoTools, "no public method"), (broken, "no GPU")):
        with pytest.raises(LLMError, match=message):
            EnvironmentKind(factory, factory.__name__)
    with pytest.raises(LLMError, match="reset returned a int"):
        load_environment(BadObservation).reset([{"prompt": "1"}])
    with pytest.raises(ConfigError, match="mix=luffy puts expert completions"):
        LLMTrainer(make_config("grpo", {"mix": "luffy", "eval_size": 4}), LLMInputs(environment=Counter))
    with pytest.raises(LLMError, match="environment .Counter. is neither module:name"):
        LLMTrainer(make_config("grpo", {"environment": "Counter", "eval_size": 4}))


def test_ppos_token_gae_runs_over_the_models_tokens_across_a_tools_result():
    """GAE on a completion with a tool's result in it equals GAE on the model's tokens alone, put back in place."""
    from policylab.llm.trainer import token_gae

    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4, 9.0], [0.5, 0.6, 0.7, 0.0, 0.0, 0.0, 0.0]])
    rewards = torch.tensor([1.0, 2.0])
    advantages, returns = token_gae(rewards, values, mask, 0.9, 0.8)
    packed = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    packed_values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0], values[1].tolist()])
    expected, expected_returns = token_gae(rewards, packed_values, packed, 0.9, 0.8)
    torch.testing.assert_close(advantages[0, [0, 1, 4, 5]], expected[0, :4])
    torch.testing.assert_close(returns[0, [0, 1, 4, 5]], expected_returns[0, :4])
    assert (advantages[0, [2, 3, 6]] == 0).all() and torch.equal(advantages[1], expected[1])
    # by hand, the first row: delta_t = r_t + gamma V_{t+1} - V_t over its 4 tokens, the reward on the last
    deltas = [0.9 * 0.2 - 0.1, 0.9 * 0.3 - 0.2, 0.9 * 0.4 - 0.3, 1.0 - 0.4]
    gae, by_hand = 0.0, []
    for delta in reversed(deltas):
        gae = delta + 0.9 * 0.8 * gae
        by_hand.insert(0, gae)
    torch.testing.assert_close(advantages[0, [0, 1, 4, 5]], torch.tensor(by_hand))


def test_a_run_with_an_environment_class_records_it_and_needs_it_again_to_resume(calculator_model, tmp_path):
    rows = multiplication_rows(32, 4)
    settings = {"model": str(calculator_model.dir), **TAGS, "max_new_tokens": 20, "steps": 2, "eval_every": 1,
                "batch_size": 2, "group_size": 4, "eval_size": 4}  # fmt: skip
    run = train_llm("grpo", settings, tmp_path, verbose=False, prompts=rows, environment=Counter,
                    callback=lambda step, _: step < 1)  # fmt: skip
    assert "environment: python:Counter" in (run.dir / "config.yaml").read_text()
    with pytest.raises(LLMError, match=r"Python objects for prompts, environment"):
        train_llm(resume=run.dir, verbose=False)
    resumed = train_llm(resume=run.dir, verbose=False, prompts=rows, environment=Counter)
    with open(resumed.dir / "train.csv") as f:  # the reward is the environment's: each completion's calls
        rows_logged = list(csv.DictReader(f))
    assert len(rows_logged) == 2 and all(row["reward"] == row["tool_calls"] for row in rows_logged)


class Plain:
    """A second kind of environment: no reward of its own; it checks that reset never sees the routing field."""

    def reset(self, **row):
        assert "environment" not in row
        self.row = row

    def echo(self, text):
        return text


def test_several_environments_are_picked_by_each_rows_environment_field():
    from policylab.llm.tools import environment_reward, load_environment

    environments = load_environment({"count": Counter, "plain": Plain})
    rows = [{"prompt": "1*2=", "answer": "2", "environment": e} for e in ("plain", "count", "count", "plain")]
    instances, observations, tools = environments.reset(rows)
    assert [type(i) for i in instances] == [Plain, Counter, Counter, Plain] and len({id(i) for i in instances}) == 4
    assert [set(t) for t in tools] == [{"echo"}, {"calculator"}, {"calculator"}, {"echo"}]
    assert observations == [""] * 4 and environments.rewarded and instances[0].row == {"prompt": "1*2=", "answer": "2"}
    tools[1]["calculator"]("2*3")
    assert environment_reward([], [""] * 4, instances) == [None, 1.0, 0.0, None]  # None: Plain has no reward
    again, _, _ = environments.reset(rows[1:3])
    assert again == instances[1:3]  # the pool's instances, reset
    with pytest.raises(LLMError, match="a row's environment is 'other', not one of count, plain"):
        environments.reset([{"prompt": "1", "environment": "other"}])


def sampled_with_a_note(prompts, trainer):
    """A rollout_func: the trainer's own sampler's completions, then a note of three tokens that are not the
    model's (env_mask 0), and a reward column."""
    from policylab.llm.tools import turns_of

    ids, mask = trainer.encode_prompts(prompts)
    sampled = trainer._sample(ids, mask, 1, trainer.rollout_greedy, trainer.max_new_tokens)
    turns = turns_of(sampled.completion_ids, sampled.completion_mask, sampled.logprobs)
    note = trainer.tokenizer("{1}", add_special_tokens=False)["input_ids"]
    sampled_with_a_note.greedy.append(trainer.rollout_greedy)
    return {
        "completion_ids": [t.ids + note for t in turns],
        "logprobs": [t.logprobs + [0.0] * len(note) for t in turns],
        "env_mask": [[1] * len(t.ids) + [0] * len(note) for t in turns],
        "source": ["scripted"] * len(prompts),
    }


sampled_with_a_note.greedy = []


def test_a_rollout_func_makes_the_completions_and_its_fields_reach_the_rewards(calculator_model, tmp_path):
    rows = multiplication_rows(16, 6)
    seen = []

    def by_source(prompts, completions, source, **_):
        seen.append(source)
        return [1.0 if s == "scripted" else 0.0 for s in source]

    settings = {"model": str(calculator_model.dir), "max_new_tokens": 20, "batch_size": 2, "group_size": 4,
                "eval_size": 4}  # fmt: skip
    inputs = LLMInputs(prompts=rows, eval_prompts=rows, rollout_func=sampled_with_a_note, rewards=[by_source])
    trainer = LLMTrainer(make_config("grpo", settings), inputs)
    rollout, rewards, _ = trainer.sample_groups()
    assert seen[-1] == ["scripted"] * 8 and rewards.tolist() == [1.0] * 8
    lengths = rollout.span.sum(-1)
    for row in range(8):
        n = int(lengths[row])
        assert rollout.tool_mask[row, n - 3 : n].all() and not rollout.tool_mask[row, : n - 3].any()
        assert (rollout.completion_mask[row, : n - 3]).all() and not rollout.completion_mask[row, n - 3 :].any()
    assert rollout.final == [""] * 8  # nothing after the note
    trainer.evaluate()
    assert sampled_with_a_note.greedy[-1] is True and sampled_with_a_note.greedy[-2] is False
    run = train_llm("grpo", {**settings, "steps": 2}, tmp_path, verbose=False, prompts=rows,
                    rollout_func=sampled_with_a_note, rewards=[by_source])  # fmt: skip
    assert "rollout_func: python:sampled_with_a_note" in (run.dir / "config.yaml").read_text()

    def broken(prompts, trainer):
        return {"completion_ids": [[5]] * len(prompts), "logprobs": [[0.0, 0.0]] * len(prompts)}

    for fn, message in ((lambda p, t: [], "without completion_ids and logprobs"),
                        (lambda p, t: {"completion_ids": [], "logprobs": []}, "has 0 entries for 8 prompts"),
                        (broken, "completion 0 has 1 tokens, 2 logprobs")):  # fmt: skip
        bad = LLMTrainer(make_config("grpo", settings), LLMInputs(prompts=rows, rollout_func=fn, rewards=[by_source]))
        with pytest.raises(LLMError, match=message):
            bad.sample_groups()
    with pytest.raises(ConfigError, match="rollout_func makes whole completions itself"):
        LLMTrainer(make_config("grpo", {**settings, "stop": ["9"]}), inputs)
