"""Unit tests start no process: a test here that asks for a real Redis, broker or worker is a collection error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hypha_celery.models.shared_storage import LocalStorage, S3Storage, SharedStorage

if TYPE_CHECKING:
    from hypha_celery.models.store import ModelStore
    from hypha_celery.runtimes.transformers import TransformerModel
    from hypha_celery.tasks.base import HyphaTask

_PROCESS_FIXTURES = frozenset({
    "redis_url", "redis_client", "redis_cluster_url", "cluster_client", "amqp_url", "start_worker", "celery_client",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/unit/" not in str(item.path):
            continue
        wanted = _PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
        if wanted:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {sorted(wanted)}: move it to tests/e2e")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3Storage]:
    """An S3 bucket in moto's in-process mock, behind hypha's S3 shared storage (no credentials read from the host)."""
    import boto3
    from moto import mock_aws

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", str(tmp_path / "none")),
                        ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))):
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="shared")
        yield S3Storage("shared", region="us-east-1", prefix="runs")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> SharedStorage:
    """Shared storage on a local folder, then on S3 (moto)."""
    if request.param == "local":
        return LocalStorage(tmp_path / "shared")
    return request.getfixturevalue("s3")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny_llama_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store holding only the tiny Llama (one per test module)."""
    from hypha_celery.models.examples import tiny_llama_store

    return tiny_llama_store(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_store: ModelStore) -> TransformerModel:
    """The tiny Llama, loaded on the CPU from its store (one per test module)."""
    import torch

    from hypha_celery.models.examples import TINY_LLAMA
    from hypha_celery.runtimes import transformers as transformers_runtime

    torch.set_num_threads(1)
    return transformers_runtime.load(tiny_llama_store.open(TINY_LLAMA), "cpu")[0]


@pytest.fixture
def task() -> Iterator[HyphaTask]:
    """A bound ``HyphaTask`` (``hypha.test``, doing nothing) of an app of its own, its request pushed: id ``t1``,
    hostname ``w@host``; what the pipeline's stages read of a running task."""
    from celery import Celery

    from hypha_celery.tasks.base import HyphaTask

    app = Celery("unit-test", set_as_current=False)

    @app.task(name="hypha.test", base=HyphaTask, bind=True, shared=False)
    def probe(self: HyphaTask, **kwargs: Any) -> None:
        return None

    probe.push_request(id="t1", hostname="w@host", headers={}, delivery_info={})
    yield probe
    probe.pop_request()
    app.close()
