"""Invalid-action masking (action_masks=true; SB3-contrib's MaskablePPO): the heads give masked actions
probability 0 and renormalize the rest, the fast path's gradient equals autograd's with masks, a masked run never
takes a forbidden action (the test env raises), learns what it cannot learn without masks, reads masks from
`action_masks()` or info["action_mask"], resumes exactly, and bad input is one clear error."""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import policylab as pl
from policylab.algos.fused import FusedActorCriticStep
from policylab.algos.onpolicy import ActorCriticLoss, AutogradStep, adam
from policylab.cli import main
from policylab.data import Batch, ReplayBuffer
from policylab.envs import make_single_env, make_vec_env
from policylab.errors import ConfigError, EnvError, PolicylabError
from policylab.nets import ActorCritic
from policylab.nets.heads import CategoricalHead, MultiCategoricalHead, mask_logit_bias
from policylab.objectives.q_targets import allowed_only, dqn_target
from policylab.ope.policies import TargetPolicy
from policylab.optim import ParameterBuffer
from policylab.policy import single_env_mask
from tests.helpers import resumed_and_full_runs, train_until

ENV = "tests.envs_for_tests:MaskedChoice"  # info["action_mask"] only; strict: a forbidden action raises
WITH_METHOD = "tests.envs_for_tests:MaskedChoiceWithMethod"
COMMON = {"num_envs": 4, "n_steps": 64, "eval_every": 0, "eval_episodes": 5}
SMALL = {**COMMON, "batch_size": 64, "epochs": 4}
"""PPO's (and the trust-region variants built on it)."""
RANKED = {"n": 8, "extra": 2, "ranked": True}


def test_masked_logits_give_forbidden_actions_probability_zero_and_renormalize_the_rest():
    head = CategoricalHead(4)
    mask = np.array([[True, False, True, False]])
    bias = torch.from_numpy(head.mask_bias(mask))
    assert bias.tolist() == [[0.0, -1e9, 0.0, -1e9]]
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    logp, entropy = head.log_prob_entropy(logits + bias, None, torch.tensor([2]))
    p0, p2 = math.exp(0.5) / (math.exp(0.5) + math.exp(-1.0)), math.exp(-1.0) / (math.exp(0.5) + math.exp(-1.0))
    assert float(logp) == pytest.approx(math.log(p2), rel=1e-6)
    assert float(entropy) == pytest.approx(-(p0 * math.log(p0) + p2 * math.log(p2)), rel=1e-6)
    noise = head.noise((2000, 1), torch.Generator().manual_seed(0))[:, 0]
    sampled, _ = head.sample((logits + bias).expand(2000, 4), None, None, noise)
    assert set(sampled.tolist()) == {0, 2} and abs(float((sampled == 0).float().mean()) - p0) < 0.03
    assert int(head.mode(logits + bias)) == 0  # the likeliest allowed action, not the likeliest one


def test_multidiscrete_masks_take_each_dimensions_flags_in_turn():
    head = MultiCategoricalHead(gym.spaces.MultiDiscrete([3, 2]))  # a [2, 3] logit grid, the last entry padding
    flags = np.array([[False, True, True, True, False]])  # dimension 0: {1, 2}; dimension 1: {0}
    bias = head.mask_bias(flags)
    assert bias.reshape(2, 3).tolist() == [[-1e9, 0.0, 0.0], [0.0, -1e9, 0.0]]
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0, 9.0, 0.0]])
    assert head.mode(logits + torch.from_numpy(bias)).tolist() == [[1, 0]]
    assert not head.nothing_allowed(bias).any()
    assert head.nothing_allowed(head.mask_bias(np.array([[True, False, False, False, False]]))).tolist() == [True]


