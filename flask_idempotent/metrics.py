"""Optional metrics built on the ``request_outcome`` signal: OpenTelemetry (``[otel]``) and Prometheus
(``[prometheus]``).

``flask_idempotent`` never imports this module: an app that does not use it pays nothing for it, and neither
extra is needed to import it (a function that needs a missing one raises ``ImportError`` naming the extra).

.. code-block:: python

    from flask_idempotent.metrics import init_metrics, prometheus_view

    idempotency.init_app(app, db)
    init_metrics(app, otel=True, prometheus=registry)   # or instrument_otel() / instrument_prometheus()
    scrape = prometheus_view(registry)                   # mount it behind the app's own auth

OpenTelemetry: every protected request sets the attribute ``idempotency.outcome`` on the span current when its
outcome is known, adds 1 to the counter ``idempotency.requests`` and records its claim's duration in the
histogram ``idempotency.claim.duration`` (seconds), both with the attributes ``outcome`` and ``endpoint``.

Prometheus: the counter ``idempotency_requests_total{outcome,endpoint}``, and the gauges
``idempotency_stuck_records``, ``idempotency_failed_records{retryable="true|false"}`` and
``idempotency_awaiting_decision_records`` (stuck plus final failures nobody acknowledged) read from the record
store at scrape time by one :func:`flask_idempotent.operations.stats` call (:class:`StoreGauges`). A store that
cannot be read skips the gauges for that scrape (logged); the counters are still served.

Outcomes are the signal's: ``executed``, ``replayed``, ``in_progress``, ``key_reused``, ``stuck``,
``store_unavailable``, ``rejected`` and ``error``. Instruments are connected to one app's signals only
(``signal.connect(receiver, app)``); instrumenting an app again replaces its previous receiver, so nothing is
counted twice. A failing metrics backend is logged and never changes a request's answer or its record.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request

from . import signals
from .operations import stats

# The extras, imported here (the package's modules import at the top) and only by this module, which
# flask_idempotent itself never imports. Either may be missing: the functions that need it say which extra.
_otel_missing: ImportError | None = None
_prometheus_missing: ImportError | None = None
try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.metrics import MeterProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    _otel_missing = exc
try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.exposition import choose_encoder
except ImportError as exc:  # pragma: no cover - depends on the environment
    _prometheus_missing = exc

__all__ = [
    "AWAITING_DECISION_RECORDS",
    "CLAIM_DURATION",
    "CLAIM_DURATION_BUCKETS",
    "FAILED_RECORDS",
    "OUTCOMES",
    "PROMETHEUS_REQUESTS",
    "REQUESTS",
    "SPAN_ATTRIBUTE",
    "STUCK_RECORDS",
    "StoreGauges",
    "init_metrics",
    "instrument_otel",
    "instrument_prometheus",
    "prometheus_view",
]

logger = logging.getLogger("flask_idempotent.metrics")

#: What a protected request came to (the ``request_outcome`` signal's ``outcome``).
OUTCOMES = ("executed", "replayed", "in_progress", "key_reused", "stuck", "store_unavailable", "rejected", "error")

#: OpenTelemetry: the attribute set on the current span.
SPAN_ATTRIBUTE = "idempotency.outcome"
#: OpenTelemetry: the counter of protected requests (attributes ``outcome`` and ``endpoint``).
REQUESTS = "idempotency.requests"
#: OpenTelemetry: the histogram of claim durations in seconds (attributes ``outcome`` and ``endpoint``).
CLAIM_DURATION = "idempotency.claim.duration"
#: The histogram's advised bucket boundaries in seconds: a claim is a few milliseconds, or up to ``wait``.
CLAIM_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Prometheus: the counter of protected requests, exposed as ``idempotency_requests_total{outcome,endpoint}``.
PROMETHEUS_REQUESTS = "idempotency_requests"
#: Prometheus: the gauge of stuck records, read from the database at scrape time.
STUCK_RECORDS = "idempotency_stuck_records"
#: Prometheus: the gauge of FAILED records, labelled ``retryable="true"|"false"``, read at scrape time.
FAILED_RECORDS = "idempotency_failed_records"
#: Prometheus: records awaiting an operator's decision (stuck, plus final failures nobody acknowledged): the
#: number a pager watches. ``idempotency_failed_records{retryable="false"}`` still counts acknowledged ones.
AWAITING_DECISION_RECORDS = "idempotency_awaiting_decision_records"
#: Prometheus: outbox jobs not yet delivered, the age in seconds of the oldest of them (0 without one), and dead
#: jobs (an operator decides): read at scrape time like the record gauges (docs: "The outbox").
OUTBOX_PENDING = "idempotency_outbox_pending"
OUTBOX_OLDEST_SECONDS = "idempotency_outbox_oldest_seconds"
OUTBOX_DEAD = "idempotency_outbox_dead"

_EXTENSION = "idempotency_metrics"
_lock = threading.Lock()


def init_metrics(
    app: Flask,
    *,
    otel: bool | MeterProvider = False,
    prometheus: bool | CollectorRegistry = False,
) -> None:
    """Instrument ``app`` with the backends asked for.

    ``otel``: ``True`` for the global meter provider, or a ``MeterProvider``. ``prometheus``: ``True`` for
    ``prometheus_client.REGISTRY``, or a ``CollectorRegistry``. Call it after ``idempotency.init_app(app, db)``.
    """
    if otel is not False:
        instrument_otel(app, meter_provider=None if otel is True else otel)
    if prometheus is not False:
        instrument_prometheus(app, None if prometheus is True else prometheus)


# OpenTelemetry -------------------------------------------------------------------------------------------------


def instrument_otel(app: Flask, *, meter_provider: MeterProvider | None = None) -> None:
    """Count ``app``'s protected requests with OpenTelemetry and tag their spans.

    The meter is ``flask_idempotent`` of ``meter_provider`` (default: the global one). The span attribute goes
    on the span current when the outcome is known (the claim runs in ``before_request``): start the request's
    span before the extension's hooks run, e.g. ``FlaskInstrumentor().instrument_app(app)`` *before*
    ``idempotency.init_app(app, db)``, or the WSGI middleware. Without a recording span only the metrics count.
    """
    _require(_otel_missing, "opentelemetry-api", "otel")
    meter = otel_metrics.get_meter("flask_idempotent", meter_provider=meter_provider)
    requests = meter.create_counter(
        REQUESTS, unit="{request}", description="Protected requests, by what their idempotency claim came to."
    )
    claim = meter.create_histogram(
        CLAIM_DURATION,
        unit="s",
        description="How long a protected request's idempotency claim took (including any wait).",
        explicit_bucket_boundaries_advisory=CLAIM_DURATION_BUCKETS,
    )
    get_current_span = otel_trace.get_current_span

    def record_outcome(
        sender: Flask, *, outcome: str, endpoint: str | None = None, claim_seconds: float = 0.0, **_: Any
    ) -> None:
        try:
            attributes = {"outcome": outcome, "endpoint": endpoint or ""}
            span = get_current_span()
            if span.is_recording():
                span.set_attribute(SPAN_ATTRIBUTE, outcome)
            requests.add(1, attributes)
            claim.record(claim_seconds, attributes)
        except Exception:  # metrics never change a request's answer or its record
            logger.exception("could not record the idempotency outcome %r with OpenTelemetry", outcome)

    _connect(app, "otel", record_outcome)


# Prometheus ----------------------------------------------------------------------------------------------------


class StoreGauges:
    """A Prometheus collector: ``idempotency_stuck_records``, ``idempotency_failed_records{retryable}`` and
    ``idempotency_awaiting_decision_records`` (stuck plus final failures not acknowledged).

    Each scrape runs one :func:`flask_idempotent.operations.stats` read in an app context of ``app`` (the
    dashboard's overview and ``flask idempotency stats`` run the same index-served counts). When the store
    cannot be read the gauges are left out of that scrape and the error is logged; the scrape itself never
    fails because of them. ``describe()`` does not touch the database, so registering it never does either.
    :func:`instrument_prometheus` registers one; register one yourself on a registry of your own (e.g. beside
    ``prometheus_client.multiprocess.MultiProcessCollector``). The app is held weakly.
    """

    def __init__(self, app: Flask) -> None:
        self._app = weakref.ref(app)

    @property
    def app(self) -> Flask | None:
        return self._app()

    @app.setter
    def app(self, app: Flask) -> None:
        self._app = weakref.ref(app)

    def describe(self) -> list[Metric]:
        return [*_gauge_families(), *_outbox_families()]

    def collect(self) -> list[Metric]:
        app = self._app()
        if app is None:
            return []
        try:
            with app.app_context():
                numbers = stats()
        except Exception as exc:  # a scrape must not break because the store is away
            logger.warning(
                "idempotency gauges skipped in this scrape: the record store could not be read (%s)", _error_line(exc)
            )
            return []
        stuck, failed, awaiting = _gauge_families()
        stuck.add_metric([], numbers["stuck"])
        failed.add_metric(["true"], numbers["failed_retryable"])
        failed.add_metric(["false"], numbers["failed_final"])
        awaiting.add_metric([], numbers["stuck"] + numbers["awaiting_decision"])
        return [stuck, failed, awaiting, *_outbox_gauges(app)]


@dataclass
class _Registered:
    """What :func:`instrument_prometheus` registered on one registry: shared by the apps instrumented on it."""

    counter: Counter
    gauges: StoreGauges | None = None


#: Per registry (held weakly): one counter for every app instrumented on it, and at most one StoreGauges.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, _Registered] = weakref.WeakKeyDictionary()


def instrument_prometheus(
    app: Flask, registry: CollectorRegistry | None = None, *, gauges: bool = True
) -> CollectorRegistry:
    """Count ``app``'s protected requests in ``idempotency_requests_total{outcome,endpoint}`` on ``registry``
    (default ``prometheus_client.REGISTRY``) and, with ``gauges``, register :class:`StoreGauges` for ``app``.

    Apps instrumented on one registry share its counter; its gauges read the store of the app instrumented last
    (an app factory called again, in tests, takes them over). Returns the registry.
    """
    _require(_prometheus_missing, "prometheus_client", "prometheus")
    target = prometheus_client.REGISTRY if registry is None else registry
    with _lock:
        registered = _registered.get(target)
        if registered is None:
            counter = prometheus_client.Counter(
                PROMETHEUS_REQUESTS,
                "Protected requests, by what their idempotency claim came to.",
                ["outcome", "endpoint"],
                registry=target,
            )
            registered = _registered[target] = _Registered(counter)
        if gauges:
            if registered.gauges is None:
                store_gauges = StoreGauges(app)
                target.register(store_gauges)
                registered.gauges = store_gauges
            else:
                registered.gauges.app = app
    counter = registered.counter

    def count_outcome(sender: Flask, *, outcome: str, endpoint: str | None = None, **_: Any) -> None:
        try:
            counter.labels(outcome=outcome, endpoint=endpoint or "").inc()
        except Exception:  # metrics never change a request's answer or its record
            logger.exception("could not count the idempotency outcome %r in Prometheus", outcome)

    _connect(app, "prometheus", count_outcome)
    return target


def prometheus_view(registry: CollectorRegistry | None = None) -> Callable[[], Response]:
    """A Flask view serving ``registry`` (default ``prometheus_client.REGISTRY``) in the exposition format the
    scraper's ``Accept`` header asks for (Prometheus text, or OpenMetrics). It checks nothing: mount it behind
    the app's own authentication, e.g. ``app.add_url_rule("/metrics", view_func=requires_token(view))``."""
    _require(_prometheus_missing, "prometheus_client", "prometheus")
    target = prometheus_client.REGISTRY if registry is None else registry

    def idempotency_metrics() -> Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = Response(encoder(target), headers={"Content-Type": content_type})
        response.headers["Cache-Control"] = "no-store"
        return response

    return idempotency_metrics


# Helpers -------------------------------------------------------------------------------------------------------


def _outbox_gauges(app: Flask) -> list[Metric]:
    """The outbox gauges, or none when the outbox cannot be read (logged; the record gauges still go out)."""
    try:
        with app.app_context():
            numbers = app.extensions["idempotency"].outbox.stats()
    except Exception as exc:  # e.g. an installation that has not created the outbox table
        logger.warning("idempotency outbox gauges skipped in this scrape: %s", _error_line(exc))
        return []
    pending, oldest, dead = _outbox_families()
    pending.add_metric([], numbers["pending"])
    oldest.add_metric([], numbers["oldest_seconds"])
    dead.add_metric([], numbers["dead"])
    return [pending, oldest, dead]


def _outbox_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(OUTBOX_PENDING, "Outbox jobs staged and not yet delivered (dead ones not included)."),
        GaugeMetricFamily(OUTBOX_OLDEST_SECONDS, "Age of the oldest pending outbox job, by the database's clock."),
        GaugeMetricFamily(OUTBOX_DEAD, "Outbox jobs that failed IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS deliveries."),
    )


