"""The peer: Powertools for AWS Lambda's idempotency utility (``idempotent_function`` + Redis persistence).

Configured the way its documentation shows for a function outside a Lambda handler: the key is taken from the
payload with ``event_key_jmespath``; the default configuration does not validate the rest of the payload, so a
second variant (``payload_validation_jmespath="body"``) is served too, for the correctness checks.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.redis import RedisCachePersistenceLayer

# Keyless calls make Powertools warn on every request ("No idempotency key value found"); keep logs quiet.
warnings.filterwarnings("ignore", message="No idempotency key value found")

__all__ = ["IdempotencyAlreadyInProgressError", "IdempotencyValidationError", "make_peer_functions"]


def make_peer_functions(body: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Callable[..., Any]]:
    """Wrap ``body`` (the shared view body, committing its own writes) with Powertools' idempotency."""
    run_id = os.environ.get("BENCH_RUN_ID", "dev")
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    # One persistence layer per configuration: a layer takes the config of the first function that uses it.
    layer = RedisCachePersistenceLayer(url=url)
    layer_validated = RedisCachePersistenceLayer(url=url)
    default = IdempotencyConfig(event_key_jmespath="key")  # the documented minimum
    validated = IdempotencyConfig(event_key_jmespath="key", payload_validation_jmespath="body")

    @idempotent_function(
        data_keyword_argument="command",
        config=default,
        persistence_store=layer,
        key_prefix=f"bench:{run_id}:peer",
    )
    def peer_default(command: dict[str, Any]) -> dict[str, Any]:
        return body(command)

    @idempotent_function(
        data_keyword_argument="command",
        config=validated,
        persistence_store=layer_validated,
        key_prefix=f"bench:{run_id}:peer-validated",
    )
    def peer_validated(command: dict[str, Any]) -> dict[str, Any]:
        return body(command)

    return {"peer": peer_default, "peer_validated": peer_validated}
