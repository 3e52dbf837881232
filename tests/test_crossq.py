"""CrossQ: batch renormalization checked by hand, the joint critic pass, running statistics for acting and
loading, the settings' errors, and learning Pendulum."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos.crossq import CrossQ, CrossQConfig
from policylab.data import Batch
from policylab.errors import ConfigError
from policylab.nets.mlp import StackedMLP, member_rows
from policylab.nets.renorm import RenormSettings, StackedBatchRenorm, batch_statistics
from tests.helpers import train_until

EPS = 1e-3


def _renorm(warmup: int, momentum: float = 0.1) -> StackedBatchRenorm:
    layer = StackedBatchRenorm(2, 3, RenormSettings(momentum=momentum, eps=EPS, warmup_steps=warmup))
    with torch.no_grad():
        layer.scale.copy_(torch.tensor([[[1.0, 2.0, 0.5]], [[3.0, 1.0, 1.0]]]))
        layer.shift.copy_(torch.tensor([[[0.0, -1.0, 0.5]], [[1.0, 0.0, 2.0]]]))
    return layer


def _inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(2, 8, 3))


def test_batch_renorm_is_batch_norm_during_its_warmup_and_moves_the_running_statistics():
    layer, x = _renorm(warmup=10), _inputs(0)
    out = layer(torch.tensor(x, dtype=torch.float32), batch_stats=True).detach().numpy()
    mean, var = x.mean(1, keepdims=True), x.var(1, ddof=1, keepdims=True)  # the unbiased variance
    scale, shift = layer.scale.detach().numpy(), layer.shift.detach().numpy()
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + EPS) * scale + shift, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
    assert int(layer.steps) == 1


def test_batch_renorm_after_its_warmup_corrects_the_batch_by_the_running_statistics():
    layer = _renorm(warmup=0)  # the first pass is plain batch normalization whatever the warmup, the second not
    first, second = _inputs(1), _inputs(2) * 0.1 + 8.0  # a second batch far from the running statistics
    layer(torch.tensor(first, dtype=torch.float32), batch_stats=True)
    mu, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    out = layer(torch.tensor(second, dtype=torch.float32), batch_stats=True).detach().numpy()
    b_mean, b_var = second.mean(1, keepdims=True), second.var(1, ddof=1, keepdims=True)
    sigma = np.sqrt(var + EPS)
    r = np.clip(np.sqrt(b_var + EPS) / sigma, 1 / 3, 3)
    d = np.clip((b_mean - mu) / sigma, -5, 5)
    assert (np.abs(d) == 5).any() and (r == 1 / 3).any()  # the clips bind
    x_hat = r * (second - b_mean) / np.sqrt(b_var + EPS) + d  # the paper's (Ioffe 2017, algorithm 1)
    expected = x_hat * layer.scale.detach().numpy() + layer.shift.detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("warmup", [10, 0])
def test_batch_renorm_gradients_equal_autograd_of_the_formula(warmup):
    """The hand-written backward against autograd through the same formula, in float64, before and after the
    warmup (r and d constants); a feature constant over the batch keeps a finite gradient."""
    torch.manual_seed(0)
    layer = _renorm(warmup=warmup).double()
    layer(torch.tensor(_inputs(5)), batch_stats=True)  # the second pass is renormalized when warmup is 0
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.tensor(_inputs(6), requires_grad=True)
    with torch.no_grad():
        x[:, :, 1] = 0.5  # a constant feature
    upstream = torch.randn(2, 8, 3, dtype=torch.float64)
    (layer(x, batch_stats=True) * upstream).sum().backward()
    ours = [x.grad.clone(), layer.scale.grad.clone(), layer.shift.grad.clone()]
    x.grad, layer.scale.grad, layer.shift.grad = None, None, None
    b_mean, b_var = x.mean(1, keepdim=True), x.var(1, keepdim=True)
    r, d = torch.ones_like(b_var), torch.zeros_like(b_var)
    if warmup == 0:
        sigma = (var + EPS).sqrt()
        r = ((b_var.detach() + EPS).sqrt() / sigma).clamp(1 / 3, 3)
        d = ((b_mean.detach() - mu) / sigma).clamp(-5, 5)
    y = layer.scale * (r * (x - b_mean) / (b_var + EPS).sqrt() + d) + layer.shift
    (y * upstream).sum().backward()
    for got, want in zip(ours, [x.grad, layer.scale.grad, layer.shift.grad]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_batch_renorm_uses_running_statistics_outside_training_passes_in_torch_and_numpy():
    layer, x = _renorm(warmup=0), _inputs(3)
    layer(torch.tensor(x, dtype=torch.float32), batch_stats=True)
    mu, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    probe = _inputs(4)
    expected = (probe - mu) / np.sqrt(var + EPS) * layer.scale.detach().numpy() + layer.shift.detach().numpy()
    out = layer(torch.tensor(probe, dtype=torch.float32), batch_stats=False).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.numpy_forward(probe[1], member=1), expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.running_mean.numpy(), mu)  # unchanged by the running-statistics passes


def test_a_renormalized_mlp_acts_alike_in_numpy_and_torch_and_batch_statistics_is_scoped():
    torch.manual_seed(0)
    mlp = StackedMLP(1, 4, [16, 16], 2, "relu", batch_renorm=RenormSettings(warmup_steps=0))
    x = torch.randn(64, 4) * 3 + 1
    with batch_statistics(mlp):
        assert mlp.batch_stats
        mlp(x)
        mlp(x * 2)
    assert not mlp.batch_stats and not mlp.analytic_backward and mlp.numpy_acting
    with pytest.raises(RuntimeError), batch_statistics(mlp):
        raise RuntimeError("inside")
    assert not mlp.batch_stats  # restored on errors too
    probe = torch.randn(5, 4)
    with torch.no_grad():
        expected = mlp(probe)[0].numpy()
    np.testing.assert_allclose(mlp.numpy_forward(probe.numpy(), member=0), expected, rtol=1e-5, atol=1e-5)


def _spread(mlp: StackedMLP) -> StackedMLP:
    """Scales and shifts away from their initial ones and zeros, so that every term of the gradients shows."""
    with torch.no_grad():
        for renorm in mlp.renorms or []:
            renorm.scale.uniform_(0.5, 2.0)
            renorm.shift.normal_()
    return mlp


@pytest.mark.parametrize("warmup", [10, 0])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_cached_passes_of_a_renormalized_mlp_equal_autograd(warmup, activation):
    """`forward_cached` and `backward` fold each normalization into the product after it (nets/mlp.py). In float64
    their outputs, running statistics and gradients (weights, biases, scales, shifts, input) equal autograd's
    through `forward`: with batch statistics before and after the warmup, and with running statistics (the input's
    gradient alone, also per member at a subset of rows, as SAC's actor step takes it)."""
    torch.manual_seed(0)
    settings = RenormSettings(momentum=0.1, eps=EPS, warmup_steps=warmup)
    mlp = _spread(StackedMLP(2, 5, [16, 12], 3, activation, batch_renorm=settings).double())
    twin = copy.deepcopy(mlp)
    for net in (mlp, twin):  # a first pass each: with warmup 0 the next is renormalized
        with batch_statistics(net), torch.no_grad():
            net(torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 + 3)
    x = torch.randn(32, 5, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(2, 32, 3, dtype=torch.float64)
    with batch_statistics(mlp):
        out, inputs = mlp.forward_cached(x)
    input_grad = mlp.backward(inputs, upstream, input_grad=True)
    x_twin = x.clone().requires_grad_()
    with batch_statistics(twin):
        expected = twin(x_twin)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected.detach())
    assert input_grad is not None
    torch.testing.assert_close(input_grad.sum(0), x_twin.grad)  # every member reads the same input
    for (name, got), (_, want) in zip(mlp.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    for (name, got), (_, want) in zip(mlp.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(got, want, msg=name)

    out, inputs = mlp.forward_cached(x)  # running statistics
    input_grad = mlp.backward(inputs, upstream, weight_grads=False, input_grad=True)
    recomputed = mlp.backward(list(inputs), upstream, weight_grads=False, input_grad=True)  # folds made anew
    x_twin = x.clone().requires_grad_()
    expected = twin(x_twin)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected.detach())
    assert input_grad is not None and recomputed is not None
    torch.testing.assert_close(input_grad.sum(0), x_twin.grad)
    torch.testing.assert_close(recomputed, input_grad)
    rows = torch.tensor([0, 5, 7, 30])
    member = mlp.backward(
        member_rows(inputs, 1, rows), upstream[1:, rows], weight_grads=False, input_grad=True, members=slice(1, 2)
    )
    x_twin = x.clone().requires_grad_()
    (twin(x_twin)[1, rows] * upstream[1, rows]).sum().backward()
    assert member is not None
    torch.testing.assert_close(member[0], x_twin.grad[rows])


def test_the_cached_passes_refuse_what_they_cannot_compute():
    mlp = StackedMLP(2, 3, [8], 1, "relu", batch_renorm=RenormSettings())
    out, inputs = mlp.forward_cached(torch.randn(4, 3))
    with pytest.raises(ValueError, match="pass with batch statistics"):
        mlp.backward(inputs, torch.ones_like(out))  # weight gradients after a running-statistics pass
    with batch_statistics(mlp):
        with pytest.raises(ValueError, match="every member"):
            mlp.forward_cached(torch.randn(4, 3), members=1)
        out, inputs = mlp.forward_cached(torch.randn(4, 3))
    with pytest.raises(ValueError, match="apart"):
        member_rows(inputs, 0, torch.tensor([0]))


def _algo(**settings) -> CrossQ:
    cfg = CrossQConfig(hidden_sizes=[8], critic_hidden_sizes=[8], renorm_momentum=1.0, threads=1, **settings)
    cfg.validate()
    obs_space = gym.spaces.Box(-5.0, 5.0, (3,), np.float32)
    return CrossQ(cfg, obs_space, gym.spaces.Box(-2.0, 2.0, (1,), np.float32))


def _batch(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        obs=torch.randn(n, 3, generator=g),
        actions=torch.rand(n, 1, generator=g) * 2 - 1,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, 3, generator=g) + 4.0,  # far from obs: the joint statistics differ from either's
        terminated=torch.zeros(n, dtype=torch.bool),
        discounts=torch.full((n,), 0.99),
    )


@pytest.mark.parametrize("analytic_grads", [True, False])
def test_the_critic_normalizes_current_and_next_state_actions_together(analytic_grads):
    """With momentum 1 the first renormalization's running mean after one update is the mean of its training
    pass: over [s, a] and [s', a'] together (the actor's next actions, drawn before the critic's step)."""
    algo, batch = _algo(analytic_grads=analytic_grads), _batch()
    assert algo.fused == analytic_grads
    algo.update(batch, 0)  # not an actor step (actor_delay 3): the actor's statistics stay where they were
    first = algo.critic.body.renorms[0]  # type: ignore[index]
    obs_mean = torch.cat([batch.obs, batch.next_obs]).mean(0)
    np.testing.assert_allclose(first.running_mean[0, 0, :3].numpy(), obs_mean.numpy(), rtol=1e-5, atol=1e-6)
    assert int(first.steps) == 1
    assert all(int(r.steps) == 0 for r in algo.net.body.renorms)  # type: ignore[union-attr]
    algo.update(batch, 2)  # an actor step (the third update): one training pass of the actor, on s only
    actor_first = algo.net.body.renorms[0]  # type: ignore[index]
    np.testing.assert_allclose(actor_first.running_mean[0, 0].numpy(), batch.obs.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert int(first.steps) == 2 and int(actor_first.steps) == 1


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"renorm_momentum": 0.0}, "renorm_momentum"),
        ({"adam_beta1": 1.0}, "adam_beta1"),
        ({"renorm_warmup": -1}, "renorm_warmup"),
        ({"critic_hidden_sizes": []}, "critic_hidden_sizes"),
        ({"actor_delay": 0}, "actor_delay"),
        ({"tau": 0.01}, "no target networks"),
    ],
)
def test_bad_settings_are_errors_that_name_them(settings, named):
    with pytest.raises(ConfigError, match=named):
        CrossQConfig(**settings).validate()


def test_crossq_reaches_minus_250_on_pendulum_and_its_loaded_policy_keeps_the_running_statistics(tmp_path):
    run, evaluations = train_until(
        -250,
        "crossq",
        env="Pendulum-v1",
        steps=15_000,
        seed=1,
        overrides={
            "eval_every": 1000,
            "eval_episodes": 10,
            "checkpoint_every": 0,
            "hidden_sizes": [64, 64],
            "critic_hidden_sizes": [64, 64],
        },
        runs_dir=tmp_path,
    )
    assert evaluations and evaluations[-1][1] >= -250, evaluations
    policy = pl.load(run.dir)
    assert int(policy.net.body.renorms[0].steps) > 0  # the statistics came back with the weights
    assert pl.evaluate(policy, episodes=5, seed=7)["return_mean"] >= -400