def _gauge_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            STUCK_RECORDS, "IN_PROGRESS idempotency records whose lease expired (by the database's clock)."
        ),
        GaugeMetricFamily(
            FAILED_RECORDS,
            'FAILED idempotency records; retryable="false" are final (acknowledged ones included).',
            labels=["retryable"],
        ),
        GaugeMetricFamily(
            AWAITING_DECISION_RECORDS,
            "Idempotency records awaiting an operator's decision: stuck, plus final failures not acknowledged.",
        ),
    )


def _connect(app: Flask, backend: str, receiver: Callable[..., None]) -> None:
    """Connect ``receiver`` to ``app``'s ``request_outcome`` only, replacing the backend's previous receiver.

    The signal holds receivers weakly; ``app.extensions`` keeps this one alive exactly as long as the app.
    """
    with _lock:
        receivers: dict[str, Callable[..., None]] = app.extensions.setdefault(_EXTENSION, {})
        previous = receivers.get(backend)
        if previous is not None:
            signals.request_outcome.disconnect(previous, sender=app)
        receivers[backend] = receiver
        signals.request_outcome.connect(receiver, sender=app)


def _require(missing: ImportError | None, package: str, extra: str) -> None:
    if missing is not None:
        raise ImportError(
            f"flask_idempotent.metrics needs {package}: pip install 'flask-idempotency[{extra}]'"
        ) from missing


def _error_line(exc: BaseException) -> str:
    """An error for the log without SQLAlchemy's ``[SQL: ...] [parameters: ...]``."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:500]
