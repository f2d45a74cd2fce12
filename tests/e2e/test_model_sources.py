"""Model sources against real servers in this process: http.server, moto's S3 server, two real processes.

Every fetch goes through :class:`ModelStore` exactly as a worker does it: a
store with an empty ``model_dir`` and ``[[worker.models.sources]]`` entries.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hypha_celery.config import ModelSource
from hypha_celery.errors import UnsupportedModel
from hypha_celery.formats.safe_files import sha256_file
from hypha_celery.manifest import validate_model_id
from hypha_celery.models.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "weights.safetensors"
MODEL_FILES = ("manifest.json", WEIGHTS)


# ---------------------------------------------------------------- helpers


class Server(ThreadingHTTPServer):
    """A static file server on 127.0.0.1 that records every path it was asked for."""

    daemon_threads = True

    def __init__(self, handler: type[SimpleHTTPRequestHandler], directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        self.paths: list[str] = []
        self.paths_lock = threading.Lock()
        self.before_weights: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def count(self, suffix: str) -> int:
        with self.paths_lock:
            return sum(path.endswith(suffix) for path in self.paths)


class CountingHandler(SimpleHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        with self.server.paths_lock:
            self.server.paths.append(self.path)
        if self.path.endswith(WEIGHTS) and self.server.before_weights is not None:
            self.server.before_weights()
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


class HalfBodyHandler(CountingHandler):
    """Announces the whole weights file in Content-Length, then sends half and hangs up."""

    def copyfile(self, source: Any, outputfile: Any) -> None:
        if not self.path.endswith(WEIGHTS):
            return super().copyfile(source, outputfile)
        size = os.fstat(source.fileno()).st_size
        outputfile.write(source.read(size // 2))
        self.close_connection = True


class ChunkedCutHandler(CountingHandler):
    """Sends the weights with chunked transfer encoding and hangs up before the last chunk."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self.path.endswith(WEIGHTS):
            return super().do_GET()
        with self.server.paths_lock:
            self.server.paths.append(self.path)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = data[: len(data) // 2]
        self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
        self.wfile.flush()
        self.close_connection = True  # no "0\r\n\r\n": the body never ends properly


class ChunkedLongHandler(CountingHandler):
    """Sends the weights with chunked transfer encoding (no length announced) and 1 MiB more than the file."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self.path.endswith(WEIGHTS):
            return super().do_GET()
        with self.server.paths_lock:
            self.server.paths.append(self.path)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes() + bytes(1 << 20)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(data), 1 << 16):
            piece = data[start : start + (1 << 16)]
            try:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except OSError:  # the client hung up: it refused the body
                break
        self.close_connection = True


class HugeLengthHandler(CountingHandler):
    """Announces a terabyte of weights, sends none of it, and holds the connection until ``release`` is set."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def do_GET(self) -> None:
        if not self.path.endswith(WEIGHTS):
            return super().do_GET()
        with self.server.paths_lock:
            self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.flush()
        self.release.wait(60)
        self.close_connection = True


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """``serve(directory, handler=CountingHandler)``: a running server, shut down after the test."""
    started: list[tuple[Server, threading.Thread]] = []

    def start(directory: Path, handler: type[SimpleHTTPRequestHandler] = CountingHandler) -> Server:
        server = Server(handler, directory)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"http-{server.url}", daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def served(tmp_path: Path, model_dir: Path) -> Path:
    """A private copy of the example models (``mlp``, ``cnn``) for a server to serve and tests to spoil."""
    directory = tmp_path / "served"
    directory.mkdir()
    for name in ("mlp", "cnn"):
        shutil.copytree(model_dir / name, directory / name)
    return directory


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """The worker's model_dir: empty (not even created) until a fetch installs something."""
    return tmp_path / "store"


def http(server: Server) -> ModelSource:
    return ModelSource(type="http", url=server.url)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Change one byte in place (same size), like bit rot or a tampered mirror."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(data[at : at + 1])


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def assert_nothing_installed(root: Path, model_id: str = "mlp") -> None:
    assert not (root / model_id).exists(), f"{model_id} was installed after a refused fetch"
    if root.exists():
        leftovers = [entry.name for entry in root.iterdir() if entry.name.startswith(".incoming-")]
        assert leftovers == [], f"staging folders left behind: {leftovers}"
    assert ModelStore(root).list() == []


# ---------------------------------------------------------------- 1. http: fetch once, then local


def test_http_source_fetches_a_missing_model_on_first_manifest(serve: Callable[..., Server], served: Path,
                                                               store_dir: Path) -> None:
    # Given an http source serving the example models and a store with an empty model_dir
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the worker first asks for mlp's manifest
    manifest = store.manifest("mlp")
    # Then the model was fetched and installed, byte for byte as served
    assert manifest.id == "mlp" and manifest.architecture == "mlp"
    for name in MODEL_FILES:
        assert (store_dir / "mlp" / name).read_bytes() == (served / "mlp" / name).read_bytes()
    assert server.count("/mlp/manifest.json") == 1 and server.count(f"/mlp/{WEIGHTS}") == 1
    assert store.list() == ["mlp"]


def test_http_source_fetches_a_missing_model_when_first_opened(serve: Callable[..., Server], served: Path,
                                                               store_dir: Path) -> None:
    # Given an http source and an empty store
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the worker first asks for verified weights
    entry = store.open("mlp")
    manifest, weights = entry.manifest, entry.file(WEIGHTS)
    # Then it gets the installed, verified weights file, identical to the served one
    assert weights == store_dir / "mlp" / WEIGHTS
    assert weights.read_bytes() == (served / "mlp" / WEIGHTS).read_bytes()
    assert sha256_file(weights) == manifest.files[WEIGHTS].sha256


def test_an_installed_model_is_not_fetched_again(serve: Callable[..., Server], served: Path, store_dir: Path) -> None:
    # Given a store that already fetched mlp over http
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    store.open("mlp")
    requests = len(server.paths)
    # When the same store, and a fresh store on the same model_dir, ask for it again
    store.manifest("mlp")
    store.open("mlp")
    ModelStore(store_dir, [http(server)]).open("mlp")
    # Then the server saw no further request
    assert len(server.paths) == requests == 2


# ---------------------------------------------------------------- 2-4. refused downloads leave nothing behind


def test_weights_with_a_wrong_checksum_are_refused(serve: Callable[..., Server], served: Path, store_dir: Path) -> None:
    # Given a mirror whose weights were altered by one byte (same size), manifest unchanged
    flip_byte(served / "mlp" / WEIGHTS)
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="sha256"):
        store.manifest("mlp")
    # Then nothing was installed, not even a staging folder
    assert server.count(f"/mlp/{WEIGHTS}") == 1
    assert_nothing_installed(store_dir)


