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

    def teacher_batch(self, prompts: list[str], texts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt ids, left-padded; their mask; completion ids with the teacher's EOS appended, right-padded;
        their mask) in the teacher's tokens: its special tokens added to the prompt (a trailing EOS dropped), the
        completion text encoded without them, as TRL's GOLDTrainer builds the teacher's inputs."""
        tok = self.teacher
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompt_lists = [ids[:-1] if ids and ids[-1] == eos else ids for ids in tok(prompts)["input_ids"]]
        completion_lists = [ids + ([eos] if eos is not None else [])
                            for ids in tok(texts, add_special_tokens=False)["input_ids"]]  # fmt: skip
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
        token), the ids and masks of the completions (the teacher's with its EOS)."""
        s = self.settings
        student_probs = F.softmax(student.float() / s.student_temperature, -1)
        teacher_probs = F.softmax(teacher.float() / s.teacher_temperature, -1)
        losses, matched, unmatched = [], [], []
        for i, text in enumerate(texts):
            n_s = int(student_mask[i].sum()) - int(s.skip_student_eos)
            n_t = int(teacher_mask[i].sum()) - int(s.skip_teacher_eos)
            if n_s <= 0 or n_t <= 0:
                losses.append(student[i].sum() * 0.0)
                continue
            s_tokens, t_tokens = student_ids[i, :n_s].tolist(), teacher_ids[i, :n_t].tolist()
            shift = 1 if s.strategy == "observed" else 0  # observed: the position of token k predicts k + 1
            s_probs = student_probs[i, shift : shift + n_s]
            t_probs = teacher_probs[i, shift : shift + n_t]
            if s.extended:
                s_bytes, t_bytes = self.student_bytes(s_tokens), self.teacher_bytes(t_tokens)
                self._check_spelling(text, s_bytes, t_bytes, i)
                s_groups, t_groups = byte_groups(s_bytes, t_bytes)
                s_aligned = merged_group_probs(s_probs, s_groups, s_tokens, s.strategy)
                t_aligned = merged_group_probs(t_probs, t_groups, t_tokens, s.strategy)
            else:
                n = min(n_s, n_t)
                s_aligned, t_aligned = s_probs[:n], t_probs[:n]
            if self.matched is not None:
                weights = s.hybrid_weights or self._adaptive_weights(teacher.shape[-1])
                loss, part_matched, part_unmatched = hybrid_uld_distance(s_aligned, t_aligned, self.matched, s.beta,
                                                                         weights)  # fmt: skip
                matched.append(part_matched.detach())
                unmatched.append(part_unmatched.detach())
                losses.append(loss)
            else:
                losses.append(sorted_l1(s_aligned, t_aligned))
        metrics = {}
        if matched:
            metrics = {"matched_loss": torch.stack(matched).mean(), "unmatched_loss": torch.stack(unmatched).mean()}
        return torch.stack(losses).mean(), metrics

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
