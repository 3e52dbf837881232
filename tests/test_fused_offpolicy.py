"""The hand-derived off-policy gradient steps (SAC, TQC, CrossQ, TD3, DQN, QR-DQN, discrete BCQ, IQL, AWAC, CRR,
CQL) equal the autograd steps (same noise, batch, state)."""

from __future__ import annotations

import pytest
import torch

from policylab.algos import get_algo
from policylab.algos.fused_offpolicy import (
    _action_grad,
    _critic_at_policy_actions,
    _min_critic_action_grad,
    _policy_draws,
    fused_c51_update,
    fused_crossq_update,
    fused_dqn_update,
    fused_iql_update,
    fused_qrdqn_update,
    fused_sac_update,
    fused_td3_update,
    fused_tqc_update,
)
from policylab.data import Batch
from policylab.train import OffPolicyLoop, resolve_config


def _warm_loop(algo: str, env: str, overrides: dict) -> OffPolicyLoop:
    """A small seeded run after one iteration (buffer filled, some updates taken): two calls give equal states."""
    spec = get_algo(algo)
    base = {"hidden_sizes": [32, 32], "learning_starts": 64, "batch_size": 16, "log_every": 100, "lr": 1e-2}
    cfg, _ = resolve_config(spec, env, 1000, 0, overrides={**base, **overrides}, preset="none")
    loop = OffPolicyLoop(spec, cfg)
    loop.iterate()
    return loop


def _fused_twins(algo: str, overrides: dict) -> tuple[OffPolicyLoop, OffPolicyLoop, Batch, torch.Tensor]:
    """Two equal warm Pendulum-v1 loops whose algorithm runs the hand-derived step, a batch of 16 and [32, A]
    standard normal draws for it."""
    loop, twin_loop = (_warm_loop(algo, "Pendulum-v1", overrides) for _ in range(2))
    assert loop.algo.fused
    batch = loop.buffer.sample(16, torch.Generator().manual_seed(5))
    noise = torch.randn(32, loop.algo.act_dim, generator=torch.Generator().manual_seed(7))
    return loop, twin_loop, batch, noise


def _state(algo) -> dict[str, torch.Tensor]:
    tensors = {f"actor/{k}": v for k, v in algo.net.state_dict().items()}
    for name, module in algo.modules.items():
        tensors.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


def _assert_same_step(fused: dict, reference: dict, algo, twin) -> None:
    """Equal metrics and equal networks, targets and temperature after the two steps."""
    assert fused.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(fused[key], reference[key].detach(), rtol=1e-4, atol=1e-5, msg=key)
    a, b = _state(algo), _state(twin)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    for name, param in algo.net.named_parameters():  # the gradients themselves (Adam's step hides their scale)
        twin_param = dict(twin.net.named_parameters())[name]
        if param.grad is not None or twin_param.grad is not None:
            torch.testing.assert_close(param.grad, twin_param.grad, rtol=1e-4, atol=1e-7, msg=f"grad {name}")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "tanh", "max_grad_norm": 0.5, "n_critics": 3},
        {"prioritized": True, "auto_alpha": False, "alpha": 0.2},
        {"actor_delay": 2},
        {"use_sde": True},  # gSDE: the per-row log std's gradient into the [latent, A] log_std
        {"use_sde": True, "activation": "tanh", "log_std_init": -0.5, "n_critics": 3, "max_grad_norm": 0.5},
    ],
)
def test_fused_sac_step_equals_autograd(overrides):
    loop, twin_loop = (_warm_loop("sac", "Pendulum-v1", overrides) for _ in range(2))  # equal, separate
    algo, twin = loop.algo, twin_loop.algo
    assert algo.fused and ("weights" in loop.buffer.sample(4)) == bool(overrides.get("prioritized"))
    batch = loop.buffer.sample(16, torch.Generator().manual_seed(5))
    noise = torch.randn(32, algo.act_dim, generator=torch.Generator().manual_seed(7))
    for index in (0, 1):
        fused = fused_sac_update(algo, batch, index, noise)
        reference = twin.autograd_update(batch, index, noise)
        _assert_same_step(fused, reference, algo, twin)
    loop.close()
    twin_loop.close()


