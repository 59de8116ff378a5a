"""What `orch data prepare` prepares, and preparing it.

`orch data prepare SRC DST [OVERRIDES]` prepares one dataset: the `data` group's settings, read from
SRC and written at DST. Without SRC and DST it prepares every dataset the pipeline's jobs use. Every
destination and source is checked, and a text dataset's tokenizer trained on the first files, before
a Ray cluster starts, so a bad destination or corpus fails in a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence

from orchestrator.config.compose import resolve_jobs
from orchestrator.config.schema import MAX_NAME, ClusterConfig, DataConfig, RootConfig, is_plain_name
from orchestrator.constants import RAY_ADDRESS_ENV
from orchestrator.data.manifest import Manifest
from orchestrator.data.prepare import PartsProgress, check_prepare_destination, prepare_dataset, ray_runner
from orchestrator.data.sources import check_source
from orchestrator.errors import ConfigError
from orchestrator.raycluster.connect import check_reachable, connect
from orchestrator.storage import local_path, open_store, routed, to_uri

EXAMPLE = "orch data prepare s3://raw/texts/ s3://bucket/datasets/web data.seq_len=1024"


def datasets_to_prepare(root: RootConfig, uris: Sequence[str]) -> list[DataConfig]:
    """SRC and DST (`uris`): one dataset, `root.data` read from SRC into DST and named after DST's
    last part. Neither: each dataset the pipeline's jobs use, once (in job order)."""
    if len(uris) == 2:
        return [dataset_at(root, uris[0], uris[1])]
    if uris:
        raise ConfigError(f"orch data prepare takes SRC and DST (or neither), got {' '.join(uris)!r}; e.g. {EXAMPLE}")
    datasets: list[DataConfig] = []
    for job in resolve_jobs(root):
        if job.data.uri not in [d.uri for d in datasets]:
            datasets.append(job.data)
    return datasets


def dataset_at(root: RootConfig, src: str, dst: str) -> DataConfig:
    """`root.data` prepared from `src` into `dst` (paths or URIs). An sft dataset must name the
    tokenizer to reuse: the `data` group's default (its own old location) cannot have one."""
    uri = to_uri(dst).rstrip("/")
    data = dataclasses.replace(root.data, source=to_uri(src), uri=uri, name=name_of_folder(uri.rsplit("/", 1)[-1]),
                               tokenizer_uri=to_uri(root.data.tokenizer_uri) if root.data.tokenizer_uri else None)
    if data.kind == "sft" and (not data.tokenizer_uri or data.tokenizer_uri == root.data.uri):
        raise ConfigError("an sft dataset needs the tokenizer of a prepared dataset or model: "
                          "set data.tokenizer_uri=URI")
    return data


def name_of_folder(folder: str) -> str:
    """A dataset name (config.schema.safe_name) for a folder named `folder`: accents dropped ('é' ->
    'e'), every run of other characters one '_', at most MAX_NAME characters; 'dataset' when no
    letter or digit is left. The name labels the dataset (its manifest, progress lines); the folder
    keeps the name the user gave it."""
    ascii_text = unicodedata.normalize("NFKD", folder).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_text)
    name = re.sub(r"\.{2,}", ".", name).lstrip("_.-")[:MAX_NAME]
    return name if is_plain_name(name, MAX_NAME) else "dataset"


def describe(data: DataConfig) -> str:
    """One line for `--dry-run`: what would be prepared, from where, to where."""
    return (f"{data.kind} dataset '{data.name}' from {data.source} -> {data.uri} "
            f"(seq_len {data.seq_len}, vocab {data.vocab_size})")


def prepare_datasets(root: RootConfig, datasets: Sequence[DataConfig], say: Callable[[str], None],
                     overwrite: bool = False, parts: PartsProgress | None = None) -> list[Manifest]:
    """Check every destination and source, then prepare each dataset; its parts are tokenized on the
    cluster `root.cluster` names (an embedded one when it names none), which is started only once
    there are parts to tokenize: a corpus whose first files cannot be read fails in a second.
    `overwrite`: prepare into folders of files orch did not write. `parts`: a progress bar of the
    parts tokenized, instead of a line per part."""
    storage = root.storage
    # each dataset's store, which also reads its source and tokenizer wherever they are (local, S3)
    stores = [routed(open_store(d.uri, endpoint_url=storage.endpoint_url, region=storage.region)) for d in datasets]
    with _new_folders_removed_on_failure([d.uri for d in datasets]):
        return _prepare_each(root, datasets, stores, say, overwrite, parts)


@contextlib.contextmanager
def _new_folders_removed_on_failure(uris: Sequence[str]) -> Iterator[None]:
    """Local destinations that do not exist yet (and their missing parents) are removed again, if
    they are empty, when preparing fails: checking a destination creates it, and a failed prepare
    removes what it wrote (orchestrator.data.prepare), so nothing is left behind."""
    new = []
    for uri in uris:
        if uri.startswith("file:///"):
            path = local_path(uri)
            while not os.path.exists(os.path.dirname(path)):
                path = os.path.dirname(path)
            if not os.path.exists(path):
                new.append(path)
    try:
        yield
    except BaseException:
        for top in new:
            for folder, _dirs, _files in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):  # not empty: something else is there now
                    os.rmdir(folder)
        raise


def _prepare_each(root: RootConfig, datasets: Sequence[DataConfig], stores: list, say: Callable[[str], None],
                  overwrite: bool, parts: PartsProgress | None) -> list[Manifest]:
    for store, d in zip(stores, datasets):  # refuse a bad destination or source before starting a cluster
        store.check(d.uri)
        check_prepare_destination(store, d, overwrite=overwrite)
        if d.source:
            check_source(store, d.source)
    address = root.cluster.address or os.environ.get(RAY_ADDRESS_ENV)
    if address:
        check_reachable(address)  # now, not after the tokenizer is trained
    manifests = []
    with _ClusterOnDemand(root.cluster) as runner:
        for store, d in zip(stores, datasets):
            m = prepare_dataset(store, d, progress=say, runner=runner, overwrite=overwrite, parts=parts)
            say(f"dataset {m.name} ready at {d.uri}: {m.splits['train'].tokens:,} train tokens, "
                f"{m.splits['train'].samples:,} samples of {m.seq_len} tokens")
            manifests.append(m)
    return manifests


class _ClusterOnDemand(contextlib.ExitStack):
    """A runner of tokenization tasks (orchestrator.data.prepare.Runner) that connects to the cluster
    (starting an embedded one) the first time it has tasks to run, and disconnects on exit."""

    def __init__(self, cluster: ClusterConfig):
        super().__init__()
        self.cluster, self.connected = cluster, False

    def __call__(self, fn: Callable, args: list[tuple]) -> Iterator:
        if not self.connected:
            self.enter_context(connect(self.cluster, needed_cpus=1))
            self.connected = True
        return ray_runner(fn, args)
