"""Reader throughput: orch's shard reader against plain boto3 GETs of the same shards, and against
mosaicml-streaming reading the same tokens converted to its MDS format, all from the same S3
endpoint (a moto server on loopback; pass --endpoint for a real one). Prints MB/s and ratios.

    .venv/bin/python bench/reader_throughput.py                  # orch vs boto3, loopback
    .venv/bin/python bench/reader_throughput.py --link-mbit 2000 # behind a 2 Gbit/s link (root)
    # with mosaicml-streaming (its deps would replace torch, so they go in a side folder, no deps):
    .venv/bin/python -m pip install --no-deps --target .bench-deps mosaicml-streaming==0.13.0 \
        xxhash zstd python-snappy cramjam brotli pillow catalogue
    PYTHONPATH=.bench-deps .venv/bin/python bench/reader_throughput.py

Every side reads one full epoch of the same token bytes, cold (empty local caches), with the same
number of download threads; throughput is token bytes delivered to the training loop per second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (imported up front, as in training: not part of any measured time)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.constants import DATASET_FORMAT_VERSION  # noqa: E402
from orchestrator.data.manifest import Manifest, ShardInfo, SplitInfo  # noqa: E402
from orchestrator.data.reader import SplitReader  # noqa: E402
from orchestrator.storage import join_uri, open_store  # noqa: E402

SEQ = 1024


def make_dataset(store, uri: str, shards: int, shard_mb: float, seed: int = 0) -> Manifest:
    """Random uint16 tokens written as orch shards plus a manifest (no tokenizer needed to read)."""
    rng = np.random.default_rng(seed)
    tokens_per_shard = int(shard_mb * 2**20 / 2)
    infos = []
    for i in range(shards):
        arr = rng.integers(0, 50000, tokens_per_shard, dtype=np.uint16)
        data = arr.tobytes()
        key = f"train/shard-{i:05d}-0000.bin"
        store.put(join_uri(uri, key), data)
        infos.append(ShardInfo(key=key, tokens=len(arr), samples=(len(arr) - 1) // SEQ, bytes=len(data),
                               sha256=hashlib.sha256(data).hexdigest()))
    m = Manifest(name="bench", kind="text", dtype="uint16", seq_len=SEQ, vocab_size=50304, eot_id=0,
                 tokenizer_key="tokenizer.json", tokenizer_sha256="-", splits={"train": SplitInfo(tuple(infos))},
                 signature=f"bench{seed}{shards}", source="bench", format_version=DATASET_FORMAT_VERSION)
    store.put(join_uri(uri, "manifest.json"), m.to_json().encode())
    return m


def bench_boto3(endpoint: str, bucket: str, keys: list[str], workers: int) -> tuple[float, int]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, keys))
    return time.perf_counter() - t0, total


def bench_orch(store, uri: str, manifest: Manifest, workers: int, batch: int, prefetch: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as cache:
        reader = SplitReader(store, uri, manifest, "train", cache, cache_limit_mb=1 << 16,
                             prefetch_batches=prefetch, download_workers=workers)
        order = reader.order(seed=0, shuffle_window=8, global_batch_size=batch)
        total = 0
        t0 = time.perf_counter()
        for cursor in range(0, order.samples_per_epoch, batch):
            for x, _ in reader.read_rank_share(order, cursor, 0, 1, batch):
                total += x.numel() * 2  # uint16 token bytes delivered (int64 tensors hold them)
        elapsed = time.perf_counter() - t0
        reader.close()
    return elapsed, total


def bench_orch_fetch(store, uri: str, manifest: Manifest, workers: int) -> tuple[float, int]:
    """The reader's download path alone: every shard fetched by ranged GETs into the local cache
    and sha256-verified (no sample assembly)."""
    with tempfile.TemporaryDirectory() as cache:
        reader = SplitReader(store, uri, manifest, "train", cache, cache_limit_mb=1 << 16, download_workers=workers)
        files = reader.files_of(np.arange(reader.num_samples))
        t0 = time.perf_counter()
        reader.cache.prefetch(files, 0)
        with reader.cache.hold(files):
            elapsed = time.perf_counter() - t0
        reader.close()
    return elapsed, sum(f.size for f in files)


def _skip_streaming_vision() -> None:
    """mosaicml-streaming imports its vision and multimodal helpers (and so torchvision) when it is
    imported; the text path measured here never uses them, and PyPI's torchvision does not match
    every torch build, so those two subpackages are replaced by empty modules."""
    for name in ("streaming.vision", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))


def bench_streaming(endpoint: str, bucket: str, store, uri: str, manifest: Manifest, workers: int,
                    batch: int) -> tuple[float, int] | None:
    try:
        _skip_streaming_vision()
        from streaming import MDSWriter, StreamingDataset
    except ImportError as e:
        print(f"mosaicml-streaming: not installed ({e}); see this file's docstring", file=sys.stderr)
        return None
    os.environ["S3_ENDPOINT_URL"] = endpoint
    remote = f"s3://{bucket}/mds"
    shard_bytes = manifest.splits["train"].shards[0].bytes
    with tempfile.TemporaryDirectory() as tmp:
        with MDSWriter(out=(os.path.join(tmp, "out"), remote), columns={"tokens": "bytes"},
                       size_limit=shard_bytes + 4096) as w:
            for info in manifest.splits["train"].shards:
                data = store.get(join_uri(uri, info.key))
                step = SEQ * 2
                for j in range(info.samples):
                    w.write({"tokens": data[j * step : j * step + step + 2]})
        local = os.path.join(tmp, "cache")
        ds = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=0, batch_size=batch,
                              predownload=batch * 8, download_retry=2)
        total = 0
        t0 = time.perf_counter()
        for sample in ds:
            total += len(sample["tokens"]) - 2  # the same tokens orch delivers (inputs only)
        elapsed = time.perf_counter() - t0
    return elapsed, total


def wait_for_port(host: str, port: int, tries: int = 100) -> None:
    """Until the moto S3 server just started listens at host:port, at most tries x ~0.1 s; one line
    and exit code 2 if it never does (moto is in the test extras, not in a plain setup)."""
    import importlib.util
    import socket

    installed = importlib.util.find_spec("moto") and importlib.util.find_spec("flask")  # (moto's server needs flask)
    for _ in range(tries if installed else 0):
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    print(f"{Path(sys.argv[0]).name}: no S3 server came up at {host}:{port}: the bench starts moto's, which comes "
          f"with the test extras; install them with `bash scripts/setup.sh --test`", file=sys.stderr)
    sys.exit(2)


def shaped_link(mbit: int) -> str:
    """A network namespace joined to this one by a veth pair whose both directions are limited to
    `mbit` Mbit/s (tc tbf): the S3 server runs there, as behind a real network link. Needs root."""
    import subprocess

    ns = "orchbench"
    cleanup = [["ip", "link", "del", "obench0"], ["ip", "netns", "del", ns]]  # leftovers of an earlier run
    for cmd in cleanup:
        subprocess.run(cmd, check=False, capture_output=True)
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", "obench0", "type", "veth", "peer", "name", "obench1"],
        ["ip", "link", "set", "obench1", "netns", ns],
        ["ip", "addr", "add", "10.213.0.1/24", "dev", "obench0"],
        ["ip", "link", "set", "obench0", "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", "10.213.0.2/24", "dev", "obench1"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "obench1", "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", "obench0", "root", "tbf", "rate", f"{mbit}mbit",
         "burst", "1mb", "latency", "50ms"],
        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "obench1", "root", "tbf", "rate", f"{mbit}mbit",
         "burst", "1mb", "latency", "50ms"],
    ]
    for cmd in cmds:
        subprocess.run(cmd, check=True, capture_output=True)
    return ns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=24)
    p.add_argument("--shard-mb", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=4, help="download threads, the same for every side")
    p.add_argument("--batch", type=int, default=256, help="samples of 1024 tokens per global batch")
    p.add_argument("--prefetch", type=int, default=16, help="orch: global batches fetched ahead")
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of a local moto server")
    p.add_argument("--link-mbit", type=int, default=0,
                   help="put the moto server behind a link of this many Mbit/s (network namespace + tc; root)")
    p.add_argument("--bucket", default="orch-bench")
    args = p.parse_args()

    server, netns = None, None
    if not args.endpoint:
        # A moto S3 server in its own process (like a real endpoint: not sharing this one's GIL),
        # on loopback, or behind a rate-limited link in a network namespace (--link-mbit).
        import socket
        import subprocess

        for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        host, prefix = "127.0.0.1", []
        if args.link_mbit:
            netns = shaped_link(args.link_mbit)
            host, prefix = "10.213.0.2", ["ip", "netns", "exec", netns]
        server = subprocess.Popen([*prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args.endpoint = f"http://{host}:{port}"
        wait_for_port(host, port)
    import boto3

    boto3.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket=args.bucket)
    uri = f"s3://{args.bucket}/datasets/bench"
    store = open_store(uri, endpoint_url=args.endpoint)
    manifest = make_dataset(store, uri, args.shards, args.shard_mb)
    keys = [f"datasets/bench/{s.key}" for s in manifest.splits["train"].shards]
    mb = sum(s.bytes for s in manifest.splits["train"].shards) / 2**20
    link = f"a {args.link_mbit} Mbit/s link" if args.link_mbit else "loopback"
    print(f"dataset: {args.shards} shards x {args.shard_mb} MB = {mb:.0f} MB at {args.endpoint} ({link}); "
          f"{args.workers} download threads each side")

    results = {}
    t, n = bench_boto3(args.endpoint, args.bucket, keys, args.workers)
    results["boto3 GET (whole shards)"] = n / t / 2**20
    t, n = bench_orch_fetch(store, uri, manifest, args.workers)
    results["orch shard cache (fetch)"] = n / t / 2**20
    t, n = bench_orch(store, uri, manifest, args.workers, args.batch, args.prefetch)
    results["orch SplitReader (epoch)"] = n / t / 2**20
    st = bench_streaming(args.endpoint, args.bucket, store, uri, manifest, args.workers, args.batch)
    if st:
        results["mosaicml-streaming (epoch)"] = st[1] / st[0] / 2**20
    for name, v in results.items():
        print(f"{name:<30} {v:8.1f} MB/s")
    base = results["boto3 GET (whole shards)"]
    ours = results["orch SplitReader (epoch)"]
    print(f"ratio orch fetch / boto3        {results['orch shard cache (fetch)'] / base:8.2f}   (target >= 0.8)")
    print(f"ratio orch epoch / boto3        {ours / base:8.2f}   (includes assembling int64 batches)")
    if "mosaicml-streaming (epoch)" in results:
        print(f"ratio orch / mosaicml-streaming {ours / results['mosaicml-streaming (epoch)']:8.2f}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    if server:
        server.terminate()
        server.wait()
    if netns:
        import subprocess

        subprocess.run(["ip", "netns", "del", netns], check=False)


if __name__ == "__main__":
    main()
