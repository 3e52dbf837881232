"""The trust-region family: TRPO, MDPO (on- and off-policy), SPO, FixPO.

Losses against hand computation, gradients against autograd, the closed-form KLs against torch.distributions,
the trust regions each method promises (TRPO's KL bound per update, FixPO's after its fixup phase), exact resume,
and learning: a deterministic evaluation reaching a bar within a step budget, stopping at the first evaluation
that does (seeds fixed; the budgets were checked on seeds 1, 2 and 3).
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

import policylab as pl
from policylab.algos import get_algo
from policylab.algos.mdpo import mdpo_step_size
from policylab.checkpoint import load_checkpoint
from policylab.errors import ConfigError
from policylab.nets import ActorCritic
from policylab.objectives import pg_surrogate, pg_surrogate_grad
from policylab.objectives.policy import kl_estimate, pg_token_losses
from policylab.optim import conjugate_gradient
from policylab.train import IterationInfo, OnPolicyLoop, resolve_config
from tests.helpers import resumed_and_full_runs, train_until

B = 64


# --- conjugate gradient ---------------------------------------------------------------------------------------


def test_conjugate_gradient_solves_a_hand_made_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)  # symmetric positive definite
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, max_steps=8)  # n steps: exact in exact arithmetic
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-8, rtol=1e-6)
    # a 2 x 2 system by hand: [[4, 1], [1, 3]] x = [1, 2]  ->  x = [1/11, 7/11]
    x2 = conjugate_gradient(lambda v: torch.tensor([[4.0, 1.0], [1.0, 3.0]]) @ v, torch.tensor([1.0, 2.0]), 2)
    torch.testing.assert_close(x2, torch.tensor([1 / 11, 7 / 11]))
    # fewer steps: a worse, but still improving, approximation
    residuals = [float((a @ conjugate_gradient(lambda v: a @ v, b, k) - b).norm()) for k in (1, 3, 8)]
    assert residuals[0] > residuals[1] > residuals[2]


# --- the surrogate's new terms: values by hand, gradients against autograd ------------------------------------


@pytest.mark.parametrize(
    ("log_ratio", "adv", "expected"),
    [
        (math.log(1.5), 2.0, -(1.5 * 2.0 - 2.0 / 0.4 * 0.25)),  # -(r A - |A| / (2 eps) (r - 1)^2), eps = 0.2
        (math.log(0.5), -1.0, -(0.5 * -1.0 - 1.0 / 0.4 * 0.25)),
        (0.0, 3.0, -3.0),  # at r = 1 the penalty is 0
    ],
)
def test_spo_loss_by_hand(log_ratio, adv, expected):
    loss, metrics = pg_surrogate(
        torch.tensor([log_ratio]), torch.zeros(1), torch.tensor([adv]), clip_low=None, spo_eps=0.2
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["clip_frac"]) == (1.0 if abs(math.exp(log_ratio) - 1) > 0.2 else 0.0)


def test_spo_optimum_is_the_edge_of_the_trust_region():
    """The SPO objective r A - |A| / (2 eps) (r - 1)^2 peaks at r = 1 + sign(A) eps (PPO's clip edges)."""
    ratios = torch.linspace(0.5, 1.5, 10_001)
    for adv, edge in ((1.0, 1.2), (-2.0, 0.8)):
        per_sample, *_ = pg_token_losses(
            ratios.log(), torch.zeros_like(ratios), torch.full_like(ratios, adv), clip_low=None, spo_eps=0.2
        )
        assert float(ratios[per_sample.argmin()]) == pytest.approx(edge, abs=1e-3)


def test_kl_penalties_by_hand():
    """MDPO: -r A + c (r log r - r + 1) (KL(pi || pi_old)); FixPO: -r A + c (r - 1 - log r) (KL(pi_old || pi))."""
    r, adv, c = 1.3, 0.7, 2.5
    logp, old, a = torch.tensor([math.log(r)]), torch.zeros(1), torch.tensor([adv])
    reverse, _ = pg_surrogate(logp, old, a, clip_low=None, kl_coef=c)
    forward, _ = pg_surrogate(logp, old, a, clip_low=None, kl_coef=c, kl="forward")
    assert float(reverse) == pytest.approx(-r * adv + c * (r * math.log(r) - r + 1), rel=1e-6)
    assert float(forward) == pytest.approx(-r * adv + c * (r - 1 - math.log(r)), rel=1e-6)
    # with the clip (FixPO's primary phase): r = 1.3 > 1.2 with A > 0, so the clipped branch -1.2 A holds
    clipped, _ = pg_surrogate(logp, old, a, clip_low=0.2, kl_coef=c, kl="forward")
    assert float(clipped) == pytest.approx(-1.2 * adv + c * (r - 1 - math.log(r)), rel=1e-6)


def test_kl_estimates_are_unbiased_for_the_closed_form_kl():
    """On samples of pi_old, mean (r log r - r + 1) -> KL(pi || pi_old) and mean (r - 1 - log r) -> KL(pi_old || pi)."""
    old, new = Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(0.3), torch.tensor(0.8))
    x = old.sample(torch.Size([400_000]))
    log_ratio = new.log_prob(x) - old.log_prob(x)
    ratio = log_ratio.exp()
    assert float(kl_estimate(ratio, log_ratio, "reverse").mean()) == pytest.approx(
        float(kl_divergence(new, old)), rel=0.03
    )
    assert float(kl_estimate(ratio, log_ratio, "forward").mean()) == pytest.approx(
        float(kl_divergence(old, new)), rel=0.03
    )
    assert (kl_estimate(ratio, log_ratio, "forward") >= 0).all() and (
        kl_estimate(ratio, log_ratio, "reverse") >= 0
    ).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"clip_low": None, "spo_eps": 0.2},
        {"clip_low": None, "spo_eps": 0.1, "dual_clip": 3.0},
        {"clip_low": None, "kl_coef": 2.0},
        {"clip_low": None, "kl_coef": 2.0, "kl": "forward"},
        {"clip_low": 0.2, "kl_coef": 0.5, "kl": "forward"},
        {"clip_low": None, "spo_eps": 0.2, "kl_coef": torch.tensor(0.7)},  # a learned (tensor) coefficient
    ],
)
def test_trust_region_gradients_match_autograd(kw):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, generator=g) * 0.3 - 1.0
    old = logp + torch.randn(B, generator=g) * 0.4
    adv = torch.randn(B, generator=g) * 2.0
    loss, grad, metrics = pg_surrogate_grad(logp, old, adv, scale=0.5, **kw)
    leaf = logp.clone().requires_grad_()
    ref_loss, ref_metrics = pg_surrogate(leaf, old, adv, **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(grad, 0.5 * leaf.grad)
    for key in ("approx_kl", "clip_frac", "ratio_mean"):
        torch.testing.assert_close(metrics[key], ref_metrics[key])


def test_spo_replaces_the_clip():
    with pytest.raises(ValueError, match="clip_low=None"):
        pg_surrogate(torch.zeros(2), torch.zeros(2), torch.ones(2), clip_low=0.2, spo_eps=0.2)


# --- closed-form KLs of the heads --------------------------------------------------------------------------------


def test_head_kls_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    obs_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    cat = ActorCritic(obs_space, gym.spaces.Discrete(4)).head
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(cat.kl(a, None, b, None), kl_divergence(Categorical(logits=a), Categorical(logits=b)))
    multi = ActorCritic(obs_space, gym.spaces.MultiDiscrete([3, 2])).head
    a, b = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    expected = kl_divergence(Categorical(logits=a[:, :3]), Categorical(logits=b[:, :3])) + kl_divergence(
        Categorical(logits=a[:, 3:5]), Categorical(logits=b[:, 3:5])
    )  # the second dimension has 2 choices: its third grid entry is padding
    torch.testing.assert_close(multi.kl(a, None, b, None), expected)
    gauss = ActorCritic(obs_space, gym.spaces.Box(-1.0, 1.0, (2,), np.float32)).head
    m1, m2 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    s1, s2 = torch.tensor([-0.5, 0.2]), torch.tensor([0.1, -0.3])
    expected = kl_divergence(Normal(m1, s1.exp()), Normal(m2, s2.exp())).sum(-1)
    torch.testing.assert_close(gauss.kl(m1, s1, m2, s2), expected)


# --- the trust regions ----------------------------------------------------------------------------------------


def _loop(algo: str, env: str, **overrides) -> OnPolicyLoop:
    spec = get_algo(algo)
    cfg, _ = resolve_config(spec, env=env, steps=100_000, seed=0, overrides={"threads": 1, **overrides}, preset="none")
    return OnPolicyLoop(spec, cfg)


def _policy_kl(net: ActorCritic, old: ActorCritic, obs: torch.Tensor) -> float:
    """Mean closed-form KL(pi_old || pi) over `obs`, computed apart from the algorithm."""
    with torch.no_grad():
        return float(net.head.kl(old(obs)[0], old.log_std, net(obs)[0], net.log_std).mean())


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_every_trpo_update_stays_within_target_kl(env):
    loop = _loop("trpo", env, n_steps=512, num_envs=2, target_kl=0.01)
    try:
        moved = 0
        for _ in range(4):
            rollout = loop.collect()
            old = copy.deepcopy(loop.net)
            metrics = loop.algo.update(rollout, loop.step / loop.cfg.steps)
            kl = _policy_kl(loop.net, old, rollout.obs.flatten(0, 1))
            assert kl <= 0.01 * 1.0001, f"KL {kl} past target_kl"
            assert kl == pytest.approx(float(metrics["kl"]), rel=1e-3, abs=1e-7)
            moved += kl > 1e-4
        assert moved >= 3, "the line search accepts steps (the bound is not met by standing still)"
    finally:
        loop.close()


def test_anneal_kl_shrinks_trpos_trust_region_linearly_to_zero():
    loop = _loop("trpo", "CartPole-v1", n_steps=512, num_envs=2, target_kl=0.01, anneal_kl=True)
    try:
        for progress in (0.5, 0.8, 1.0):
            rollout = loop.collect()
            old = copy.deepcopy(loop.net)
            loop.algo.update(rollout, progress)
            kl = _policy_kl(loop.net, old, rollout.obs.flatten(0, 1))
            bound = 0.01 * (1.0 - progress)
            assert kl <= bound * 1.0001, f"KL {kl} past the annealed bound {bound} at progress {progress}"
            assert (kl > 1e-5) == (progress < 1.0), "steps within the bound, none at its end"
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("action_space", "activation", "squash", "sde"),
    [
        (gym.spaces.Box(-1.0, 1.0, (3,)), "tanh", False, False),
        (gym.spaces.Box(-1.0, 1.0, (2,)), "relu", True, False),
        (gym.spaces.Discrete(4), "tanh", False, False),
        (gym.spaces.MultiDiscrete([3, 2]), "relu", False, False),
        (gym.spaces.Box(-1.0, 1.0, (3,)), "tanh", False, True),  # gSDE: the [features, actions] log-std block
        (gym.spaces.Box(-1.0, 1.0, (2,)), "relu", False, True),
    ],
)
def test_trpo_fisher_vector_products_equal_double_backprop(action_space, activation, squash, sde):
    from policylab.algos.trpo import ActorFisher, _autograd_fisher
    from policylab.optim import ParameterBuffer

    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (5,))
    net = ActorCritic(obs_space, action_space, (16, 8), activation, log_std_init=-0.5, squash=squash, sde=sde)
    params = ParameterBuffer(list(net.parameters()))
    with torch.no_grad():
        params.flat.add_(0.3 * torch.randn_like(params.flat))  # off the init: ReLUs of both signs, log-std != 0
    assert ActorFisher.supports(net)
    obs = torch.randn(B, 5)
    with torch.no_grad():
        old_out, old_log_std = net.policy_distribution(obs)
        old_log_std = None if old_log_std is None else old_log_std.detach().clone()  # the shared one: a parameter
    kl = net.head.kl(old_out, old_log_std, *net.policy_distribution(obs)).mean()
    reference = _autograd_fisher(kl, params.params, damping=0.1)
    analytic = ActorFisher(net, params, obs, damping=0.1)
    for _ in range(3):  # the same cached activations serve every product
        v = torch.randn_like(params.flat)
        torch.testing.assert_close(analytic(v), reference(v), rtol=1e-5, atol=1e-6)