def test_fused_sac_gsde_step_with_clipped_means_equals_autograd():
    """gSDE clips the mean to +-2 (SB3's Hardtanh): no gradient reaches the rows' clipped outputs."""
    loop, twin_loop = (_warm_loop("sac", "Pendulum-v1", {"use_sde": True}) for _ in range(2))
    algo, twin = loop.algo, twin_loop.algo
    batch = loop.buffer.sample(16, torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a in (algo, twin):
            a.net.body.biases[-1][0, 0, 0] = 2.0  # about half the rows above the clip
        raw = algo.net.body(batch.obs)[0, :, 0]
        assert 0 < int((raw > 2.0).sum()) < len(raw)
    noise = torch.randn(32, algo.act_dim, generator=torch.Generator().manual_seed(7))
    _assert_same_step(fused_sac_update(algo, batch, 0, noise), twin.autograd_update(batch, 0, noise), algo, twin)
    loop.close()
    twin_loop.close()


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    """Elementwise within rtol of the tensor's largest magnitude (the rounding of sums of many terms)."""
    error = float((got.double() - want.double()).abs().max())
    assert error <= rtol * max(float(want.double().abs().max()), 1e-6), (name, error)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "tanh", "n_critics": 3, "max_grad_norm": 0.5},
        {"renorm_warmup": 0},  # every later pass corrected by r and d
        {"use_sde": True, "renorm_warmup": 0},
        {"prioritized": True, "auto_alpha": False, "alpha": 0.2},
    ],
)
def test_fused_crossq_step_equals_autograd(overrides):
    """Metrics, every gradient (weights, biases, the normalizations' scales and shifts) and the running statistics
    over six steps, three of them actor steps. The two algorithms are made equal again after each step: a bias
    before a normalization can have a gradient that is zero in exact arithmetic (a ReLU unit active on every row:
    the normalization removes any shift of it), and Adam turns the two paths' different rounding there into
    steps of +-lr."""
    overrides = {"critic_hidden_sizes": [32, 32], "actor_delay": 2, **overrides}
    loop, twin_loop, batch, noise = _fused_twins("crossq", overrides)
    algo, twin = loop.algo, twin_loop.algo
    for index in range(6):
        fused, reference = fused_crossq_update(algo, batch, index, noise), twin.autograd_update(batch, index, noise)
        assert fused.keys() == reference.keys() and ("actor_loss" in fused) == (index % 2 == 1)
        for key in reference:
            _assert_close_to_scale(fused[key], reference[key].detach(), key)
        for ours, theirs in ((algo.critic, twin.critic), (algo.net, twin.net)):
            for (name, got), (_, want) in zip(ours.named_parameters(), theirs.named_parameters()):
                if want.grad is not None:  # a renormalization's shift and scale gradients sum the batch's
                    # upstream gradients of both signs: two summation orders differ by more than their result's
                    # scale suggests (1.2e-5 of it on an AMD EPYC Zen 4's MKL)
                    rtol = 3e-5 if "renorm" in name else 1e-5
                    _assert_close_to_scale(got.grad, want.grad, f"grad {name}", rtol)
            for (name, got), (_, want) in zip(ours.named_buffers(), theirs.named_buffers()):
                _assert_close_to_scale(got, want, name)
        with torch.no_grad():
            for ours, theirs in (
                (algo.critic, twin.critic),
                (algo.net, twin.net),
                (algo.temperature, twin.temperature),
            ):
                for got, want in zip(ours.parameters(), theirs.parameters()):
                    want.copy_(got)
        for ours_opt, theirs_opt in ((algo.critic_opt, twin.critic_opt), (algo.actor_opt, twin.actor_opt)):
            theirs_opt.optimizer.load_state_dict(ours_opt.optimizer.state_dict())
    loop.close()
    twin_loop.close()


