"""RPO, Robust Policy Optimization (Rahman & Xue 2022, arXiv:2212.07536): PPO whose every gradient step evaluates the
Gaussian policy with its mean moved by uniform noise, which keeps the policy's entropy from collapsing.

for each iteration:
    collect n_steps x num_envs transitions with pi_old = N(mu(s), std)      (the loop, no noise)
    A, R = GAE(lambda)(rewards, V)
    for epoch in 1..epochs, for each minibatch:
        z ~ U(-alpha, alpha) per row and action dimension
        r = N(a; mu(s) + z, std) / pi_old(a|s)
        PPO's clipped loss on r, value and entropy terms                    (algos/ppo.py)

Everything else is PPO's (the loop, the fused gradient path: z is a bias on the head's inputs, as action masks'
logit bias is, so d/d mu is unchanged), so RPO is a PPO config: the same PPO class runs it with `rpo_alpha` > 0.
Defaults are PPO's with alpha 0.5, CleanRL's `rpo_continuous_action.py` value.
"""

from __future__ import annotations

from dataclasses import dataclass

from policylab.algos.ppo import PPOConfig


@dataclass
class RPOConfig(PPOConfig):
    """RPO: PPO with rpo_alpha 0.5 (CleanRL's)."""

    rpo_alpha: float = 0.5
