"""The analytic-gradient fast path computes what autograd computes."""

from __future__ import annotations

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from policylab.algos.fused import FusedActorCriticStep
from policylab.algos.onpolicy import ActorCriticLoss, AutogradStep, ImitationTerm, adam
from policylab.data import Batch
from policylab.nets import ActorCritic
from policylab.nets.mlp import StackedMLP
from policylab.objectives import pg_surrogate, pg_surrogate_grad, value_loss, value_loss_grad
from policylab.optim import ParameterBuffer

B = 64


def _autograd_pg(logp, old, adv, **kw):
    logp = logp.clone().requires_grad_()
    loss, metrics = pg_surrogate(logp, old, adv, **kw)
    loss.backward()
    return loss.detach(), logp.grad, metrics


@pytest.mark.parametrize(
    "kw",
    [
        {"clip_low": None},
        {"clip_low": 0.2},
        {"clip_low": 0.2, "clip_high": 0.28},
        {"clip_low": 0.1, "dual_clip": 3.0},
    ],
)
def test_pg_surrogate_grad_matches_autograd(kw):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, generator=g) * 0.3 - 1.0
    old = logp + torch.randn(B, generator=g) * 0.4  # ratios well outside [0.8, 1.2] for some samples
    adv = torch.randn(B, generator=g) * 2.0
    loss, grad, metrics = pg_surrogate_grad(logp, old, adv, scale=0.5, **kw)
    ref_loss, ref_grad, ref_metrics = _autograd_pg(logp, old, adv, **kw)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, 0.5 * ref_grad)
    for k in ("approx_kl", "clip_frac", "ratio_mean"):
        torch.testing.assert_close(metrics[k], ref_metrics[k])
    if kw.get("clip_low") is not None:
        assert 0.0 < float(metrics["clip_frac"]) < 1.0, "the example exercises both branches"


@pytest.mark.parametrize("clip", [None, 0.1])
def test_value_loss_grad_matches_autograd(clip):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(B, generator=g).requires_grad_()
    returns, old = torch.randn(B, generator=g), torch.randn(B, generator=g)
    ref = value_loss(values, returns, old_values=old, clip=clip)
    ref.backward()
    loss, grad = value_loss_grad(values.detach(), returns, old_values=old, clip=clip, scale=0.25)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, 0.25 * values.grad)


