"""Turn a corpus into tokenized shards plus a manifest in the object store (`orch data prepare`).

The corpus is cut into units (orchestrator.data.sources) that Ray tasks tokenize in parallel, so
preparation scales with the cluster; each task writes fixed-size shards of tokens (numpy uint16 or
uint32 arrays; sft shards add a uint8 loss-mask file) with multipart uploads (orchestrator.data.shards).
A dataset reuses the tokenizer of `tokenizer_uri` (a prepared dataset, an orch export or checkpoint,
a Hugging Face folder: orchestrator.data.tokenizer_files) when set, which sft datasets must; a text
dataset without one trains a byte-level BPE on a sample of the corpus first. The manifest is written last: a crashed
prepare leaves no usable dataset, and a re-run clears its leftovers and starts again.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from orchestrator.config.schema import DataConfig
from orchestrator.constants import DATASET_FORMAT_VERSION, DATASET_MARKER, MANIFEST, TOKENIZER
from orchestrator.data.manifest import Manifest, ShardInfo, SplitInfo, manifest_uri, try_load_manifest
from orchestrator.data.shards import SPLITS, tokenize_unit
from orchestrator.data.sources import Unit, is_validation, plan_units, read_unit
from orchestrator.data.tokenizer_files import TokenizerFile, load_tokenizer_file, parse_tokenizer
from orchestrator.errors import DatasetError, OrchError
from orchestrator.storage import ObjectStore, join_uri, routed
from orchestrator.storage.claim import check_destination, claim_destination, overlaps
from orchestrator.storage.digest import sha256_bytes

log = logging.getLogger(__name__)

TOKENIZER_SAMPLE_BYTES = 64 << 20  # text the tokenizer is trained on (from the first units)

# A runner maps a function over argument tuples, yielding results as they complete (any order).
Runner = Callable[[Callable, list[tuple]], Iterator]


def local_runner(fn: Callable, args: list[tuple]) -> Iterator:
    for a in args:
        yield fn(*a)


def ray_runner(fn: Callable, args: list[tuple]) -> Iterator:
    """One Ray task per argument tuple (1 CPU each), results as they finish."""
    import ray  # (only when a cluster runs the tasks; local_runner needs none)

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending = [remote.remote(*a) for a in args]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, OrchError):  # the task's own one-line error, not Ray's traceback
                for ref in pending:
                    ray.cancel(ref)
                raise e.cause from None
            raise


def default_runner() -> Runner:
    ray = sys.modules.get("ray")
    return ray_runner if ray is not None and ray.is_initialized() else local_runner


def dataset_signature(cfg: DataConfig, tokenizer_sha256: str | None, units: list[Unit]) -> str:
    """A hash of everything that changes the prepared bytes (settings, tokenizer, source files)."""
    keys = dict(kind=cfg.kind, source=cfg.source, seq_len=cfg.seq_len, num_documents=cfg.num_documents,
                shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction, seed=cfg.seed,
                version=DATASET_FORMAT_VERSION, unit_mb=cfg.unit_mb,
                files=[(f.uri, f.size) for u in units for f in u.files])
    if not cfg.source.startswith("generated:"):  # what file datasets' bytes also depend on since these came
        keys.update(split="text", text_field=cfg.text_field, parts=[f.part for u in units for f in u.files])
    if tokenizer_sha256 is None:
        keys["vocab_size"] = cfg.vocab_size
    else:
        keys["tokenizer"] = tokenizer_sha256
    return sha256_bytes(json.dumps(keys, sort_keys=True).encode())[:16]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


# ------------------------------------------------------------------------------------ tokenizer
def _tokenizer_sample(store: ObjectStore, cfg: DataConfig, units: list[Unit]) -> Iterable[str]:
    """Training documents from the first units, up to TOKENIZER_SAMPLE_BYTES of text."""
    seen = 0
    for unit in units:
        for batch in read_unit(store, cfg.source, unit, "text", cfg.seed, cfg.text_field,
                               int(cfg.read_batch_mb * (1 << 20))):
            for identity, doc in batch:
                if is_validation(identity, cfg.seed, cfg.val_fraction):
                    continue
                yield doc[: TOKENIZER_SAMPLE_BYTES - seen]  # one huge document counts up to the budget only
                seen += len(doc)
                if seen >= TOKENIZER_SAMPLE_BYTES:
                    return


# A progress bar of the parts tokenized: (key, description, parts done, parts in all, unit, detail)
# (orchestrator.cli.progress.ConsoleProgress.bar, on a terminal).
PartsProgress = Callable[[str, str, int, int, str, str], None]


class _Progress:
    """Documents, tokens and MB/s as tasks finish: one line per update, or a bar's move (`parts`)."""

    def __init__(self, say: Callable[[str], None], name: str, units: int, parts: PartsProgress | None = None):
        self.say, self.name, self.units, self.parts = say, name, units, parts
        self.done = self.docs = self.tokens = self.bytes = 0
        self.t0 = time.perf_counter()
        if parts is not None:
            parts(f"dataset {name}", f"dataset {name}: tokenizing", 0, units, "parts", "")

    def update(self, result: dict) -> None:
        self.done += 1
        self.docs += result["documents"]
        self.tokens += result["tokens"]
        self.bytes += result["source_bytes"]
        dt = max(time.perf_counter() - self.t0, 1e-6)
        mb_s = f", {self.bytes / dt / 1e6:.1f} MB/s" if self.bytes else ""
        if self.parts is not None:
            self.parts(f"dataset {self.name}", f"dataset {self.name}: tokenizing", self.done, self.units, "parts",
                       f"{self.docs:,} documents, {self.tokens:,} tokens{mb_s}, {self.tokens / dt:,.0f} tokens/s")
            return
        self.say(f"dataset {self.name}: tokenized {self.done}/{self.units} parts, {self.docs:,} documents, "
                 f"{self.tokens:,} tokens{mb_s}, {self.tokens / dt:,.0f} tokens/s")