def test_weights_cut_short_by_the_server_are_refused_as_truncated(serve: Callable[..., Server], served: Path,
                                                                  store_dir: Path) -> None:
    # Given a server that announces the whole weights file but hangs up half way
    server = serve(served, HalfBodyHandler)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="truncated"):
        store.open("mlp")
    # Then nothing was installed
    assert_nothing_installed(store_dir)


def test_a_chunked_body_cut_short_is_refused_as_unsupported_model(serve: Callable[..., Server], served: Path,
                                                                  store_dir: Path) -> None:
    # Given a server that streams the weights in chunks and hangs up before the last one
    server = serve(served, ChunkedCutHandler)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp
    # Then the broken transfer is a refused model (not a raw http.client error), and nothing is installed
    with pytest.raises(UnsupportedModel, match="download interrupted"):
        store.manifest("mlp")
    assert server.count(f"/mlp/{WEIGHTS}") == 1
    assert_nothing_installed(store_dir)


def test_a_weights_file_shorter_than_its_manifest_is_refused_as_truncated(serve: Callable[..., Server], served: Path,
                                                                          store_dir: Path) -> None:
    # Given a mirror whose weights file was truncated on disk, manifest unchanged
    weights = served / "mlp" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="truncated"):
        store.manifest("mlp")
    # Then nothing was installed
    assert_nothing_installed(store_dir)


