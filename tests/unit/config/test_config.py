"""Unit tests of config composition (orchestrator/config/compose.py, schema.py, typed.py) on the
REAL conf/ folder: every option of every group composes, overrides land where they should, and
every bad input is one ConfigError line that names the key, the value or the choices."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.config import schema
from orchestrator.config.compose import (
    compose_root,
    conf_dir,
    group_options,
    job_config_from_dict,
    resolve_jobs,
    with_config_dirs,
)
from orchestrator.config.typed import build, to_dict
from orchestrator.constants import CONF_DIR_ENV, STATE_DIR_ENV
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
CONF = (REPO / "conf").resolve()
# The reliability recorder's fields (tests/reliability.py) for the bad inputs checked here
IN_PROCESS = dict(category="config (in-process)", lost="nothing",
                  happened="one ConfigError line naming the key, the value and the fix (compose, in-process)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """The real conf/, a state folder relative to a scratch cwd, no S3 bucket from the env."""
    monkeypatch.delenv(CONF_DIR_ENV, raising=False)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    monkeypatch.delenv("ORCH_S3_BUCKET", raising=False)
    monkeypatch.chdir(tmp_path)


def compose(*overrides: str):
    root = compose_root(list(overrides))
    return root, {j.name: j for j in resolve_jobs(root)}


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        compose(*overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"multi-line error: {msg!r}"
    return msg


def _group_options() -> list[tuple[str, str]]:
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir())
    return [(g, p.stem) for g in groups for p in sorted((CONF / g).glob("*.yaml"))]


# Options only valid in combination: on their own they must fail with this exact reason.
ONLY_IN_COMBINATION = {
    ("data", "qa"): "job 'pretrain': a pretrain job needs a text dataset, got data 'qa' of kind 'sft'",
    ("pipeline", "finetune"): "job 'finetune': a finetune job needs weights: depends_on a job that trains them "
                              "(or `orch submit --after JOB_ID`), or init_from=MODEL",
    ("pipeline", "pretrain_curve"): "job 'finetune': pretrain@every:100 needs a checkpoint of pretrain at each "
                                    "multiple of 100, but pretrain commits only its final one "
                                    "(checkpoint.interval=0); set checkpoint.interval=100 or a divisor of it",
}
# Settings that complete an option that is only valid in combination.
COMPLETIONS = {("pipeline", "finetune"): ("pipeline.jobs.finetune.init_from=/models/hf-gpt",),
               ("pipeline", "pretrain_curve"): ("checkpoint.interval=100",)}


def _scalars(path: Path) -> dict:
    """A group option's literal scalar settings (no interpolations, no nested blocks, no defaults)."""
    raw = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in raw.items()
            if k != "defaults" and not isinstance(v, (dict, list)) and not (isinstance(v, str) and "${" in v)}


# ------------------------------------------------------------------------------ every option
def test_conf_folder_is_the_real_one():
    """The built-in groups are conf/ at the repository's top, the package's own through its link
    (they ship in the wheel: tests/integration/test_wheel.py)."""
    import orchestrator.conf

    assert conf_dir() == CONF == Path(orchestrator.conf.__file__).resolve().parent == (REPO / "conf").resolve()
    assert (REPO / "orchestrator" / "conf").is_symlink() and (REPO / "conf").is_dir()
    assert len(_group_options()) >= 20
    assert group_options("model") == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("group,option", _group_options(), ids=lambda x: x)
def test_every_option_of_every_group_composes(group, option):
    if (group, option) in ONLY_IN_COMBINATION:
        assert config_error(f"{group}={option}") == ONLY_IN_COMBINATION[(group, option)]
        if (group, option) not in COMPLETIONS:
            return
    root, jobs = compose(f"{group}={option}", *COMPLETIONS.get((group, option), ()))
    assert jobs, "no jobs resolved"
    # The option really was selected: its literal settings are the typed values.
    typed = getattr(root, group)
    for key, value in _scalars(CONF / group / f"{option}.yaml").items():
        assert getattr(typed, key) == value, f"{group}={option}: {key}"
    for job in jobs.values():
        assert job.model == root.model and job.deepspeed == root.deepspeed and job.cluster == root.cluster


