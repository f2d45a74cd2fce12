"""The CLI's fail-fast connection settings and its one line for a Redis that does not answer."""

from __future__ import annotations

import pytest

from hypha_celery.cli.reach import CONNECT_TIMEOUT_S, cli_app, unreachable


def test_the_cli_app_times_connects_out_quickly_and_retries_nothing() -> None:
    # When the CLI builds the app it sends with
    conf = cli_app("redis://127.0.0.1:1/0").conf
    # Then every connect is bounded by the CLI's timeout, and nothing is retried
    assert CONNECT_TIMEOUT_S <= 3
    assert conf.broker_connection_timeout == CONNECT_TIMEOUT_S
    assert conf.redis_socket_connect_timeout == CONNECT_TIMEOUT_S
    assert conf.broker_transport_options["socket_connect_timeout"] == CONNECT_TIMEOUT_S
    assert conf.result_backend_transport_options["retry_policy"] == {"max_retries": 0}
    assert conf.task_publish_retry is False and conf.broker_connection_retry_on_startup is False
    # And the app's own transport options are kept beside them
    assert "visibility_timeout" in conf.broker_transport_options


@pytest.mark.parametrize(("env", "source"), [
    ({}, "the default: $HYPHA_CONFIG and $HYPHA_BROKER_URL are unset"),
    ({"HYPHA_BROKER_URL": "redis://h:1/0"}, "$HYPHA_BROKER_URL"),
    ({"HYPHA_CONFIG": "worker.toml"}, "from $HYPHA_CONFIG=worker.toml"),
])
def test_the_line_names_where_the_address_came_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                    source: str) -> None:
    # Given the environment a person ran the command in
    for name in ("HYPHA_BROKER_URL", "HYPHA_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # When the broker does not answer
    line = unreachable("broker", "redis://:secret@h:1/0", ConnectionError("Connection refused."))
    # Then one line says where the address came from, what to set and how to start a Redis; the password is masked
    assert "\n" not in line and f"({source})" in line
    assert "secret" not in line and "HYPHA_BROKER_URL" in line and "`hypha-celery redis`" in line


def test_an_amqp_broker_is_named_as_rabbitmq() -> None:
    # When a RabbitMQ broker does not answer
    line = unreachable("broker", "amqp://guest:guest@h:5672//", ConnectionRefusedError("refused"))
    # Then the line calls it what it is
    assert line.startswith("broker RabbitMQ unreachable at amqp://guest:**@h:5672//")