def test_a_weights_file_longer_than_its_manifest_is_refused(serve: Callable[..., Server], served: Path,
                                                           store_dir: Path) -> None:
    # Given a mirror whose weights file has extra bytes appended (the manifest still states the old size)
    with open(served / "mlp" / WEIGHTS, "ab") as handle:
        handle.write(b"\0" * 4096)
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp, Then the announced length gives it away before the body is read
    with pytest.raises(UnsupportedModel, match=r"announces .* bytes, longer than the manifest's"):
        store.manifest("mlp")
    # Then nothing was installed
    assert_nothing_installed(store_dir)


def test_a_body_longer_than_its_manifest_is_cut_off_while_it_streams(serve: Callable[..., Server], served: Path,
                                                                     store_dir: Path) -> None:
    # Given a server that sends the weights chunked (no length announced) with 1 MiB more than the manifest lists
    server = serve(served, ChunkedLongHandler)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp, Then the download stops at the manifest's size, refused
    with pytest.raises(UnsupportedModel, match="longer than the manifest's"):
        store.manifest("mlp")
    assert_nothing_installed(store_dir)


def test_an_announced_length_above_the_manifest_is_refused_before_the_body(serve: Callable[..., Server],
                                                                          served: Path, store_dir: Path) -> None:
    # Given a server that announces a terabyte of weights and then sends nothing (it would stall a reader)
    HugeLengthHandler.release.clear()
    server = serve(served, HugeLengthHandler)
    store = ModelStore(store_dir, [http(server)])
    try:
        # When the store fetches mlp, Then the Content-Length refuses it at once, without waiting for a byte
        with pytest.raises(UnsupportedModel, match=r"announces 1000000000000 bytes, longer than the manifest's"):
            store.manifest("mlp")
    finally:
        HugeLengthHandler.release.set()
    assert server.count(f"/mlp/{WEIGHTS}") == 1
    assert_nothing_installed(store_dir)


def test_a_model_above_max_model_size_is_refused_before_its_weights_are_downloaded(
    serve: Callable[..., Server], served: Path, store_dir: Path
) -> None:
    # Given a store whose max_model_size is below mlp's weights size
    server = serve(served)
    size = (served / "mlp" / WEIGHTS).stat().st_size
    store = ModelStore(store_dir, [http(server)], max_model_size=size - 1)
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="max_model_size"):
        store.manifest("mlp")
    # Then only the manifest was read: the weights were never requested, nothing installed
    assert server.count("/mlp/manifest.json") == 1 and server.count(f"/mlp/{WEIGHTS}") == 0
    assert_nothing_installed(store_dir)


def test_files_that_together_exceed_max_model_size_are_refused(serve: Callable[..., Server], served: Path,
                                                               store_dir: Path) -> None:
    # Given a manifest listing the weights (exactly max_model_size) plus one more small file
    size = (served / "mlp" / WEIGHTS).stat().st_size
    (served / "mlp" / "extra.bin").write_bytes(b"x" * 10)
    edit_manifest(served / "mlp", lambda m: m["files"].update(
        {"extra.bin": {"sha256": hashlib.sha256(b"x" * 10).hexdigest(), "size": 10}}))
    server = serve(served)
    store = ModelStore(store_dir, [http(server)], max_model_size=size)
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="above max_model_size"):
        store.manifest("mlp")
    # Then no file was downloaded and nothing installed
    assert server.count(WEIGHTS) == 0 and server.count("extra.bin") == 0
    assert_nothing_installed(store_dir)


# ---------------------------------------------------------------- 5. sources in order