# ------------------------------------------------------------------------------------ entry
def check_first_files(store: ObjectStore, cfg: DataConfig) -> None:
    """Read (and drop) what `prepare_dataset` reads before it writes anything, the first units' text
    up to TOKENIZER_SAMPLE_BYTES: a job whose corpus starts with a file that cannot be read (binary,
    not UTF-8, a broken line) is refused when it is submitted, in the line `orch data prepare` gives,
    instead of failing in a Ray task. Generated sources have no files."""
    if cfg.source.startswith("generated:"):
        return
    store = routed(store)
    seen = 0
    for unit in plan_units(store, cfg.source, cfg.num_documents, int(cfg.unit_mb * (1 << 20))):
        for batch in read_unit(store, cfg.source, unit, cfg.kind, cfg.seed, cfg.text_field,
                               int(cfg.read_batch_mb * (1 << 20))):
            seen += sum(len(item) if isinstance(item, str) else len(json.dumps(item)) for _, item in batch)
            if seen >= TOKENIZER_SAMPLE_BYTES:
                return


def check_prepare_destination(store: ObjectStore, cfg: DataConfig, overwrite: bool = False) -> None:
    """Refuse (one line, exit 2) a destination that overlaps the source or holds the user's files."""
    if cfg.source and not cfg.source.startswith("generated:") and overlaps(cfg.source, cfg.uri):
        raise DatasetError(
            f"the dataset destination {cfg.uri} overlaps its source {cfg.source}: preparing there would write into "
            f"(and clear parts of) the corpus; choose a destination outside the source folder"
        )
    check_destination(store, cfg.uri, DATASET_MARKER, "dataset", ours=(MANIFEST,), overwrite=overwrite)


def ensure_dataset(store: ObjectStore, cfg: DataConfig, progress: Callable[[str], None] | None = None,
                   runner: Runner | None = None) -> Manifest:
    """What a job does: use the dataset at `cfg.uri` if one is there (however it was prepared: the
    job checks it fits), else prepare it from `cfg.source`."""
    existing = prepared_dataset(store, cfg, progress)
    if existing is not None:
        return existing
    if not cfg.source:
        raise DatasetError(
            f"no dataset at {cfg.uri} (missing {manifest_uri(cfg.uri).rsplit('/', 1)[-1]}) and data.source is null; "
            f"run `orch data prepare SRC {cfg.uri}` first, or fix data.uri"
        )
    return prepare_dataset(store, cfg, progress, runner)


def prepared_dataset(store: ObjectStore, cfg: DataConfig,
                     progress: Callable[[str], None] | None = None) -> Manifest | None:
    """The dataset already at `cfg.uri` (its manifest), or None: `ensure_dataset` without preparing."""
    existing = try_load_manifest(store, cfg.uri)
    if existing is not None:
        (progress or log.info)(f"dataset {cfg.name}: using the prepared dataset at {cfg.uri} (from {existing.source})")
    return existing


def prepare_dataset(store: ObjectStore, cfg: DataConfig, progress: Callable[[str], None] | None = None,
                    runner: Runner | None = None, overwrite: bool = False,
                    parts: PartsProgress | None = None) -> Manifest:
    """Prepare `cfg` at `cfg.uri` unless a dataset with the same signature is already there (a
    dataset from other settings there is an error: it is never overwritten). `cfg.uri` must not
    overlap the source, and must be empty or a dataset folder orch wrote, unless `overwrite`.
    The source and `cfg.tokenizer_uri` may be on another store than `cfg.uri` (a local folder, S3)."""
    say = progress or (lambda msg: log.info(msg))
    if not cfg.source:
        raise DatasetError(f"data.source is null: nothing to prepare {cfg.uri} from; set data.source=URI")
    store = routed(store)
    check_prepare_destination(store, cfg, overwrite)
    reused = load_tokenizer_file(cfg.tokenizer_uri, store) if cfg.tokenizer_uri else None
    units = plan_units(store, cfg.source, cfg.num_documents, int(cfg.unit_mb * (1 << 20)))
    signature = dataset_signature(cfg, reused.sha256 if reused else None, units)

    existing = try_load_manifest(store, cfg.uri)
    if existing is not None:
        if existing.signature == signature:
            say(f"dataset {cfg.name}: using the prepared dataset at {cfg.uri}")
            return existing
        raise DatasetError(
            f"a different dataset already exists at {cfg.uri} (prepared from other settings or files); "
            f"set data.name or data.uri to a new location, or delete {manifest_uri(cfg.uri)} to rebuild it"
        )
    # before anything is written: a file that cannot be read, or a bad tokenizer, leaves DST untouched
    tok_file = reused or _train_tokenizer(store, cfg, units, say)
    tok, eot = parse_tokenizer(tok_file)
    if reused:
        say(f"dataset {cfg.name}: tokenizing with the {tok.get_vocab_size():,}-token tokenizer of {reused.uri}")
    fresh = claim_destination(store, cfg.uri, DATASET_MARKER, "dataset", ours=(MANIFEST,), overwrite=overwrite)
    try:
        return _write_dataset(store, cfg, units, (tok_file, tok, eot), signature, reused, say, runner, parts)
    except BaseException:
        if fresh:  # the destination held nothing: leave it so (not a marker and a tokenizer), then say why
            _clear(store, cfg.uri)
        raise


