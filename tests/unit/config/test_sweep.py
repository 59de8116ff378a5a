"""Sweeps (`-m`) expanded with Hydra's own grammar and BasicSweeper, and which earlier `orch run`
pipeline a new one may continue (`orch run --resume`): pure logic, no Ray."""

from __future__ import annotations

import pytest

from orchestrator.config.sweep import expand_sweep
from orchestrator.errors import ConfigError
from orchestrator.jobs.record import JobRecord
from orchestrator.jobs.retry import ABANDONED, blocked_dependents, config_difference, find_resumable
from orchestrator.jobs.state import JobState

S = JobState


def test_comma_lists_give_the_cartesian_product_in_hydras_order():
    assert expand_sweep(["trainer.lr=1e-3,3e-3", "model=gpt_tiny,gpt_small", "trainer.max_steps=5"]) == [
        ["trainer.lr=0.001", "model=gpt_tiny", "trainer.max_steps=5"],
        ["trainer.lr=0.001", "model=gpt_small", "trainer.max_steps=5"],
        ["trainer.lr=0.003", "model=gpt_tiny", "trainer.max_steps=5"],
        ["trainer.lr=0.003", "model=gpt_small", "trainer.max_steps=5"],
    ]


def test_range_choice_glob_and_one_list_value():
    combos = expand_sweep(["trainer.max_steps=range(10,30,10)", "model=glob(gpt_t*)", "trainer.seed=choice(1,2)",
                           "pipeline.jobs.pretrain.workers=[2,4]", "state_dir='a,b'"])
    assert combos == [[f"trainer.max_steps={n}", "model=gpt_tiny", f"trainer.seed={s}",
                       "pipeline.jobs.pretrain.workers=[2,4]", "state_dir='a,b'"] for n in (10, 20) for s in (1, 2)]
    assert expand_sweep([]) == [[]]  # no overrides: one pipeline of the defaults


def test_glob_sees_the_options_of_a_config_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "gpt_mine.yaml").write_text("name: gpt_mine\n")
    combos = expand_sweep(["model=glob([gpt_mi*,gpt_ti*])"], config_dirs=[str(tmp_path)])
    # (the folder itself is added to each combination when it is composed, like any --config-dir)
    assert combos == [["model=gpt_mine"], ["model=gpt_tiny"]]


@pytest.mark.parametrize("overrides, needles", [
    (["trainer.lr=range(1,1)"], ["trainer.lr=range(1,1)", "no values"]),
    (["model=glob(nothing*)"], ["glob(nothing*)", "no values"]),
    (["trainer.lr=interval(0,1)"], ["interval", "range(", "choice("]),
    (["trainer.lr=(1,"], ["trainer.lr=(1,"]),
    (["trainer.lr"], ["trainer.lr", "key=value"]),
])
def test_bad_sweep_syntax_is_one_config_error(overrides, needles):
    with pytest.raises(ConfigError) as e:
        expand_sweep(overrides)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


# --------------------------------------------------------------------- which pipeline --resume continues
_seq = iter(range(1, 10**6))


def _job(pid: str, name: str, state: S, config: dict, reason: str | None = None, checkpoint=None) -> JobRecord:
    return JobRecord(id=f"{pid}-{name}", pipeline_id=pid, name=name, kind="pretrain", state=state, priority=0,
                     depends_on=[], config=config, created_at=0, seq=next(_seq), failure_reason=reason,
                     checkpoint=checkpoint)


CFG = {"pre": {"trainer": {"lr": 0.001, "max_steps": 10}, "workers": 2}, "ft": {"trainer": {"lr": 0.001}}}


def _pipeline(pid, pre_state, ft_state, cfg=CFG, ft_reason=ABANDONED):
    return [_job(pid, "pre", pre_state, cfg["pre"]),
            _job(pid, "ft", ft_state, cfg["ft"], ft_reason if ft_state is S.CANCELLED else None,
                 "s3://b/runs/x/checkpoints/step-4")]


def test_an_interrupted_pipeline_with_the_same_configs_is_found():
    records = _pipeline("p1", S.SUCCEEDED, S.CANCELLED)
    res, _ = find_resumable(records, CFG, {"p1": False})
    assert res.pipeline_id == "p1" and res.interrupted
    assert res.describe() == "pre finished, ft continues from step-4"


def test_other_settings_finished_or_driven_pipelines_are_not_continued():
    other = {**CFG, "pre": {"trainer": {"lr": 0.003, "max_steps": 10}, "workers": 2}}
    res, why = find_resumable(_pipeline("p1", S.SUCCEEDED, S.CANCELLED), other, {"p1": False})
    assert res is None and why == "the unfinished pipeline p1 was run with other settings (trainer.lr: 0.001 then, " \
                                  "0.003 now)"
    # the newest one with these configs finished: nothing to continue (an older interrupted one is history)
    records = _pipeline("p1", S.SUCCEEDED, S.CANCELLED) + _pipeline("p2", S.SUCCEEDED, S.SUCCEEDED)
    assert find_resumable(records, CFG, {"p1": False, "p2": False})[1] == \
        "pipeline p2, the last one run with this configuration, finished"
    # a live `orch run` drives it
    assert "another `orch run`" in find_resumable(_pipeline("p3", S.RUNNING, S.PENDING), CFG, {"p3": True})[1]
    # not an `orch run` pipeline (a controller's: no lock file)
    assert find_resumable(_pipeline("p4", S.SUCCEEDED, S.CANCELLED), CFG, {})[0] is None


def test_a_vanished_driver_or_a_failure_is_resumable_but_only_an_interruption_is_offered():
    orphan, _ = find_resumable(_pipeline("p1", S.RUNNING, S.PENDING), CFG, {"p1": False})  # a reboot
    assert orphan.pipeline_id == "p1" and orphan.interrupted
    failed, _ = find_resumable(_pipeline("p2", S.SUCCEEDED, S.FAILED), CFG, {"p2": False})
    assert failed.pipeline_id == "p2" and not failed.interrupted  # --resume continues it; no prompt offers it
    cancelled, _ = find_resumable(_pipeline("p3", S.SUCCEEDED, S.CANCELLED, ft_reason="cancelled by the user"),
                                  CFG, {"p3": False})
    assert not cancelled.interrupted


def test_config_difference_names_the_first_differing_key():
    assert config_difference({"a": {"b": 1, "c": [1]}}, {"a": {"b": 1, "c": [1]}}) is None
    assert config_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b: 1 then, 2 now"
    assert config_difference({"a": 1}, {"a": 1, "z": "x"}) == 'z: unset then, "x" now'


def test_blocked_dependents_are_found_through_other_blocked_jobs():
    jobs = [_job("p", "a", S.FAILED, {}), _job("p", "b", S.BLOCKED, {}), _job("p", "c", S.BLOCKED, {}),
            _job("p", "d", S.BLOCKED, {}), _job("p", "e", S.PENDING, {})]
    jobs[1].depends_on, jobs[2].depends_on, jobs[3].depends_on, jobs[4].depends_on = \
        ["p-a"], ["p-b"], ["p-x"], ["p-a"]
    assert blocked_dependents("p-a", jobs) == ["p-b", "p-c"]