def test_sources_are_tried_in_order_until_one_has_the_model(serve: Callable[..., Server], served: Path,
                                                            tmp_path: Path, store_dir: Path) -> None:
    # Given a first http source without the model (404) and a second one with it
    empty = tmp_path / "empty"
    empty.mkdir()
    first, second = serve(empty), serve(served)
    store = ModelStore(store_dir, [http(first), http(second)])
    # When the store fetches mlp
    entry = store.open("mlp")
    manifest, weights = entry.manifest, entry.file(WEIGHTS)
    # Then the first was asked for the manifest only, and the second served the model
    assert first.paths == ["/mlp/manifest.json"]
    assert second.paths == ["/mlp/manifest.json", f"/mlp/{WEIGHTS}"]
    assert sha256_file(weights) == manifest.files[WEIGHTS].sha256


def test_a_source_serving_a_bad_copy_falls_through_to_the_next(serve: Callable[..., Server], served: Path,
                                                               tmp_path: Path, store_dir: Path) -> None:
    # Given a first source with a tampered copy and a second, local source with a good one
    bad = tmp_path / "bad"
    shutil.copytree(served, bad)
    flip_byte(bad / "mlp" / WEIGHTS)
    first = serve(bad)
    store = ModelStore(store_dir, [http(first), ModelSource(type="local", path=str(served))])
    # When the store fetches mlp
    weights = store.open("mlp").file(WEIGHTS)
    # Then the good copy is installed
    assert weights.read_bytes() == (served / "mlp" / WEIGHTS).read_bytes()


def test_when_every_source_fails_each_reason_is_reported(serve: Callable[..., Server], tmp_path: Path,
                                                         store_dir: Path) -> None:
    # Given an http source and a local source, neither of which has the model
    (tmp_path / "empty").mkdir()
    server = serve(tmp_path / "empty")
    store = ModelStore(store_dir, [http(server), ModelSource(type="local", path=str(tmp_path / "empty"))])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel) as refused:
        store.manifest("mlp")
    # Then the error names both failures, and nothing was installed
    assert "http: GET" in str(refused.value) and "HTTP 404" in str(refused.value)
    assert "local: not found" in str(refused.value)
    assert_nothing_installed(store_dir)


# ---------------------------------------------------------------- 6. S3 (moto server)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    if server._server is not None:  # stop() shuts the loop down but leaves the listening socket open
        server._server.server_close()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A fresh bucket on the moto server, and a client for it (dummy credentials, no config files)."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    client.close()


def upload(client: Any, bucket: str, folder: Path, prefix: str) -> None:
    for name in MODEL_FILES:
        client.put_object(Bucket=bucket, Key=f"{prefix}{folder.name}/{name}", Body=(folder / name).read_bytes())


def test_s3_source_fetches_a_model_from_a_prefix(s3_bucket: tuple[Any, str], moto_endpoint: str, served: Path,
                                                 store_dir: Path) -> None:
    # Given the mlp files uploaded under a prefix of an S3 bucket
    client, bucket = s3_bucket
    upload(client, bucket, served / "mlp", "models/")
    source = ModelSource(type="s3", bucket=bucket, region="us-east-1", endpoint_url=moto_endpoint, prefix="models/")
    store = ModelStore(store_dir, [source])
    # When an empty store asks for mlp's verified weights
    entry = store.open("mlp")
    manifest, weights = entry.manifest, entry.file(WEIGHTS)
    # Then they were fetched from S3, byte for byte
    for name in MODEL_FILES:
        assert (store_dir / "mlp" / name).read_bytes() == (served / "mlp" / name).read_bytes()
    assert sha256_file(weights) == manifest.files[WEIGHTS].sha256


