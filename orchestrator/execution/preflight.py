"""Checks made before any worker starts, one line each when they fail (exit 2).

`preflight(jobs)` runs when jobs are submitted (`orch run`, and the controller's submit for `orch
submit`): secrets, the store, prepared datasets, the weights a job starts or resumes from.
`check_job_inputs` runs again in the job's runner once its dataset is prepared and its dependency's
weights are known, just before the worker group starts.
"""

from __future__ import annotations

import dataclasses
import os

from orchestrator import artifacts
from orchestrator.checkpoint.layout import CheckpointRef, check_committed, list_checkpoints, step_of
from orchestrator.config.schema import JobConfig
from orchestrator.config.typed import to_dict
from orchestrator.constants import COMMIT_MARKER, SECRET_ENV_VARS, TOKENIZER
from orchestrator.data.manifest import Manifest, load_manifest, try_load_manifest
from orchestrator.data.prepare import check_first_files, ensure_dataset
from orchestrator.data.sources import check_source
from orchestrator.data.tokenizer_files import TokenizerFile, load_tokenizer_file, parse_tokenizer, same_tokenizer
from orchestrator.errors import CheckpointError, ConfigError, DatasetError
from orchestrator.storage import ObjectNotFound, join_uri, routed, to_uri
from orchestrator.workspace import open_job_store


def preflight(jobs: list[JobConfig]) -> None:
    """Everything that can be checked when the jobs are submitted. A dataset that is already
    prepared must fit the model; one that is not must have a source (here or in an earlier job)."""
    for job in jobs:
        check_no_secrets(job)
    made_here = {j.data.uri.rstrip("/") for j in jobs if j.data.source}
    for job in jobs:
        store = open_job_store(job)
        manifest = try_load_manifest(store, job.data.uri)
        # a tokenizer_uri that is a dataset one of these jobs prepares may not exist yet: the runner checks it
        tokenizer_later = manifest is None and bool(job.data.tokenizer_uri) and \
            to_uri(job.data.tokenizer_uri).rstrip("/") in made_here
        if manifest is not None:
            check_dataset_matches(job, manifest)
        elif job.data.source:
            _check_source(job, store)
            if not tokenizer_later:
                check_tokenizer_fits(job)
        elif not any(j.data.uri == job.data.uri and j.data.source for j in jobs):
            ensure_dataset(store, job.data)  # raises: nothing there, nothing to make it from
        if job.init_from:
            check_weights_match(job, job.init_from, "init_from")
        if job.resume_from:
            check_resume_source(job)
        for setting in ("init_from", "resume_from") if not tokenizer_later else ():
            if getattr(job, setting):
                check_same_tokenizer(job, getattr(job, setting), setting, manifest)


def _check_source(job: JobConfig, store) -> None:
    """A missing or empty corpus, or one whose first files cannot be read (binary, not UTF-8), fails
    now in the line `orch data prepare` gives, not in the job's Ray task; a corpus is read through
    its own store (a local folder beside storage=s3, say)."""
    source = job.data.source
    if source.startswith("generated:"):  # (a generator reads no store)
        check_source(routed(store), source)
        return
    data = dataclasses.replace(job.data, source=to_uri(source))
    check_source(routed(store), data.source)
    check_first_files(store, data)


def check_job_inputs(job: JobConfig, init_from: str | None) -> None:
    """In the runner, before the worker group starts: the prepared dataset and the weights."""
    manifest = load_manifest(open_job_store(job), job.data.uri)
    check_dataset_matches(job, manifest)
    if init_from:
        check_weights_match(job, init_from, "init_from")
        check_same_tokenizer(job, init_from, "init_from", manifest)
    if job.resume_from:
        check_resume_source(job)
        check_same_tokenizer(job, job.resume_from, "resume_from", manifest)


def _vocab_size(tf: TokenizerFile) -> int:
    tok, _ = parse_tokenizer(tf)
    return tok.get_vocab_size()


def check_tokenizer_fits(job: JobConfig) -> None:
    """A dataset still to be prepared: the tokenizer it will have fits the model's embedding."""
    data, model = job.data, job.model
    if data.tokenizer_uri:
        tf = load_tokenizer_file(to_uri(data.tokenizer_uri), open_job_store(job))
        size, what = _vocab_size(tf), f"the tokenizer of data.tokenizer_uri={data.tokenizer_uri}"
    elif data.kind == "text":
        size, what = data.vocab_size, f"the tokenizer data.vocab_size={data.vocab_size} asks for"
    else:
        return
    if size > model.vocab_size:
        raise DatasetError(f"{what} has {size:,} tokens but model '{model.name}' has vocab_size={model.vocab_size:,}; "
                           f"set model.vocab_size>={size} (or a model preset that large), or use a smaller tokenizer")


def _dataset_tokenizer(job: JobConfig, manifest: Manifest | None) -> TokenizerFile | None:
    """The tokenizer the job's dataset has (prepared) or will have (data.tokenizer_uri); None: it
    will train its own."""
    store = open_job_store(job)
    if manifest is not None:
        uri = join_uri(job.data.uri, manifest.tokenizer_key)
        return TokenizerFile(store.get(uri).decode(), uri)
    if job.data.tokenizer_uri:
        return load_tokenizer_file(to_uri(job.data.tokenizer_uri), store)
    return None


