"""Shared test helpers."""

from __future__ import annotations

import torch

import policylab as pl


def params_of(run_dir) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pl.load(run_dir).net.state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"
