"""Fixtures shared by the offline and hybrid test files (made once per session: collect takes seconds)."""

from __future__ import annotations

import pytest

from policylab.collect import collect
from tests.helpers import cartpole_expert, pendulum_expert


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    """Pendulum-v1 "expert" (the scripted swing-up controller, 20 episodes) and "medium" (the same with Gaussian
    noise 0.5, normalized against the expert), and an epsilon-greedy CartPole expert (10 episodes, noise 0.2)."""
    root = tmp_path_factory.mktemp("datasets")
    expert = collect("Pendulum-v1", pendulum_expert, 20, seed=0, out=root / "pendulum-expert")
    medium = collect(
        "Pendulum-v1",
        pendulum_expert,
        20,
        noise=0.5,
        seed=1,
        out=root / "pendulum-medium",
        ref_max_score=expert.ref_max_score,
    )
    cartpole = collect("CartPole-v1", cartpole_expert, 10, noise=0.2, seed=2, out=root / "cartpole")
    return {"expert": expert.path, "medium": medium.path, "cartpole": cartpole.path}