def test_bad_masks_are_one_clear_error():
    head = CategoricalHead(3)
    with pytest.raises(EnvError, match=r"has shape \(2,\): the action space needs 3 flags") as exc:
        mask_logit_bias(head, np.ones((4, 2), bool), "env X's action_masks()")
    assert "one flag per action" in exc.value.fix
    with pytest.raises(EnvError, match=r"allows no action at all \(row 1\)"):
        mask_logit_bias(head, np.array([[1, 0, 0], [0, 0, 0]]), "env X's action_masks()")
    box = ActorCritic(gym.spaces.Box(-1, 1, (2,)), gym.spaces.Box(-1, 1, (1,))).head
    with pytest.raises(EnvError, match=r"continuous \(Box\) actions"):
        mask_logit_bias(box, np.ones((1, 1)), "Pendulum-v1")


@pytest.mark.parametrize(("kind", "shared", "ent_coef"), [("discrete", False, 0.01), ("multi", True, 0.0)])
def test_the_fast_path_with_masks_is_autograds(kind, shared, ent_coef):
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
    act_space = gym.spaces.Discrete(5) if kind == "discrete" else gym.spaces.MultiDiscrete([3, 4])
    net_a = ActorCritic(obs_space, act_space, (32, 32), "tanh", shared=shared)
    net_b = copy.deepcopy(net_a)
    buf_a, buf_b = ParameterBuffer(net_a.parameters()), ParameterBuffer(net_b.parameters())
    auto = AutogradStep(net_a, buf_a, adam([buf_a.flat], 3e-3), max_grad_norm=0.5)
    fast = FusedActorCriticStep(net_b, buf_b, adam([buf_b.flat], 3e-3), max_grad_norm=0.5)
    g = torch.Generator().manual_seed(1)
    flags = torch.rand(64, net_a.head.mask_size, generator=g) < 0.6
    flags[:, 0] = True  # every row (and, for MultiDiscrete, dimension 0) allows something
    if kind == "multi":
        flags[:, 3] = True
    bias = torch.from_numpy(mask_logit_bias(net_a.head, flags.numpy(), "test"))
    obs = torch.randn(64, 6, generator=g)
    with torch.no_grad():
        actions, logp, values = net_a.act(obs, g, logit_bias=bias)
    batch = Batch(
        obs=obs, actions=actions, logp=logp + 0.3 * torch.randn(64, generator=g), values=values,
        advantages=torch.randn(64, generator=g), returns=values + torch.randn(64, generator=g), logit_bias=bias,
    )  # fmt: skip
    loss = ActorCriticLoss(clip_low=0.2, vf_coef=0.5, ent_coef=ent_coef)
    with torch.no_grad():
        unmasked_entropy = net_a.evaluate(obs, actions)[1].mean()
    m_a, _ = auto(batch, loss)
    m_b, _ = fast(batch, loss)
    for key in ("loss", "policy_loss", "entropy", "approx_kl", "grad_norm"):
        torch.testing.assert_close(m_b[key], m_a[key], atol=1e-6, rtol=1e-5, msg=key)
    for (name, p), q in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert float(m_a["entropy"]) < float(unmasked_entropy) - 0.1, "the masks are in the loss"


def test_masked_ppo_learns_what_unmasked_ppo_cannot(tmp_path):
    """The ranked task: nothing observed, the reward is for the highest allowed action. Masked PPO has to rank the
    actions (20 per episode; acting at random among the allowed: about 6.7); without masks a policy cannot know
    what is allowed, and a forbidden action ends the episode (about -0.5 here). The strict env raises at a
    forbidden action, so the masked run took none."""
    _, evaluations = train_until(
        19.5, "ppo", env=ENV, steps=16_384, seed=1, runs_dir=tmp_path, name="masked",
        overrides={**SMALL, "eval_every": 2048, "eval_episodes": 20, "action_masks": True, "env_kwargs": RANKED},
    )  # fmt: skip
    assert evaluations and evaluations[-1][1] >= 19.5, evaluations
    budget = evaluations[-1][0]
    unmasked = pl.train(
        "ppo", env=ENV, steps=budget, seed=1, runs_dir=tmp_path, name="unmasked", verbose=False,
        overrides={**SMALL, "eval_episodes": 20, "env_kwargs": {**RANKED, "strict": False}},
    )  # fmt: skip
    assert unmasked.final_eval["return_mean"] < 5.0
    assert any("offers action masks" in note for note in unmasked.notes), unmasked.notes
    assert any("overrides={'action_masks': True} acts only" in note for note in unmasked.notes), "the API's wording"