def test_an_eval_job_needs_weights_and_metrics_orch_computes():
    assert config_error("pipeline=pretrain", "pipeline.jobs.pretrain.kind=eval") == (
        "job 'pretrain': an eval job needs weights: depends_on a job that trains them (or `orch submit --after "
        "JOB_ID`), or init_from=MODEL")
    msg = config_error("trainer.eval_metrics=[loss,bleu]")
    assert "eval_metrics names 'bleu'" in msg and "choose from loss, qa_exact_match" in msg
    _, jobs = compose("pipeline=pretrain", "pipeline.jobs.pretrain.kind=eval", "pipeline.jobs.pretrain.init_from=/m",
                      "trainer.eval_metrics=[loss]")
    assert jobs["pretrain"].kind == "eval" and jobs["pretrain"].trainer.eval_metrics == ("loss",)


def test_sft_data_composes_in_the_finetune_job():
    """qa is valid where it belongs: as the finetune job's data (the pipeline's default)."""
    _, jobs = compose("pipeline=pretrain_finetune", "data=stories")
    assert jobs["finetune"].data.name == "qa" and jobs["finetune"].data.kind == "sft"


def test_finetune_pipeline_uses_the_models_tokenizer():
    """pipeline=finetune starts from a model folder and tokenizes its data with that folder's tokenizer."""
    _, jobs = compose("pipeline=finetune", "pipeline.jobs.finetune.init_from=/models/hf-gpt")
    job = jobs["finetune"]
    assert job.init_from == "file:///models/hf-gpt"
    assert job.data.tokenizer_uri == "file:///models/hf-gpt"
    assert job.depends_on == ()


def test_zero3_offload_extends_zero3():
    root, _ = compose("deepspeed=zero3_offload")
    assert root.deepspeed.stage == 3
    assert (root.deepspeed.offload_optimizer, root.deepspeed.offload_param) == ("cpu", "cpu")


# ------------------------------------------------------------------------------ typed values
def test_overrides_give_typed_values():
    root, jobs = compose("model=gpt_tiny", "trainer.max_steps=40", "deepspeed=zero3")
    assert root.model.name == "gpt_tiny"
    assert (root.model.n_layer, root.model.n_head, root.model.n_embd, root.model.block_size) == (2, 2, 64, 64)
    assert root.trainer.max_steps == 40 and type(root.trainer.max_steps) is int
    assert root.deepspeed.stage == 3
    assert isinstance(root.trainer.lr, float)
    assert isinstance(root.cluster.cpus_per_worker, float)  # int in YAML, float in the schema
    assert isinstance(root.pipeline.jobs["finetune"].depends_on, tuple)
    assert jobs["pretrain"].trainer.max_steps == 40
    assert jobs["pretrain"].model == root.model
    assert jobs["pretrain"].deepspeed.stage == 3
    # data.vocab_size follows model.vocab_size through the interpolation.
    assert jobs["pretrain"].data.vocab_size == root.model.vocab_size


def test_per_job_trainer_override_applies_to_that_job_only():
    root, jobs = compose("pipeline.jobs.finetune.trainer.max_steps=7")
    assert jobs["finetune"].trainer.max_steps == 7
    assert jobs["pretrain"].trainer.max_steps == root.trainer.max_steps == 400


def test_per_job_trainer_keys_win_and_the_rest_is_inherited():
    root, jobs = compose("trainer.max_steps=40", "trainer.micro_batch_size=2", "trainer.seed=7")
    ft = jobs["finetune"].trainer
    assert ft.max_steps == 80  # the pipeline's finetune value beats the top-level one
    assert ft.lr == 5.0e-4 and ft.weight_decay == 0.0
    assert ft.micro_batch_size == 2 and ft.seed == 7  # not set per job: inherited
    assert jobs["pretrain"].trainer.lr == root.trainer.lr == 3.0e-3


