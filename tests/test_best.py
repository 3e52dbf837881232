"""The best evaluated policy: best/ round trip, its atomic write, --resume keeping the best so far, eval --best."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import policylab as pl
from policylab import checkpoint
from policylab.checkpoint import load_checkpoint
from policylab.cli import main
from policylab.errors import CheckpointError, PolicylabError
from policylab.logging import read_csv
from tests.helpers import assert_same_params, params_of
from tests.test_offpolicy import TINY

train_module = importlib.import_module("policylab.train")  # `policylab.train` is also the function

# 32 env steps per iteration; with steps=160 and eval_every=32: evaluations at 32, 64, 96, 128, final at 160
SMALL = {"n_steps": 16, "num_envs": 2, "batch_size": 32, "epochs": 1, "eval_every": 32, "eval_episodes": 2}


def _train(tmp_path: Path, steps: int = 160, name: str = "run", **kwargs: Any) -> pl.Run:
    overrides = {**SMALL, **kwargs.pop("overrides", {})}
    kwargs.setdefault("verbose", False)
    return pl.train(
        "ppo",
        env="CartPole-v1",
        steps=steps,
        seed=0,
        overrides=overrides,
        preset="none",
        runs_dir=tmp_path,
        name=name,
        **kwargs,
    )


class ScriptedEvals:
    """Replaces the training loop's evaluations: each returns the next scripted mean return (no env is
    run) and records the parameters and observation statistics of the policy it was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, returns: list[float]) -> None:
        self.returns = list(returns)
        self.params: list[dict[str, torch.Tensor]] = []
        self.obs_stats: list[dict[str, np.ndarray] | None] = []
        monkeypatch.setattr(train_module, "evaluate", self)

    def __call__(self, policy: pl.Policy, episodes: int, seed: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.params.append({k: v.clone() for k, v in policy.net.state_dict().items()})
        norm = policy.obs_normalizer
        self.obs_stats.append(None if norm is None else {k: np.array(v) for k, v in norm.rms.state().items()})
        r = self.returns.pop(0)
        return {
            "episodes": episodes,
            "return_mean": r,
            "return_std": 0.5,
            "return_min": r,
            "return_max": r,
            "length_mean": 10.0,
            "returns": [r] * episodes,
        }


def _params(policy: pl.Policy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy.net.state_dict().items()}


def _summary_best(run_dir: Path) -> dict[str, Any] | None:
    return json.loads((run_dir / "eval.json").read_text())["best"]


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(".*"))


# --- round trip ----------------------------------------------------------------------------------


def test_best_policy_round_trip_is_the_policy_evaluated_best(tmp_path, monkeypatch):
    evals = ScriptedEvals(monkeypatch, [1.0, 5.0, 3.0, 5.0, 4.0])  # ties do not replace: the first 5.0 stays
    run = _train(tmp_path, overrides={"normalize_obs": True})
    assert [r["step"] for r in read_csv(run.dir / "eval.csv")] == [32, 64, 96, 128, 160]
    assert run.best == {"step": 64, "return_mean": 5.0, "dir": "best"} == _summary_best(run.dir)

    tensors, state, where = load_checkpoint(run.dir / "best")
    assert where == run.dir / "best" and state["step"] == 64 and state["algo"] == "ppo"
    assert state["eval"] == {"return_mean": 5.0, "return_std": 0.5, "episodes": 2}
    assert {k.split("/")[0] for k in tensors} == {"policy", "obs_norm"}  # a policy, no optimizer or env state

    best = pl.load(run.dir, which="best")
    assert_same_params(evals.params[1], _params(best))
    assert_same_params(evals.params[1], params_of(run.dir / "best"))  # the best/ directory itself loads too
    assert best.obs_normalizer is not None and evals.obs_stats[1] is not None
    for key, value in evals.obs_stats[1].items():
        np.testing.assert_array_equal(np.asarray(getattr(best.obs_normalizer.rms, key)), value)

    # The default stays the final policy (the latest checkpoint), as does which="final".
    assert_same_params(evals.params[4], params_of(run.dir))
    assert_same_params(evals.params[4], _params(pl.load(run.dir, which="final")))
    assert any(not torch.equal(evals.params[1][k], evals.params[4][k]) for k in evals.params[1])
    assert _hidden(run.dir) == []


def test_the_final_evaluation_competes_and_the_summary_names_it(tmp_path, monkeypatch, capsys):
    evals = ScriptedEvals(monkeypatch, [1.0, 2.0, 3.0, 2.0, 9.0])
    run = _train(tmp_path, verbose=True, progress=False)
    assert run.best == {"step": 160, "return_mean": 9.0, "dir": "best"} == _summary_best(run.dir)
    assert_same_params(params_of(run.dir / "best"), evals.params[4])
    assert_same_params(params_of(run.dir / "best"), params_of(run.dir))
    out = capsys.readouterr().out
    assert "best policy: step 160 (the final policy), evaluation return 9.0" in out
    assert f"saved in {run.dir / 'best'}" in out