def test_the_actor_step_through_each_rows_minimizing_critic_alone_equals_the_pass_through_all():
    """SAC's dL/da through the minimizing critic of each row only (the others' gradient there is zero) equals the
    pass through every critic with zero output gradients (bit for bit on MKL; a kernel may round a product of fewer
    rows differently in the last bit); also when a critic minimizes no row."""
    loop = _warm_loop("sac", "Pendulum-v1", {"n_critics": 3})
    algo, n = loop.algo, 16
    batch = loop.buffer.sample(n, torch.Generator().manual_seed(5))
    with torch.no_grad():
        draws = _policy_draws(algo, batch, None)
        _, pi_inputs = _critic_at_policy_actions(algo, batch, draws, n)
        for k_min in (torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(1)), torch.zeros(n).long()):
            g_out = torch.zeros(3, n).scatter_(0, k_min[None], -1.0 / n)[..., None]
            dense = _action_grad(algo, batch, pi_inputs, g_out)
            split = _min_critic_action_grad(algo, batch, pi_inputs, k_min, n)
            torch.testing.assert_close(split, dense, rtol=1e-6, atol=1e-9)
    loop.close()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "tanh", "max_grad_norm": 0.5, "n_critics": 3, "n_quantiles": 5, "drop_per_critic": 1},
        {"auto_alpha": False, "alpha": 0.2, "n_step": 3},
        {"use_sde": True, "log_std_init": -1.0},
    ],
)
def test_fused_tqc_step_equals_autograd(overrides):
    loop, twin_loop, batch, noise = _fused_twins("tqc", overrides)
    algo, twin = loop.algo, twin_loop.algo
    for _ in range(2):
        fused = fused_tqc_update(algo, batch, noise)
        reference = twin.autograd_update(batch, noise)
        _assert_same_step(fused, reference, algo, twin)
    loop.close()
    twin_loop.close()


@pytest.mark.parametrize(
    ("algo_name", "overrides"),
    [
        ("dqn", {}),
        ("dqn", {"double_q": True, "dueling": True}),
        ("dqn", {"loss": "mse", "activation": "tanh", "max_grad_norm": None}),
        ("dqn", {"prioritized": True, "double_q": True, "n_step": 3}),
        ("qrdqn", {}),
        ("qrdqn", {"activation": "tanh", "max_grad_norm": 0.5, "n_quantiles": 7, "n_step": 3}),
        ("c51", {}),
        ("c51", {"activation": "tanh", "max_grad_norm": 0.5, "n_atoms": 11, "v_min": 0.0, "v_max": 20.0, "n_step": 3}),
    ],
)
def test_fused_dqn_qrdqn_and_c51_steps_equal_autograd(algo_name, overrides):
    fused_update = {"dqn": fused_dqn_update, "qrdqn": fused_qrdqn_update, "c51": fused_c51_update}[algo_name]
    loop, twin_loop = (_warm_loop(algo_name, "CartPole-v1", overrides) for _ in range(2))
    algo, twin = loop.algo, twin_loop.algo
    assert algo.fused
    batch = loop.buffer.sample(16, torch.Generator().manual_seed(5))
    for _ in range(2):
        fused = fused_update(algo, batch)
        reference = twin.autograd_update(batch)
        _assert_same_step(fused, reference, algo, twin)
    loop.close()
    twin_loop.close()


@pytest.mark.parametrize(
    ("algo_name", "overrides"),
    [
        ("td3", {}),
        ("td3", {"activation": "tanh", "max_grad_norm": 0.5, "n_critics": 3, "prioritized": True}),
        ("ddpg", {}),
        ("td3", {"bc_alpha": 2.5}),  # TD3+BC's actor loss
    ],
)
def test_fused_td3_step_equals_autograd(algo_name, overrides):
    loop, twin_loop = (_warm_loop(algo_name, "Pendulum-v1", overrides) for _ in range(2))
    algo, twin = loop.algo, twin_loop.algo
    assert algo.fused
    batch = loop.buffer.sample(16, torch.Generator().manual_seed(5))
    for index in (0, 1, 2):
        fused = fused_td3_update(algo, batch, index)
        reference = twin.autograd_update(batch, index)
        _assert_same_step(fused, reference, algo, twin)
    loop.close()
    twin_loop.close()


