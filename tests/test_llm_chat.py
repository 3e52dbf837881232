"""Conversational rows (TRL's formats) through a chat template: rendering, SFT on whole conversations with and
without assistant-only loss, RL on conversational prompts, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from policylab.llm import LLMError
from policylab.llm.chat import conversation_tokens, rendered_rows
from policylab.llm.models import build_tiny_model
from policylab.llm.rewards import prompt_rows
from policylab.llm.tasks import addition_rows, char_tokenizer
from policylab.llm.trainer import LLMInputs, LLMTrainer, make_config, train_llm

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}({{ m['content'] }}){% else %}:{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}:{% endif %}"
)
"""A user turn in parentheses, an assistant turn after a colon and up to EOS (marked for assistant-only loss)."""


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversations(n, seed):
    """Two-turn conversations: a sum and its answer, then another sum, whose answer the assistant gives last."""
    rows = addition_rows(2 * n, seed)
    return [
        {"messages": [user(a["prompt"]), assistant(a["answer"]), user(b["prompt"]), assistant(b["answer"])]}
        for a, b in zip(rows[::2], rows[1::2])
    ]


def test_conversational_rows_render_with_the_chat_template():
    tok = chat_tokenizer()
    rows = prompt_rows(
        [
            {"prompt": [user("1+2=")], "completion": [assistant("03")], "answer": "03"},
            {"messages": [user("1+1="), assistant("02"), user("2+2="), assistant("04")]},
            {"prompt": "3+3=", "answer": "06"},
        ]
    )
    assert rows[1]["answer"] == "04"  # a conversation's answer: its last message's, unless given
    rendered = rendered_rows(rows, tok)
    assert rendered[0]["prompt"] == "(1+2=):" == tok.apply_chat_template([user("1+2=")], tokenize=False,
                                                                         add_generation_prompt=True)  # fmt: skip
    assert rendered[0]["completion"] == "03"
    assert rendered[1]["prompt"] == "(1+1=):02<eos>(2+2=):" and rendered[1]["completion"] == "04"
    assert rendered[2] == rows[2]
    plain = [{"prompt": "1+1=", "answer": "2"}]
    assert rendered_rows(plain, char_tokenizer()) is plain  # string rows need no template
    with pytest.raises(LLMError, match="has no chat template"):
        rendered_rows(rows, char_tokenizer())


def test_malformed_conversations_are_one_error_naming_the_row_and_field():
    cases = [
        ({"messages": [user("1+1=")]}, "the last of \"messages\" is a 'user' message"),
        ({"messages": [user("1+1="), assistant("2")], "prompt": "x"}, 'both "prompt" and "messages"'),
        ({"messages": []}, '"messages" is not a non-empty list'),
        ({"prompt": [{"role": "user"}]}, '"prompt" message 0 has no "content" string'),
        ({"prompt": "1+1=", "completion": [{"content": "2"}]}, '"completion" message 0 has no "role" string'),
    ]
    for row, message in cases:
        with pytest.raises(LLMError, match=f"rows, row 1: {message}"):
            prompt_rows([{"prompt": "ok"}, row], "rows")
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    rows = prompt_rows([{"messages": [user("1+1="), call, {"role": "tool", "content": "2"}, assistant("2")]}])
    assert rows[0]["answer"] == "2"  # a tool-call message may go without content, as in TRL


def test_a_conversations_tokens_train_on_all_of_it_or_on_the_assistants_marked_turns():
    tok = chat_tokenizer()
    messages = [user("1+1="), assistant("02"), user("2+2="), assistant("04")]
    text = "(1+1=):02<eos>(2+2=):04<eos>"
    prompt, rest, trained = conversation_tokens(tok, messages, assistant_only=True)
    assert tok.decode(prompt + rest) == text and tok.decode(prompt) == "(1+1=):"
    assert [t for t, keep in zip(rest, trained) if keep] == tok("02<eos>04<eos>", add_special_tokens=False)["input_ids"]
    prompt, rest, trained = conversation_tokens(tok, messages, assistant_only=False)
    assert tok.decode(prompt) == "(" and tok.decode(prompt + rest) == text and all(trained)
    unmarked = char_tokenizer()
    unmarked.chat_template = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(LLMError, match="marks none"):
        conversation_tokens(unmarked, messages, assistant_only=True)


def _trainer(algo, settings, rows):
    tok = chat_tokenizer()
    model = build_tiny_model("tiny-llama", tok)
    inputs = LLMInputs(model=model, tokenizer=tok, prompts=rows, eval_prompts=rows)
    return LLMTrainer(make_config(algo, {"eval_size": 4, "max_new_tokens": 4, **settings}), inputs)


@pytest.mark.parametrize("assistant_only", [True, False])
def test_sft_on_conversations_takes_the_loss_over_the_tokens_it_trains(assistant_only):
    from policylab.llm.rollout import token_logprobs
    from policylab.objectives.aggregation import aggregate

    rows = conversations(4, 0)
    trainer = _trainer("sft", {"batch_size": 4, "assistant_only_loss": assistant_only}, rows)
    drawn = trainer.train_rows[:4]
    trainer.sample_rows = lambda n: drawn
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.sft_step()
    trainer.model.load_state_dict(before)
    tok = trainer.tokenizer
    p, pm, ids, mask = trainer.sft_batch(drawn)
    for i, row in enumerate(drawn):
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        assert tok.decode(torch.cat([p[i][pm[i].bool()], ids[i][: len(text)]]).tolist()).startswith(text[:-5])
    # 2 answers of 3 digits + EOS each; else each turn pair "(07+85=):092<eos>" (13 tokens) twice, but the first
    trained_tokens = 8 if assistant_only else 2 * 13 - 1
    assert metrics["tokens"] == 4 * trained_tokens == int(mask.sum())
    with torch.no_grad():
        logp, _ = token_logprobs(trainer.model, p, pm, ids, mask)
    assert metrics["loss"] == pytest.approx(-float(aggregate(logp, mask, "token-mean")), rel=1e-5)


def test_sft_learns_from_conversations_and_rl_samples_after_the_rendered_prompt(tmp_path):
    """300 SFT steps on two-turn conversations of sums (the evaluation: the last answer, after the first turn's sum
    and answer): on the assistant's tokens only, exact match 0.51; on the whole conversation, whose other tokens
    are random digits, 0.09 (seed 0; seeds 1 and 2, each with its own initial weights: 0.65 against 0.46, 0.67
    against 0.60, so the bar is only "above"). GRPO on conversational prompts then samples after the template's
    generation prompt and trains."""
    rows = conversations(600, 0)
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runs = {}
    for assistant_only in (True, False):
        tok = chat_tokenizer()
        settings = {"steps": 300, "batch_size": 64, "eval_every": 300, "eval_size": 100, "max_new_tokens": 4,
                    "assistant_only_loss": assistant_only}  # fmt: skip
        model = build_tiny_model("tiny-llama", tok)
        name = f"sft-{assistant_only}"
        runs[assistant_only] = train_llm("sft", settings, tmp_path, name=name, verbose=False, prompts=str(path),
                                         tokenizer=tok, model=model)  # fmt: skip
    sft = runs[True]
    assert sft.initial_eval["accuracy"] == 0.0 and sft.final_eval["accuracy"] >= 0.3, sft.final_eval
    assert sft.final_eval["accuracy"] > runs[False].final_eval["accuracy"], runs[False].final_eval
    prompts = [{"prompt": r["messages"][:3], "answer": r["messages"][3]["content"]} for r in rows]
    from policylab.llm.models import load_model

    model, saved_tok = load_model(sft.dir)
    assert saved_tok.chat_template == TEMPLATE  # the run's model keeps its template
    grpo = {"steps": 2, "batch_size": 4, "group_size": 4, "eval_size": 100, "max_new_tokens": 4}
    trainer = LLMTrainer(make_config("grpo", grpo), LLMInputs(model=model, tokenizer=saved_tok, prompts=prompts))
    assert trainer.train_rows[0]["prompt"].endswith("):") and trainer.train_rows[0]["prompt"].count("<eos>") == 1
    assert trainer.evaluate()["accuracy"] == pytest.approx(sft.final_eval["accuracy"], abs=0.1)
    assert trainer.rl_step()["tokens"] > 0


class Hint:
    """An environment whose reset text is a hint, appended to the prompt."""

    def reset(self, **_):
        return "7"

    def look(self) -> str:
        """What the board shows."""
        return "0"


def test_an_environments_reset_text_joins_the_last_message_of_a_conversational_prompt():
    rows = [{"prompt": [user("1+1=")], "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    tok = chat_tokenizer()
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=rows,
                       environment=Hint)  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", {"eval_size": 2, "max_new_tokens": 4}), inputs)
    rollout, _ = trainer.rollout(trainer.eval_rows, greedy=True)
    prompts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
    assert prompts == ["(1+1=7):", "2+2=7"]


class Peek:
    """A second environment kind, with a tool of its own."""

    def reset(self, **_):
        return None

    def peek(self) -> str:
        """What lies under the board."""
        return "1"


def test_each_prompt_describes_its_own_environments_tools():
    """With several environment kinds, the chat template describes in each row's prompt the tools of that row's
    kind only (as TRL renders each prompt with its environment's tools), before and after the reset text joins."""
    listing = "{% if tools %}<{% for t in tools %}{{ t['function']['name'] }};{% endfor %}>{% endif %}"
    tok = chat_tokenizer()
    tok.chat_template = listing + TOOL_TEMPLATE
    rows = [{"prompt": [user(f"{i}+1=")], "answer": str(i + 1), "environment": kind}
            for i, kind in enumerate(("hint", "peek", "hint"))]  # fmt: skip
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=rows,
                       environment={"hint": Hint, "peek": Peek})  # fmt: skip
    trainer = LLMTrainer(make_config("grpo", {"eval_size": 3, "max_new_tokens": 4}), inputs)
    assert [row["prompt"] for row in trainer.eval_rows] == ["<look;>(0+1=):", "<peek;>(1+1=):", "<look;>(2+1=):"]
    _, observations, _ = trainer.environments.reset(trainer.eval_rows)
    joined = [trainer.with_observation(r["prompt"], o) for r, o in zip(trainer.eval_rows, observations, strict=True)]
    assert joined == ["<look;>(0+1=7):", "<peek;>(1+1=):", "<look;>(2+1=7):"]