def test_new_per_job_trainer_key_needs_plus_and_is_validated():
    _, jobs = compose("+pipeline.jobs.pretrain.trainer.max_steps=9")
    assert jobs["pretrain"].trainer.max_steps == 9 and jobs["finetune"].trainer.max_steps == 80
    msg = config_error("+pipeline.jobs.finetune.trainer.foo=1")
    assert "pipeline.jobs.finetune.trainer.foo" in msg and "max_steps" in msg


def test_per_job_deepspeed_override_applies_to_that_job_only_and_is_validated():
    # (a fine-tune at ZeRO-1 after a ZeRO-3 pretraining; the rest of `deepspeed` is inherited)
    root, jobs = compose("deepspeed=zero3", "+pipeline.jobs.finetune.deepspeed.stage=1")
    assert jobs["finetune"].deepspeed.stage == 1 and jobs["pretrain"].deepspeed.stage == root.deepspeed.stage == 3
    assert jobs["finetune"].deepspeed.precision == root.deepspeed.precision
    msg = config_error("+pipeline.jobs.finetune.deepspeed.stag=1")
    assert "pipeline.jobs.finetune.deepspeed.stag" in msg and "stage" in msg
    msg = config_error("+pipeline.jobs.finetune.deepspeed.stage=4")
    assert "pipeline.jobs.finetune.deepspeed" in msg and "stage" in msg, msg


def test_resolve_jobs_order_and_dependencies():
    root, _ = compose()
    jobs = resolve_jobs(root)
    assert [j.name for j in jobs] == ["pretrain", "finetune", "finetune_scratch"]
    pretrain, finetune, _ = jobs
    assert pretrain.depends_on == () and pretrain.kind == "pretrain" and pretrain.data.kind == "text"
    assert finetune.depends_on == ("pretrain",)
    assert finetune.kind == "finetune" and finetune.data.kind == "sft"
    assert finetune.data.tokenizer_uri == pretrain.data.uri
    assert finetune.data.uri != pretrain.data.uri
    assert pretrain.pipeline == finetune.pipeline == "pretrain_finetune"


def test_resolve_jobs_puts_dependencies_first_whatever_the_yaml_order():
    """Renaming so that the dependent job comes first in the mapping must not change the order."""
    root = compose_root([])
    spec = root.pipeline.jobs
    flipped = dataclasses.replace(root, pipeline=schema.PipelineConfig(
        name="flipped", jobs={"finetune": spec["finetune"], "pretrain": spec["pretrain"]}))
    assert [j.name for j in resolve_jobs(flipped)] == ["pretrain", "finetune"]


def test_state_dir_becomes_absolute(tmp_path):
    root, jobs = compose()
    assert root.state_dir == str(tmp_path / ".orch")
    assert root.storage.root == f"file://{tmp_path}/.orch/store"
    assert jobs["pretrain"].data.uri == f"file://{tmp_path}/.orch/store/datasets/stories"
    root, _ = compose("state_dir=rel/dir")
    assert root.state_dir == str(tmp_path / "rel" / "dir")
    assert root.storage.root == f"file://{tmp_path}/rel/dir/store"


def test_state_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(STATE_DIR_ENV, "from-env")
    root, _ = compose()
    assert root.state_dir == str(tmp_path / "from-env")


def test_s3_storage():
    root, jobs = compose("storage=s3", "storage.root=s3://b/p")
    assert root.storage.backend == "s3" and root.storage.root == "s3://b/p"
    assert jobs["pretrain"].data.uri == "s3://b/p/datasets/stories"
    assert jobs["finetune"].data.tokenizer_uri == "s3://b/p/datasets/stories"


@pytest.mark.reliability(case="storage.root=s3://... with storage=local", **IN_PROCESS)
def test_s3_root_with_local_backend_is_rejected():
    msg = config_error("storage.root=s3://b/p")
    assert "s3://b/p" in msg and "storage=s3" in msg