@pytest.mark.parametrize("overrides", [{}, {"deterministic_actor": True, "max_grad_norm": 0.5, "activation": "tanh"}])
def test_fused_iql_step_equals_autograd(tmp_path, overrides):
    from policylab.collect import collect

    data = collect("Pendulum-v1", "random", 4, seed=0, out=tmp_path / "pendulum-random")
    loops = []
    for _ in range(2):
        spec = get_algo("iql")
        cfg, _ = resolve_config(
            spec,
            steps=1000,
            seed=0,
            dataset=data.path,
            overrides={"hidden_sizes": [32, 32], "batch_size": 16, "lr": 1e-2, **overrides},
        )
        loops.append(OffPolicyLoop(spec, cfg))
    algo, twin = loops[0].algo, loops[1].algo
    assert algo.fused
    for index in range(3):
        batch = loops[0].offline_source.sample(16, torch.Generator().manual_seed(index))
        fused = fused_iql_update(algo, batch)
        reference = twin.autograd_update(batch)
        _assert_same_step(fused, reference, algo, twin)
        torch.testing.assert_close(algo.net.state_dict(), twin.net.state_dict(), rtol=1e-4, atol=1e-6)
    for loop in loops:
        loop.close()


@pytest.mark.parametrize(
    ("algo_name", "overrides"),
    [
        ("cql", {}),
        ("cql", {"lagrange": True, "backup_entropy": False, "max_grad_norm": 0.5, "n_critics": 3}),
        ("cal_ql", {"activation": "tanh"}),  # the calibrated (bounded) policy values in the penalty
    ],
)
def test_fused_cql_step_equals_autograd(tmp_path, algo_name, overrides):
    from policylab.algos.cql import CQLNoise
    from policylab.algos.fused_offpolicy import fused_cql_update
    from policylab.collect import collect

    data = collect("Pendulum-v1", "random", 4, seed=0, out=tmp_path / "pendulum-random")
    loops = []
    for _ in range(2):
        spec = get_algo(algo_name)
        settings = {"hidden_sizes": [32, 32], "batch_size": 16, "lr": 1e-2, "n_action_samples": 3, **overrides}
        cfg, _ = resolve_config(spec, steps=1000, seed=0, dataset=data.path, overrides=settings)
        loops.append(OffPolicyLoop(spec, cfg))
    algo, twin = loops[0].algo, loops[1].algo
    assert algo.fused
    draws = torch.Generator().manual_seed(7)
    for index in range(2):
        batch = loops[0].offline_source.sample(16, torch.Generator().manual_seed(index))
        if algo_name == "cal_ql":  # bounds near the critics' values: some policy values below, some above
            batch.mc_returns = algo.critic(batch.obs, batch.actions).detach().mean(0)
        noise = CQLNoise(
            torch.randn(32, algo.act_dim, generator=draws),
            torch.randn(32 * 3, algo.act_dim, generator=draws),
            torch.rand(16 * 3, algo.act_dim, generator=draws) * 2 - 1,
        )
        fused = fused_cql_update(algo, batch, index, noise)
        reference = twin.autograd_update(batch, index, noise)
        _assert_same_step(fused, reference, algo, twin)
        if algo_name == "cal_ql":
            assert 0.1 < float(algo._below_bound) < 0.9
    for loop in loops:
        loop.close()