TOOL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}({{ m['content'] }}){% elif m['role'] == 'tool' %}"
    "{{ '{' }}{{ m['content'] }}{{ '}' }}{% else %}:{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
)
"""TEMPLATE with tool messages: a result in braces after the assistant's turn, then the next assistant turn."""
CALL_TAGS = {"tool_call_start": "[", "tool_call_end": "]"}


def tool_tokenizer():
    from policylab.llm.tasks import CHARACTERS

    tok = char_tokenizer(CHARACTERS + "[]{}")
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_with_a_chat_template_a_result_is_the_templates_tool_message_after_the_models_turn():
    """tool_results=template (TRL's way): the call's turn ends at the model's EOS, and what follows is the
    template's rendering of a tool message and of the next assistant turn's start."""
    from policylab.llm.tools import ToolFormat, ToolRunner, Turn, calculator

    tok = tool_tokenizer()
    runner = ToolRunner(tok, ToolFormat("[", "]"), [], max_iterations=2, calls=True, template=True)
    assert tok.decode(runner.result_tokens("calculator", "42")) == "{42}:"
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = [
        Turn(encode("[6*7]") + [tok.eos_token_id], [True] * 6, [-0.5] * 6),
        Turn(encode("[6*7]99"), [True] * 7, [-0.5] * 7),
    ]

    def sample(ids, mask, own, own_mask, room):
        return [Turn(encode("42") + [tok.eos_token_id], [True] * 3, [-1.0] * 3) for _ in ids]

    turns, stats = runner.run([encode("(6*7=):")] * 2, first, sample, 20, [{"calculator": calculator}] * 2)
    assert (
        tok.decode(turns[0].ids) == "[6*7]<eos>{42}:42<eos>"
        and turns[0].trained == [True] * 6 + [False] * 5 + [True] * 3
    )
    assert tok.decode(turns[1].ids) == "[6*7]99" and stats.calls == 1  # no EOS: the turn was cut, no call