def check_same_tokenizer(job: JobConfig, uri: str, setting: str, manifest: Manifest | None = None) -> None:
    """The weights at `uri` (the job's `setting`) came with the tokenizer of the job's dataset, so
    the same token ids mean the same text. `manifest`: the dataset's, None while it is still to be
    prepared (then its data.tokenizer_uri is compared). Weights without a tokenizer.json are not checked."""
    source = artifacts.resolve(uri, endpoint_url=job.storage.endpoint_url)
    try:
        theirs = TokenizerFile(source.store.get(join_uri(source.uri, TOKENIZER)).decode(),
                               join_uri(source.uri, TOKENIZER))
    except ObjectNotFound:
        return
    if manifest is not None and manifest.tokenizer_sha256 == theirs.sha256:
        return
    ours = _dataset_tokenizer(job, manifest)
    if ours is None:  # the dataset trains its own: the runner compares once it has (an orch model's may recur)
        if source.kind == "hf":  # a Hugging Face model's tokenizer never comes out of orch's BPE training
            raise DatasetError(
                f"the weights at {setting}={uri} come with their own tokenizer, but dataset {job.data.uri} would "
                f"train a new one (token ids that mean other text); set data.tokenizer_uri={uri} to use theirs"
            )
        return
    if not same_tokenizer(ours.json, theirs.json):
        raise DatasetError(
            f"the weights at {setting}={uri} come with another tokenizer than dataset {job.data.uri}: "
            f"{theirs.uri} ({_vocab_size(theirs):,} tokens, sha256 {theirs.sha256[:12]}) vs {ours.uri} "
            f"({_vocab_size(ours):,} tokens, sha256 {ours.sha256[:12]}); prepare the dataset with "
            f"data.tokenizer_uri={uri} (at a new data.uri), or start from weights trained with its tokenizer"
        )


def check_no_secrets(job: JobConfig) -> None:
    """Refuse a config that holds the value of a secret environment variable: job records, W&B
    and checkpoints store configs, and secrets must live in the environment only."""
    secrets = {name: os.environ[name] for name in SECRET_ENV_VARS if len(os.environ.get(name, "")) >= 8}

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, str):
            for name, secret in secrets.items():
                if secret in value:
                    raise ConfigError(f"config key '{path}' holds the value of {name}; secrets belong in environment "
                                      f"variables only, never in a config: remove it from the override or conf/")

    walk(to_dict(job), "")


def check_dataset_matches(job: JobConfig, manifest: Manifest | None = None) -> None:
    """Fail before any worker starts if the dataset (its `manifest`, read if not given) does not fit
    the model or the job."""
    store = open_job_store(job)
    manifest = manifest or load_manifest(store, job.data.uri)
    for split in ("train", "val"):
        manifest.split(split, job.data.uri)  # each must have samples: the job evaluates on 'val'
    manifest.check_files(store, job.data.uri)
    if manifest.vocab_size > job.model.vocab_size:
        raise DatasetError(
            f"dataset {job.data.uri} has a {manifest.vocab_size}-token tokenizer but model '{job.model.name}' has "
            f"vocab_size={job.model.vocab_size}; set model.vocab_size>={manifest.vocab_size} or prepare the data with "
            f"a smaller vocabulary"
        )
    if manifest.seq_len != job.data.seq_len:
        raise DatasetError(
            f"dataset {job.data.uri} was prepared with seq_len={manifest.seq_len}, the job asks for "
            f"data.seq_len={job.data.seq_len}; use data.seq_len={manifest.seq_len} or a new data.name"
        )


def check_weights_match(job: JobConfig, uri: str, setting: str, committed: bool = False) -> None:
    """Fail before any worker starts if the weights at `uri` (the job's `setting`: init_from or
    resume_from) do not fit the job's model. `committed`: the caller has checked its commit already."""
    source = artifacts.resolve(uri, endpoint_url=job.storage.endpoint_url)
    if source.kind == "checkpoint" and not committed:  # a step-N folder whose marker's files are all there
        check_committed(source.store, CheckpointRef(step_of(source.uri), source.uri, True))
    theirs, ours = artifacts.read_model_config(source).architecture(), job.model.architecture()
    keys = list(ours) + [k for k in theirs if k not in ours]  # the family first, then its fields in order
    diff = [f"{f}={theirs.get(f)} (job: {ours.get(f)})" for f in keys if theirs.get(f) != ours.get(f)]
    if diff:
        raise CheckpointError(
            f"the model at {setting}={uri} does not match model '{job.model.name}': {', '.join(diff)}; "
            f"choose the model preset (or model.* overrides) that matches it"
        )


def check_resume_source(job: JobConfig) -> None:
    """`resume_from` must hold a committed checkpoint of the job's architecture: a step-N folder
    whose commit marker is valid and whose files are there, or a run with one such checkpoint (the
    job falls back from the newest as it does; see orchestrator.checkpoint.checkpointer)."""
    store, src = open_job_store(job), job.resume_from.rstrip("/")
    if store.exists(join_uri(src, COMMIT_MARKER)):
        candidates = [CheckpointRef(step_of(src), src, True)]
    else:
        candidates = [c for c in reversed(list_checkpoints(store, src)) if c.committed]
    if not candidates:
        raise CheckpointError(f"resume_from={job.resume_from} holds no committed checkpoint; give a "
                              f".../checkpoints/step-N URI or a run URI with checkpoints")
    problems = []
    for ref in candidates:
        try:
            check_committed(store, ref)
            break
        except CheckpointError as e:
            problems.append(str(e))
    else:
        raise CheckpointError(problems[0] if len(problems) == 1 else
                              f"none of the {len(problems)} committed checkpoints of resume_from={job.resume_from} "
                              f"is usable; the newest: {problems[0]}")
    check_weights_match(job, ref.uri, "resume_from", committed=True)  # the checkpoint the job will take