def test_fixpo_fixup_phase_ends_inside_the_trust_region():
    # a large learning rate, many epochs and a tight eps_kl: the primary phase leaves the region, the fixup
    # phase brings the policy back
    loop = _loop("fixpo", "CartPole-v1", n_steps=256, num_envs=2, lr=3e-3, epochs=10, eps_kl=0.005, clip_eps=0.5)
    try:
        fixups = 0
        for _ in range(3):
            rollout = loop.collect()
            metrics = loop.algo.update(rollout, loop.step / loop.cfg.steps)
            with torch.no_grad():
                logp = loop.net.evaluate(rollout.obs.flatten(0, 1), rollout.actions.flatten(0, 1))[0]
            log_ratio = logp - rollout.logp.flatten()
            kl = float((log_ratio.exp() - 1 - log_ratio).mean())  # the KL(pi_old || pi) estimate FixPO bounds
            assert kl <= 0.005, f"KL {kl} after the fixup phase"
            assert kl == pytest.approx(float(metrics["kl_final"]), rel=1e-4)
            fixups += int(metrics["fixup_steps"])
            assert float(metrics["beta"]) >= loop.cfg.beta_min
        assert fixups > 0, "the settings made the primary phase overshoot: the fixup phase ran"
    finally:
        loop.close()


