"""Config parsing: human step counts, typed --set overrides, YAML files, validation."""

from __future__ import annotations

import dataclasses

import pytest

from policylab.algos import A2CConfig, PPOConfig, SACConfig, TD3Config
from policylab.config import apply_values, dump_yaml, load_yaml, parse_count, parse_set_args
from policylab.errors import ConfigError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("100k", 100_000),
        ("100K", 100_000),
        ("1e6", 1_000_000),
        ("1.5M", 1_500_000),
        ("2_500", 2_500),
        ("1,000", 1_000),
        (" 7 ", 7),
        ("2g", 2_000_000_000),
        (100, 100),
        (1e5, 100_000),
    ],
)
def test_parse_count(text, expected):
    value = parse_count(text)
    assert value == expected and type(value) is int


@pytest.mark.parametrize("bad", ["abc", "", "1.5", "1e-3", "-5", "k", "10x", "0x10", True, 2.5, float("nan"), None])
def test_parse_count_rejects(bad):
    with pytest.raises(ValueError):
        parse_count(bad)


def test_apply_values_coerces_strings_to_field_types():
    cfg = apply_values(
        PPOConfig(),
        {
            "num_envs": "16",
            "steps": "1.5M",
            "lr": "3e-4",
            "normalize_obs": "true",
            "ortho_init": "false",
            "max_grad_norm": "none",
            "clip_eps_high": "0.28",
            "env_kwargs": "{max_episode_steps: 200}",
        },
        "--set",
    )
    assert cfg.num_envs == 16 and type(cfg.num_envs) is int
    assert cfg.steps == 1_500_000
    assert cfg.lr == 0.0003 and type(cfg.lr) is float
    assert cfg.normalize_obs is True
    assert cfg.ortho_init is False
    assert cfg.max_grad_norm is None
    assert cfg.clip_eps_high == 0.28
    assert cfg.env_kwargs == {"max_episode_steps": 200}
    # the original is untouched (apply_values returns a copy)
    assert PPOConfig().num_envs == 8


@pytest.mark.parametrize("text", ["[32,32]", "32,32", "[32, 32]"])
def test_apply_values_list_field(text):
    assert apply_values(PPOConfig(), {"hidden_sizes": text}, "--set").hidden_sizes == [32, 32]


def test_apply_values_accepts_yaml_native_values():
    cfg = apply_values(PPOConfig(), {"hidden_sizes": [16, 8], "gamma": 1, "anneal_lr": True, "dual_clip": None}, "x")
    assert cfg.hidden_sizes == [16, 8]
    assert cfg.gamma == 1.0 and type(cfg.gamma) is float
    assert cfg.anneal_lr is True
    assert cfg.dual_clip is None


@pytest.mark.parametrize("none", ["none", "None", "null", "~"])
def test_optional_fields_accept_none(none):
    cfg = apply_values(PPOConfig(target_kl=0.01), {"target_kl": none}, "--set")
    assert cfg.target_kl is None


def test_unknown_key_suggests_close_match_and_lists_keys():
    with pytest.raises(ConfigError) as info:
        apply_values(PPOConfig(), {"lrr": "0.1"}, "--set")
    err = info.value
    assert "'lrr'" in err.problem and "--set" in err.problem
    assert "Did you mean: lr" in err.problem
    assert "valid keys for PPOConfig" in err.fix
    for key in ("batch_size", "clip_eps", "gae_lambda", "num_envs"):
        assert key in err.fix


def test_an_option_of_other_algorithms_names_them():
    """A key this config lacks but other algorithms have: the error names those algorithms, not near-miss keys."""
    with pytest.raises(ConfigError) as info:
        apply_values(PPOConfig(), {"tau": "0.01"}, "--set")
    err = info.value
    assert "'tau' in --set is not an option of PPOConfig" in err.problem
    owners = err.problem.split("it is one of ")[1].split(", ")
    assert {"sac", "td3", "dqn", "iql"} <= set(owners) and "ppo" not in owners
    assert "drop tau" in err.fix


