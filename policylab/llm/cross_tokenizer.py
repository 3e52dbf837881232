"""Distillation from a teacher with another tokenizer (GOLD's Universal Logit Distillation, TRL's GOLDTrainer):
the teacher reads the same prompt and completion text in its own tokens, and the loss compares the two models'
next-token distributions position by position after aligning the two tokenizations of the completion.

Alignment (`use_extended_uld`): each token's length in bytes of the completion text (`TokenBytes`) cuts both
tokenizations where both have a boundary (objectives.imitation.byte_groups); a group of several tokens on one
side is merged into one distribution (objectives.imitation.merged_group_probs). Without it, the first
min(student, teacher) positions are paired as they are (the ULD paper's positional alignment). The distance is
objectives.imitation.sorted_l1 (or, with the hybrid loss, the generalized JSD on the tokens both vocabularies spell
alike and sorted_l1 on the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from policylab.llm import LLMError
from policylab.objectives.imitation import byte_groups, hybrid_uld_distance, merged_group_probs, sorted_l1


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a fast tokenizer's tokens are spelled in the GPT-2 byte alphabet (one character per byte)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


class TokenBytes:
    """Each token's length in bytes of the text it decodes to: its piece's length for byte-level tokenizers
    (GPT-2's, Llama 3's, Qwen's), else the UTF-8 length of the token decoded alone (character-level and
    word-level vocabularies); special tokens 0. Cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        self.lengths: dict[int, int] = {}

    def __call__(self, ids: list[int]) -> list[int]:
        missing = [i for i in dict.fromkeys(ids) if i not in self.lengths]
        if missing:
            pieces = self.tokenizer.convert_ids_to_tokens(missing) if self.byte_level else None
            for k, i in enumerate(missing):
                if i in self.special:
                    self.lengths[i] = 0
                elif pieces is not None:
                    self.lengths[i] = len(pieces[k])
                else:
                    self.lengths[i] = len(self.tokenizer.decode([i]).encode("utf-8"))
        return [self.lengths[i] for i in ids]


def vocabulary_matches(student: Any, teacher: Any) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of the tokens both vocabularies spell alike (the hybrid loss's matched part)."""
    student_vocab = student.get_vocab()
    pairs = sorted((teacher_id, student_vocab[text]) for text, teacher_id in teacher.get_vocab().items()
                   if text in student_vocab)  # fmt: skip
    return torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long)


@dataclass(frozen=True)
class ULDSettings:
    """GOLDConfig's ULD settings (LLMConfig's fields of these names, without the uld_ prefix)."""

    extended: bool = True
    strategy: str = "observed"
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    hybrid: bool = False
    beta: float = 0.5
    hybrid_weights: tuple[float, float] | None = None


