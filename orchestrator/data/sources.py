"""Where a corpus comes from, split into units of work that tasks read on their own.

A source is `generated:<name>` (documents made locally, no downloads) or a URI/path of files:
`.txt` (one document per file) and `.jsonl` (one document per line: the `data.text_field` string,
or `prompt`/`response`, or chat `messages`), optionally `.gz`/`.zst`-compressed; Parquet and Arrow
files (one document per row, the `data.text_field` column; orchestrator.data.tables); and Hugging
Face `datasets` folders (`save_to_disk`: the Arrow files its state.json lists). A unit is a range of
generated documents or a group of files (or of a large Parquet file's row groups) of about
`unit_bytes`. A document's train/validation split is a hash of its text (generated documents: of
their number), so it depends neither on how the work is cut nor on the file's name or format: the
same text prepared from JSONL, Parquet or a `datasets` folder gives the same dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.data.corpus import GENERATORS
from orchestrator.data.lines import codec, not_compressed, not_utf8, read_lines
from orchestrator.data.tables import TABLE_SUFFIXES, is_table, parquet_parts, read_table, table_columns
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectInfo, ObjectNotFound, ObjectStore, join_uri

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")
CORPUS_FILES = "no .txt or .jsonl files (optionally .gz/.zst), .parquet or .arrow files or `datasets` folder"
GENERATED_PER_UNIT = 1000  # generated documents per unit of work
HF_STATE = "state.json"  # in a folder `datasets.Dataset.save_to_disk` wrote: its Arrow files, in order
HF_DATASET_DICT = "dataset_dict.json"  # in a folder `DatasetDict.save_to_disk` wrote: its splits
DEFAULT_BATCH_BYTES = 16 << 20

Batch = list[tuple[str, object]]  # (identity, item) of documents read together


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int  # bytes (of the row groups `part`, for a part of a Parquet file)
    part: tuple[int, int] | None = None  # a Parquet file's row groups [start, stop) to read; None: all of it
    file_bytes: int | None = None  # the whole file's size, for a part

    @property
    def object_size(self) -> int:
        return self.size if self.file_bytes is None else self.file_bytes


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus one task reads: generated documents [start, stop), or files."""

    index: int
    start: int = 0
    stop: int = 0
    files: tuple[SourceFile, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def generator_name(source: str) -> str:
    name = source.split(":", 1)[1]
    if name not in GENERATORS:
        raise DatasetError(f"unknown generated source {source!r}; choose one of: "
                           + ", ".join(f"generated:{g}" for g in GENERATORS))
    return name


def _folder(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def _read_json(store: ObjectStore, uri: str, what: str) -> dict:
    try:
        raw = json.loads(store.get(uri))
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        return raw
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{uri} is not valid JSON ({str(e)[:200]}); it is not {what}, or it is damaged: save the "
                           f"dataset again") from None


def _datasets_files(store: ObjectStore, source: str, objs: list[ObjectInfo]) -> dict[str, list[str]]:
    """{folder: its Arrow files in order} for each `datasets` folder (a state.json) under `source`;
    a DatasetDict (several splits) is refused: the user picks the split."""
    root_dict = join_uri(source, HF_DATASET_DICT)
    if any(o.uri == root_dict for o in objs):
        splits = _read_json(store, root_dict, "a `datasets` DatasetDict").get("splits") or []
        example = join_uri(source, str(splits[0])) if splits else join_uri(source, "train")
        raise DatasetError(f"data.source={source} is a `datasets` DatasetDict (splits: {', '.join(map(str, splits))}); "
                           f"give the folder of the split to prepare, e.g. {example}")
    folders: dict[str, list[str]] = {}
    present = {o.uri for o in objs}
    for o in objs:
        if o.uri.rsplit("/", 1)[-1] != HF_STATE:
            continue
        state = _read_json(store, o.uri, "a `datasets` state file")
        try:
            names = [str(f["filename"]) for f in state["_data_files"]]
        except (KeyError, TypeError):
            raise DatasetError(f"{o.uri} lists no _data_files; it is not a `datasets` save_to_disk folder's "
                               f"state.json: save the dataset again, or remove the file") from None
        files = [join_uri(_folder(o.uri), n) for n in names]
        for f in files:
            if f not in present:
                raise DatasetError(f"{o.uri} lists {f.rsplit('/', 1)[-1]}, which is missing; copy the whole "
                                   f"`datasets` folder again")
        folders[_folder(o.uri)] = files
    return folders


def list_files(store: ObjectStore, source: str) -> list[SourceFile]:
    """The corpus files under `source` (a folder/prefix, or one file), sorted by URI (a `datasets`
    folder's Arrow files in the order its state.json gives)."""
    objs = store.list(source)
    datasets = _datasets_files(store, source, objs)
    sizes = {o.uri: o.size for o in objs}
    out: list[SourceFile] = []
    for o in objs:
        folder = _folder(o.uri)
        if folder in datasets:
            if o.uri.rsplit("/", 1)[-1] == HF_STATE:
                out.extend(SourceFile(f, sizes[f]) for f in datasets[folder])
        elif o.uri.endswith(TEXT_SUFFIXES + TABLE_SUFFIXES):
            out.append(SourceFile(o.uri, o.size))
    if not out:
        raise DatasetError(f"{CORPUS_FILES} under data.source={source}; check the URI")
    return out


def check_source(store: ObjectStore, source: str) -> None:
    """Fail now, in one line, on a source with nothing to read (an unknown generator, a missing or
    empty folder): one listing, so a job does not find out after its cluster started."""
    if source.startswith("generated:"):
        generator_name(source)
    else:
        list_files(store, source)


def _pieces(store: ObjectStore, files: list[SourceFile], unit_bytes: int) -> Iterator[SourceFile]:
    """Each file, or each part (a run of row groups) of a Parquet file larger than `unit_bytes`."""
    for f in files:
        if f.uri.endswith(".parquet") and f.size > unit_bytes:
            for part, nbytes in parquet_parts(store, f.uri, f.size, unit_bytes):
                yield SourceFile(f.uri, nbytes, part, f.size)
        else:
            yield f


def plan_units(store: ObjectStore, source: str, num_documents: int, unit_bytes: int) -> list[Unit]:
    """Cut the corpus into units: fixed ranges of generated documents, or runs of files of about
    `unit_bytes` (a file is never split, but for a Parquet file: into runs of whole row groups)."""
    if source.startswith("generated:"):
        generator_name(source)
        return [Unit(i, start=a, stop=min(a + GENERATED_PER_UNIT, num_documents))
                for i, a in enumerate(range(0, num_documents, GENERATED_PER_UNIT))]
    units, group, size = [], [], 0
    for f in _pieces(store, list_files(store, source), unit_bytes):
        if group and size + f.size > unit_bytes:
            units.append(Unit(len(units), files=tuple(group)))
            group, size = [], 0
        group.append(f)
        size += f.size
    if group:
        units.append(Unit(len(units), files=tuple(group)))
    return units


def _decompress(name: str, data: bytes) -> str:
    """A whole .txt file (one document) as text."""
    import zstandard  # (only for .zst corpora)

    try:
        if codec(name) == "gzip":
            data = gzip.decompress(data)
        elif codec(name) == "zstd":
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise not_compressed(name, e) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(name, e) from None
    if "\x00" in text:  # valid UTF-8, but text files hold no NUL bytes: an image, an archive, padding
        raise DatasetError(f"{name} holds NUL bytes (at character {text.index(chr(0))}): it is binary, not text; "
                           f"remove it from the corpus")
    return text


def _chat_to_pair(msgs: list[dict]) -> dict:
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + f"{msgs[-1]['role']}:"
    return {"prompt": prompt, "response": " " + msgs[-1]["content"]}


def identity_of(item: object) -> str:
    """What a file document's split is a hash of: its text (a pair: prompt and response)."""
    return item if isinstance(item, str) else f"{item['prompt']}\x00{item['response']}"


def _row_item(row: object, kind: str, text_field: str) -> object:
    """The document of one JSONL line or table row; ValueError/KeyError/TypeError if it has none."""
    if kind == "text":
        item = row[text_field]
        if not isinstance(item, str):
            raise TypeError
        return item
    pair = _chat_to_pair(row["messages"]) if row.get("messages") is not None else {
        "prompt": row["prompt"], "response": row["response"]}
    if not (isinstance(pair["prompt"], str) and isinstance(pair["response"], str)):
        raise TypeError
    return pair


def _jsonl_items(store: ObjectStore, f: SourceFile, kind: str, text_field: str, batch_bytes: int
                 ) -> Iterator[Batch]:
    """Batches of about `batch_bytes` of the documents of a JSONL file, read as a stream."""
    batch: Batch = []
    size = 0
    for n, line in read_lines(store, f.uri, f.object_size):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise DatasetError(f"{f.uri} line {n} is not valid JSON ({why}); fix or remove that line") from None
        try:
            item = _row_item(row, kind, text_field)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            need = f"a {text_field!r} string" if kind == "text" else "'prompt' and 'response' strings (or 'messages')"
            has = f"keys: {', '.join(map(str, row))[:200]}" if isinstance(row, dict) else type(row).__name__
            raise DatasetError(f"{f.uri} line {n} is not a JSON object with {need} ({has}); fix that line, or "
                               f"convert the file to one such object per line") from None
        batch.append((identity_of(item), item))
        size += len(line)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _table_items(store: ObjectStore, f: SourceFile, kind: str, text_field: str, batch_bytes: int) -> Iterator[Batch]:
    """Batches of documents of a Parquet/Arrow file: the `text_field` column (rows where it is null
    hold no document), or for sft the prompt/response (or messages) columns."""
    if kind == "text":
        columns, setting = [text_field], "data.text_field"
    else:
        names = table_columns(store, f.uri, f.object_size)
        columns = ["messages"] if "messages" in names else ["prompt", "response"]
        setting = "the fine-tuning columns (prompt and response, or messages)"
    for cols in read_table(store, f.uri, f.object_size, f.part, columns, batch_bytes, setting):
        if kind == "text":
            yield [(t, t) for t in cols[text_field] if t is not None]
            continue
        batch: Batch = []
        for row in (dict(zip(cols, values)) for values in zip(*cols.values())):
            try:
                item = _row_item(row, kind, text_field)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                raise DatasetError(f"{f.uri} has a row without 'prompt' and 'response' strings (or 'messages'): "
                                   f"{str(row)[:200]}; fix or drop that row") from None
            batch.append((identity_of(item), item))
        yield batch


def read_unit(store: ObjectStore, source: str, unit: Unit, kind: str, seed: int, text_field: str = "text",
              batch_bytes: int = DEFAULT_BATCH_BYTES) -> Iterator[Batch]:
    """(identity, item) of every document in a unit, in batches of about `batch_bytes` of text (a .txt
    file, one document: all of it): an item is a string for text, {"prompt","response"} for sft."""
    if unit.files == ():
        items = GENERATORS[generator_name(source)](unit.start, unit.stop, seed)
        yield [(f"generated:{i}", item) for i, item in zip(range(unit.start, unit.stop), items)]
        return
    for f in unit.files:
        try:
            if is_table(f.uri):
                yield from _table_items(store, f, kind, text_field, batch_bytes)
            elif ".jsonl" in f.uri:
                yield from _jsonl_items(store, f, kind, text_field, batch_bytes)
            elif kind == "sft":
                raise DatasetError(f"{f.uri}: fine-tuning data must be .jsonl (or Parquet/Arrow) with prompt/response "
                                   f"or messages")
            else:
                text = _decompress(f.uri, store.get(f.uri))
                yield [(identity_of(text), text)]
        except ObjectNotFound:
            raise DatasetError(f"{f.uri} was listed in the corpus but is gone; run again once the corpus "
                               f"stops changing") from None


def is_validation(identity: str, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its identity, so the split is the same however
    the corpus is cut into units."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{identity}".encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < val_fraction * 1_000_000