@pytest.mark.parametrize("out_dim", [3, 1])  # one output (a critic, a value): its backward is an outer product
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_stacked_mlp_manual_backward_matches_autograd(activation, out_dim):
    torch.manual_seed(0)
    mlp = StackedMLP(2, 5, [32, 16], out_dim, activation)
    x = torch.randn(B, 5, requires_grad=True)
    out = mlp(x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    ref = [p.grad.clone() for p in mlp.parameters()]
    for p in mlp.parameters():
        p.grad = None
    out2, cache = mlp.forward_cached(x.detach())
    torch.testing.assert_close(out2, out.detach(), atol=1e-6, rtol=1e-5)
    g_x = mlp.backward(cache, g_out, input_grad=True)
    assert g_x is not None
    torch.testing.assert_close(g_x.sum(0), x.grad, atol=1e-5, rtol=1e-4)
    for p, r in zip(mlp.parameters(), ref):
        torch.testing.assert_close(p.grad, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_stacked_mlp_forward_without_autograd_is_the_same(activation):
    """Without autograd the activations run in place on each layer's own output: the same bits, input intact."""
    torch.manual_seed(0)
    mlp = StackedMLP(2, 5, [32, 16], 1, activation)
    x = torch.randn(B, 5)
    x_before = x.clone()
    with_grad = mlp(x)
    with torch.no_grad():
        without = mlp(x)
    assert torch.equal(without, with_grad.detach()) and torch.equal(x, x_before)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped, and within the bound (gradients unchanged)
def test_parameter_buffer_clipping_matches_torch(max_norm):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    buffer = ParameterBuffer(b)
    for p, q in zip(a, b):
        p.grad = torch.randn(5) * 3
        q.grad.copy_(p.grad)
    ref = torch.nn.utils.clip_grad_norm_(a, max_norm, foreach=True)
    assert (float(ref) > max_norm) == (max_norm == 0.5)
    total = buffer.clip_grad_norm_(max_norm)
    torch.testing.assert_close(total, ref)
    for p, q in zip(a, b):
        torch.testing.assert_close(q.grad, p.grad)
    assert torch.equal(buffer.grad, torch.cat([q.grad for q in b]))


def test_parameter_buffer_clipping_an_overflowing_norm_warns_nothing():
    """A diverging run's gradients: the norm overflows to inf without numpy's RuntimeWarning (the NaN check's
    error is the message a user needs), as torch's clip_grad_norm_ does."""
    buffer = ParameterBuffer([torch.nn.Parameter(torch.zeros(4))])
    buffer.grad.fill_(1e30)  # squares overflow float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = buffer.clip_grad_norm_(1.0)
    assert torch.isinf(total)


def test_parameter_buffer_params_are_views_and_autograd_accumulates_into_it():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ref = copy.deepcopy(lin)
    buffer = ParameterBuffer(lin.parameters())
    x = torch.randn(4, 3)
    for _ in range(2):
        buffer.zero_grad()
        lin(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(buffer.grad, torch.cat([ref.weight.grad.reshape(-1), ref.bias.grad]))
    with torch.no_grad():
        buffer.flat.add_(1.0)
    assert torch.equal(lin.bias, ref.bias + 1.0)
    lin.load_state_dict(ref.state_dict())
    assert torch.equal(buffer.flat, torch.cat([ref.weight.reshape(-1), ref.bias]).detach())


def _spaces(kind: str) -> tuple[gym.Space, gym.Space]:
    obs = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
    actions = {
        "discrete": gym.spaces.Discrete(3),
        "multi": gym.spaces.MultiDiscrete([3, 2, 4]),
        "continuous": gym.spaces.Box(-2.0, 2.0, (2,), np.float32),
    }
    return obs, actions[kind]


CASES = [
    ("discrete", "tanh", False, {"clip_low": 0.2}),
    ("discrete", "tanh", True, {"clip_low": 0.2, "clip_high": 0.3, "ent_coef": 0.01, "clip_value": 0.2}),
    ("discrete", "relu", False, {"clip_low": 0.2, "dual_clip": 3.0}),
    ("discrete", "tanh", False, {"clip_low": None, "on_policy": True, "ent_coef": 0.01}),
    ("multi", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01}),
    ("multi", "relu", True, {"clip_low": 0.2, "clip_value": 0.2}),
    ("continuous", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01}),
    ("continuous", "relu", True, {"clip_low": 0.2, "clip_value": 0.5}),
    ("continuous", "tanh", False, {"clip_low": None, "on_policy": True}),
    # the trust-region family's surrogates: SPO's ratio penalty, MDPO's reverse and FixPO's forward KL penalty
    ("discrete", "tanh", False, {"clip_low": None, "spo_eps": 0.2, "ent_coef": 0.01}),
    ("continuous", "relu", True, {"clip_low": None, "spo_eps": 0.1, "clip_value": 0.2}),
    ("continuous", "tanh", False, {"clip_low": None, "kl_coef": 2.0}),
    ("multi", "tanh", False, {"clip_low": 0.2, "kl_coef": 0.5, "kl": "forward"}),
    # with demonstration rows (hybrid on-policy): no value or entropy gradient on them, their own weights
    ("discrete", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01, "imitation": "phi"}),
    ("multi", "relu", True, {"clip_low": 0.2, "ent_coef": 0.01, "imitation": "uniform"}),
    ("continuous", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01, "imitation": "advantage"}),
    ("continuous", "relu", True, {"clip_low": None, "on_policy": True, "imitation": "uniform"}),
    # gSDE: a log std per row from the actor's features, its gradient into the [features, actions] parameter
    ("continuous", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01, "sde": True}),
    ("continuous", "relu", True, {"clip_low": None, "on_policy": True, "sde": True}),
    ("continuous", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01, "imitation": "advantage", "sde": True}),
    # RPO: the Gaussian's mean moved by U(-alpha, alpha) per row (the demonstration rows unmoved)
    ("continuous", "tanh", False, {"clip_low": 0.2, "ent_coef": 0.01, "rpo": 0.5}),
    ("continuous", "relu", True, {"clip_low": 0.2, "rpo": 0.5, "imitation": "advantage"}),
]


def _demonstrations(net: ActorCritic, weighting: str, g: torch.Generator) -> ImitationTerm:
    """32 demonstration rows with actions the current policy finds neither certain nor impossible."""
    obs = torch.randn(32, 6, generator=g)
    with torch.no_grad():
        actions, _, values = net.act(obs, g)
    returns = values + torch.randn(32, generator=g)
    return ImitationTerm(Batch(obs=obs, actions=actions, returns=returns), 0.3, weighting, beta=0.5)


