"""Building registry clients: one Redis or a Redis Cluster, named by the URL; no connection while building."""

from __future__ import annotations

import pytest
import redis

from hypha_celery.errors import ConfigError, RegistryUnavailable
from hypha_celery.harness.launch import free_port
from hypha_celery.keys import KeySchema
from hypha_celery.redis_client import LazyCluster, check_registry, hash_tag, registry_client, split_cluster_flag
from hypha_celery.resources.ledger import Ledger


def test_the_cluster_flag_is_read_and_taken_out_of_the_url() -> None:
    assert split_cluster_flag("redis://h:7000/0?cluster=true") == ("redis://h:7000/0", True)
    assert split_cluster_flag("redis://h:7000/0?cluster=no&ssl_cert_reqs=none") == (
        "redis://h:7000/0?ssl_cert_reqs=none", False)
    assert split_cluster_flag("redis://h:6379/0") == ("redis://h:6379/0", False)
    with pytest.raises(ConfigError, match="cluster= takes true or false"):
        split_cluster_flag("redis://h:7000/0?cluster=maybe")


def test_a_hash_tag_is_the_first_non_empty_braces() -> None:
    assert hash_tag("{hypha}") == "hypha"
    assert hash_tag("prod{hypha}") == "hypha"
    assert hash_tag("hypha") is None
    assert hash_tag("{}hypha") is None
    assert hash_tag("{hypha") is None


def test_a_cluster_without_a_hash_tag_prefix_is_refused_naming_the_variable() -> None:
    # Given a cluster URL and the default prefix, When it is checked, Then the refusal names HYPHA_KEY_PREFIX
    with pytest.raises(ConfigError, match=r"HYPHA_KEY_PREFIX: .*set HYPHA_KEY_PREFIX=\{hypha\}") as caught:
        registry_client("redis://127.0.0.1:7000/0?cluster=true", schema=KeySchema("hypha"))
    assert caught.value.key == "HYPHA_KEY_PREFIX"
    # ... while one Redis needs no tag, and a tagged prefix is accepted for a cluster
    assert check_registry("redis://127.0.0.1:6379/0", KeySchema("hypha")) is False
    assert check_registry("redis://127.0.0.1:7000/0?cluster=true", KeySchema("{hypha}")) is True


def test_the_prefix_is_read_from_the_environment_when_the_client_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPHA_KEY_PREFIX", "{hypha}")
    assert isinstance(registry_client("redis://127.0.0.1:7000/0?cluster=true"), LazyCluster)
    monkeypatch.setenv("HYPHA_KEY_PREFIX", "hypha")
    with pytest.raises(ConfigError, match="HYPHA_KEY_PREFIX"):
        registry_client("redis://127.0.0.1:7000/0?cluster=true")


def test_a_plain_url_builds_one_redis_client() -> None:
    client = registry_client("redis://127.0.0.1:6379/3?cluster=false", timeout=2)
    assert type(client) is redis.Redis
    assert client.connection_pool.connection_kwargs["db"] == 3


def test_building_a_cluster_client_opens_no_connection_and_an_unreachable_one_is_an_outage() -> None:
    # Given a cluster URL on a port nobody listens on
    url = f"redis://127.0.0.1:{free_port()}/0?cluster=true"
    # When the client and a ledger over it are built, Then nothing fails yet (no connection was opened)
    client = registry_client(url, timeout=1, schema=KeySchema("{hypha}"))
    ledger = Ledger(client, "node-a", schema=KeySchema("{hypha}"))
    # ... and the first use reads as a registry outage, like a single Redis that is down
    with pytest.raises(RegistryUnavailable):
        ledger.usage()
    client.close()