@pytest.mark.parametrize(
    ("cfg", "key", "takers", "refusers"),
    [
        (TD3Config(), "use_sde", {"sac", "tqc", "mdpo_sac", "ppo", "trpo"}, {"cql", "sac_n", "edac", "cal_ql"}),
        (PPOConfig(), "her", {"dqn", "qrdqn", "sac", "td3", "tqc"}, {"bc", "iql", "awac", "cql", "rebrac"}),
    ],
)
def test_an_option_of_other_algorithms_names_only_those_that_accept_the_value(cfg, key, takers, refusers):
    """The offline algorithms have use_sde and her (their configs extend the off-policy one) but refuse both:
    the hint lists the algorithms whose own validation accepts the value."""
    with pytest.raises(ConfigError) as info:
        apply_values(cfg, {key: "true"}, "--set")
    owners = set(info.value.problem.split("it is one of ")[1].split(", "))
    assert takers <= owners and not refusers & owners


def test_another_algorithms_config_file_is_named(tmp_path):
    """A run's config.yaml records its algorithm: given to another algorithm that lacks its keys, the error says
    whose file it is, instead of naming the first foreign key; the same algorithm's file applies as it is."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(PPOConfig(lr=1e-3), "ppo"))
    with pytest.raises(ConfigError) as info:
        apply_values(A2CConfig(), load_yaml(path), str(path))
    assert info.value.problem.startswith(f"{path} is a ppo config (algo: ppo), and a2c does not take its keys ")
    assert "batch_size" in info.value.problem
    assert info.value.fix.startswith(f"train ppo with it (policylab train ppo --config {path})")
    assert apply_values(PPOConfig(), load_yaml(path), str(path)).lr == 1e-3


def test_another_algorithm_given_as_an_override_is_an_error():
    """`--set algo=td3` on `train sac` was dropped without a word (the key exists only to name a file's algorithm);
    the same algorithm's name is harmless and passes."""
    from policylab.train import OVERRIDES

    with pytest.raises(ConfigError) as info:
        apply_values(A2CConfig(), {"algo": "ppo", "lr": 1e-3}, OVERRIDES)
    assert (
        info.value.problem == "--set (overrides) algo=ppo: the algorithm is not a config value, and this run trains a2c"
    )
    assert info.value.fix.startswith("train ppo itself (policylab train ppo ..., pl.train('ppo', ...))")
    assert apply_values(A2CConfig(), {"algo": "a2c", "lr": 1e-3}, OVERRIDES).lr == 1e-3


@pytest.mark.parametrize(
    ("algo", "values", "message"),
    [
        ("ppo", {"lr": "nan"}, "bad value for 'lr' in --set: 'nan' is not a number (NaN)"),
        ("sac", {"alpha": float("nan")}, "is not a number (NaN)"),
        ("ppo", {"dual_clip": 1.0}, "dual_clip=1.0 must be > 1"),
        ("dppo", {"denoiser_hidden_sizes": [0]}, "denoiser_hidden_sizes=[0] must be a list of positive layer widths"),
        ("fpo", {"denoiser_hidden_sizes": [-5]}, "denoiser_hidden_sizes=[-5] must be a list of positive"),
        ("dppo", {"clip_eps_rate": 1e12}, "clip_eps_rate=1000000000000.0 is outside [-100, 100]"),
        ("spot", {"vae_hidden_sizes": [0], "dataset": "d"}, "vae_hidden_sizes=[0] and vae_latent_dim=None must be"),
        ("spot", {"vae_latent_dim": -1, "dataset": "d"}, "vae_latent_dim=-1 must be positive widths"),
        ("prdc", {"dc_beta": "inf", "dataset": "d"}, "dc_beta=inf must be finite and > 0"),
        ("ppo", {"recurrent": True, "lstm_hidden": -1}, "lstm_hidden=-1 must be >= 1"),
        ("dqn", {"batch_size": 10**9}, "batch_size=1,000,000,000 is more than buffer_size=1,000,000 transitions"),
        ("dqn", {"eps_final": 1.5}, "eps_final=1.5 is outside [0, 1]"),
        ("sac", {"per_alpha": -0.5}, "per_alpha=-0.5 is outside [0, 1]"),
        ("ppo", {"clip_obs": 0}, "clip_obs=0.0 must be > 0"),
        ("a2c", {"optim_eps": -1}, "optim_eps=-1.0 must be > 0"),
    ],
)
def test_values_that_failed_deep_inside_a_run_are_config_errors(algo, values, message):
    """Found by trying edge values of every field: NaN reached runs as a divergence (lr, alpha, ...), dual_clip
    <= 1 as a ValueError from the objective, a zero or negative denoiser width as ZeroDivisionError / a torch
    error, a huge DPPO clip rate as OverflowError, PRDC's inf scales as scipy's ValueError, a negative LSTM size
    as torch's, a batch larger than the buffer as an allocation failure; probabilities outside [0, 1], clips of 0
    and a negative optimizer eps were accepted; each is now the config's error."""
    from policylab.algos import get_algo

    with pytest.raises(ConfigError) as info:
        apply_values(get_algo(algo).config_cls(), values, "--set").validate()
    assert message in info.value.problem


def test_device_is_checked_against_its_forms_and_this_torch(monkeypatch):
    import torch

    with pytest.raises(ConfigError) as info:
        PPOConfig(device="gpu").validate()
    assert info.value.problem == "device='gpu' is not a device: it takes cpu, cuda (cuda:N for GPU N), mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device={device} needs a CUDA GPU") as info:
            PPOConfig(device=device).validate()
        assert "overrides={'device': 'cpu'}" in str(info.value.fix) and "CUDA build of torch" in str(info.value.fix)
    with pytest.raises(ConfigError, match="device=mps needs Apple silicon") as info:
        SACConfig(device="mps").validate()
    assert "overrides={'device': 'cpu'}" in str(info.value.fix)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    PPOConfig(device="cuda:0").validate()
    with pytest.raises(ConfigError, match="names GPU 1, and this machine has 1"):
        PPOConfig(device="cuda:1").validate()
    PPOConfig(device="cpu").validate()


