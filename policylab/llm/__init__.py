"""Language-model policies: built-in tasks, generation with behaviour log-probs, rewards, SFT and RL (GRPO and
relatives) on the objectives the control side uses, at token level.

Needs the `llm` extra (transformers, tokenizers, peft, datasets); the rest of policylab imports without it.
"""

from __future__ import annotations

from policylab.errors import PolicylabError


class LLMError(PolicylabError):
    """A bad model, tokenizer, prompt file or reward function."""


def require_llm() -> None:
    """One clear error when the `llm` extra is missing (policylab's control side does not need it)."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise LLMError(
            f"language-model policies need the llm extra ({exc.name} is not installed)",
            "pip install 'policylab[llm]'",
        ) from None