def test_fused_deterministic_bc_step_equals_autograd():
    import gymnasium as gym

    from policylab.algos.bc import BC, BCConfig
    from policylab.data import Batch

    spaces = (gym.spaces.Box(-5, 5, (4,)), gym.spaces.Box(-2, 2, (3,)))
    gen = torch.Generator().manual_seed(0)
    batch = Batch(obs=torch.randn(16, 4, generator=gen), actions=torch.rand(16, 3, generator=gen) * 2 - 1)

    def bc(analytic: bool) -> BC:
        torch.manual_seed(1)  # the same initial weights
        return BC(BCConfig(dataset="d", analytic_grads=analytic, hidden_sizes=[32, 32], max_grad_norm=0.5), *spaces)

    fused, reference = bc(True), bc(False)
    assert fused.fused and not reference.fused
    for i in range(2):
        a, b = fused.update(batch, i), reference.update(batch, i)
        torch.testing.assert_close(a["bc_loss"], b["bc_loss"], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.net.state_dict().items(), reference.net.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("algo_name", "overrides"),
    [
        ("awac", {}),
        ("awac", {"deterministic_actor": True, "max_grad_norm": 0.5, "activation": "tanh", "n_critics": 3}),
        ("crr", {"target_update_interval": 2}),  # a hard target copy after the second step
        ("crr", {"weight": "binary", "advantage_baseline": "max", "cwp": False, "n_critics": 2, "tau": 0.1}),
        ("crr", {"activation": "tanh", "max_grad_norm": 0.5, "n_action_samples": 2}),
    ],
)
def test_fused_awac_and_crr_steps_equal_autograd(tmp_path, algo_name, overrides):
    from policylab.collect import collect

    data = collect("Pendulum-v1", "random", 4, seed=0, out=tmp_path / "pendulum-random")
    loops = []
    for _ in range(2):
        spec = get_algo(algo_name)
        settings = {"hidden_sizes": [32, 32], "batch_size": 16, "lr": 1e-2, **overrides}
        cfg, _ = resolve_config(spec, steps=1000, seed=0, dataset=data.path, overrides=settings)
        loops.append(OffPolicyLoop(spec, cfg))
    algo, twin = loops[0].algo, loops[1].algo
    assert algo.fused and twin.fused
    for index in range(3):
        batch = loops[0].offline_source.sample(16, torch.Generator().manual_seed(index))
        fused = algo.update(batch, index)
        reference = twin.autograd_update(batch, index) if algo_name == "crr" else twin.autograd_update(batch)
        _assert_same_step(fused, reference, algo, twin)
    for loop in loops:
        loop.close()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"dueling": True, "loss": "mse", "activation": "tanh", "max_grad_norm": 0.5, "imitation_beta": 0.5}],
)
def test_fused_discrete_bcq_step_equals_autograd(tmp_path, overrides):
    from policylab.collect import collect

    data = collect("CartPole-v1", "random", 6, seed=0, out=tmp_path / "cartpole-random")
    loops = []
    for _ in range(2):
        spec = get_algo("bcq_discrete")
        settings = {"hidden_sizes": [32, 32], "batch_size": 16, "lr": 1e-2, "threshold": 0.5, **overrides}
        cfg, _ = resolve_config(spec, steps=1000, seed=0, dataset=data.path, overrides=settings)
        loops.append(OffPolicyLoop(spec, cfg))
    algo, twin = loops[0].algo, loops[1].algo
    assert algo.fused
    for index in range(3):
        batch = loops[0].offline_source.sample(16, torch.Generator().manual_seed(index))
        _assert_same_step(algo.update(batch, index), twin.autograd_update(batch), algo, twin)
    for loop in loops:
        loop.close()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"perturbation": 0.5, "policy_delay": 2, "activation": "tanh", "max_grad_norm": 0.5, "n_critics": 3}],
)
def test_fused_plas_step_equals_autograd(tmp_path, overrides):
    """After the VAE's steps (index 2 and on), PLAS and PLAS+P (a wide perturbation: some actions clipped)."""
    from policylab.collect import collect

    data = collect("Pendulum-v1", "random", 4, seed=0, out=tmp_path / "pendulum-random")
    loops = []
    for _ in range(2):
        spec = get_algo("plas")
        settings = {"hidden_sizes": [32, 32], "vae_hidden_sizes": [32], "batch_size": 16, "lr": 1e-2,
                    "actor_lr": 1e-2, "vae_steps": 2, **overrides}  # fmt: skip
        cfg, _ = resolve_config(spec, steps=1000, seed=0, dataset=data.path, overrides=settings)
        loops.append(OffPolicyLoop(spec, cfg))
    algo, twin = loops[0].algo, loops[1].algo
    assert algo.fused
    twin.fused = False
    for index in range(5):
        batch = loops[0].offline_source.sample(16, torch.Generator().manual_seed(index))
        _assert_same_step(algo.update(batch, index), twin.update(batch, index), algo, twin)
    for loop in loops:
        loop.close()