def test_the_unused_masks_note_names_the_flag_on_the_command_line(tmp_path, capsys):
    argv = ["train", "ppo", "--env", ENV, "--steps", "256", "--runs-dir", str(tmp_path), "--no-progress"]
    settings = ["--set", "n_steps=64", "--set", "num_envs=4", "--set", "eval_episodes=1", "--set"]
    assert main([*argv, *settings, "env_kwargs={strict: false}"]) == 0
    out = capsys.readouterr().out
    assert "offers action masks (info['action_mask']); --set action_masks=true acts only" in out


@pytest.mark.parametrize(
    ("algo", "extra"),
    [
        ("a2c", {"n_steps": 8}),
        ("reinforce", {}),
        ("trpo", {}),
        ("mdpo", {}),
        ("spo", {}),
        ("fixpo", {}),
        ("ppo", {"recurrent": True, "lstm_hidden": 16, "batch_size": 128}),
        ("ppo", {"env_kwargs": {"multi": True}}),
        ("ppo", {"rollout_workers": 2, "rollout_backend": "inline"}),
        ("ppo", {"analytic_grads": False}),
        ("ppo", {"vectorization": "async"}),
        ("ppo", {"vectorization": "async", "env": WITH_METHOD}),
    ],
)
def test_every_maskable_algorithm_acts_among_the_allowed_actions_and_learns(tmp_path, algo, extra):
    """The observed task (the target is shown): 4,096 steps, never a forbidden action (the env raises), and the
    final evaluation (masked too, 5 episodes) above acting at random among the allowed actions (10 of 20)."""
    env = extra.pop("env", ENV)
    run = pl.train(
        algo, env=env, steps=4096, seed=1, runs_dir=tmp_path, verbose=False, preset="none",
        overrides={**(SMALL if algo in ("ppo", "mdpo", "spo", "fixpo") else COMMON), "action_masks": True, **extra},
    )  # fmt: skip
    assert run.final_eval["return_mean"] > 12.0, run.final_eval


def test_masks_come_from_the_method_first_then_the_info():
    for env_id, source in ((WITH_METHOD, "method"), (ENV, "info")):
        env = make_vec_env(env_id, 3)
        env.track_action_masks()
        env.reset(seed=0)
        assert env.mask_source == source and env.action_masks.shape == (3, 8) and env.action_masks.sum() == 6
        for _ in range(25):  # through episode ends (20 steps): the reset's masks
            allowed = [int(np.flatnonzero(row)[0]) for row in env.action_masks]
            env.step(np.array(allowed))
            assert (env.action_masks.sum(1) == 2).all()
        env.close()
    for env_id in (ENV, WITH_METHOD):  # one plain env (videos): the same masks
        single = make_single_env(env_id)
        _, info = single.reset(seed=0)
        assert (single_env_mask(single, info) == single.unwrapped.flags()).all()
    with pytest.raises(EnvError, match="gives no action masks"):
        single_env_mask(make_single_env("CartPole-v1"), {})
    plain = make_vec_env("CartPole-v1", 2)
    plain.track_action_masks()
    with pytest.raises(EnvError, match="gives no action masks") as exc:
        plain.reset(seed=0)
    assert "ActionMasker" in exc.value.fix and "info['action_mask']" in exc.value.fix


