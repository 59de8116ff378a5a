"""Search bytes for planted secrets, for tests: every encoding a secret is likely to take when it
leaks (raw, URL-encoded, JSON-escaped, hex, UTF-16, base64 at any alignment), inside plain files,
zip archives (torch checkpoints), gzip and zstd streams.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import random
import shutil
import string
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, quote_plus

REPO = Path(__file__).resolve().parents[1]
SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"  # an AWS secret key's characters


def plant_secrets(seed: int | None = None) -> dict[str, str]:
    """Fresh, realistic-looking secrets (moto accepts any keys): an access key id, a 40-character
    secret key holding '/' and '+' (so its URL-encoded form differs), a session token, a W&B key."""
    rng = random.SystemRandom() if seed is None else random.Random(seed)

    def pick(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    secret = list(pick(SECRET_ALPHABET, 38) + "/+")
    rng.shuffle(secret)
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + pick(string.ascii_uppercase + string.digits, 16),
        "AWS_SECRET_ACCESS_KEY": "".join(secret),
        "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjE" + pick(SECRET_ALPHABET, 280) + "==",
        "WANDB_API_KEY": pick("0123456789abcdef", 40),
    }


def _base64_inside(raw: bytes) -> set[bytes]:
    """The base64 characters that encode `raw` alone, wherever it starts in a longer stream (three
    alignments), in the standard and URL-safe alphabets."""
    out = set()
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        start, end = (8 * shift + 5) // 6, (8 * (shift + len(raw))) // 6  # characters only `raw` decides
        part = enc[start:end]
        out |= {part, part.replace(b"+", b"-").replace(b"/", b"_")}
    return out


def encodings(secret: str) -> set[bytes]:
    """The byte strings whose presence means `secret` leaked."""
    raw = secret.encode()
    forms = {
        raw,
        quote(secret, safe="").encode(),
        quote_plus(secret).encode(),
        json.dumps(secret)[1:-1].replace("/", "\\/").encode(),
        raw.hex().encode(),
        raw.hex().upper().encode(),
        secret.encode("utf-16-le"),
    }
    return forms | _base64_inside(raw)


def _layers(data: bytes, depth: int = 0):
    """`data`, and what it holds when it is a zip archive, a gzip or a zstd stream."""
    yield data
    if depth > 2:
        return
    inner: list[bytes] = []
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                inner = [z.read(name) for name in z.namelist()]
        elif data[:2] == b"\x1f\x8b":
            inner = [gzip.decompress(data)]
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            import zstandard

            inner = [zstandard.ZstdDecompressor().decompressobj().decompress(data)]
    except Exception:  # noqa: BLE001 - not what the magic bytes promised: the raw bytes were searched
        inner = []
    for part in inner:
        yield from _layers(part, depth + 1)


def find_in_bytes(data: bytes, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets found in `data` (in any encoding, in any layer)."""
    needles = {name: encodings(value) for name, value in secrets.items()}
    found = []
    for layer in _layers(data):
        for name, forms in needles.items():
            if name not in found and any(f in layer for f in forms):
                found.append(name)
    return found


def find_in_tree(root: Path, secrets: dict[str, str]) -> tuple[list[str], int]:
    """(`path: SECRET_NAME` for each hit, files searched) over every regular file under `root`."""
    hits, searched = [], 0
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink() or not path.is_file():  # a link's target is searched where it lies
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        searched += 1
        hits += [f"{path}: {name}" for name in find_in_bytes(data, secrets)]
    return hits, searched


# ------------------------------------------------------------------- a sandbox of every byte
@contextmanager
def sandboxed():
    """A short folder (Ray's socket paths must stay under 107 bytes) holding everything the
    commands write: the state folder, scratch, Ray's sessions, HOME, TMPDIR and W&B's folders."""
    root = Path(tempfile.mkdtemp(prefix="orchsec-", dir="/tmp"))
    dirs = {name: root / name for name in ("state", "scratch", "ray", "tmp", "home", "wandb")}
    for d in dirs.values():
        d.mkdir()
    env = {
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "RAY_TMPDIR": str(dirs["ray"]),
        "ORCH_LOCAL_DIR": str(dirs["scratch"]),
        "WANDB_CONFIG_DIR": str(dirs["wandb"] / "config"),
        "WANDB_CACHE_DIR": str(dirs["wandb"] / "cache"),
        "WANDB_DATA_DIR": str(dirs["wandb"] / "data"),
        "WANDB_ARTIFACT_DIR": str(dirs["wandb"] / "artifacts"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    try:
        yield root, dirs, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bucket_hits(s3_server, bucket: str, secrets: dict[str, str]) -> tuple[list[str], int]:
    """Hits in every object of the bucket (body and metadata), and the number of objects."""
    client = s3_server.client()
    hits, n = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            data = got["Body"].read() + json.dumps(got.get("Metadata", {})).encode() + obj["Key"].encode()
            hits += [f"s3://{bucket}/{obj['Key']}: {name}" for name in find_in_bytes(data, secrets)]
            n += 1
    return hits, n


def output_hits(outputs: dict[str, str], secrets: dict[str, str]) -> list[str]:
    return [f"output of `{cmd}`: {name}" for cmd, text in outputs.items()
            for name in find_in_bytes(text.encode(), secrets)]