def test_a_bad_item_of_a_list_names_it_and_negative_whole_numbers_parse():
    with pytest.raises(ConfigError) as info:
        apply_values(PPOConfig(), {"hidden_sizes": "[64,x]"}, "--set")
    assert (
        info.value.problem
        == "bad value for 'hidden_sizes' in --set: item 2 of [64, 'x'], 'x', is not an integer layer width"
    )
    assert info.value.fix == "give whole layer widths, e.g. overrides={'hidden_sizes': [64, 64]}"
    assert apply_values(SACConfig(), {"gradient_steps": "-1"}, "--set").gradient_steps == -1  # its documented -1
    with pytest.raises(ConfigError) as info:
        apply_values(PPOConfig(), {"n_steps": "lots"}, "--set")
    assert info.value.fix == "n_steps expects a whole number (e.g. 100000, 100k, 1e6)"


def test_negative_steps_say_a_positive_count():
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config(get_algo("ppo"), env="CartPole-v1", steps="-5")
    assert (
        info.value.problem == "steps=-5 must be > 0" and info.value.fix == "give a positive count, e.g. steps=100_000"
    )
    with pytest.raises(ConfigError) as info:
        resolve_config(get_algo("ppo"), env="CartPole-v1", steps="many")
    assert info.value.fix == "give a positive count, e.g. steps=100_000 (or 100000, 1e6)"


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_envs", "abc"),
        ("num_envs", "2.5"),
        ("lr", "fast"),
        ("normalize_obs", "maybe"),
        ("hidden_sizes", "[32, x]"),
        ("max_grad_norm", "big"),
        ("gamma", True),
        ("env_kwargs", "[1, 2]"),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        apply_values(PPOConfig(), {key: value}, "config.yaml")
    assert f"'{key}'" in str(info.value)
    assert "config.yaml" in str(info.value)


def test_parse_set_args():
    assert parse_set_args(["lr=3e-4", " num_envs = 16 ", "env_kwargs={a: 1}", "note=a=b"]) == {
        "lr": "3e-4",
        "num_envs": "16",
        "env_kwargs": "{a: 1}",
        "note": "a=b",  # only the first '=' splits
    }