def test_a_tampered_s3_object_is_refused(s3_bucket: tuple[Any, str], moto_endpoint: str, served: Path,
                                         store_dir: Path) -> None:
    # Given the mlp files in S3, with one byte of the weights object changed
    client, bucket = s3_bucket
    upload(client, bucket, served / "mlp", "models/")
    data = bytearray((served / "mlp" / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"models/mlp/{WEIGHTS}", Body=bytes(data))
    source = ModelSource(type="s3", bucket=bucket, region="us-east-1", endpoint_url=moto_endpoint, prefix="models/")
    store = ModelStore(store_dir, [source])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match="sha256"):
        store.manifest("mlp")
    # Then nothing was installed
    assert_nothing_installed(store_dir)


def test_a_missing_s3_key_falls_through_to_the_next_source(s3_bucket: tuple[Any, str], moto_endpoint: str,
                                                           serve: Callable[..., Server], served: Path,
                                                           store_dir: Path) -> None:
    # Given an S3 bucket without the model, then an http source with it
    _, bucket = s3_bucket
    server = serve(served)
    s3 = ModelSource(type="s3", bucket=bucket, region="us-east-1", endpoint_url=moto_endpoint, prefix="models/")
    store = ModelStore(store_dir, [s3, http(server)])
    # When the store fetches mlp
    manifest = store.manifest("mlp")
    # Then the http source served it
    assert manifest.id == "mlp" and server.count(f"/mlp/{WEIGHTS}") == 1


def test_an_s3_object_longer_than_its_manifest_is_refused_from_its_stated_size(
    s3_bucket: tuple[Any, str], moto_endpoint: str, served: Path, store_dir: Path
) -> None:
    # Given the mlp files in S3, the weights object 1 MiB longer than the manifest lists
    client, bucket = s3_bucket
    upload(client, bucket, served / "mlp", "models/")
    client.put_object(Bucket=bucket, Key=f"models/mlp/{WEIGHTS}",
                      Body=(served / "mlp" / WEIGHTS).read_bytes() + bytes(1 << 20))
    source = ModelSource(type="s3", bucket=bucket, region="us-east-1", endpoint_url=moto_endpoint, prefix="models/")
    # When the store fetches mlp, Then the object's ContentLength refuses it before its body is read
    with pytest.raises(UnsupportedModel, match=r"announces .* bytes, longer than the manifest's"):
        ModelStore(store_dir, [source]).manifest("mlp")
    assert_nothing_installed(store_dir)


# ---------------------------------------------------------------- 6b. a local source opens no link


def _link_weights(served: Path, outside: Path) -> None:
    """mlp's weights replaced by a link to a byte-identical file outside the source: the hash still matches."""
    (outside / WEIGHTS).write_bytes((served / "mlp" / WEIGHTS).read_bytes())
    (served / "mlp" / WEIGHTS).unlink()
    (served / "mlp" / WEIGHTS).symlink_to(outside / WEIGHTS)


def _link_model_folder(served: Path, outside: Path) -> None:
    """mlp's folder replaced by a link to a copy outside the source."""
    shutil.copytree(served / "mlp", outside / "mlp")
    shutil.rmtree(served / "mlp")
    (served / "mlp").symlink_to(outside / "mlp", target_is_directory=True)


@pytest.mark.parametrize("plant", [_link_weights, _link_model_folder])
def test_a_local_source_refuses_a_link_even_to_the_right_bytes(served: Path, store_dir: Path, tmp_path: Path,
                                                               plant: Callable[[Path, Path], None]) -> None:
    # Given a local source (a shared mount) where a link was planted below its path, to a file outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(served, outside)
    store = ModelStore(store_dir, [ModelSource(type="local", path=str(served))])
    # When the store fetches mlp, Then the link is refused (not followed), and nothing is installed
    with pytest.raises(UnsupportedModel, match="symbolic link"):
        store.manifest("mlp")
    assert_nothing_installed(store_dir)


