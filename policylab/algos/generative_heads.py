"""The generative-head options every algorithm with a diffusion, flow or consistency policy shares (BC, IDQL, DPPO,
FPO): one config mixin, so a BC run's head can be loaded by a fine-tuning run with the same field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policylab.config import ACTIVATIONS
from policylab.errors import ConfigError
from policylab.nets.consistency import CONSISTENCY_LOSSES, ConsistencyHead
from policylab.nets.diffusion import DiffusionHead
from policylab.nets.flow import FlowHead
from policylab.nets.generative import make_generative_head
from policylab.nets.selection import SELECTIONS


@dataclass
class GenerativeHeadConfig:
    """Mixed into an algorithm's config (`class XConfig(BaseConfig, GenerativeHeadConfig)`); its `validate` calls
    `validate_head(kind)`."""

    denoiser_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    """Generative heads: the denoiser MLP's hidden layers (three of 256 as Diffusion-QL and IDQL's MLPs)."""
    denoiser_activation: str = "silu"
    """Generative heads: the denoiser's activation (tanh, relu, elu or silu)."""
    diffusion_steps: int = 20
    """diffusion: DDPM's training steps T (DPPO's 20; Diffusion Policy uses 100); consistency: the grid's N."""
    sample_steps: int | None = None
    """Steps when acting: DDIM's K (default T), flow's Euler steps (default 10), consistency's (default 1)."""
    beta_schedule: str = "cosine"
    """diffusion: cosine or linear."""
    ddim_eta: float = 0.0
    """diffusion: DDIM's eta when acting (0: deterministic steps from the drawn noise; 1 with K = T: DDPM)."""
    flow_time: str = "uniform"
    """flow: the training distribution of t, uniform or beta (pi_0's)."""
    consistency_sigma_max: float = 80.0
    """consistency: the largest noise level."""
    consistency_loss: str = "ict"
    """consistency: ict (improved consistency training: pseudo-Huber, log-normal levels) or ct (the original's
    squared distance, uniform levels: Consistency-AC's default, see nets/consistency.py)."""

    def validate_head(self, kind: str) -> None:
        if any(h <= 0 for h in self.denoiser_hidden_sizes):
            raise ConfigError(
                f"denoiser_hidden_sizes={self.denoiser_hidden_sizes} must be a list of positive layer widths",
                "set denoiser_hidden_sizes to e.g. [256, 256, 256]",
            )
        if self.diffusion_steps < 2:
            raise ConfigError(f"diffusion_steps={self.diffusion_steps} must be >= 2", "set diffusion_steps to e.g. 20")
        limit = self.diffusion_steps if kind == "diffusion" else None
        if self.sample_steps is not None and (self.sample_steps < 1 or (limit and self.sample_steps > limit)):
            raise ConfigError(
                f"sample_steps={self.sample_steps} must be >= 1"
                + (f" and <= diffusion_steps={limit}" if limit else ""),
                "set sample_steps to e.g. 5 (or drop it for the head's default)",
            )
        if self.beta_schedule not in ("cosine", "linear"):
            raise ConfigError(f"beta_schedule={self.beta_schedule!r} is not cosine or linear", "set it to cosine")
        if self.flow_time not in ("uniform", "beta"):
            raise ConfigError(f"flow_time={self.flow_time!r} is not uniform or beta", "set it to uniform")
        if not 0.0 <= self.ddim_eta <= 1.0:
            raise ConfigError(f"ddim_eta={self.ddim_eta} is outside [0, 1]", "set ddim_eta to 0 (DDIM) or 1 (DDPM)")
        if self.denoiser_activation not in ACTIVATIONS:
            raise ConfigError(
                f"denoiser_activation={self.denoiser_activation!r} is not one of {', '.join(ACTIVATIONS)}",
                "set denoiser_activation to silu",
            )
        if self.consistency_loss not in CONSISTENCY_LOSSES:
            raise ConfigError(
                f"consistency_loss={self.consistency_loss!r} is not one of {', '.join(CONSISTENCY_LOSSES)}",
                "set consistency_loss to ict (or ct)",
            )
        if not self.consistency_sigma_max > 0.002:
            raise ConfigError(f"consistency_sigma_max={self.consistency_sigma_max} must be > 0.002", "set it to 80")


@dataclass
class CandidateSelectionConfig:
    """Acting by N candidates from a generative actor, one chosen by the critic (nets/selection.py), and an EMA copy
    of the actor: IDQL's and Diffusion-QL's options (each algorithm sets its own defaults)."""

    candidates: int = 64
    """N, the actions drawn per state when acting (1: the actor's own draw, no critic)."""
    selection: str = "expectile"
    """How a candidate is chosen when exploring (online): expectile (needs V), greedy or softmax."""
    eval_selection: str = "greedy"
    """How a candidate is chosen when evaluating (`deterministic=True`)."""
    temperature: float = 1.0
    """softmax selection: the temperature of softmax(q / temperature)."""
    actor_ema: float = 0.0
    """The rate per step of an EMA copy of the actor (0: none; the algorithm says what the copy is for)."""
    ema_start: int = 1000
    """Updates before the EMA starts averaging (until then the copy follows the actor exactly)."""

    def validate_selection(self, allowed: tuple[str, ...] = SELECTIONS) -> None:
        for name in ("selection", "eval_selection"):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}",
                    f"set {name} to {allowed[0]}",
                )
        if self.candidates < 1:
            raise ConfigError(f"candidates={self.candidates} must be >= 1", "set candidates to e.g. 64 (1: no critic)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0", "set temperature to e.g. 1.0")
        if not 0.0 <= self.actor_ema <= 1.0:
            raise ConfigError(f"actor_ema={self.actor_ema} is outside [0, 1]", "set actor_ema to 0 (off) or 0.001")


def generative_head(
    cfg: Any, kind: str, obs_size: int, dim: int, consistency_sigmas: list[float] | None = None
) -> DiffusionHead | FlowHead | ConsistencyHead:
    """The head of `kind` over x in R^dim (an action, or a chunk of actions) from a GenerativeHeadConfig;
    `consistency_sigmas`: a consistency head's explicit grid (a distilled head's, its teacher's levels)."""
    return make_generative_head(
        kind,
        obs_size,
        dim,
        cfg.denoiser_hidden_sizes,
        cfg.denoiser_activation,
        train_steps=cfg.diffusion_steps,
        sample_steps=cfg.sample_steps,
        schedule=cfg.beta_schedule,
        eta=cfg.ddim_eta,
        time_sampling=cfg.flow_time,
        sigma_max=cfg.consistency_sigma_max,
        consistency_loss=cfg.consistency_loss,
        consistency_sigmas=consistency_sigmas,
    )