@pytest.mark.parametrize("env", [ENV, WITH_METHOD])
def test_a_masked_run_resumes_exactly(tmp_path, env):
    """The current masks are part of the checkpoint (an info mask cannot be asked for again)."""
    resumed_and_full_runs(
        "ppo", stop=512, env=env, steps=1024, seed=3, runs_dir=tmp_path, verbose=False,
        overrides={**SMALL, "action_masks": True, "checkpoint_every": 256},
    )  # fmt: skip


def test_the_saved_policy_takes_masks(tmp_path):
    run = pl.train(
        "ppo", env=ENV, steps=2048, seed=2, runs_dir=tmp_path, verbose=False,
        overrides={**SMALL, "action_masks": True},
    )  # fmt: skip
    policy = pl.load(run.dir)
    assert policy.action_masks and "action masks" in repr(policy)
    obs = np.eye(8, dtype=np.float32)
    only = np.zeros((8, 8), bool)
    only[:, 5] = True
    assert policy.act(obs, action_mask=only).tolist() == [5] * 8  # a single allowed action is always taken
    assert policy.act(obs[3], action_mask=only[3]) == 5
    assert policy.act(obs[3], deterministic=False, action_mask=only[3]) == 5
    assert pl.evaluate(policy, episodes=3)["return_mean"] > 12.0  # masked in evaluation too: the strict env raises
    with pytest.raises(PolicylabError, match="action_mask has 2 rows for 8 observations"):
        policy.act(obs, action_mask=only[:2])
    with pytest.raises(PolicylabError, match="action_mask has one row for 8 observations"):
        policy.act(obs, action_mask=only[0])
    with pytest.raises(PolicylabError, match=r"action_mask has shape \(3,\)") as exc:
        policy.act(obs, action_mask=np.ones((8, 3), bool))
    assert not isinstance(exc.value, EnvError), "the caller's argument is wrong, not the env"
    with pytest.warns(UserWarning, match=r"trained with action masks, and act\(\) got none"):
        policy.act(obs)
    with pytest.raises(PolicylabError, match="collect does not read action masks yet"):
        pl.collect(ENV, run.dir, episodes=1)
    with pytest.raises(PolicylabError, match="off-policy evaluation does not read action masks yet"):
        TargetPolicy(policy)


def test_action_mask_settings_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="sac does not take action masks") as exc:
        pl.train("sac", env="Pendulum-v1", steps=100, overrides={"action_masks": True}, runs_dir=tmp_path)
    assert "ppo" in exc.value.fix
    with pytest.raises(EnvError, match=r"continuous \(Box\) actions"):
        pl.train("ppo", env="Pendulum-v1", steps=100, overrides={"action_masks": True}, runs_dir=tmp_path)
    with pytest.raises(EnvError, match="gives no action masks"):
        pl.train("ppo", env="CartPole-v1", steps=100, overrides={"action_masks": True}, runs_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "a refused start leaves no run directory"
    sac = pl.train("sac", env="Pendulum-v1", steps=600, preset="none", runs_dir=tmp_path, verbose=False,
                   overrides={"learning_starts": 500, "eval_episodes": 1})  # fmt: skip
    with pytest.raises(PolicylabError, match="does not take action masks"):
        pl.load(sac.dir).act(np.zeros(3, np.float32), action_mask=np.ones(1, bool))
    for extra in ({"dataset": "datasets/x"}, {"rollout_workers": 2, "num_envs": 2}):
        with pytest.raises(ConfigError, match="dqn with action masks does not combine with"):
            pl.train("dqn", env=ENV, steps=100, overrides={"action_masks": True, **extra}, runs_dir=tmp_path)


def test_the_q_target_takes_the_max_over_the_allowed_actions_only():
    next_q_target = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 4.0]])
    next_q_online = torch.tensor([[0.0, 9.0, 1.0], [5.0, 0.0, 1.0]])
    allowed = torch.tensor([[True, False, True], [False, True, True]])
    rewards, discounts, terminated = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([False, False])
    plain = dqn_target(rewards, discounts, terminated, allowed_only(next_q_target, allowed))
    assert plain.tolist() == [1.0 + 0.5 * 2.0, 0.5 * 4.0]  # not 5 (action 1 forbidden) nor 3 (action 0)
    double = dqn_target(
        rewards, discounts, terminated, allowed_only(next_q_target, allowed), allowed_only(next_q_online, allowed)
    )
    assert double.tolist() == [1.0 + 0.5 * 2.0, 0.5 * 4.0]  # the online argmax among allowed: action 2 in both rows
    assert allowed_only(next_q_target, None) is next_q_target