# ------------------------------------------------------------------------------ bad input
@pytest.mark.reliability(case="unknown group option model=nope", **IN_PROCESS)
def test_unknown_group_option_lists_the_choices():
    msg = config_error("model=nope")
    assert "'nope'" in msg and "model" in msg
    for option in ("gpt_tiny", "gpt_small", "gpt2_124m"):
        assert option in msg


# ------------------------------------------------------------------------------ the user's config folders
@pytest.fixture
def user_conf(tmp_path):
    """A user's config folder: a model option of their own, and a cluster option."""
    d = tmp_path / "my-conf"
    (d / "model").mkdir(parents=True)
    tiny = yaml.safe_load((CONF / "model" / "gpt_tiny.yaml").read_text())
    (d / "model" / "my_model.yaml").write_text(yaml.safe_dump({**tiny, "name": "my_model", "n_layer": 3}))
    (d / "cluster").mkdir()
    (d / "cluster" / "my_cluster.yaml").write_text((CONF / "cluster" / "local.yaml").read_text()
                                                   .replace("name: local", "name: my_cluster"))
    return d


def test_config_dir_adds_the_users_options(user_conf):
    root, _ = compose(*with_config_dirs(["model=my_model", "cluster=my_cluster"], [str(user_conf)]))
    assert (root.model.name, root.model.n_layer, root.cluster.name) == ("my_model", 3, "my_cluster")
    assert root.deepspeed.stage == 2  # the built-in groups are still there


def test_hydra_searchpath_override_adds_the_users_options(user_conf):
    root, _ = compose(f"hydra.searchpath=[file://{user_conf}]", "model=my_model")
    assert root.model.name == "my_model"
    # --config-dir adds to the user's own hydra.searchpath instead of replacing it
    merged = with_config_dirs([f"hydra.searchpath=[file://{user_conf}]"], [str(user_conf / "model")])
    assert merged == [f"hydra.searchpath=['file://{user_conf}','file://{user_conf / 'model'}']"]


@pytest.mark.reliability(case="unknown group option with a --config-dir", **IN_PROCESS)
def test_unknown_option_lists_the_users_options_too(user_conf):
    msg = config_error(*with_config_dirs(["model=nope"], [str(user_conf)]))
    assert "'nope'" in msg and "gpt_tiny" in msg and "my_model" in msg
    assert "my_cluster" in config_error(f"hydra.searchpath=[file://{user_conf}]", "cluster=nope")
    assert {"aws", "gpu", "local"} <= set(group_options("cluster")) and "my_cluster" not in group_options("cluster")


@pytest.mark.reliability(case="--config-dir that does not exist", **IN_PROCESS)
def test_missing_config_dir_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config-dir .*nope: no such folder"):
        with_config_dirs(["model=gpt_tiny"], [str(tmp_path / "nope")])


@pytest.mark.reliability(case="hydra.searchpath entry that does not exist", **IN_PROCESS)
def test_missing_searchpath_entry_is_one_line(tmp_path):
    msg = config_error(f"hydra.searchpath=[file://{tmp_path}/nope]", "model=gpt_tiny")
    assert msg.startswith("hydra.searchpath entry") and f"{tmp_path}/nope" in msg and "no such folder" in msg


@pytest.mark.reliability(case="unknown key `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override", ["trainer.foo=1", "+trainer.foo=1"])
def test_unknown_key_lists_the_valid_keys(override):
    msg = config_error(override)
    assert "trainer.foo" in msg
    assert "max_steps" in msg and "global_batch_size" in msg and "micro_batch_size" in msg


@pytest.mark.reliability(case="unknown top-level key +foo=1", **IN_PROCESS)
def test_unknown_top_level_key():
    msg = config_error("+foo=1")
    assert "'foo'" in msg and "trainer" in msg and "model" in msg


