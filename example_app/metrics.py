"""``GET /metrics``: Prometheus metrics of the idempotency layer, for the operators' scraper.

Served only when ``prometheus_client`` is installed (``pip install 'flask-idempotency[prometheus]'``), and only
to a logged-in operator or to a scraper presenting ``METRICS_TOKEN`` as a bearer token (unset: operators only).
"""

from __future__ import annotations

import hmac
import importlib
import importlib.util

from flask import Flask, abort, current_app, request
from flask.typing import ResponseReturnValue

from .auth import operator_name


def _allowed() -> bool:
    token = current_app.config.get("METRICS_TOKEN")
    sent = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    return operator_name() is not None


def init_metrics_endpoint(app: Flask) -> bool:
    """Count the layer's outcomes and mount ``/metrics``; ``False`` when prometheus_client is not installed."""
    if importlib.util.find_spec("prometheus_client") is None:
        return False
    prometheus_client = importlib.import_module("prometheus_client")
    layer_metrics = importlib.import_module("flask_idempotent.metrics")
    registry = layer_metrics.instrument_prometheus(app, prometheus_client.CollectorRegistry())
    serve = layer_metrics.prometheus_view(registry)

    def scrape() -> ResponseReturnValue:
        if not _allowed():
            abort(401)
        return serve()

    app.add_url_rule("/metrics", "metrics", scrape)
    return True