def test_a_fifo_in_a_local_source_is_refused_without_waiting(served: Path, store_dir: Path) -> None:
    # Given a local source whose weights are a FIFO (opening it for reading would wait for a writer forever)
    (served / "mlp" / WEIGHTS).unlink()
    os.mkfifo(served / "mlp" / WEIGHTS)
    store = ModelStore(store_dir, [ModelSource(type="local", path=str(served))])
    # When the store fetches mlp, Then it is refused at once as not a regular file
    with pytest.raises(UnsupportedModel, match="is a FIFO"):
        store.manifest("mlp")
    assert_nothing_installed(store_dir)


# ---------------------------------------------------------------- 7. ids cannot leave model_dir

BAD_IDS = ["../etc", "..", ".", "a/b", "/abs", "", "x" * 129, "x" * 200, "a..b", "mlp\n", "ml\np", "a b",
           "a\\b", ".hidden", "-flag", "mlp\x00"]


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_validate_model_id_refuses_malformed_ids(model_id: str) -> None:
    # Given a malformed id, When validated, Then it is refused
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        validate_model_id(model_id)


@pytest.mark.parametrize("model_id", [None, 5, b"mlp", ["mlp"]])
def test_validate_model_id_refuses_non_strings(model_id: object) -> None:
    # Given something that is not a string, When validated, Then it is refused
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        validate_model_id(model_id)


@pytest.mark.parametrize("model_id", ["mlp", "a", "x" * 128, "resnet-50_v1.2", "A.b-c_9"])
def test_validate_model_id_accepts_well_formed_ids(model_id: str) -> None:
    # Given a well-formed id, When validated, Then it is returned unchanged
    assert validate_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_store_refuses_malformed_ids_without_asking_any_source(model_id: str, serve: Callable[..., Server],
                                                               served: Path, store_dir: Path) -> None:
    # Given a store with an http source
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When asked for a malformed id, Then it is refused and no source was asked
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        store.manifest(model_id)
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        store.open(model_id)
    assert server.paths == []


def test_a_manifest_outside_model_dir_is_never_read(tmp_path: Path, model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a valid-looking model next to model_dir, at model_dir/../secret
    root = tmp_path / "models"
    shutil.copytree(model_dir / "mlp", root / "mlp")
    shutil.copytree(model_dir / "mlp", tmp_path / "secret")
    edit_manifest(tmp_path / "secret", lambda m: m.update(id="../secret"))
    opened: list[str] = []
    real_open = open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *args, **kwargs)

    store = ModelStore(root, [ModelSource(type="local", path=str(tmp_path / "models"))])
    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr("io.open", spy)
    # When the store is asked for '../secret'
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        store.manifest("../secret")
    with pytest.raises(UnsupportedModel, match="invalid model id"):
        store.open("../secret")
    monkeypatch.undo()
    # Then no file under 'secret' was opened, and the store still only lists its own model
    assert not [path for path in opened if "secret" in path]
    assert store.list() == ["mlp"]


# ---------------------------------------------------------------- 8. tampered local models


@pytest.fixture
def local_store(tmp_path: Path, model_dir: Path) -> Path:
    root = tmp_path / "local"
    root.mkdir()
    shutil.copytree(model_dir / "mlp", root / "mlp")
    return root


def test_a_fresh_store_refuses_locally_tampered_weights(local_store: Path) -> None:
    # Given an installed mlp whose weights were changed by one byte
    flip_byte(local_store / "mlp" / WEIGHTS)
    # When a fresh store verifies it
    # Then it is refused for its sha256
    with pytest.raises(UnsupportedModel, match="sha256"):
        ModelStore(local_store).open("mlp")