def test_mdpo_step_size_anneals_as_in_the_paper():
    """t_k = 1 - k/K for the K = 4 rollouts of a run (progress (k + 1)/K after the k-th), at least t_min."""
    assert [mdpo_step_size((k + 1) / 4, 25, 100, 0.01) for k in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert mdpo_step_size(1.3, 25, 100, 0.05) == 0.05


def test_mdpo_sac_kl_term_is_zero_at_refresh_and_grows_after():
    run_cfg = {"learning_starts": 100, "kl_refresh": 50, "batch_size": 32, "hidden_sizes": [32, 32], "threads": 1}
    kls: list[float] = []

    def record(info: IterationInfo) -> bool:
        if "kl_old" in info.metrics:
            kls.append(info.metrics["kl_old"])
        return True

    pl.train("mdpo_sac", env="Pendulum-v1", steps=300, seed=0, overrides={**run_cfg, "eval_every": 0,
             "eval_episodes": 1, "checkpoint_every": 0}, preset="none", runs_dir="/tmp/pl-mdpo-sac",
             callback=record, verbose=False)  # fmt: skip
    assert kls and all(k >= 0 for k in kls) and max(kls) > 0


# --- configs, resume, loading ---------------------------------------------------------------------------------


def test_trpo_rejects_shared_and_recurrent_networks():
    for bad in ({"shared_net": True}, {"recurrent": True}):
        with pytest.raises(ConfigError, match="separate actor and critic") as info:
            resolve_config(get_algo("trpo"), env="CartPole-v1", overrides=bad)
        (key,) = bad  # the fix names the one setting given, one --set per key (the command line takes no other form)
        assert info.value.fix == f"drop {key} (overrides={{{key!r}: False}})"
    with pytest.raises(ConfigError) as info:
        resolve_config(get_algo("trpo"), env="CartPole-v1", overrides={"shared_net": True, "recurrent": True})
    assert "(overrides={'shared_net': False, 'recurrent': False})" in str(info.value.fix)


@pytest.mark.parametrize(
    ("algo", "env", "stop", "extra"),
    [
        ("trpo", "Pendulum-v1", 640, {"n_steps": 128, "num_envs": 2, "batch_size": 64, "n_critic_updates": 2}),
        ("mdpo", "CartPole-v1", 640, {"n_steps": 128, "num_envs": 2, "batch_size": 128, "epochs": 2}),
        ("spo", "CartPole-v1", 640, {"n_steps": 128, "num_envs": 2, "batch_size": 64, "epochs": 2}),
        ("fixpo", "CartPole-v1", 640, {"n_steps": 128, "num_envs": 2, "batch_size": 64, "epochs": 2, "eps_kl": 0.01}),
        ("mdpo_sac", "Pendulum-v1", 300, {"learning_starts": 64, "kl_refresh": 50, "batch_size": 32,
                                          "hidden_sizes": [32, 32], "log_every": 100, "save_buffer": True}),
    ],
)  # fmt: skip
def test_resumed_run_equals_uninterrupted_run(tmp_path, algo, env, stop, extra):
    """The checkpoints hold every learned state: FixPO's beta and its Adam state, MDPO-SAC's pi_old."""
    steps = 1536 if get_algo(algo).kind == "on-policy" else 600
    settings = {**extra, "eval_every": 0, "eval_episodes": 2}
    kwargs = dict(env=env, steps=steps, seed=3, overrides=settings, preset="none", runs_dir=tmp_path, verbose=False)
    full, _, resumed = resumed_and_full_runs(algo, stop, **kwargs)
    assert resumed.final_eval == full.final_eval
    a, b = load_checkpoint(full.dir)[0], load_checkpoint(resumed.dir)[0]
    own = {"fixpo": "kl_multiplier/beta", "mdpo_sac": "actor_old/body.weights.0"}.get(algo)
    assert own is None or own in a
    for key in a.keys() - {k for k in a if k.startswith(("buffer/", "env/"))}:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    policy = pl.load(resumed.dir)
    obs, _ = gym.make(env).reset(seed=0)
    assert gym.make(env).action_space.contains(policy.act(obs))


# --- learning ---------------------------------------------------------------------------------------------------


def _reaches(algo: str, env: str, budget: int, bar: float, every: int, tmp_path, seed: int = 1, **overrides) -> None:
    """Train until a deterministic evaluation reaches `bar` (or the budget runs out)."""
    settings = {"eval_every": every, "eval_episodes": 10, "checkpoint_every": 0, "threads": 1, **overrides}
    _, evaluations = train_until(bar, algo, env=env, steps=budget, seed=seed, overrides=settings, runs_dir=tmp_path)
    assert evaluations and max(r for _, r in evaluations) >= bar, f"{algo} on {env} within {budget}: {evaluations}"


def test_trpo_reaches_400_on_cartpole_within_100k_steps(tmp_path):
    _reaches("trpo", "CartPole-v1", 100_000, 400, 5000, tmp_path)  # the preset (rl-zoo's entry)


def test_trpo_reaches_minus_600_on_pendulum_within_60k_steps(tmp_path):
    # the preset (rl-zoo's entry, gSDE included); passes with it and passed without it (seeds 1-3 at 45-50k then)
    _reaches("trpo", "Pendulum-v1", 60_000, -600, 5000, tmp_path)


MDPO_CARTPOLE = {"num_envs": 2, "n_steps": 512, "batch_size": 64, "gae_lambda": 0.98}


def test_mdpo_reaches_400_on_cartpole_within_30k_steps(tmp_path):
    _reaches("mdpo", "CartPole-v1", 30_000, 400, 5000, tmp_path, **MDPO_CARTPOLE)  # seeds 1-3: at 5k steps


def test_mdpo_reaches_minus_600_on_pendulum_within_50k_steps(tmp_path):
    # TRPO's Pendulum settings with 10 epochs of minibatches of 64; seeds 1-3 reach it at 27-31k steps
    settings = {"num_envs": 2, "n_steps": 1024, "gamma": 0.9, "batch_size": 64, "lr": 1e-3}
    _reaches("mdpo", "Pendulum-v1", 50_000, -600, 5000, tmp_path, **settings)


def test_spo_and_fixpo_learn_cartpole(tmp_path):
    _reaches("spo", "CartPole-v1", 30_000, 400, 5000, tmp_path, **MDPO_CARTPOLE)
    _reaches("fixpo", "CartPole-v1", 30_000, 400, 5000, tmp_path, **MDPO_CARTPOLE)


def test_mdpo_sac_reaches_minus_300_on_pendulum_within_6k_steps(tmp_path):
    # the preset (SAC's, lr 1e-3) with 64 x 64 networks (the autograd update: about 3 ms a step); seeds 1-3 reach
    # it at 4k-5k steps
    _reaches("mdpo_sac", "Pendulum-v1", 6000, -300, 1000, tmp_path, hidden_sizes=[64, 64])