@pytest.mark.parametrize("bad", ["lr", "=3", " =3", ""])
def test_parse_set_args_errors(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args([bad])


def test_load_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: ppo\nlr: 0.001\nhidden_sizes: [32, 32]\n")
    assert load_yaml(path) == {"algo": "ppo", "lr": 0.001, "hidden_sizes": [32, 32]}  # algo: checked on apply
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_load_yaml_malformed_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    # the unclosed list on line 3 is detected at line 4
    path.write_text("lr: 0.1\nnum_envs: 4\nhidden_sizes: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert "bad.yaml" in msg and "not valid YAML" in msg
    assert "line 4" in msg


def test_load_yaml_tab_indent_reports_line(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("lr: 1\n\tseed: 2\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_yaml(path)


def test_load_yaml_list_is_not_a_config(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr: 0.1\n- seed: 2\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping"):
        load_yaml(path)


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = apply_values(PPOConfig(), {"lr": "1e-3", "hidden_sizes": "16,16", "clip_eps_high": "0.3"}, "--set")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg, "ppo"))
    assert apply_values(PPOConfig(), load_yaml(path), str(path)) == cfg


def test_validate_accepts_defaults_and_edges():
    PPOConfig().validate()
    PPOConfig(n_steps=4, num_envs=2, batch_size=8, gamma=1.0).validate()  # batch = whole rollout
    PPOConfig(gamma=0.0).validate()


def test_validate_rejects_batch_larger_than_rollout():
    with pytest.raises(ConfigError) as info:
        PPOConfig(n_steps=4, num_envs=2, batch_size=9).validate()
    assert "batch_size=9" in str(info.value) and "8" in str(info.value)


@pytest.mark.parametrize("gamma", [1.5, -0.1])
def test_validate_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ConfigError, match="gamma"):
        PPOConfig(gamma=gamma).validate()


def test_validate_rejects_unknown_activation():
    with pytest.raises(ConfigError) as info:
        PPOConfig(activation="gelu").validate()
    assert "gelu" in str(info.value) and "tanh" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"hidden_sizes": [64, 0]}, {"num_envs": 0}, {"vectorization": "fast"}])
def test_validate_rejects_other_bad_values(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        PPOConfig(**kwargs).validate()


def test_no_hidden_layers_is_a_linear_network():
    PPOConfig(hidden_sizes=[]).validate()  # linear heads (e.g. on a CNN's features, as SB3's Atari policies)
    import gymnasium as gym
    import torch

    from policylab.algos.onpolicy import build_actor_critic

    net = build_actor_critic(PPOConfig(hidden_sizes=[]), gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2), "ppo")
    assert len(net.body.weights) == 1 and net.body.weight(0).shape == (2, 3, 2)  # actor and critic: one layer each
    logits, values = net(torch.ones(4, 3))
    assert logits.shape == (4, 2) and values.shape == (4,)


def test_preset_rl_zoo_gives_rl_zoos_values_where_the_default_differs():
    from policylab.algos import get_algo
    from policylab.presets import PRESETS, VARIANTS
    from policylab.train import resolve_config

    for algo, table in VARIANTS["rl-zoo"].items():
        for env, zoo in table.items():
            cfg, notes = resolve_config(get_algo(algo), env=env, preset="rl-zoo")
            assert all(getattr(cfg, k) == v for k, v in zoo.values.items()) and "(rl-zoo)" in notes[0]
            default = PRESETS[algo][env].values
            assert any(zoo.values.get(k) != v for k, v in default.items()), "a variant must differ"
    zoo, _ = resolve_config(get_algo("dqn"), env="CartPole-v1", preset="rl-zoo")
    assert (zoo.lr, zoo.gradient_steps, zoo.target_update_interval, zoo.double_q, zoo.n_step) == (
        2.3e-3,
        128,
        10,
        False,
        1,
    )
    assert not zoo.anneal_lr
    sac, _ = resolve_config(get_algo("sac"), env="Pendulum-v1", preset="rl-zoo")  # the default is rl-zoo's
    assert sac.lr == 1e-3 and sac.steps == 20_000
    with pytest.raises(ConfigError, match="no reinforce rl-zoo preset for 'CartPole-v1'"):  # our own tuning
        resolve_config(get_algo("reinforce"), env="CartPole-v1", preset="rl-zoo")


def test_an_unknown_preset_lists_the_choices_with_a_near_miss():
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    with pytest.raises(ConfigError) as info:
        resolve_config(get_algo("ppo"), env="CartPole-v1", preset="nonee")
    assert info.value.problem == "no ppo preset for 'nonee'. Did you mean: none?"
    fix = str(info.value.fix)
    assert fix.startswith("preset takes auto (the env's tuned preset, if any), none, rl-zoo (its values), or an env")
    assert "CartPole-v1" in fix and "Pendulum-v1" in fix
    with pytest.raises(ConfigError) as info:
        resolve_config(get_algo("dqn"), env="Pendulum-v1", preset="rl-zoo")
    assert info.value.fix == (
        "the dqn rl-zoo presets are for Acrobot-v1, CartPole-v1, MountainCar-v0, Atari games; use preset='auto' or "
        "none on Pendulum-v1"
    )