def test_weights_tampered_after_a_cached_verification_are_refused(local_store: Path) -> None:
    # Given a store that already verified mlp (and caches that verification)
    store = ModelStore(local_store)
    store.open("mlp")
    # When one byte of the weights is changed in place, with a visibly newer mtime
    weights = local_store / "mlp" / WEIGHTS
    before = weights.stat()
    flip_byte(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    # Then the same store refuses it
    with pytest.raises(UnsupportedModel, match="sha256"):
        store.open("mlp")


def test_weights_tampered_with_their_mtime_put_back_are_still_refused(local_store: Path) -> None:
    # Given a store that already verified mlp
    store = ModelStore(local_store)
    store.open("mlp")
    # When one byte is changed in place and the old mtime restored (as rsync --inplace or touch -r would)
    weights = local_store / "mlp" / WEIGHTS
    before = weights.stat()
    time.sleep(0.02)  # past the file system's timestamp granularity
    flip_byte(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_size == before.st_size
    # Then the same store still refuses it
    with pytest.raises(UnsupportedModel, match="sha256"):
        store.open("mlp")


def test_a_truncated_local_weights_file_is_refused(local_store: Path) -> None:
    # Given an installed mlp whose weights file lost its tail
    weights = local_store / "mlp" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1])
    # When verified, Then it is refused as truncated
    with pytest.raises(UnsupportedModel, match="truncated"):
        ModelStore(local_store).open("mlp")


# ---------------------------------------------------------------- 9. two processes, one download

_FETCH = """
import sys
from hypha_celery.config import ModelSource
from hypha_celery.models.store import ModelStore
store = ModelStore(sys.argv[1], [ModelSource(type="http", url=sys.argv[2])])
store.ensure("mlp")
manifest = store.open("mlp").manifest
print(manifest.files["weights.safetensors"].sha256)
"""


def _someone_waits_on(lock: Path) -> bool:
    """Whether /proc/locks shows a process blocked on an flock of ``lock``."""
    try:
        inode = lock.stat().st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    return any("->" in line.split() and line.split()[-3].endswith(f":{inode}") for line in table.splitlines())


