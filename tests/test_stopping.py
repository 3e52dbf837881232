"""Stopping rules: `stop_return` and `stop_patience` end a run at a periodic evaluation as a finished run (final
evaluation, best/, summary), across --resume too; their settings' errors."""

from __future__ import annotations

import json

import pytest

import policylab as pl
from policylab.checkpoint import load_checkpoint
from policylab.errors import ConfigError
from policylab.logging import read_csv
from tests.helpers import assert_same_params, params_of
from tests.test_best import ScriptedEvals, _train

# tests.test_best's SMALL run: periodic evaluations at 32, 64, 96, 128 and the final one at 160


def _summary(run: pl.Run) -> dict:
    return json.loads((run.dir / "eval.json").read_text())


def test_stop_return_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, monkeypatch, capsys):
    evals = ScriptedEvals(monkeypatch, [1.0, 4.9, 5.0, 6.5])  # 32, 64, 96 (reaches 5) | the final evaluation
    run = _train(tmp_path, overrides={"stop_return": 5.0}, verbose=True, progress=False)
    assert run.steps == 96 and not run.interrupted and not evals.returns
    assert run.stopped == "stop_return=5 reached, evaluation return 5.0 at step 96"
    assert run.final_eval is not None and run.final_eval["return_mean"] == 6.5
    assert [r["step"] for r in read_csv(run.dir / "eval.csv")] == [32, 64, 96, 96]  # the final one at the stop
    summary = _summary(run)
    assert summary["steps"] == 96 and summary["stopped"] == run.stopped
    assert run.best == {"step": 96, "return_mean": 6.5, "dir": "best"} == summary["best"]
    _, state, where = load_checkpoint(run.dir)
    assert state["step"] == 96 and state["stopped"] == run.stopped and where.name.endswith("96")
    out = capsys.readouterr().out
    assert f"ended early at step 96 of 160: {run.stopped}" in out and "done: 96 steps" in out

    again = pl.train("ppo", resume=run.dir, verbose=False)  # complete: no training, no evaluation (none scripted)
    assert again.steps == 96 and again.stopped == run.stopped and again.final_eval == run.final_eval
    assert "it ended early at step 96" in again.notes[0] and "start a new run" in again.notes[0]
    longer = pl.train("ppo", resume=run.dir, steps=320, verbose=False)  # a larger budget does not undo the rule
    assert longer.steps == 96 and not evals.returns


def test_stop_patience_counts_evaluations_without_a_new_best(tmp_path, monkeypatch):
    # 32: 1 (best), 64: 5 (best), 96: 4 (1 without), 128: 5 (a tie is no new best: 2) -> stops at 128
    evals = ScriptedEvals(monkeypatch, [1.0, 5.0, 4.0, 5.0, 3.0])
    run = _train(tmp_path, overrides={"stop_patience": 2})
    assert run.steps == 128 and not run.interrupted and not evals.returns
    assert run.stopped == "stop_patience=2: 2 evaluations in a row without a new best (the best: 5.0 at step 64)"
    assert run.best == {"step": 64, "return_mean": 5.0, "dir": "best"}
    assert_same_params(params_of(run.dir / "best"), evals.params[1])


def test_a_new_best_restarts_the_patience(tmp_path, monkeypatch):
    evals = ScriptedEvals(monkeypatch, [1.0, 0.5, 2.0, 1.5, 1.0])  # 64: 1 without, 96: best again, 128: 1 without
    run = _train(tmp_path, overrides={"stop_patience": 2})
    assert run.steps == 160 and run.stopped is None and not evals.returns
    assert "stopped" not in _summary(run)


def test_an_interrupted_run_resumes_with_its_count_and_stops_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    returns = [1.0, 5.0, 4.0, 3.0, 9.0]  # stops at 128 (96 and 128 without a new best), then the final evaluation
    ScriptedEvals(monkeypatch, returns)
    whole = _train(tmp_path, name="whole", overrides={"stop_patience": 2})
    evals = ScriptedEvals(monkeypatch, returns)
    part = _train(tmp_path, name="part", overrides={"stop_patience": 2}, callback=lambda info: info.step < 96)
    assert part.interrupted and part.stopped is None and part.steps == 96  # one evaluation without a new best
    resumed = pl.train("ppo", resume=part.dir, verbose=False)
    assert resumed.steps == whole.steps == 128 and not evals.returns
    assert resumed.stopped == whole.stopped and resumed.final_eval == whole.final_eval
    assert_same_params(params_of(resumed.dir), params_of(whole.dir))


def test_a_stop_whose_summary_was_not_written_is_finished_by_resume_without_training(tmp_path, monkeypatch):
    """A crash between the stop's checkpoint and the summary: --resume writes the final evaluation, at the same
    step."""
    ScriptedEvals(monkeypatch, [6.0, 7.0])
    run = _train(tmp_path, overrides={"stop_return": 5.0})
    assert run.steps == 32
    (run.dir / "eval.json").unlink()
    evals = ScriptedEvals(monkeypatch, [8.0])  # the final evaluation alone
    resumed = pl.train("ppo", resume=run.dir, verbose=False)
    assert resumed.steps == 32 and resumed.stopped == run.stopped and not evals.returns
    assert resumed.final_eval is not None and resumed.final_eval["return_mean"] == 8.0
    assert _summary(resumed)["stopped"] == run.stopped


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"stop_return": 100.0, "eval_every": 0}, "stop_return acts at the periodic evaluations"),
        ({"stop_patience": 3, "eval_every": 0}, "stop_patience acts at the periodic evaluations"),
        ({"stop_patience": -1}, "stop_patience=-1 must be >= 0"),
    ],
)
def test_stopping_settings_that_cannot_act_are_errors(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        _train(tmp_path, overrides=overrides)