def test_without_periodic_evaluations_best_is_the_final_policy(tmp_path):
    run = _train(tmp_path, steps=64, overrides={"eval_every": 0})
    assert run.best is not None and run.best["step"] == 64
    assert run.best["return_mean"] == run.final_eval["return_mean"]
    assert_same_params(params_of(run.dir / "best"), params_of(run.dir))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> pl.Run:
    """Real evaluations (no scripting): 8 of them, the last one final."""
    return _train(tmp_path_factory.mktemp("runs"), steps=512, overrides={"eval_every": 64})


def test_best_is_the_maximum_of_the_real_evaluations(real_run):
    rows = read_csv(real_run.dir / "eval.csv")
    assert len(rows) == 8
    top = max(r["return_mean"] for r in rows)
    first_top = next(r for r in rows if r["return_mean"] == top)
    _, state, _ = load_checkpoint(real_run.dir / "best")
    assert state["step"] == first_top["step"] == real_run.best["step"]
    assert state["eval"]["return_mean"] == pytest.approx(top, rel=1e-5)  # eval.csv keeps 6 significant digits
    assert _summary_best(real_run.dir) == real_run.best


# --- atomic write --------------------------------------------------------------------------------


def test_a_failed_write_of_best_leaves_the_previous_one(tmp_path, monkeypatch):
    evals = ScriptedEvals(monkeypatch, [1.0, 2.0, 3.0, 4.0, 5.0])
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        if Path(filename).parent.name.startswith(".tmp-best"):
            calls.append(filename)
            if len(calls) == 2:  # the second improvement: half a file, then the disk is full
                real_save(tensors, filename)
                Path(filename).write_bytes(Path(filename).read_bytes()[:100])
                raise OSError(28, "No space left on device")
        real_save(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _train(tmp_path, name="full")
    run_dir = tmp_path / "full"
    _, state, _ = load_checkpoint(run_dir / "best")
    assert state["step"] == 32 and state["eval"]["return_mean"] == 1.0
    assert_same_params(_params(pl.load(run_dir, which="best")), evals.params[0])
    assert _hidden(run_dir) == [], "no temporary directory is left behind"


def test_a_failed_rename_puts_the_previous_best_back(tmp_path, monkeypatch):
    best = tmp_path / "best"
    checkpoint.write_checkpoint_dir(best, {"policy/w": torch.ones(3)}, {"step": 1})
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-best"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        checkpoint.write_checkpoint_dir(best, {"policy/w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, state, _ = load_checkpoint(best)
    assert state["step"] == 1 and torch.equal(tensors["policy/w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    checkpoint.write_checkpoint_dir(best, {"policy/w": torch.zeros(3)}, {"step": 2})  # replacing works
    tensors, state, _ = load_checkpoint(best)
    assert state["step"] == 2 and torch.equal(tensors["policy/w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# --- resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("after", "best_step"), [([6.0, 5.0], 64), ([8.0, 5.0], 128)])
def test_resume_keeps_the_best_so_far(tmp_path, monkeypatch, after, best_step):
    evals = ScriptedEvals(monkeypatch, [1.0, 7.0, 3.0, *after])  # 32, 64, 96 | resumed: 128, final 160
    part = _train(tmp_path, callback=lambda info: info.step < 96)
    assert part.interrupted and part.steps == 96
    assert part.best == {"step": 64, "return_mean": 7.0, "dir": "best"}
    _, state, _ = load_checkpoint(part.dir)
    assert state["best"] == {"step": 64, "return_mean": 7.0}
    weights = (part.dir / "best" / "weights.safetensors").read_bytes()

    resumed = pl.train("ppo", resume=part.dir, verbose=False)
    assert resumed.steps == 160 and not evals.returns
    rows = read_csv(part.dir / "eval.csv")
    assert [r["step"] for r in rows] == [32, 64, 96, 128, 160]
    top = max(rows, key=lambda r: r["return_mean"])
    assert top["step"] == best_step
    expected = {"step": best_step, "return_mean": top["return_mean"], "dir": "best"}
    assert resumed.best == expected == _summary_best(part.dir)
    _, best_state, _ = load_checkpoint(part.dir / "best")
    assert best_state["step"] == best_step
    assert_same_params(params_of(part.dir / "best"), evals.params[1 if best_step == 64 else 3])
    if best_step == 64:  # worse evaluations after the resume do not touch best/
        assert (part.dir / "best" / "weights.safetensors").read_bytes() == weights


def test_continuing_a_finished_run_keeps_its_final_policy_as_the_best(tmp_path, monkeypatch):
    # The final evaluation comes after the last checkpoint was written: best/ itself says what it holds.
    ScriptedEvals(monkeypatch, [1.0, 2.0, 3.0, 4.0, 9.0, 5.0, 6.0])  # ... final 160 | 192, final 224
    run = _train(tmp_path)
    assert run.best is not None and run.best["step"] == 160
    more = pl.train("ppo", resume=run.dir, steps=224, verbose=False)
    assert more.steps == 224 and more.best == {"step": 160, "return_mean": 9.0, "dir": "best"}


def test_resume_with_best_missing_writes_a_new_one(tmp_path, monkeypatch):
    ScriptedEvals(monkeypatch, [1.0, 7.0, 3.0, 2.0, 1.0])
    part = _train(tmp_path, callback=lambda info: info.step < 96)
    checkpoint.shutil.rmtree(part.dir / "best")
    resumed = pl.train("ppo", resume=part.dir, verbose=False)
    assert any("best/ (step 64) cannot be read" in note for note in resumed.notes)
    assert resumed.best == {"step": 128, "return_mean": 2.0, "dir": "best"}
    assert load_checkpoint(part.dir / "best")[1]["step"] == 128


# --- loading and the command line ----------------------------------------------------------------


def test_eval_of_a_corrupt_final_checkpoint_suggests_the_best_policy(capsys, tmp_path):
    run = _train(tmp_path, steps=64, overrides={"eval_every": 32})
    weights = checkpoint.find_checkpoint(run.dir) / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run.dir), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt or truncated" in err and err.count("fix:") == 1
    assert f"fix: load the run's best evaluated policy instead (policylab eval {run.dir} --best" in err
    assert main(["eval", str(run.dir), "--best", "--episodes", "1"]) == 0  # and that works
    checkpoint.shutil.rmtree(run.dir / "best")  # without a best/, the fix is the older checkpoint's alone
    with pytest.raises(CheckpointError) as info:
        pl.load(run.dir)
    assert "--best" not in str(info.value) and "use an older checkpoint" in str(info.value)


def test_eval_best_command(capsys, real_run):
    assert main(["eval", str(real_run.dir), "--best", "--episodes", "2"]) == 0
    assert "over 2 episodes" in capsys.readouterr().out
    assert main(["eval", str(real_run.dir / "best"), "--episodes", "2"]) == 0  # a best/ directory is a checkpoint


def test_eval_deterministic_off_samples_in_training_and_in_the_eval_command(monkeypatch, tmp_path):
    """eval_deterministic=false (rl-zoo's Atari evaluations, set by the Atari presets): every
    evaluation of the run samples actions, the loaded policy knows it, and `policylab eval` follows the run
    unless told --deterministic."""
    modes: list[bool] = []

    def scripted(*args: Any, deterministic: bool = True, **kwargs: Any) -> dict[str, Any]:
        modes.append(deterministic)
        return {"episodes": 1, "return_mean": 1.0, "return_std": 0.0, "length_mean": 1.0}

    monkeypatch.setattr(train_module, "evaluate", scripted)
    run = _train(tmp_path, steps=96, overrides={"eval_deterministic": False})
    assert modes == [False, False, False]  # at 32 and 64, and the final one at 96
    assert pl.load(run.dir).eval_deterministic is False
    assert pl.load(_train(tmp_path, steps=32, name="default").dir).eval_deterministic is True
    asked: list[bool] = []
    real = pl.policy.evaluate

    def recorded(*args: Any, **kwargs: Any) -> dict[str, Any]:
        asked.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pl.policy, "evaluate", recorded)
    for flags in ([], ["--deterministic"], ["--stochastic"]):
        assert main(["eval", str(run.dir), "--episodes", "1", *flags]) == 0
    assert asked == [False, True, False]


def test_missing_best_is_a_clear_error(capsys, tmp_path):
    run = _train(tmp_path, overrides={"eval_every": 0}, callback=lambda info: False)
    assert run.interrupted and run.best is None and not (run.dir / "best").exists()
    assert main(["eval", str(run.dir), "--best"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no best/ policy" in err and "fix: load the final policy" in err
    assert "Traceback" not in err
    assert main(["eval", str(run.dir), "--episodes", "1"]) == 0  # the final policy is there


def test_which_is_validated_and_best_is_not_resumable(real_run):
    with pytest.raises(PolicylabError, match="which='last' is not a policy of a run"):
        pl.load(real_run.dir, which="last")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="holds only a policy"):
        pl.train("ppo", resume=real_run.dir / "best", verbose=False)


def test_off_policy_runs_keep_the_best_too(tmp_path):
    overrides = {**TINY, "eval_every": 100}
    run = pl.train(
        "dqn",
        env="CartPole-v1",
        steps=400,
        seed=0,
        overrides=overrides,
        preset="none",
        runs_dir=tmp_path,
        verbose=False,
    )
    rows = read_csv(run.dir / "eval.csv")
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert run.best is not None and run.best["step"] == next(
        r["step"] for r in rows if r["return_mean"] == max(q["return_mean"] for q in rows)
    )
    tensors, state, _ = load_checkpoint(run.dir / "best")
    assert state["algo"] == "dqn" and all(k.startswith("policy/") for k in tensors)
    policy = pl.load(run.dir, which="best")
    assert isinstance(policy.act(np.zeros(4, np.float32)), int)