def test_a_chat_model_sft_on_tool_conversations_then_calls_the_tool_through_its_template(tmp_path):
    """SFT (assistant-only) on conversations where the assistant calls the calculator and copies its result, then
    the evaluation on conversational prompts runs each call through the template: exact match >= 0.5 with the
    calculator (0.84-0.88 over seeds 0-2; one seed of a build whose float rounding differed reached 0.56 in these
    100 steps), at most 0.05 with one that adds 1 (0.02: the answers are the tool's, which the model copies)."""
    from policylab.llm.tasks import multiplication_rows
    from policylab.llm.tools import calculator

    def conversation(row):
        expression = row["prompt"].rstrip("=")
        result = {"role": "tool", "name": "calculator", "content": row["answer"]}
        return {"messages": [user(row["prompt"]), assistant(f"[{expression}]"), result, assistant(row["answer"])]}

    train = [conversation(r) for r in multiplication_rows(2000, 1)]
    held_out = [{"prompt": [user(r["prompt"])], "answer": r["answer"]} for r in multiplication_rows(50, 9)]
    tok = tool_tokenizer()
    settings = {"steps": 100, "batch_size": 64, "eval_every": 100, "eval_size": 50, "max_new_tokens": 24,
                "assistant_only_loss": True, **CALL_TAGS}  # fmt: skip
    sft = train_llm("sft", settings, tmp_path, verbose=False, prompts=train, eval_prompts=held_out, tokenizer=tok,
                    model=build_tiny_model("tiny-llama", tok), tools=[calculator])  # fmt: skip
    assert sft.final_eval["accuracy"] >= 0.5, sft.final_eval
    from policylab.llm.models import load_model

    def liar(expression: str) -> str:
        """A calculator that adds 1.

        Args:
            expression: the expression
        """
        return str(int(calculator(expression)) + 1)

    model, saved = load_model(sft.dir)
    inputs = LLMInputs(model=model, tokenizer=saved, prompts=held_out, eval_prompts=held_out, tools=[liar])
    lying = LLMTrainer(make_config("grpo", {"eval_size": 50, "max_new_tokens": 24, **CALL_TAGS}), inputs)
    assert lying.template_results and lying.evaluate()["accuracy"] <= 0.05  # a miscopied result can hit


def test_chat_template_kwargs_reach_every_rendering():
    """TRL's chat_template_kwargs: here a template flag that adds a space at the end of every rendering."""
    tok = chat_tokenizer()
    tok.chat_template = TEMPLATE + "{% if spaced %} {% endif %}"
    rows = [{"prompt": [user("1+1=")], "answer": "2"}, {"messages": [user("2+2="), assistant("4")]}]
    inputs = LLMInputs(model=build_tiny_model("tiny-llama", tok), tokenizer=tok, prompts=rows, eval_prompts=rows)
    settings = {"eval_size": 2, "max_new_tokens": 4, "chat_template_kwargs": {"spaced": True}}
    trainer = LLMTrainer(make_config("sft", settings), inputs)
    assert [row["prompt"] for row in trainer.train_rows] == ["(1+1=): ", "(2+2=): "]
    prompt, rest, _ = conversation_tokens(trainer.chat, rows[1]["messages"], False)  # what SFT trains on
    assert tok.decode(prompt + rest).endswith("4<eos> ")
    plain = LLMTrainer(make_config("sft", {"eval_size": 2, "max_new_tokens": 4}), inputs)
    assert [row["prompt"] for row in plain.train_rows] == ["(1+1=):", "(2+2=):"]