def test_an_on_policy_budget_rounded_up_to_whole_rollouts_is_said():
    from policylab.algos import get_algo
    from policylab.train import resolve_config

    ppo = get_algo("ppo")
    _, notes = resolve_config(ppo, env="MountainCarContinuous-v0", steps="5k", preset="none")
    assert any("--steps 5,000 is rounded up to 16,384" in n and "2,048 x 8" in n for n in notes), notes
    _, exact = resolve_config(ppo, env="MountainCarContinuous-v0", steps=32_768, preset="none")
    _, close = resolve_config(ppo, env="CartPole-v1", steps="100k")  # the preset's 256-step rollouts: 100,096
    assert not any("rounded up" in n for n in exact + close)
    _, off_policy = resolve_config(get_algo("sac"), env="Pendulum-v1", steps=5_001, preset="none")
    assert not any("rounded up" in n for n in off_policy)


def test_an_off_policy_budget_is_whole_vector_steps_and_said_when_rounded_up():
    """num_envs envs step at once: a run of 4 envs asked for 1,001 steps takes 1,004, config.yaml says so, and a
    budget rounded up by more than 1% gets a note (the loop used to run past --steps silently)."""
    from policylab.algos import get_algo
    from policylab.train import _with_actual_steps, resolve_config, run_total

    sac = get_algo("sac")
    cfg, notes = resolve_config(sac, env="Pendulum-v1", steps=1_001, preset="none", overrides={"num_envs": 4})
    assert not any("rounded up" in n for n in notes)
    assert _with_actual_steps(sac, cfg).steps == run_total(sac, _with_actual_steps(sac, cfg)) == 1_004
    _, notes = resolve_config(sac, env="Pendulum-v1", steps=10, preset="none", overrides={"num_envs": 8})
    assert any(n.startswith("note: --steps 10 is rounded up to 16: sac collects 8 env steps at a time") for n in notes)


def test_every_preset_resolves_to_a_valid_config():
    """A preset is a user-facing claim: every one must name real fields with values its algorithm accepts."""
    from policylab.algos import get_algo
    from policylab.presets import ATARI, PRESETS
    from policylab.train import resolve_config

    for algo, table in PRESETS.items():
        for env, preset in table.items():
            cfg, notes = resolve_config(get_algo(algo), env="PongNoFrameskip-v4" if env == ATARI else env)
            assert all(getattr(cfg, k) == v for k, v in preset.values.items()), (algo, env)
            assert notes and "tuned" in notes[0], (algo, env)


def test_rl_zoo_presets_cite_rl_zoo_itself():
    """Every preset that says it is rl-baselines3-zoo's links rl-zoo's own file at a commit (td3/ddpg/tqc's
    MuJoCo and Pendulum values are rl-zoo's, checked against its hyperparams at 22e3ff24), not a fork's copy."""
    from policylab.presets import PRESETS, VARIANTS

    tables = [*PRESETS.values(), *(table for variant in VARIANTS.values() for table in variant.values())]
    sources = [preset.source for table in tables for preset in table.values()]
    zoo = [source for source in sources if source.startswith("rl-baselines3-zoo")]
    assert len(zoo) > 20 and all("https://github.com/DLR-RM/rl-baselines3-zoo/blob/" in source for source in zoo)
    assert PRESETS["td3"]["HalfCheetah-v5"].source.startswith("rl-baselines3-zoo hyperparams/td3.yml (https://")


def _field_default(cls: type, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_every_config_default_is_the_one_its_nearest_class_declares():
    """A config built from two (e.g. OfflineConfig and DQNConfig) takes each field's default from the last base that
    dataclasses read, not from the nearest class in the method order: OfflineConfig's copy of OffPolicyConfig's tau
    (0.005) silently replaced DQNConfig's 1.0 (hard target copies) in discrete CQL and BCQ. Every default must be
    the one the nearest class that declares the field gives it."""
    from policylab.algos import ALGORITHMS

    for spec in ALGORITHMS.values():
        cls = spec.config_cls
        for name in cls.__dataclass_fields__:
            owner = next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))
            assert _field_default(cls, name) == _field_default(owner, name), (spec.name, name, owner.__name__)
