"""Where a corpus comes from, split into units of work that tasks read on their own.

A source is `generated:<name>` (documents made locally, no downloads) or a URI/path of `.txt`
(one document per file) and `.jsonl` (one document per line: `text`, or `prompt`/`response`, or
chat `messages`) files, optionally `.gz`/`.zst`-compressed. A unit is a range of generated
documents or a group of files of about `unit_bytes`; every document keeps a stable identity
(unit-independent), so the train/validation split does not depend on how the work is cut.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass

from orchestrator.data.corpus import GENERATORS
from orchestrator.errors import DatasetError
from orchestrator.storage import ObjectStore

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")
GENERATED_PER_UNIT = 1000  # generated documents per unit of work


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int


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


def list_files(store: ObjectStore, source: str) -> list[SourceFile]:
    """The corpus files under `source` (a folder/prefix, or one file), sorted by URI."""
    objs = [o for o in store.list(source) if o.uri.endswith(TEXT_SUFFIXES)]
    if not objs:
        raise DatasetError(f"no .txt or .jsonl files (optionally .gz/.zst) under data.source={source}; check the URI")
    return [SourceFile(o.uri, o.size) for o in objs]


def check_source(store: ObjectStore, source: str) -> None:
    """Fail now, in one line, on a source with nothing to read (an unknown generator, a missing or
    empty folder): one listing, so a job does not find out after its cluster started."""
    if source.startswith("generated:"):
        generator_name(source)
    else:
        list_files(store, source)


def plan_units(store: ObjectStore, source: str, num_documents: int, unit_bytes: int) -> list[Unit]:
    """Cut the corpus into units: fixed ranges of generated documents, or runs of files of about
    `unit_bytes` (a file is never split)."""
    if source.startswith("generated:"):
        generator_name(source)
        return [Unit(i, start=a, stop=min(a + GENERATED_PER_UNIT, num_documents))
                for i, a in enumerate(range(0, num_documents, GENERATED_PER_UNIT))]
    units, group, size = [], [], 0
    for f in list_files(store, source):
        if group and size + f.size > unit_bytes:
            units.append(Unit(len(units), files=tuple(group)))
            group, size = [], 0
        group.append(f)
        size += f.size
    if group:
        units.append(Unit(len(units), files=tuple(group)))
    return units


def _decompress(name: str, data: bytes) -> str:
    import zstandard  # (only for .zst corpora)

    try:
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        elif name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except (OSError, EOFError, zstandard.ZstdError) as e:
        kind = "gzip" if name.endswith(".gz") else "zstd"
        raise DatasetError(f"{name} is not a valid {kind} file ({e}); "
                           f"recompress it or remove it from the corpus") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                           f"(e.g. iconv -t UTF-8) or remove it from the corpus") from None
    if "\x00" in text:  # valid UTF-8, but text files hold no NUL bytes: an image, an archive, padding
        raise DatasetError(f"{name} holds NUL bytes (at character {text.index(chr(0))}): it is binary, not text; "
                           f"remove it from the corpus")
    return text


def _chat_to_pair(msgs: list[dict]) -> dict:
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + f"{msgs[-1]['role']}:"
    return {"prompt": prompt, "response": " " + msgs[-1]["content"]}


def read_unit(store: ObjectStore, source: str, unit: Unit, kind: str, seed: int) -> list[tuple[str, object]]:
    """(identity, item) of every document in a unit: a string for text, {"prompt","response"} for sft."""
    if unit.files == ():
        items = GENERATORS[generator_name(source)](unit.start, unit.stop, seed)
        return [(f"generated:{i}", item) for i, item in zip(range(unit.start, unit.stop), items)]
    out: list[tuple[str, object]] = []
    for f in unit.files:
        text = _decompress(f.uri, store.get(f.uri))
        if ".jsonl" not in f.uri:
            if kind == "sft":
                raise DatasetError(f"{f.uri}: fine-tuning data must be .jsonl with prompt/response or messages")
            out.append((f.uri, text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DatasetError(f"{f.uri} line {n} is not valid JSON ({why}); fix or remove that line") from None
            try:
                if kind == "text":
                    item: object = row["text"]
                    if not isinstance(item, str):
                        raise TypeError
                else:
                    item = (_chat_to_pair(row["messages"]) if "messages" in row
                            else {"prompt": row["prompt"], "response": row["response"]})
            except (ValueError, KeyError, TypeError, IndexError):
                need = "a 'text' string" if kind == "text" else "'prompt' and 'response' strings (or 'messages')"
                has = f"keys: {', '.join(map(str, row))[:200]}" if isinstance(row, dict) else type(row).__name__
                raise DatasetError(f"{f.uri} line {n} is not a JSON object with {need} ({has}); fix that line, or "
                                   f"convert the file to one such object per line") from None
            out.append((f"{f.uri}#{n}", item))
    return out


def is_validation(identity: str, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its identity, so the split is the same however
    the corpus is cut into units."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{identity}".encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < val_fraction * 1_000_000
