"""The network speaks OpenAI: an HTTP gateway any OpenAI client can use (``hypha-celery gateway``).

::

    pip install 'hypha-celery[gateway]'
    hypha-celery gateway --key scheduler.key --api-keys api-keys.txt --port 8000

``GET /v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions`` (``hypha.generate``,
streamed as Server-Sent Events with ``stream: true``) and ``POST /v1/embeddings``
(``hypha.infer``), with OpenAI's bodies and error shapes. Layout: :mod:`.translate`
(request bodies → task calls), :mod:`.responses` (results → bodies and SSE chunks),
:mod:`.errors` (the status table), :mod:`.auth` (bearer keys), :mod:`.ratelimit` (a
token bucket per key in Redis), :mod:`.network` (submitting through
:mod:`hypha_celery.client`), :mod:`.app` (the Starlette routes). This module joins them
from settings; importing it starts nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hypha_celery.config import load_config, registry_url

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hypha_celery.config.schema import GatewayConfig

__all__ = ["GatewaySettings", "build_app", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens and how it guards and signs: ``[worker.gateway]``, overridden by the command line."""

    host: str = "127.0.0.1"
    port: int = 8000
    key: str | None = None
    api_keys: str | None = None
    rate_limit: int = 600
    burst: int = 60
    timeout: float = 300.0

    @classmethod
    def of(cls, config: GatewayConfig, **overrides: Any) -> GatewaySettings:
        """The config's section with the options that were given (``None`` means not given)."""
        base = cls(host=config.host, port=config.port, key=config.key, api_keys=config.api_keys,
                   rate_limit=config.rate_limit, burst=config.burst, timeout=config.timeout)
        return replace(base, **{name: value for name, value in overrides.items() if value is not None})


def build_app(settings: GatewaySettings) -> Starlette:
    """The ASGI app for ``settings``: keys and signing key read now (``ConfigError`` naming a bad file)."""
    from hypha_celery.gateway.app import Gateway, create_app
    from hypha_celery.gateway.auth import ApiKeys
    from hypha_celery.gateway.network import Network
    from hypha_celery.gateway.ratelimit import RateLimiter
    from hypha_celery.keys import KeySchema
    from hypha_celery.monitoring.tracing import from_env as tracing_from_env
    from hypha_celery.redis_client import registry_client
    from hypha_celery.security import load_signing_key

    keys = ApiKeys.load(settings.api_keys) if settings.api_keys else None
    if keys is None:
        log.warning("no --api-keys: the gateway answers anyone who reaches %s:%s", settings.host, settings.port)
    signing = load_signing_key(settings.key) if settings.key else None
    registry = registry_client(registry_url(load_config()), timeout=5)
    schema = KeySchema.from_env()
    limiter = RateLimiter(registry, settings.rate_limit, settings.burst, schema) if settings.rate_limit else None
    network = Network(signing_key=signing, registry=registry, timeout=settings.timeout, schema=schema)
    return create_app(Gateway(network=network, keys=keys, limiter=limiter, tracing=tracing_from_env("hypha-gateway")))


def serve(settings: GatewaySettings) -> None:
    """Run the gateway with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)