def test_two_processes_fetching_the_same_model_download_it_once(serve: Callable[..., Server], served: Path,
                                                                store_dir: Path) -> None:
    # Given an http source whose first weights download waits until another process queues on the model's lock
    server = serve(served)
    lock = store_dir / ".locks" / "mlp.lock"
    contended: list[bool] = []

    def hold_until_contended() -> None:
        deadline = time.monotonic() + 10
        while not _someone_waits_on(lock) and time.monotonic() < deadline:
            time.sleep(0.01)
        contended.append(_someone_waits_on(lock))

    server.before_weights = hold_until_contended
    # When two processes, each with its own ModelStore on the same model_dir, ensure mlp at once
    processes = [
        subprocess.Popen([sys.executable, "-c", _FETCH, str(store_dir), server.url], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    # Then both succeed with the same intact model, installed once from a single download
    expected = json.loads((served / "mlp" / "manifest.json").read_text())["files"][WEIGHTS]["sha256"]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == expected
    assert sha256_file(store_dir / "mlp" / WEIGHTS) == expected
    assert contended == [True], "the second process never queued on the lock: the test raced nothing"
    assert server.count(f"/mlp/{WEIGHTS}") == 1
    assert server.count("/mlp/manifest.json") == 1
    assert sorted(entry.name for entry in store_dir.iterdir()) == [".locks", "mlp"]


# ---------------------------------------------------------------- 10. hostile manifests


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest.update({key: value})


def _add_file(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest["files"].update({name: {"sha256": "0" * 64, "size": 1}})


HOSTILE = {
    "file ../../x": (_add_file("../../x"), "invalid file name"),
    "file /etc/passwd": (_add_file("/etc/passwd"), "invalid file name"),
    "file sub/dir": (_add_file("sub/dir"), "invalid file name"),
    "file ..": (_add_file(".."), "invalid file name"),
    "file a\\b": (_add_file("a\\b"), "invalid file name"),
    "file with newline": (_add_file("extra\n"), "invalid file name"),
    "unknown architecture": (_set("architecture", "evil"), "unknown architecture"),
    "unhashable architecture": (_set("architecture", ["mlp"]), "unknown architecture"),
    "other model's id": (_set("id", "cnn"), "is for 'cnn'"),
    "wrong format": (_set("format", "pickle/1"), "format"),
    "config not a table": (_set("config", "xy"), "config"),
    "created_at not a number": (_set("created_at", "yesterday"), "created_at"),
    "parent not a string": (_set("parent", {"evil": True}), "parent"),
    "sha256 not a string": (lambda m: m["files"][WEIGHTS].update(sha256=10**63), "sha256"),
    "sha256 with a newline": (lambda m: m["files"][WEIGHTS].update(sha256=m["files"][WEIGHTS]["sha256"] + "\n"),
                              "sha256"),
    "negative size": (lambda m: m["files"][WEIGHTS].update(size=-1), "size"),
    "not an object": (lambda m: (m.clear(), m.update({"0": 0})), "format"),
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_manifest_from_a_source_is_refused(change: tuple[Callable[[dict[str, Any]], None], str],
                                                     serve: Callable[..., Server], served: Path, tmp_path: Path,
                                                     store_dir: Path) -> None:
    # Given a source whose mlp manifest was altered to something hostile or malformed
    alter, reason = change
    edit_manifest(served / "mlp", alter)
    server = serve(served)
    store = ModelStore(store_dir, [http(server)])
    # When the store fetches mlp
    with pytest.raises(UnsupportedModel, match=reason):
        store.manifest("mlp")
    # Then no file was requested beyond the manifest, nothing was written outside model_dir, nothing installed
    assert server.paths == ["/mlp/manifest.json"]
    assert not (tmp_path / "x").exists() and not (store_dir.parent.parent / "x").exists()
    assert_nothing_installed(store_dir)


def test_a_manifest_that_is_not_json_is_refused(serve: Callable[..., Server], served: Path, store_dir: Path) -> None:
    # Given a source whose manifest is not JSON
    (served / "mlp" / "manifest.json").write_text("<html>not found</html>")
    server = serve(served)
    # When the store fetches mlp, Then it is refused and nothing installed
    with pytest.raises(UnsupportedModel, match="not JSON"):
        ModelStore(store_dir, [http(server)]).manifest("mlp")
    assert_nothing_installed(store_dir)


def test_a_huge_manifest_is_refused_without_reading_it_all(serve: Callable[..., Server], served: Path,
                                                           store_dir: Path) -> None:
    # Given a source whose manifest is several megabytes
    (served / "mlp" / "manifest.json").write_bytes(b" " * (4 << 20))
    server = serve(served)
    # When the store fetches mlp, Then it is refused for its size and nothing installed
    with pytest.raises(UnsupportedModel, match="larger than"):
        ModelStore(store_dir, [http(server)]).manifest("mlp")
    assert_nothing_installed(store_dir)


def test_a_save_that_waited_for_the_lock_does_not_replace_a_model_saved_meanwhile(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    # Given a save of "m" that passed its "already exists?" check and now waits on the model's lock
    from hypha_celery.formats.builtin import build

    root = tmp_path / "racing"
    config = {"in_features": 4, "hidden": 16, "out_features": 3}
    outcome: list[BaseException | None] = []

    def save() -> None:
        try:
            ModelStore(root).add("builtin", build("mlp", config), "m", architecture="mlp", config=config, input_shape=[4])
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    writer = ModelStore(root)
    with writer._lock("m"):
        thread = threading.Thread(target=save)
        thread.start()
        deadline = time.monotonic() + 10
        while not _someone_waits_on(root / ".locks" / "m.lock") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _someone_waits_on(root / ".locks" / "m.lock")
        # When another writer completes "m" meanwhile
        shutil.copytree(model_dir / "mlp", root / "m")
        edit_manifest(root / "m", lambda m: m.update(id="m"))
        first = (root / "m" / "manifest.json").read_bytes()
    thread.join(30)
    # Then the waiting save is refused, and the model saved first is untouched
    assert len(outcome) == 1 and isinstance(outcome[0], UnsupportedModel), outcome
    assert "already exists" in str(outcome[0])
    assert (root / "m" / "manifest.json").read_bytes() == first
    ModelStore(root).open("m")