@pytest.mark.parametrize("n_step", [1, 2])
def test_the_replay_keeps_the_allowed_actions_at_each_next_observation(n_step):
    """One env: a step, a truncation (its final observation: every action allowed, its mask there unknown), a step
    of the new episode; each transition's next_action_mask is the mask where its target bootstraps."""
    buffer = ReplayBuffer(16, 1, (1,), (), torch.long, n_step=n_step, mask_size=3)
    m = [np.array([[True, False, True]]), np.array([[False, True, False]]), np.array([[True, True, False]])]
    obs = [np.full((1, 1), float(i), np.float32) for i in range(4)]
    no, yes = np.array([False]), np.array([True])
    buffer.add(obs[0], np.array([0]), np.array([1.0]), obs[1], no, no, None, m[0], m[1])
    buffer.add(obs[1], np.array([1]), np.array([1.0]), obs[2], no, yes, obs[3], m[1], m[2])  # truncated; reset: m[2]
    buffer.add(obs[2], np.array([0]), np.array([1.0]), obs[3], no, no, None, m[2], m[0])
    batch = buffer.gather(torch.tensor([0, 1, 3]))  # slot 2 holds the final observation
    expected = [m[1][0] if n_step == 1 else [True] * 3, [True] * 3, m[0][0]]  # n = 2: step 0 bootstraps at the end
    assert batch.next_action_mask.tolist() == [list(map(bool, row)) for row in expected]


@pytest.mark.parametrize("algo", ["dqn", "qrdqn"])
def test_masked_q_learning_learns_what_it_cannot_learn_without_masks(tmp_path, algo):
    """The ranked task: acting, exploring and the target's max among the allowed actions; the strict env raises at
    a forbidden action. Without masks a forbidden action ends the episode."""
    settings = {"eval_episodes": 20, "learning_starts": 500, "exploration_fraction": 0.3, "lr": 1e-3, "train_freq": 1}
    settings.update(target_update_interval=500, eval_every=2000)
    _, evaluations = train_until(
        19.5, algo, env=ENV, steps=6000, seed=2, preset="none", runs_dir=tmp_path, name="masked",
        overrides={**settings, "action_masks": True, "env_kwargs": RANKED},
    )  # fmt: skip
    assert evaluations and evaluations[-1][1] >= 19.5, evaluations
    unmasked = pl.train(
        algo, env=ENV, steps=evaluations[-1][0], seed=2, preset="none", runs_dir=tmp_path, name="unmasked",
        verbose=False, overrides={**settings, "eval_every": 0, "env_kwargs": {**RANKED, "strict": False}},
    )  # fmt: skip
    assert unmasked.final_eval["return_mean"] < 5.0
    policy = pl.load(next(tmp_path.glob("masked*")))
    only = np.zeros((2, 8), bool)
    only[:, 3] = True
    assert policy.act(np.zeros((2, 8), np.float32), action_mask=only).tolist() == [3, 3]


def test_a_masked_dqn_run_resumes_exactly(tmp_path):
    """The env's current masks and the replay's (saved with the buffer) are part of the checkpoint."""
    resumed_and_full_runs(
        "dqn", stop=1000, env=ENV, steps=2000, seed=3, preset="none", runs_dir=tmp_path, verbose=False,
        overrides={"action_masks": True, "learning_starts": 300, "save_buffer": True, "checkpoint_every": 500,
                   "eval_every": 0, "eval_episodes": 2},
    )  # fmt: skip
