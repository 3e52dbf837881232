"""SPO, Simple Policy Optimization (Xie et al. 2024, arXiv:2401.16025): PPO with a ratio penalty instead of the clip.

for each iteration:
    collect n_steps x num_envs transitions with pi_old           (the loop)
    A, R = GAE(lambda)(rewards, V)
    for epoch in 1..epochs, for each minibatch:
        r = pi(a|s) / pi_old(a|s)
        L = -(r A - |A| / (2 eps) (r - 1)^2)                       (objectives.pg_surrogate, spo_eps=eps)
            + vf_coef (V(s) - R)^2 - ent_coef H[pi(.|s)]
        Adam step on L with the gradient norm clipped

The penalty's gradient pulls r back towards 1 wherever it leaves [1 - eps, 1 + eps] (the clip only stops pushing
it further), and its optimum over r is exactly 1 + sign(A) eps, the edge of PPO's trust region. Everything else is
PPO's (algos/ppo.py: the loop over epochs and minibatches, the fused gradient path, demonstrations), so SPO is a
PPO config: the same PPO class runs it with `ratio_penalty=true`, and `clip_eps` is the penalty's eps.
"""

from __future__ import annotations

from dataclasses import dataclass

from policylab.algos.ppo import PPOConfig


@dataclass
class SPOConfig(PPOConfig):
    """SPO. Defaults are PPO's (Stable-Baselines3's), as in the paper's MuJoCo runs; clip_eps = eps = 0.2."""

    ratio_penalty: bool = True
    """The SPO penalty in place of the clip (false: plain PPO-clip)."""