@pytest.mark.reliability(case="wrong type `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override,key,value", [
    ("trainer.max_steps=abc", "trainer.max_steps", "'abc'"),
    ("trainer.max_steps=1.5", "trainer.max_steps", "1.5"),
    ("trainer.max_steps=true", "trainer.max_steps", "True"),
    ("model.n_layer=[1,2]", "model.n_layer", "[1, 2]"),
    ("trainer.lr=fast", "trainer.lr", "'fast'"),
    ("cluster.num_cpus=many", "cluster.num_cpus", "'many'"),
])
def test_wrong_type_names_key_and_value(override, key, value):
    msg = config_error(override)
    assert f"'{key}'" in msg and value in msg


@pytest.mark.reliability(case="bad choice `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override,key,choices", [
    ("deepspeed.stage=4", "deepspeed.stage", ["1", "2", "3"]),
    ("deepspeed.stage=true", "deepspeed.stage", ["1", "2", "3"]),  # True == 1 must not pass as stage 1
    ("deepspeed.precision=fp8", "deepspeed.precision", ["'fp32'", "'bf16'", "'fp16'"]),
    ("data.kind=images", "data.kind", ["'text'", "'sft'"]),
])
def test_bad_choice_names_key_and_choices(override, key, choices):
    msg = config_error(override)
    assert f"'{key}'" in msg
    assert all(c in msg for c in choices)


@pytest.mark.reliability(case="malformed override `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override,fragment", [
    ("trainer.max_steps", "'trainer.max_steps'"),
    ("a=[", "'a=['"),
])
def test_malformed_override(override, fragment):
    msg = config_error(override)
    assert "malformed override" in msg and fragment in msg


@pytest.mark.reliability(case="global batch not divisible by 3 workers", **IN_PROCESS)
def test_global_batch_not_divisible_by_workers_times_micro_batch():
    msg = config_error("pipeline.jobs.pretrain.workers=3")
    assert "pretrain" in msg and "global_batch_size=16" in msg and "3 x 4" in msg


@pytest.mark.reliability(case="dependency cycle between jobs", **IN_PROCESS)
def test_dependency_cycle():
    msg = config_error("pipeline.jobs.pretrain.depends_on=[finetune]")
    assert "cycle" in msg and "pretrain" in msg and "finetune" in msg
    # one message, from one walk over depends_on: what, the value, the fix
    assert msg == ("pipeline.jobs has a dependency cycle: finetune -> pretrain -> finetune; "
                   "remove one of these depends_on")


@pytest.mark.reliability(case="depends_on a job that is not in the pipeline", **IN_PROCESS)
def test_unknown_dependency():
    msg = config_error("pipeline.jobs.finetune.depends_on=[nope]")
    assert "'nope'" in msg and "finetune" in msg
    assert msg == ("pipeline.jobs.finetune.depends_on names 'nope', which is not a job of the pipeline "
                   "(finetune, finetune_scratch, pretrain); for a job already submitted use "
                   "`orch submit --after JOB_ID`")


@pytest.mark.reliability(case="data.seq_len longer than model.block_size", **IN_PROCESS)
def test_seq_len_longer_than_block_size():
    msg = config_error("model=gpt_tiny", "data.seq_len=128")
    assert "data.seq_len=128" in msg and "block_size=64" in msg
    msg = config_error("model=gpt_tiny", "pipeline.jobs.finetune.data.seq_len=128")
    assert "finetune" in msg and "data.seq_len=128" in msg


@pytest.mark.reliability(case="invalid value `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override,fragment", [
    ("pipeline.jobs.pretrain.workers=0", "workers=0"),
    ("trainer.micro_batch_size=5", "micro_batch_size=5"),
    ("trainer.min_lr=1.0", "min_lr=1.0"),
])
def test_component_validation_errors_name_the_value(override, fragment):
    assert fragment in config_error(override)


@pytest.mark.reliability(case="offload_param=cpu with ZeRO-1", **IN_PROCESS)
def test_param_offload_needs_stage_3():
    compose("deepspeed=zero1")
    msg = config_error("deepspeed=zero1", "deepspeed.offload_param=cpu")
    assert "offload_param" in msg and "stage=3" in msg


