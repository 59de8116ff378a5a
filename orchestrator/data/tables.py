"""Parquet files, Arrow IPC files and Hugging Face `datasets` folders, read with pyarrow batch by batch.

A Parquet file is read row group by row group and, inside one, a batch of rows at a time (only the
columns asked for; column chunks through a buffered stream), so a 10 GB file never sits in memory:
what a reader holds is about `batch_bytes` of text plus pyarrow's read buffer. A large Parquet file
is also cut into parts of whole row groups, so several tasks tokenize it in parallel. An Arrow file
(IPC stream, which `datasets.Dataset.save_to_disk` writes, or IPC file/Feather v2) is read one
record batch at a time, as written. Objects are read through `open_object`: local files directly,
S3 objects through ranged GETs.

pyarrow is imported here only, lazily (it is heavy; `orch --help` must not wait for it). Why pyarrow
and not the `datasets` library or Ray Data: a `save_to_disk` folder is Arrow IPC files plus JSON that
pyarrow reads as they are (pyarrow already comes with Ray), where `datasets` would add a large
dependency tree for the same reader and reaches S3 only through its own fsspec client; Ray Data would
read S3 through its own filesystem as well (not the store's endpoint, retries and one-line errors),
and the units, Ray tasks and manifest that already cut, run and record the work would be duplicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.errors import DatasetError, OrchError
from orchestrator.storage import ObjectStore, open_object

PARQUET_SUFFIX = ".parquet"
ARROW_SUFFIXES = (".arrow", ".feather")
TABLE_SUFFIXES = (PARQUET_SUFFIX, *ARROW_SUFFIXES)
PARQUET_BUFFER = 1 << 20  # bytes of a column chunk read at a time (a row group is never read whole)


def is_table(uri: str) -> bool:
    return uri.endswith(TABLE_SUFFIXES)


def _kind(uri: str) -> str:
    return "Parquet" if uri.endswith(PARQUET_SUFFIX) else "Arrow"


@contextmanager
def _readable(uri: str) -> Iterator[None]:
    """pyarrow's errors on a damaged or foreign file as one DatasetError naming the file."""
    import pyarrow as pa

    try:
        yield
    except OrchError:  # the store's own errors (a missing object, S3 unreachable) pass through pyarrow
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DatasetError(f"{uri} is not a readable {_kind(uri)} file ({why}); write it again (or convert it), "
                           f"or remove it from the corpus") from None


def _open_parquet(store: ObjectStore, uri: str, size: int):
    import pyarrow.parquet as pq

    f = open_object(store, uri, size)
    try:
        return pq.ParquetFile(f, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    except BaseException:
        f.close()
        raise


def parquet_parts(store: ObjectStore, uri: str, size: int, unit_bytes: int) -> list[tuple[tuple[int, int], int]]:
    """A Parquet file cut into runs of whole row groups of about `unit_bytes` (compressed) each:
    ((first row group, stop), bytes) per part. Reads the footer only."""
    with _readable(uri), _open_parquet(store, uri, size) as pf:
        meta = pf.metadata
        sizes = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                 for g in range(meta.num_row_groups)]
    parts: list[tuple[tuple[int, int], int]] = []
    start, total = 0, 0
    for g, nbytes in enumerate(sizes):
        if g > start and total + nbytes > unit_bytes:
            parts.append(((start, g), total))
            start, total = g, 0
        total += nbytes
    if sizes:
        parts.append(((start, len(sizes)), total))
    return parts


def _is_text_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # (pyarrow >= 16)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def check_columns(uri: str, schema, columns: list[str], setting: str) -> None:
    """Every column in `columns` is in the file; a text column (`setting` names the setting that
    chose it) holds strings."""
    names = list(schema.names)
    for col in columns:
        if col not in names:
            raise DatasetError(f"{uri} has no column {col!r} (columns: {', '.join(names)[:200]}); set {setting} to "
                               f"the column that holds the text, or remove the file from the corpus")
    if setting == "data.text_field" and not _is_text_type(schema.field(columns[0]).type):
        raise DatasetError(f"column {columns[0]!r} of {uri} holds {schema.field(columns[0]).type}, not text; set "
                           f"data.text_field to a string column")


def _parquet_batches(store: ObjectStore, uri: str, size: int, part: tuple[int, int] | None,
                     columns: list[str], batch_bytes: int, setting: str) -> Iterator:
    with _open_parquet(store, uri, size) as pf:
        check_columns(uri, pf.schema_arrow, columns, setting)
        meta = pf.metadata
        for g in range(*(part or (0, meta.num_row_groups))):
            rg = meta.row_group(g)
            if not rg.num_rows:
                continue
            wanted = [c for c in range(rg.num_columns) if rg.column(c).path_in_schema.split(".")[0] in columns]
            row_bytes = max(1, sum(rg.column(c).total_uncompressed_size for c in wanted) // rg.num_rows)
            yield from pf.iter_batches(batch_size=max(1, batch_bytes // row_bytes), row_groups=[g], columns=columns,
                                       use_threads=False)


def _is_ipc_file(f) -> bool:
    """Whether an Arrow file is in the IPC file format (its magic) rather than the stream format."""
    magic = f.read(6)
    f.seek(0)
    return magic == b"ARROW1"


def _arrow_batches(store: ObjectStore, uri: str, size: int, columns: list[str], setting: str) -> Iterator:
    import pyarrow as pa

    with open_object(store, uri, size) as f:
        if _is_ipc_file(f):  # IPC file format (Feather v2): batches indexed by its footer
            reader = pa.ipc.open_file(f)
            check_columns(uri, reader.schema, columns, setting)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select(columns)
        else:  # IPC stream format (what `datasets` writes)
            reader = pa.ipc.open_stream(f)
            check_columns(uri, reader.schema, columns, setting)
            for batch in reader:
                yield batch.select(columns)


def read_table(store: ObjectStore, uri: str, size: int, part: tuple[int, int] | None, columns: list[str],
               batch_bytes: int, setting: str = "data.text_field") -> Iterator[dict[str, list]]:
    """The rows of a Parquet or Arrow file (row groups `part` of a Parquet file; all when None) as
    {column: values} of about `batch_bytes` each, only `columns` read."""
    with _readable(uri):
        batches = (_parquet_batches(store, uri, size, part, columns, batch_bytes, setting)
                   if uri.endswith(PARQUET_SUFFIX) else _arrow_batches(store, uri, size, columns, setting))
        for batch in batches:
            rows = max(1, batch.num_rows * batch_bytes // max(1, batch.nbytes))  # cut an oversized written batch
            for start in range(0, batch.num_rows, rows):
                piece = batch.slice(start, rows)
                yield {name: piece.column(name).to_pylist() for name in columns}


def table_columns(store: ObjectStore, uri: str, size: int) -> list[str]:
    """The column names of a Parquet or Arrow file (its schema only)."""
    import pyarrow as pa

    with _readable(uri):
        if uri.endswith(PARQUET_SUFFIX):
            with _open_parquet(store, uri, size) as pf:
                return list(pf.schema_arrow.names)
        with open_object(store, uri, size) as f:
            opener = pa.ipc.open_file if _is_ipc_file(f) else pa.ipc.open_stream
            return list(opener(f).schema.names)
