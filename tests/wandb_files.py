"""Read W&B offline run files (`run-<id>.wandb`) back, for tests.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of records, each with a 7-byte header (crc32, length u16, type u8: 1 full, 2 first,
3 middle, 4 last) whose payloads are `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B datastore file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def history(path: str | Path) -> list[dict]:
    """Every logged history row as {key: value} (including `_step`)."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path: str | Path) -> dict:
    """The run record's id, group and job_type."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            return {"run_id": rec.run.run_id, "group": rec.run.run_group, "job_type": rec.run.job_type,
                    "project": rec.run.project,
                    "config": {i.key: json.loads(i.value_json) for i in rec.run.config.update}}
    return {}


def run_file(run_dir: str | Path) -> Path:
    (f,) = Path(run_dir).glob("run-*.wandb")
    return f


def artifacts(path: str | Path) -> list[dict]:
    """Every artifact record: name, type, whether it is an input (`use_after_commit`: what
    `use_artifact` of a draft artifact records, used once synced) and its references."""
    out = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append({"name": a.name, "type": a.type, "use_after_commit": a.use_after_commit,
                        "refs": [e.ref for e in a.manifest.contents]})
        elif rec.WhichOneof("record_type") == "use_artifact":
            out.append({"name": rec.use_artifact.name, "type": rec.use_artifact.type, "use_after_commit": True,
                        "refs": []})
    return out


def summary(path: str | Path) -> dict:
    """The run's summary as its records last set it: {key: value}."""
    out: dict = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out
