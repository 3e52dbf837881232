"""Conversational rows (TRL's conversational dataset formats), rendered with the tokenizer's chat template:

- a `prompt` that is a list of messages ({"role", "content"}) becomes the template's text of them with the
  generation prompt (`add_generation_prompt=True`), what sampling continues;
- a `completion`, `chosen`, `rejected` or `reference` that is a list of messages becomes its assistant
  messages' content (the completion ends with the tokenizer's EOS, as every completion here);
- a `messages` row (a whole conversation, for SFT) gets the prompt of its messages before the last (with the
  generation prompt) and, unless given, `completion` and `answer` from its last message (the assistant's), what
  RL and the evaluation read; SFT trains on the conversation's tokens (`conversation_tokens`): all of them after
  the first, or, with `assistant_only_loss`, the assistant's only (the template must mark them with
  {% generation %}, as TRL requires).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from policylab.llm import LLMError

COMPLETION_FIELDS = ("completion", "chosen", "rejected", "reference")
"""The fields that may hold a conversation's assistant messages instead of a string."""


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, where: str, field: str) -> None:
    """One error naming the row and field where a list of messages is malformed."""
    fix = 'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(value, list) or not value:
        raise LLMError(f'{where}: "{field}" is not a non-empty list of messages', fix)
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise LLMError(f'{where}: "{field}" message {number} has no "role" string', fix)
        calls_only = message.get("tool_calls") and message.get("content") is None  # TRL's tool-call messages
        if not isinstance(message.get("content"), str) and not calls_only:
            raise LLMError(f'{where}: "{field}" message {number} has no "content" string', fix)
    if field == "messages" and value[-1]["role"] != "assistant":
        raise LLMError(
            f'{where}: the last of "messages" is a {value[-1]["role"]!r} message, not the assistant\'s',
            "end each conversation with the assistant's message (what SFT and the evaluation's answer read)",
        )


def normalized_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `messages` row with the `answer` its evaluation compares (the last message's content) unless given."""
    if "messages" in row and "prompt" not in row and "answer" not in row:
        return {**row, "answer": row["messages"][-1].get("content") or ""}
    return row


def has_conversations(rows: list[dict[str, Any]]) -> bool:
    return any(
        "messages" in row
        or is_conversation(row.get("prompt"))
        or any(is_conversation(row.get(f)) for f in COMPLETION_FIELDS)
        for row in rows
    )


def require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LLMError(
            f"the rows are conversations (lists of messages), and the tokenizer {type(tokenizer).__name__} has no "
            "chat template to render them",
            "use a model whose tokenizer has one (an instruct model's), set tokenizer.chat_template, or give the "
            "prompts as strings",
        )


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str:
    """The chat template's text of `messages` with the generation prompt (what the assistant's turn follows);
    with `tools`, their descriptions too (the template's, from each function's type hints and docstring)."""
    return str(chat_template(tokenizer, messages, tools, tokenize=False, add_generation_prompt=True))


def chat_template(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None, **options: Any) -> Any:
    """`apply_chat_template` with the tools described, or one error naming the tool it cannot describe."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, **options)
    except Exception as exc:
        if not tools or "schema" not in str(exc).lower():
            raise
        raise LLMError(
            f"a tool cannot be described to the chat template: {exc}",
            "give each tool type hints and a Google-style docstring with an Args: section (what transformers' "
            "get_json_schema reads), or set tool_results=tags",
        ) from None


ToolsOf = Callable[[dict[str, Any]], list[Any] | None]
"""The tools a chat template describes in a row's prompt, given the row."""


def rendered_rows(rows: list[dict[str, Any]], tokenizer: Any, tools: ToolsOf | None = None) -> list[dict[str, Any]]:
    """The rows with string prompts and completions (the module's docstring; `tools`: each row's, described in its
    prompt); rows of strings unchanged."""
    if not has_conversations(rows):
        return rows
    require_template(tokenizer)
    out = []
    for row in rows:
        row = dict(row)
        described = tools(row) if tools is not None else None
        if "messages" in row and "prompt" not in row:
            row["prompt"] = render(tokenizer, row["messages"][:-1], described)
            row.setdefault("completion", row["messages"][-1].get("content") or "")
        elif is_conversation(row.get("prompt")):
            row["prompt"] = render(tokenizer, row["prompt"], described)
        for field in COMPLETION_FIELDS:
            if is_conversation(row.get(field)):
                row[field] = "".join(m.get("content") or "" for m in row[field] if m["role"] == "assistant")
        out.append(row)
    return out


def conversational_prompts(
    rows: list[dict[str, Any]], tokenizer: Any, tools: ToolsOf | None = None
) -> dict[str, tuple[list[dict[str, Any]], list[Any] | None]]:
    """The messages of the rows' conversational prompts (a `messages` row's: all but the last) and the tools
    described with them, by their rendered text."""
    found: dict[str, tuple[list[dict[str, Any]], list[Any] | None]] = {}
    for row in rows:
        messages = row["messages"][:-1] if "messages" in row and "prompt" not in row else row.get("prompt")
        if is_conversation(messages) and messages:
            require_template(tokenizer)
            described = tools(row) if tools is not None else None
            found[render(tokenizer, messages, described)] = (messages, described)
    return found


class WithTemplateOptions:
    """A tokenizer whose chat template is rendered with `options` too (TRL's chat_template_kwargs, e.g.
    {"enable_thinking": false} for Qwen3's); everything else is the tokenizer's."""

    def __init__(self, tokenizer: Any, options: dict[str, Any]) -> None:
        self._tokenizer, self._options = tokenizer, dict(options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(*args, **{**self._options, **kwargs})


def conversation_key(messages: list[dict[str, Any]], environment: Any = None) -> str:
    """A conversation's key (with its row's environment: its tools are described in the rendering)."""
    return json.dumps([environment, messages], sort_keys=True)


def conversation_tokens(
    tokenizer: Any, messages: list[dict[str, Any]], assistant_only: bool, tools: list[Any] | None = None
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt tokens, the rest's tokens, which of the rest are trained) of a whole conversation: the prompt is
    the tokens before the first trained one (the first token without `assistant_only`, else the first of the
    assistant's, by the template's {% generation %} marks)."""
    encoded = chat_template(
        tokenizer, messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = list(encoded["input_ids"])
    if not assistant_only:
        return ids[:1], ids[1:], [True] * (len(ids) - 1)
    marks = [bool(m) for m in encoded["assistant_masks"]]
    if not any(marks):
        raise LLMError(
            "assistant_only_loss=true needs the chat template to mark the assistant's tokens with "
            "{% generation %} ... {% endgeneration %}, and this one marks none",
            "use a template with generation marks, or set assistant_only_loss=false (train on the whole conversation)",
        )
    start = marks.index(True)
    return ids[:start], ids[start:], marks[start:]