# ------------------------------------------------------------------------------ frozen, round trip
def test_typed_configs_are_frozen():
    root, jobs = compose()
    job = jobs["pretrain"]
    for obj, field in [(root, "state_dir"), (root.model, "n_layer"), (root.trainer, "max_steps"),
                       (root.deepspeed, "stage"), (root.data, "uri"), (root.cluster, "name"),
                       (root.storage, "root"), (root.tracking, "mode"), (root.checkpoint, "interval"),
                       (root.pipeline, "name"), (job, "workers"), (job.trainer, "lr")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, getattr(obj, field))


def test_job_config_round_trips_through_its_json_record():
    _, jobs = compose("model=gpt_tiny", "tracking=none", "cluster=aws")
    for job in jobs.values():
        stored = json.loads(json.dumps(to_dict(job)))  # as frozen into the job record
        back = job_config_from_dict(stored)
        assert back == job
        assert isinstance(back.depends_on, tuple) and isinstance(back.tracking.tags, tuple)


@pytest.mark.reliability(case="job record with an unknown key", **IN_PROCESS)
def test_job_config_from_dict_rejects_unknown_keys_and_names_them():
    _, jobs = compose()
    data = to_dict(jobs["pretrain"])
    data["trainer"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"job\.trainer\.bogus"):
        job_config_from_dict(data)


@pytest.mark.reliability(case="config without a required key", **IN_PROCESS)
def test_build_reports_missing_required_key():
    with pytest.raises(ConfigError, match=r"'trainer\.lr' is missing"):
        build(schema.TrainerConfig, {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 2}, "trainer")


@pytest.mark.reliability(case="nonsense trainer value `{override}`", **IN_PROCESS)
@pytest.mark.parametrize("override, needle", [
    ("trainer.warmup_steps=-10", "warmup_steps=-10 must be >= 0"),
    ("trainer.grad_clip=-1", "grad_clip=-1"),
    ("trainer.eval_batches=0", "eval_batches=0 must be > 0"),
    ("trainer.beta1=1.5", "beta1=1.5 must be in [0, 1)"),
    ("trainer.beta2=-0.1", "beta2=-0.1"),
    ("trainer.weight_decay=-0.1", "weight_decay=-0.1"),
])
def test_nonsense_trainer_values_are_refused_at_compose_time(override, needle):
    assert needle in config_error(override)


@pytest.mark.reliability(case="pipeline job named {name!r}", **IN_PROCESS)
@pytest.mark.parametrize("name", ["../x", "a/b", "..", ""])
def test_job_name_that_is_not_a_plain_name(name):
    """Job names become part of job ids and run folders (storage.root/runs/<id>): they stay one name."""
    with pytest.raises(ConfigError, match="is not a safe name") as info:
        build(schema.PipelineConfig, {"name": "p", "jobs": {name: {"kind": "pretrain"}}}, "pipeline")
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


def test_non_ascii_values_are_quoted_for_hydra():
    root, _ = compose("data.uri=file:///tmp/ü/données", "state_dir=/tmp/état")
    assert root.data.uri == "file:///tmp/ü/données" and root.state_dir == "/tmp/état"


# ------------------------------------------------------------------------------ GPU clusters
@pytest.mark.parametrize("cluster", ["gpu", "aws"])
@pytest.mark.parametrize("ds", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_gpu_clusters_default_to_bf16_nccl_one_worker_per_gpu(cluster, ds):
    root, jobs = compose(f"cluster={cluster}", f"deepspeed={ds}")
    for job in jobs.values():
        assert job.deepspeed.precision == "bf16"
        assert (job.cluster.backend, job.cluster.accelerator, job.cluster.gpus_per_worker) == ("nccl", "cuda", 1)
        assert job.resources_per_worker()["GPU"] == 1
    assert root.cluster.autoscaling is (cluster == "aws")


def test_cpu_cluster_stays_fp32_and_an_explicit_precision_wins():
    root, _ = compose()
    assert (root.cluster.name, root.deepspeed.precision, root.cluster.backend) == ("local", "fp32", "gloo")
    root, _ = compose("cluster=aws", "deepspeed.precision=fp16")
    assert root.deepspeed.precision == "fp16"