@pytest.mark.parametrize(("kind", "activation", "shared", "options"), CASES)
def test_fused_step_matches_autograd_step(kind, activation, shared, options):
    options = dict(options)
    on_policy = options.pop("on_policy", False)
    weighting = options.pop("imitation", None)
    sde = options.pop("sde", False)
    rpo = options.pop("rpo", 0.0)
    torch.manual_seed(0)
    obs_space, act_space = _spaces(kind)
    net_a = ActorCritic(obs_space, act_space, (32, 32), activation, shared=shared, log_std_init=-0.5, sde=sde)
    net_b = copy.deepcopy(net_a)
    buf_a, buf_b = ParameterBuffer(net_a.parameters()), ParameterBuffer(net_b.parameters())
    auto = AutogradStep(net_a, buf_a, adam([buf_a.flat], 3e-3), max_grad_norm=0.5)
    fast = FusedActorCriticStep(net_b, buf_b, adam([buf_b.flat], 3e-3), max_grad_norm=0.5)
    assert FusedActorCriticStep.supports(net_b)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, 6, generator=g)
    with torch.no_grad():
        actions, logp, values = net_a.act(obs, g)
    old_logp = None if on_policy else logp + 0.3 * torch.randn(B, generator=g)
    adv, returns = torch.randn(B, generator=g), values + torch.randn(B, generator=g)
    # One step: the gradients (after clipping) and the metrics agree. (Over several Adam steps,
    # float32 rounding differences of 1e-8 get amplified where a gradient is near Adam's eps.)
    fields = {"obs": obs, "actions": actions, "advantages": adv, "returns": returns, "values": values}
    if rpo:  # PPO.update's draw for RPO, as the head inputs' bias
        fields["logit_bias"] = (torch.rand(actions.shape, generator=g) * 2.0 - 1.0) * rpo
    batch = Batch(**fields) if old_logp is None else Batch(**fields, logp=old_logp)
    loss = ActorCriticLoss(vf_coef=0.5, **options)
    demos = None if weighting is None else _demonstrations(net_a, weighting, g)
    m_a, _ = auto(batch, loss, imitation=demos)
    m_b, _ = fast(batch, loss, imitation=demos)
    keys = ["loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac", "grad_norm"]
    for key in keys + (["imitation_loss", "imitation_coef"] if demos is not None else []):
        torch.testing.assert_close(m_b[key], m_a[key], atol=1e-6, rtol=1e-5, msg=key)
    if options.get("clip_low") is not None:
        assert 0.0 < float(m_a["clip_frac"]) < 1.0
    for (name, p), q in zip(net_a.named_parameters(), net_b.parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0.0, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("kind", "activation"), [("continuous", "tanh"), ("discrete", "relu")])
def test_value_step_is_the_fused_step_with_zero_advantages(kind, activation):
    """TRPO's critic fit: the critic's member alone gives the full step's loss, gradients and parameters."""
    torch.manual_seed(0)
    obs_space, act_space = _spaces(kind)
    net_a = ActorCritic(obs_space, act_space, (32, 32), activation, log_std_init=-0.5)
    net_b = copy.deepcopy(net_a)
    buf_a, buf_b = ParameterBuffer(net_a.parameters()), ParameterBuffer(net_b.parameters())
    full = FusedActorCriticStep(net_a, buf_a, adam([buf_a.flat], 3e-3), max_grad_norm=0.5)
    critic_only = FusedActorCriticStep(net_b, buf_b, adam([buf_b.flat], 3e-3), max_grad_norm=0.5)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, 6, generator=g)
    with torch.no_grad():
        actions, _, values = net_a.act(obs, g)
    returns = values + torch.randn(B, generator=g)
    batch = Batch(obs=obs, actions=actions, advantages=torch.zeros(B), returns=returns)
    m_a, _ = full(batch, ActorCriticLoss(clip_low=None, vf_coef=1.0, ent_coef=0.0))
    buf_b.grad.fill_(1.0)  # stale entries: zeroed by the caller, left alone by value_step
    buf_b.zero_grad()
    v_loss = critic_only.value_step(obs, returns)
    torch.testing.assert_close(v_loss, m_a["value_loss"])
    moved = 0
    for (name, p), q in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-7, rtol=1e-5, msg=name)
        torch.testing.assert_close(q, p, atol=1e-7, rtol=1e-6, msg=name)
        moved += float(p.grad.abs().max()) > 0.0
    assert moved == len(net_a.body.weights) + len(net_a.body.biases)  # the critic's member of every layer
    assert float(net_b.body.weights[0].grad[0].abs().max()) == 0.0  # the actor's, none


def test_fast_path_is_chosen_only_where_it_applies():
    obs_space, act_space = _spaces("continuous")
    assert FusedActorCriticStep.supports(ActorCritic(obs_space, act_space, activation="tanh"))
    assert not FusedActorCriticStep.supports(ActorCritic(obs_space, act_space, activation="elu"))
    assert not FusedActorCriticStep.supports(ActorCritic(obs_space, act_space, squash=True))


def test_target_kl_skips_the_step():
    torch.manual_seed(0)
    obs_space, act_space = _spaces("discrete")
    net = ActorCritic(obs_space, act_space, (16,))
    before = [p.detach().clone() for p in net.parameters()]
    buffer = ParameterBuffer(net.parameters())
    step = FusedActorCriticStep(net, buffer, adam([buffer.flat], 1e-3), 0.5)
    obs = torch.randn(B, 6)
    actions = torch.randint(0, 3, (B,))
    old_logp = torch.full((B,), -5.0)  # far from the current policy: a large KL
    batch = Batch(obs=obs, actions=actions, logp=old_logp, advantages=torch.randn(B), returns=torch.randn(B))
    metrics, stepped = step(batch, ActorCriticLoss(clip_low=0.2), kl_limit=0.01)
    assert not stepped and float(metrics["approx_kl"]) > 0.01
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