def _clear(store: ObjectStore, uri: str) -> None:
    """Remove what a failed prepare wrote at `uri`; a failure to do so is logged, not raised (the
    prepare's own error is the one to tell)."""
    try:
        store.delete_prefix(uri.rstrip("/") + "/")
    except Exception as e:  # noqa: BLE001 - the store may be what failed
        log.warning("could not remove the partial dataset at %s: %s", uri, e)


def _write_dataset(store: ObjectStore, cfg: DataConfig, units: list[Unit], tokenizer: tuple, signature: str,
                   reused: TokenizerFile | None, say: Callable[[str], None], runner: Runner | None,
                   parts: PartsProgress | None) -> Manifest:
    """Tokenize the units into the claimed `cfg.uri`: the tokenizer, the shards, the manifest last.
    `tokenizer`: its file, and the tokenizer and end-of-text id parsed from it."""
    tok_file, tok, eot = tokenizer
    for split in SPLITS:  # leftovers of a crashed attempt (or, with overwrite, what the user gave up)
        store.delete_prefix(join_uri(cfg.uri, split) + "/")
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    store.put(join_uri(cfg.uri, TOKENIZER), tok_file.json.encode())

    bar = _Progress(say, cfg.name, len(units), parts)
    results = []
    # One unit gains nothing from a Ray task but a process start and its imports (seconds): it is
    # tokenized here. More go to Ray tasks, in parallel, when a cluster is connected.
    run_units = runner or (local_runner if len(units) == 1 else default_runner())
    for result in run_units(tokenize_unit, [(store, cfg, cfg.source, u, tok_file.json, dtype, eot) for u in units]):
        results.append(result)
        bar.update(result)
    results.sort(key=lambda r: r["unit"])
    splits = {s: SplitInfo(tuple(ShardInfo(**sh) for r in results for sh in r["shards"][s])) for s in SPLITS}
    _report_splits(cfg, splits, say)
    manifest = Manifest(
        name=cfg.name, kind=cfg.kind, dtype=dtype, seq_len=cfg.seq_len, vocab_size=vocab, eot_id=eot,
        tokenizer_key=TOKENIZER, tokenizer_sha256=tok_file.sha256, splits=splits, signature=signature,
        source=cfg.source, extra={"tokenizer_from": reused.uri} if reused else {},
    )
    store.put(manifest_uri(cfg.uri), manifest.to_json().encode())  # last: the dataset now exists
    return manifest


def _train_tokenizer(store: ObjectStore, cfg: DataConfig, units: list[Unit], say: Callable[[str], None]
                     ) -> TokenizerFile:
    """A byte-level BPE trained on the first units of a text corpus."""
    from model.tokenizer import tokenizer_to_json, train_bpe_tokenizer  # (model/ loads torch: not at import)

    if cfg.kind != "text":
        raise DatasetError(f"sft data '{cfg.name}' needs data.tokenizer_uri (the dataset or model whose tokenizer "
                           f"it uses)")
    say(f"dataset {cfg.name}: training a {cfg.vocab_size}-token byte-level BPE tokenizer")
    tok = train_bpe_tokenizer(_tokenizer_sample(store, cfg, units), cfg.vocab_size)
    return TokenizerFile(tokenizer_to_json(tok), join_uri(cfg.uri, TOKENIZER))


def _report_splits(cfg: DataConfig, splits: dict[str, SplitInfo], say: Callable[[str], None]) -> None:
    if not splits["train"].samples:
        raise DatasetError(
            f"corpus data.source={cfg.source} gave no training samples of {cfg.seq_len + 1} tokens; "
            f"point it at files with text, or lower data.seq_len"
        )
    for split, info in splits.items():
        say(f"dataset {cfg.name}: {split}: {info.tokens:,} tokens, {info.samples:,} samples, {len(info.shards)} shards")
    if not splits["val"].samples:
        say(f"dataset {cfg.name}: warning: no validation samples, and jobs evaluate on them (a job refuses this "
            f"dataset); prepare it with a larger data.val_fraction (now {cfg.val_fraction:g}) or more documents")