class CrossTokenizer:
    """The teacher's view of a batch (its tokens of the prompts and completions) and the ULD loss between the two
    models' logits on it."""

    def __init__(self, student: Any, teacher: Any, settings: ULDSettings) -> None:
        self.student, self.teacher, self.settings = student, teacher, settings
        self.student_bytes, self.teacher_bytes = TokenBytes(student), TokenBytes(teacher)
        self.matched = vocabulary_matches(student, teacher) if settings.hybrid else None
        self.prompt_ids: dict[str, list[int]] = {}
        """Each prompt's teacher tokens, encoded once (the rows come back every epoch)."""

    def teacher_batch(self, prompts: list[str], texts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids, left-padded; their mask; completion ids with the teacher's EOS appended, right-padded;
        their mask) in the teacher's tokens: its special tokens added to the prompt (a trailing EOS dropped), the
        completion text encoded without them, as TRL's GOLDTrainer builds the teacher's inputs."""
        tok = self.teacher
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_ids]
        if missing:
            for prompt, ids in zip(missing, tok(missing)["input_ids"], strict=True):
                self.prompt_ids[prompt] = ids[:-1] if ids and ids[-1] == eos else ids
        prompt_lists = [self.prompt_ids[p] for p in prompts]
        backend = getattr(tok, "backend_tokenizer", None)  # one text at a time: faster than a batch call here
        encoded = ([backend.encode(text, add_special_tokens=False).ids for text in texts] if backend is not None
                   else tok(texts, add_special_tokens=False)["input_ids"])  # fmt: skip
        completion_lists = [ids + ([eos] if eos is not None else []) for ids in encoded]
        width = max(len(ids) for ids in prompt_lists)
        prompt_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_lists])
        prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_lists])
        length = max(len(ids) for ids in completion_lists)
        ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in completion_lists])
        mask = torch.tensor([[True] * len(ids) + [False] * (length - len(ids)) for ids in completion_lists])
        return prompt_ids, prompt_mask, ids, mask

    def loss(
        self, student: Tensor, student_ids: Tensor, student_mask: Tensor, teacher: Tensor, teacher_ids: Tensor,
        teacher_mask: Tensor, texts: list[str],
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """The mean over rows of each row's ULD distance between the aligned distributions, and the hybrid
        loss's parts. `student` / `teacher`: each model's logits at its completion's positions predicting each
        completion token ([N, T(+1), V]: a column more where "observed" reads the position after the last
        token), the ids and masks of the completions (the teacher's with its EOS). A row with no token left on a
        side adds 0 to the mean."""
        s = self.settings
        n_s = (student_mask.sum(-1) - int(s.skip_student_eos)).clamp_min(0).tolist()
        n_t = (teacher_mask.sum(-1) - int(s.skip_teacher_eos)).clamp_min(0).tolist()
        s_tokens = [row[:n].tolist() if n and m else [] for row, n, m in zip(student_ids, n_s, n_t)]
        t_tokens = [row[:m].tolist() if n and m else [] for row, n, m in zip(teacher_ids, n_s, n_t)]
        if s.extended:
            s_groups, t_groups = [], []
            for i, (text, s_row, t_row) in enumerate(zip(texts, s_tokens, t_tokens)):
                s_bytes, t_bytes = self.student_bytes(s_row), self.teacher_bytes(t_row)
                if s_row:
                    self._check_spelling(text, s_bytes, t_bytes, i)
                groups = byte_groups(s_bytes, t_bytes)
                s_groups.append(groups[0])
                t_groups.append(groups[1])
        else:  # positional: the first min(n_s, n_t) positions of each side, one token each
            s_groups = [[[k] for k in range(min(len(a), len(b)))] for a, b in zip(s_tokens, t_tokens)]
            t_groups = s_groups
        shift = 1 if s.strategy == "observed" else 0  # observed: the position of token k predicts k + 1
        width_s, width_t = max(max(n_s), 1), max(max(n_t), 1)
        s_probs = F.softmax(student[:, shift : shift + width_s].float() / s.student_temperature, -1)
        t_probs = F.softmax(teacher[:, shift : shift + width_t].float() / s.teacher_temperature, -1)
        s_aligned, valid = merged_group_probs(s_probs, s_groups, s_tokens, s.strategy)
        t_aligned, _ = merged_group_probs(t_probs, t_groups, t_tokens, s.strategy)
        metrics = {}
        if self.matched is not None:
            weights = s.hybrid_weights or self._adaptive_weights(teacher.shape[-1])
            per_row, matched, unmatched = hybrid_uld_distance(s_aligned, t_aligned, valid, self.matched, s.beta,
                                                              weights)  # fmt: skip
            metrics = {"matched_loss": matched.detach().mean(), "unmatched_loss": unmatched.detach().mean()}
        else:
            per_row = sorted_l1(s_aligned, t_aligned, valid)
        return per_row.mean(), metrics

    def _adaptive_weights(self, teacher_vocabulary: int) -> tuple[float, float]:
        """TRL's default hybrid weights: the share of the teacher's vocabulary that both spell alike, and the rest."""
        assert self.matched is not None
        share = len(self.matched[1]) / max(1, teacher_vocabulary)
        return share, 1.0 - share

    @staticmethod
    def _check_spelling(text: str, s_bytes: list[int], t_bytes: list[int], row: int) -> None:
        """Both tokenizations must spell the completion's bytes (what the byte alignment cuts); a tokenizer whose
        tokens do not decode alone to their share of the text (SentencePiece's word-start marks) cannot."""
        total = len(text.encode("utf-8"))
        if sum(t_bytes) != total or sum(s_bytes) > total:
            raise LLMError(
                f"completion {row}'s tokens do not spell its {total} bytes of text one token at a time (student "
                f"{sum(s_bytes)}, teacher {sum(t_bytes)} bytes): the byte alignment of use_extended_uld needs "
                "byte-level or character-level tokenizers",
                "set use_extended_uld=false (positional alignment, the ULD paper's)",
            )
