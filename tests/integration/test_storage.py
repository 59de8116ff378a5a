"""Object storage: the same behaviour tests on the local backend and on S3 (a real moto server on loopback).

Run: .venv/bin/python -m pytest tests/integration/test_storage.py -q
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import StorageError
from orchestrator.storage import (
    LocalStore,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    join_uri,
    open_store,
    to_uri,
)
from orchestrator.storage.local import PARTIAL_SUFFIX
from tests.fixtures_s3 import S3Server

MiB = 1024 * 1024
MULTIPART_CHUNK = 5 * MiB  # the S3 minimum part size
BIG_FILE_SIZE = 2 * MULTIPART_CHUNK + 123  # three parts, the last one short


def small_s3_store(server: S3Server, **kwargs: object) -> S3Store:
    """An S3Store on the moto server that uses multipart above 1 MiB, in 5 MiB parts."""
    options = {"multipart_threshold": 1 * MiB, "multipart_chunksize": MULTIPART_CHUNK}
    options.update(kwargs)
    return S3Store(endpoint_url=server.endpoint_url, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ObjectStore, str]]:
    """(store, root URI) for each backend; the root is empty and private to the test."""
    if request.param == "local":
        yield LocalStore(), to_uri(tmp_path / "store")
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        yield small_s3_store(server), f"s3://{server.make_bucket()}/root"


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random file large enough to be uploaded in three parts by `small_s3_store`."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    path.write_bytes(os.urandom(BIG_FILE_SIZE))
    return path


def closed_loopback_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- join_uri / to_uri / open_store ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b", ("x", "y"), "s3://b/x/y"),
        ("s3://b/", ("/x/", "/y"), "s3://b/x/y"),
        ("s3://b/root", ("dir/",), "s3://b/root/dir/"),
        ("s3://b/root", (), "s3://b/root"),
        ("file:///tmp/a/", ("b", "c.bin"), "file:///tmp/a/b/c.bin"),
        ("file:///", ("a",), "file:///a"),
        ("/tmp/a", ("b",), "/tmp/a/b"),
    ],
)
def test_join_uri_uses_single_slashes(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_uri(base, *parts) == expected


def test_to_uri_makes_absolute_file_uris_and_keeps_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert to_uri("rel/x") == f"file://{tmp_path}/rel/x"
    assert to_uri(tmp_path / "y") == f"file://{tmp_path}/y"
    assert to_uri("s3://b/k") == "s3://b/k"


def test_open_store_picks_the_backend_from_the_scheme(tmp_path: Path) -> None:
    assert isinstance(open_store("s3://bucket/root", endpoint_url="http://127.0.0.1:1"), S3Store)
    assert isinstance(open_store(to_uri(tmp_path)), LocalStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)


@pytest.mark.parametrize("uri", ["gs://bucket/root", "relative/path", "file://relative"])
def test_open_store_rejects_unknown_schemes(uri: str) -> None:
    with pytest.raises(StorageError, match="s3://") as info:
        open_store(uri)
    assert uri in str(info.value)


# -- the same behaviour on both backends -------------------------------------------------------------


def test_put_get_round_trip_and_overwrite(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "dir", "obj.bin")
    store.put(uri, b"hello")
    assert store.get(uri) == b"hello"
    store.put(uri, b"")  # empty objects are objects
    assert store.get(uri) == b""
    assert store.exists(uri)
    store.put(uri, b"second version")
    assert store.get(uri) == b"second version"


def test_get_range_returns_the_half_open_interval(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "range.bin")
    data = bytes(range(256)) * 4
    store.put(uri, data)
    assert store.get_range(uri, 0, 10) == data[0:10]
    assert store.get_range(uri, 100, 613) == data[100:613]
    assert store.get_range(uri, 7, 7) == b""
    assert store.get_range(uri, 1000, 5000) == data[1000:]  # cut short at the end
    assert store.get_range(uri, len(data), len(data) + 10) == b""  # past the end
    with pytest.raises(StorageError, match="invalid byte range"):
        store.get_range(uri, 10, 5)


def test_put_file_get_file_round_trip_large(store_root: tuple[ObjectStore, str], big_file: Path,
                                            tmp_path: Path) -> None:
    store, root = store_root
    uri = join_uri(root, "ckpt", "big.bin")
    store.put_file(uri, big_file)
    assert store.size(uri) == BIG_FILE_SIZE
    dest = tmp_path / "down" / "nested" / "big.bin"  # parent folders do not exist yet
    store.get_file(uri, dest)
    assert _sha(dest) == _sha(big_file)
    assert os.listdir(dest.parent) == ["big.bin"]  # no temporary file left behind


def test_get_file_replaces_an_existing_file(store_root: tuple[ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_root
    uri = join_uri(root, "small.txt")
    store.put(uri, b"new")
    dest = tmp_path / "small.txt"
    dest.write_bytes(b"old contents, longer")
    store.get_file(uri, str(dest))
    assert dest.read_bytes() == b"new"


def test_list_is_recursive_sorted_with_sizes(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    objects = {"a/b/c/3": b"333", "a/1": b"1", "a/b/2": b"22", "ab/x": b"xxxx", "other/y": b"y"}
    for key, data in objects.items():
        store.put(join_uri(root, key), data)

    listed = store.list(join_uri(root, "a/"))
    assert listed == [
        ObjectInfo(join_uri(root, "a/1"), 1),
        ObjectInfo(join_uri(root, "a/b/2"), 2),
        ObjectInfo(join_uri(root, "a/b/c/3"), 3),
    ]
    # A prefix without a trailing slash is a string prefix, as on S3: it also matches "ab/...".
    assert [info.uri for info in store.list(join_uri(root, "a"))] == [
        join_uri(root, key) for key in ["a/1", "a/b/2", "a/b/c/3", "ab/x"]
    ]
    everything = store.list(root)
    assert [info.uri for info in everything] == sorted(join_uri(root, key) for key in objects)
    assert sum(info.size for info in everything) == sum(len(d) for d in objects.values())
    assert store.list(join_uri(root, "missing/")) == []


def test_exists_and_size(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "d", "sized")
    assert not store.exists(uri)
    store.put(uri, b"x" * 1234)
    assert store.exists(uri)
    assert store.size(uri) == 1234
    assert not store.exists(join_uri(root, "d"))  # a "folder" is not an object
    with pytest.raises(ObjectNotFound, match="object not found"):
        store.size(join_uri(root, "d", "nope"))


def test_delete_and_missing_delete_is_not_an_error(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "gone")
    store.put(uri, b"x")
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # missing: no error
    store.delete(join_uri(root, "never", "was"))


def test_delete_prefix_deletes_only_under_the_prefix(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    for key in ["step_1/a", "step_1/sub/b", "step_1/sub/c", "step_10/a", "step_2/a"]:
        store.put(join_uri(root, key), b"data")
    assert store.delete_prefix(join_uri(root, "step_1/")) == 3
    assert [info.uri for info in store.list(root)] == [join_uri(root, "step_10/a"), join_uri(root, "step_2/a")]
    assert store.delete_prefix(join_uri(root, "step_1/")) == 0
    assert store.delete_prefix(root) == 2
    assert store.list(root) == []


def test_missing_objects_raise_object_not_found(store_root: tuple[ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_root
    uri = join_uri(root, "no", "such", "key")
    with pytest.raises(ObjectNotFound) as info:
        store.get(uri)
    assert str(info.value) == f"object not found: {uri}"
    assert isinstance(info.value, StorageError)
    with pytest.raises(ObjectNotFound):
        store.get_range(uri, 0, 10)
    dest = tmp_path / "dl" / "key"
    with pytest.raises(ObjectNotFound):
        store.get_file(uri, dest)
    assert not dest.exists()
    assert not dest.parent.exists() or os.listdir(dest.parent) == []  # no partial download left


def test_put_file_of_a_missing_local_file_fails_cleanly(store_root: tuple[ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_root
    uri = join_uri(root, "f")
    with pytest.raises(StorageError, match="does not exist"):
        store.put_file(uri, tmp_path / "absent.bin")
    assert not store.exists(uri)


def test_readers_never_see_a_partial_object(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "hot.bin")
    versions = [b"a" * (256 * 1024), b"b" * (512 * 1024)]
    store.put(uri, versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def read_until_stopped() -> None:
        while not stop.is_set():
            seen.append(store.get(uri))

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        for i in range(20):
            store.put(uri, versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and all(data in versions for data in seen)
    assert not [info for info in store.list(root) if info.uri.endswith(PARTIAL_SUFFIX)]


def test_check_accepts_a_usable_root(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    store.check(root)
    assert store.list(root) == []  # the check leaves nothing behind


def test_store_pickles_and_the_copy_still_reads(store_root: tuple[ObjectStore, str]) -> None:
    store, root = store_root
    uri = join_uri(root, "p")
    store.put(uri, b"before pickling")  # builds the S3 client, which must not be pickled
    copy = pickle.loads(pickle.dumps(store))
    assert copy.get(uri) == b"before pickling"
    copy.put(uri, b"from the copy")
    assert store.get(uri) == b"from the copy"


# -- S3 specifics ----------------------------------------------------------------------------------


def test_s3_large_files_are_uploaded_in_parts(s3_server: S3Server, big_file: Path) -> None:  # noqa: F811
    store = small_s3_store(s3_server)
    bucket = s3_server.make_bucket()
    store.put_file(f"s3://{bucket}/big.bin", big_file)
    head = s3_server.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # multipart ETag: md5-of-parts "-" part count
    assert head["ContentLength"] == BIG_FILE_SIZE


def test_s3_store_keeps_no_credentials(s3_server: S3Server) -> None:  # noqa: F811
    store = small_s3_store(s3_server)
    store.put(f"s3://{s3_server.make_bucket()}/k", b"x")
    state = pickle.dumps(store)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in state
    assert "secret" not in " ".join(vars(store)).lower()


def test_s3_missing_bucket_names_the_bucket(s3_server: S3Server) -> None:  # noqa: F811
    store = small_s3_store(s3_server)
    root = "s3://no-such-bucket-here/root"
    for call in (
        lambda: store.check(root),
        lambda: store.get(join_uri(root, "k")),
        lambda: store.put(join_uri(root, "k"), b"x"),
        lambda: store.list(root),
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, ObjectNotFound)
        assert "'no-such-bucket-here' does not exist" in message
        assert s3_server.endpoint_url in message and "storage.root" in message
        assert "\n" not in message


def test_s3_missing_credentials_say_which_variables_to_set(
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = s3_server.make_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = small_s3_store(s3_server)
    for call in (lambda: store.check(f"s3://{bucket}"), lambda: store.get(f"s3://{bucket}/k")):
        with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID") as info:
            call()
        assert f"s3://{bucket}" in str(info.value)


def test_s3_unreachable_endpoint_fails_fast_naming_it() -> None:
    endpoint = f"http://127.0.0.1:{closed_loopback_port()}"
    store = S3Store(endpoint_url=endpoint, region="us-east-1", connect_timeout=1, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.check("s3://bucket/root")
    assert time.monotonic() - started < 5
    assert endpoint in str(info.value)
    assert "storage.endpoint_url" in str(info.value)


def test_s3_rejects_parts_below_the_s3_minimum() -> None:
    with pytest.raises(StorageError, match="5 MiB"):
        S3Store(multipart_chunksize=1 * MiB)


# -- local specifics -------------------------------------------------------------------------------


def test_local_store_accepts_plain_absolute_paths(tmp_path: Path) -> None:
    store = LocalStore()
    store.put(str(tmp_path / "x" / "y"), b"plain")
    assert store.get(to_uri(tmp_path / "x" / "y")) == b"plain"
    assert store.list(str(tmp_path)) == [ObjectInfo(str(tmp_path / "x" / "y"), 5)]


def test_local_check_rejects_an_unusable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    root = to_uri(blocker / "root")  # a folder under a regular file cannot exist
    with pytest.raises(StorageError, match="storage.root") as info:
        LocalStore().check(root)
    assert str(blocker / "root") in str(info.value)


def test_local_delete_prefix_removes_emptied_folders(tmp_path: Path) -> None:
    store = LocalStore()
    root = to_uri(tmp_path)
    store.put(join_uri(root, "ckpt", "step_1", "deep", "x"), b"x")
    store.put(join_uri(root, "ckpt", "step_2", "x"), b"x")
    assert store.delete_prefix(join_uri(root, "ckpt", "step_1/")) == 1
    # like an object store, where a "folder" is only its objects: the emptied prefix folder goes too
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_2"]


def test_local_relative_path_is_rejected() -> None:
    with pytest.raises(StorageError, match="not absolute"):
        LocalStore().get("relative/path")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
