"""IDQL: implicit Q-learning with a diffusion behaviour model (Hansen-Estruch et al. 2023, arXiv:2304.10573), Box
actions. IQL's critic, unchanged, and a diffusion model of the dataset's actions trained by plain behaviour cloning,
independent of the critic; the policy is the behaviour model reweighted by the critic at acting time.

for each gradient step on a batch (s, a, r, s', done, d = gamma^n):
    V step, Q step, exactly IQL's                                       (IQL.value_and_critic_steps)
    actor step on mean_b DDPM(eps_theta; s_b, a_b)                      (plain BC, no weights: nets/diffusion.py)
    Q' <- (1 - tau) Q' + tau Q;  mu_ema <- (1 - ema) mu_ema + ema mu     (the EMA only with actor_ema > 0)
act: N = `candidates` draws a_1..a_N ~ mu(.|s) (T-step DDPM/DDIM, one batched call for all states x candidates),
     q_i = min_k Q'_k(s, a_i), one chosen by `selection` (exploring) or `eval_selection` (evaluating):
     expectile: i ~ w_i = |tau - 1(q_i - V(s) < 0)| / |q_i - V(s)|  (the paper's implicit policy of the expectile loss)
     greedy: argmax_i q_i (the released code's evaluation);  softmax: i ~ softmax(q / temperature)   (nets/selection.py)

The acting network `net` (nets/selection.py: CriticSelectedActor) holds the diffusion actor (its EMA copy when
actor_ema > 0), the target critic Q' and V: the checkpoint's `policy/` tensors are enough for `pl.load`, and the
checkpoint keeps only what acting does not use (the online critic, and the trained actor behind an EMA) in `modules`.

Defaults are the paper's for the D4RL locomotion tasks where they apply: T = 5 diffusion steps, N = 64 candidates,
expectile 0.7, two critics, lr 3e-4, tau 0.005. Replaced: the LN-ResNet denoiser (3 blocks, dropout 0.1) by the
MLP denoiser of nets/denoiser.py ([256, 256, 256] SiLU); the "vp" beta schedule by the cosine one; one actor step
per critic step on the same batch (the released code takes two actor steps on batches of 512 per critic step);
the EMA actor (rate 0.001 there) is off by default here (short runs learn faster without its lag).
IQL's `beta`, `max_weight`, `deterministic_actor` are not used (the actor is not advantage-weighted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym
import torch
from torch import Tensor, nn

from policylab.algos.generative_heads import CandidateSelectionConfig, GenerativeHeadConfig, generative_head
from policylab.algos.iql import IQL, IQLConfig
from policylab.algos.offpolicy import FlatAdam, TargetNetwork, box_bounds, obs_dim, seeded_generator
from policylab.data import Batch
from policylab.nets import ContinuousCritic, StackedMLP
from policylab.nets.generative import GenerativeActor
from policylab.nets.selection import CriticSelectedActor


@dataclass
class IDQLConfig(IQLConfig, GenerativeHeadConfig, CandidateSelectionConfig):
    """IDQL with the paper's locomotion values (see the module docstring for what differs)."""

    diffusion_steps: int = 5
    """DDPM's T (the paper's 5)."""
    ddim_eta: float = 1.0
    """1 with sample_steps = T: DDPM's ancestral sampler, as the paper samples."""
    actor_ema: float = 0.0
    """Acting with an EMA copy of the diffusion model at this rate per step (0: the trained model itself; the
    released code uses 0.001). Before `ema_start` updates the copy follows the model exactly."""

    def validate(self) -> None:
        super().validate()
        self.validate_head("diffusion")
        self.validate_selection()


class IDQL(IQL):
    """IQL's critic steps (inherited, not copied), a diffusion behaviour model, acting by critic selection."""

    name = "idql"
    config_cls = IDQLConfig  # type: ignore[assignment]  # its dataclass __init__ adds the head's fields
    cfg: IDQLConfig

    def __init__(self, cfg: IDQLConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
        self.cfg = cfg
        self.generator = seeded_generator(cfg.seed, cfg.device)
        self.net: Any = self.build_policy(cfg, obs_space, act_space).to(cfg.device)
        self.act_dim = int(self.net.actor.act_dim)
        self.actor = cast(GenerativeActor, self.net.actor)
        self.critic: ContinuousCritic = self.net.critic
        self.value = cast(StackedMLP, self.net.value)
        self.actor_opt = FlatAdam(self.actor, cfg.lr, cfg.max_grad_norm)
        self.critic_opt = FlatAdam(self.critic, cfg.lr, cfg.max_grad_norm)
        self.value_opt = FlatAdam(self.value, cfg.lr, cfg.max_grad_norm)
        self.critic_target = TargetNetwork(self.critic, self.critic_opt.params)
        self.net.critic = cast(
            ContinuousCritic, self.critic_target.module
        )  # acting scores candidates with Q' (as the released code)
        self.modules: dict[str, nn.Module] = {"critic": self.critic}
        self.actor_ema: TargetNetwork | None = None
        if cfg.actor_ema > 0:
            self.actor_ema = TargetNetwork(self.actor, self.actor_opt.params)
            self.net.actor = cast(GenerativeActor, self.actor_ema.module)
            self.modules["actor"] = self.actor
        self.optimizers = {
            "actor": self.actor_opt.optimizer,
            "critic": self.critic_opt.optimizer,
            "value": self.value_opt.optimizer,
        }
        self.action_shape, self.action_dtype = (self.act_dim,), torch.float32
        self.fused = False

    @staticmethod
    def build_policy(
        cfg: IDQLConfig,  # type: ignore[override]
        obs_space: gym.Space,
        act_space: gym.Space,
    ) -> CriticSelectedActor:
        low, high = box_bounds(act_space, "idql", cfg)
        n_obs = obs_dim(obs_space)
        actor = GenerativeActor(generative_head(cfg, "diffusion", n_obs, low.numel()), low, high)
        critic = ContinuousCritic(n_obs, low.numel(), cfg.hidden_sizes, cfg.activation, cfg.n_critics)
        value = StackedMLP(1, n_obs, cfg.hidden_sizes, 1, cfg.activation)
        return CriticSelectedActor(actor, critic, value, cfg.candidates, cfg.selection, cfg.eval_selection,
                                   cfg.expectile, cfg.temperature)  # fmt: skip

    def explore(self, obs: Any, progress: float) -> Any:
        with torch.inference_mode():
            return self.net.act(torch.as_tensor(obs, device=self.cfg.device), self.generator).cpu().numpy()

    def update(self, batch: Batch, index: int) -> dict[str, Tensor]:
        cfg = self.cfg
        _, metrics = self.value_and_critic_steps(batch)  # IQL's V and Q steps; the advantages are not used
        bc_loss = self.actor.loss(batch.obs, batch.actions, self.generator).mean()
        self.actor_opt.step(bc_loss)
        self.critic_target.update(cfg.tau)
        if self.actor_ema is not None:
            self.actor_ema.update(1.0 if index < cfg.ema_start else cfg.actor_ema)
        return {**metrics, "bc_loss": bc_loss.detach()}
