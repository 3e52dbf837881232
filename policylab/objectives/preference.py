"""Preference losses over sequence log-probabilities (language models): DPO's sigmoid loss.

    DPO (Rafailov et al. 2023):
        loss = -log sigmoid(beta ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))

with y_w the chosen and y_l the rejected completion of a prompt, log pi(y) the sum of the completion's token
log-probs. The implicit rewards beta (log pi(y) - log pi_ref(y)) are returned as metrics (their accuracy: the
share of pairs where the chosen one's is higher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO loss over pairs [P] and its metrics; `label_smoothing` eps is the conservative DPO of
    Mitchell (2023): (1 - eps) of the loss on the pair as labelled plus eps on the pair flipped."""
    chosen_reward = beta * (chosen_logp - ref_chosen_logp)
    rejected_reward = beta * (rejected_logp - ref_rejected_logp)
    margin = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    with torch.no_grad():
        metrics = {
            "reward_chosen": chosen_reward.mean(),
            "reward_rejected": rejected_reward.mean(),
            "reward_accuracy": (margin > 0).float().mean(),
            "reward_margin": margin.mean(),
        }
    return loss.mean(), metrics
