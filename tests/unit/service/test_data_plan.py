"""Unit tests of orchestrator/service/data_prepare.py: which datasets `orch data prepare` prepares, composed
from the REAL conf/ folder (nothing is prepared, no Ray, no object store)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from orchestrator.config.compose import compose_root
from orchestrator.errors import ConfigError
from orchestrator.service import data_prepare as plan
from orchestrator.service.data_prepare import datasets_to_prepare, describe
from tests.unit.config.test_config import _isolated  # noqa: F401  (autouse: the real conf/, a scratch cwd, no bucket)


def test_src_and_dst_prepare_the_data_group_from_src_into_dst(tmp_path):
    root = compose_root(["data.seq_len=32", "data.vocab_size=300"])
    (data,) = datasets_to_prepare(root, ["corpus", "s3://bucket/datasets/web/"])
    assert data.source == f"file://{tmp_path}/corpus"  # a relative path is taken from the current folder
    assert data.uri == "s3://bucket/datasets/web" and data.name == "web"
    # Everything else is the `data` group's, overrides included.
    assert (data.kind, data.seq_len, data.vocab_size) == ("text", 32, 300)
    assert dataclasses.replace(data, source=root.data.source, uri=root.data.uri, name=root.data.name) == root.data


def test_src_and_dst_uris_are_kept_as_given():
    root = compose_root([])
    (data,) = datasets_to_prepare(root, ["s3://raw/texts/", "file:///data/sets/books"])
    assert (data.source, data.uri, data.name) == ("s3://raw/texts/", "file:///data/sets/books", "books")


def test_without_src_and_dst_every_dataset_of_the_pipeline_in_job_order():
    root = compose_root([])  # pretrain on stories, then fine-tune on qa (and its baseline, on its own copy)
    datasets = datasets_to_prepare(root, [])
    assert [(d.name, d.kind, d.source) for d in datasets] == [("stories", "text", "generated:stories"),
                                                               ("qa", "sft", "generated:qa"),
                                                               ("qa-scratch", "sft", "generated:qa")]
    assert datasets[0] == root.data
    assert [d.name for d in datasets_to_prepare(compose_root(["pipeline=pretrain"]), [])] == ["stories"]


def test_a_dataset_several_jobs_use_is_prepared_once(monkeypatch):
    root = compose_root([])
    a, b = root.data, dataclasses.replace(root.data, name="other", uri=root.data.uri + "-other")
    jobs = [SimpleNamespace(data=a), SimpleNamespace(data=b), SimpleNamespace(data=a)]
    monkeypatch.setattr(plan, "resolve_jobs", lambda _root: jobs)
    assert datasets_to_prepare(root, []) == [a, b]


@pytest.mark.parametrize("uris", [["only-src"], ["a", "b", "c"]])
def test_anything_but_two_uris_or_none_is_one_config_error(uris):
    with pytest.raises(ConfigError) as info:
        datasets_to_prepare(compose_root([]), uris)
    msg = str(info.value)
    assert "\n" not in msg
    assert "SRC and DST (or neither)" in msg and repr(" ".join(uris)) in msg
    assert "orch data prepare s3://" in msg  # an example to copy


def test_an_sft_dataset_needs_a_tokenizer_to_reuse():
    root = compose_root(["data=qa", "pipeline=pretrain"])
    assert root.data.tokenizer_uri == root.data.uri  # the group's default: the dataset's own old place
    with pytest.raises(ConfigError, match=r"data\.tokenizer_uri=URI"):
        datasets_to_prepare(root, ["qa.jsonl", "file:///d/qa2"])
    root = compose_root(["data=qa", "pipeline=pretrain", "data.tokenizer_uri=file:///d/stories"])
    (data,) = datasets_to_prepare(root, ["qa.jsonl", "file:///d/qa2"])
    assert (data.kind, data.tokenizer_uri, data.uri) == ("sft", "file:///d/stories", "file:///d/qa2")


def test_describe_is_one_line_naming_source_destination_and_shape():
    (data,) = datasets_to_prepare(compose_root(["data.seq_len=32"]), ["s3://raw/texts/", "s3://b/datasets/web"])
    assert describe(data) == "text dataset 'web' from s3://raw/texts/ -> s3://b/datasets/web (seq_len 32, vocab 512)"


@pytest.mark.parametrize("folder, name", [
    ("ds é", "ds_e"), ("my data set", "my_data_set"), ("Ünïcödé-2", "Unicode-2"), ("日本語", "dataset"),
    (".hidden", "hidden"), ("a..b", "a.b"), ("x" * 150, "x" * 100), ("web", "web"), ("v1.2_ok-3", "v1.2_ok-3"),
])
def test_the_name_of_a_destination_folder_is_made_safe(folder, name):
    """The dataset is named after DST's last part, in the characters a name may hold (a folder named
    with a space or an accent raised a traceback from the schema's name check)."""
    (data,) = datasets_to_prepare(compose_root([]), ["corpus", f"./out dir/{folder}"])
    assert data.name == name
    assert data.uri.endswith(f"/out dir/{folder}")  # the destination itself is where the user said


def test_a_relative_source_of_a_job_is_taken_from_the_current_folder(tmp_path):
    """`orch run data.source=./texts`: the job (in another process, elsewhere) reads the submitting
    shell's folder, as it does for data.tokenizer_uri; a generator's name is kept as it is."""
    from orchestrator.config.compose import resolve_jobs

    (job,) = resolve_jobs(compose_root(["pipeline=pretrain", "data.source=./my texts"]))
    assert job.data.source == f"file://{tmp_path}/my texts"
    (job,) = resolve_jobs(compose_root(["pipeline=pretrain"]))
    assert job.data.source == "generated:stories"
