"""policylab.optim.Adam is torch.optim.Adam(fused=True), bit for bit, and round-trips its state."""

from __future__ import annotations

import pytest
import torch

from policylab.optim import Adam, RAdam, RMSprop


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_matches_torch_fused_adam_bitwise(weight_decay):
    ours, ref = _params(0), _params(0)
    opt = Adam(ours, lr=3e-3, eps=1e-5, weight_decay=weight_decay)
    ref_opt = torch.optim.Adam(ref, lr=3e-3, eps=1e-5, weight_decay=weight_decay, fused=True)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 3:
            opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_bumps_every_parameters_version_counter(fused):
    """As torch.optim's step does: checks for in-place changes (autograd's, the LLM trainer's sampler tape) see it."""
    params = _params(4)
    opt = Adam(params, lr=1e-2)
    opt._fused = opt._fused and fused
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before))


def test_foreach_fallback_matches_torch_adam():
    ours, ref = _params(2), _params(2)
    opt = Adam(ours, lr=1e-2)
    opt._fused = False
    ref_opt = torch.optim.Adam(ref, lr=1e-2, foreach=True)
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.ones_like(p) * 0.3 + p.detach() * 0.1
            q.grad = torch.ones_like(q) * 0.3 + q.detach() * 0.1
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip_continues_identically():
    a, b = _params(3), _params(3)
    opt_a = Adam(a, lr=1e-2)
    for p in a:
        p.grad = torch.full_like(p, 0.5)
    opt_a.step()
    state = opt_a.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and state["param_groups"][0]["params"] == [0, 1]
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b = Adam(b, lr=5.0)
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["lr"] == 1e-2
    for opt, params in ((opt_a, a), (opt_b, b)):
        for p in params:
            p.grad = torch.full_like(p, -0.25)
        opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="does not match"):
        Adam(_params(0)[:1]).load_state_dict(state)


def test_rmsprop_matches_torch_rmsprop_bitwise_and_round_trips_through_its_state_dict():
    """A2C's optimizer: torch.optim.RMSprop(foreach=True) without momentum or centering, bit for bit, with a
    learning-rate change on the way (A2C anneals it); a state_dict of either loads into the other."""
    ours, ref = _params(5), _params(5)
    opt = RMSprop(ours, lr=7e-4, alpha=0.99, eps=1e-5)
    ref_opt = torch.optim.RMSprop(ref, lr=7e-4, alpha=0.99, eps=1e-5, foreach=True)
    g = torch.Generator().manual_seed(6)
    for step in range(6):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 2:
            opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 3e-4
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), step
    restored = RMSprop(_params(5), lr=1.0)
    restored.load_state_dict(ref_opt.state_dict())
    assert restored.param_groups[0]["lr"] == 3e-4 and restored.param_groups[0]["eps"] == 1e-5
    for p, q in zip(opt.params, restored.params):
        assert torch.equal(restored.state[q]["square_avg"], opt.state[p]["square_avg"])
    back = torch.optim.RMSprop(_params(5), lr=1.0, foreach=True)
    back.load_state_dict(opt.state_dict())
    assert back.param_groups[0]["lr"] == 3e-4


def test_radam_matches_torch_radam_bitwise_through_both_regimes_and_its_state_dict():
    """PQN's optimizer: torch.optim.RAdam (single-tensor path) bit for bit, over the first steps (rho_t <= 5: the
    unadapted step) and the later ones (the rectified adaptive step), with a learning-rate change on the way."""
    ours, ref = _params(7), _params(7)
    opt = RAdam(ours, lr=2.5e-4)
    ref_opt = torch.optim.RAdam(ref, lr=2.5e-4, foreach=False)
    g = torch.Generator().manual_seed(8)
    for step in range(10):  # rho_t passes 5 at the 6th step with beta2 0.999
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 7:
            opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = 1e-4
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), step
    restored = RAdam(_params(7), lr=1.0)
    restored.load_state_dict(ref_opt.state_dict())
    assert restored.param_groups[0]["lr"] == 1e-4
    for p, q in zip(opt.params, restored.params):
        assert torch.equal(restored.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        assert float(restored.state[q]["step"]) == 10
