"""Optional metrics (``flask_idempotent.metrics``): OpenTelemetry and Prometheus on the ``request_outcome`` signal.

On SQLite and PostgreSQL. A scripted sequence of protected requests (first, replay, key reuse, a rejection by a
blueprint hook, in progress, stuck, final and retryable failures) is counted exactly per outcome and endpoint by
an OpenTelemetry MeterProvider (InMemoryMetricReader), tagged on each request's span (InMemorySpanExporter) and
counted in a Prometheus CollectorRegistry, whose gauges read the record store at scrape time. A scrape while the
store cannot be read serves the counters without the gauges and never raises.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from concurrency import Background
from flask import Blueprint, Flask, abort, jsonify, request
from flask.testing import FlaskClient
from helpers import ext, post, record
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from test_store_unavailable import unreachable_url
from testapp import Controls, build_app

from flask_idempotent import idempotent, metrics
from flask_idempotent import operations as ops
from flask_idempotent.metrics import StoreGauges, init_metrics, instrument_otel, instrument_prometheus, prometheus_view

# Helpers --------------------------------------------------------------------------------------------------------


class Otel:
    """A MeterProvider read in memory, and a tracer whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.tracer_provider.get_tracer("tests")

    def points(self, name: str) -> dict[tuple[str, str], Any]:
        """The data points of instrument ``name`` by their (outcome, endpoint) attributes."""
        found: dict[tuple[str, str], Any] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            assert set(point.attributes) == {"outcome", "endpoint"}
                            found[(point.attributes["outcome"], point.attributes["endpoint"])] = point
        return found

    def counts(self) -> dict[tuple[str, str], int]:
        return {labels: point.value for labels, point in self.points(metrics.REQUESTS).items()}

    def instrument(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        assert data is not None
        found = [m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics if m.name == name]
        assert len(found) == 1, name
        return found[0]

    def outcomes_on_spans(self) -> list[tuple[str, Any]]:
        """(span name, its ``idempotency.outcome``) of each finished request span, in the order they ended."""
        return [(s.name, (s.attributes or {}).get(metrics.SPAN_ATTRIBUTE)) for s in self.exporter.get_finished_spans()]

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


@pytest.fixture
def otel() -> Any:
    telemetry = Otel()
    yield telemetry
    telemetry.shutdown()


def trace_requests(app: Flask, tracer: Tracer) -> None:
    """Run each request of ``app`` inside a server span, as a WSGI tracing middleware does: the span is current
    for all of Flask's hooks (threads included: the span starts in the thread that serves the request)."""
    inner = app.wsgi_app

    def traced(environ: dict[str, Any], start_response: Any) -> Any:
        with tracer.start_as_current_span(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"):
            return inner(environ, start_response)

    app.wsgi_app = traced  # type: ignore[method-assign]


def add_locked_blueprint(app: Flask) -> None:
    """``POST /locked/payments``: its blueprint's before_request answers 401 after the claim (``rejected``)."""
    locked = Blueprint("locked", __name__, url_prefix="/locked")

    @locked.before_request
    def authenticate() -> None:
        if request.headers.get("X-Auth") != "ok":
            abort(401)

    @locked.post("/payments")
    @idempotent
    def pay() -> Any:
        return jsonify(paid=True), 201

    app.register_blueprint(locked)


def requests_total(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """``idempotency_requests_total`` by (outcome, endpoint)."""
    return {
        (s.labels["outcome"], s.labels["endpoint"]): s.value
        for family in registry.collect()
        if family.name == "idempotency_requests"
        for s in family.samples
        if s.name == "idempotency_requests_total"
    }


def gauges(registry: CollectorRegistry) -> dict[str, float]:
    """The store gauges' samples, named ``metric{label}``."""
    found = {}
    for family in registry.collect():
        if family.name in (metrics.STUCK_RECORDS, metrics.FAILED_RECORDS, metrics.AWAITING_DECISION_RECORDS):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def scrape(
    client: FlaskClient, path: str = "/metrics", **headers: str
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET the metrics view; its samples by name and labels, parsed as Prometheus parses them."""
    response = client.get(path, headers=headers)
    assert response.status_code == 200, response.data
    parsed: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            parsed.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return parsed


# The scripted sequence ------------------------------------------------------------------------------------------


def test_each_outcome_is_counted_tagged_and_scraped(app: Flask, client: FlaskClient, clock: Any, otel: Otel) -> None:
    registry = CollectorRegistry()
    init_metrics(app, otel=otel.meter_provider, prometheus=registry)
    trace_requests(app, otel.tracer)
    add_locked_blueprint(app)
    app.add_url_rule("/metrics", view_func=prometheus_view(registry))
    controls = ext(app)["controls"]

    assert post(client, "/payments", json={"amount": 1}).status_code == 201  # executed
    assert post(client, "/payments", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"  # replayed
    assert post(client, "/payments", json={"amount": 2}).status_code == 422  # key_reused
    assert post(client, "/locked/payments", key="l-1", json={}).status_code == 401  # rejected (claim withdrawn)
    assert post(client, "/other", key="o-1", json={"amount": 1}).status_code == 201  # executed, another endpoint
    assert client.get("/payments").status_code == 200  # not protected: no outcome
    held = controls.hold("payments")
    owner = Background(app, "/payments", key="k-2", json={"amount": 1})
    assert held.entered.wait(10)
    in_progress = post(client, "/payments", key="k-2", json={"amount": 1})
    assert in_progress.status_code == 409 and in_progress.get_json()["type"].endswith("in-progress")
    clock.advance(seconds=61)  # the held owner's lease (60 s) has run out by the database's clock
    stuck = post(client, "/payments", key="k-2", json={"amount": 1})
    assert stuck.status_code == 409 and stuck.get_json()["type"].endswith("stuck")
    controls.status = 500
    assert post(client, "/payments", key="f-500", json={"amount": 1}).status_code == 500  # executed: FAILED final
    controls.status = 503
    assert post(client, "/payments", key="f-503", json={"amount": 1}).status_code == 503  # executed: retryable
    controls.status = None

    counted = {
        ("executed", "create_payment"): 3,
        ("replayed", "create_payment"): 1,
        ("key_reused", "create_payment"): 1,
        ("rejected", "locked.pay"): 1,
        ("executed", "other"): 1,
        ("in_progress", "create_payment"): 1,
        ("stuck", "create_payment"): 1,
    }
    assert otel.counts() == counted
    assert requests_total(registry) == counted
    # The gauges, read from the store at scrape time: k-2 is stuck, f-500 failed for good, f-503 may be retried.
    assert gauges(registry) == {
        "idempotency_stuck_records": 1,
        "idempotency_failed_records{retryable=false}": 1,
        "idempotency_failed_records{retryable=true}": 1,
        "idempotency_awaiting_decision_records": 2,  # k-2 stuck and f-500 final, nobody acknowledged it
    }
    scraped = scrape(client)
    assert scraped["idempotency_requests_total"] == {
        (("endpoint", endpoint), ("outcome", outcome)): float(n) for (outcome, endpoint), n in counted.items()
    }
    assert scraped["idempotency_stuck_records"] == {(): 1.0}
    assert scraped["idempotency_failed_records"] == {(("retryable", "false"),): 1.0, (("retryable", "true"),): 1.0}

    held.release.set()
    assert owner.result().status_code == 201  # nobody took its lease over: its outcome is stored
    assert record(app, "k-2")["state"] == "COMPLETED"
    counted[("executed", "create_payment")] += 1  # the held owner, counted once its view ran
    assert otel.counts() == counted
    assert requests_total(registry) == counted
    assert gauges(registry)["idempotency_stuck_records"] == 0

    # One histogram point per (outcome, endpoint), one measurement per request, in seconds.
    claim = otel.instrument(metrics.CLAIM_DURATION)
    assert claim.unit == "s"
    points = otel.points(metrics.CLAIM_DURATION)
    assert {labels: p.count for labels, p in points.items()} == counted
    for p in points.values():
        assert tuple(p.explicit_bounds) == metrics.CLAIM_DURATION_BUCKETS
        assert 0 <= p.min <= p.max < 10
    assert otel.instrument(metrics.REQUESTS).unit == "{request}"

    # Each protected request's own span carries its outcome; the held owner's span ended last.
    assert otel.outcomes_on_spans() == [
        ("POST /payments", "executed"),
        ("POST /payments", "replayed"),
        ("POST /payments", "key_reused"),
        ("POST /locked/payments", "rejected"),
        ("POST /other", "executed"),
        ("GET /payments", None),
        ("POST /payments", "in_progress"),
        ("POST /payments", "stuck"),
        ("POST /payments", "executed"),
        ("POST /payments", "executed"),
        ("GET /metrics", None),
        ("POST /payments", "executed"),
    ]


def test_a_request_outside_any_span_is_still_counted(app: Flask, client: FlaskClient, otel: Otel) -> None:
    instrument_otel(app, meter_provider=otel.meter_provider)
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert otel.counts() == {("executed", "create_payment"): 1}
    assert otel.exporter.get_finished_spans() == ()


# Scrapes while the store cannot be read -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_scrape_with_the_store_unreachable_serves_the_counters_without_the_gauges(
    kind: str, tmp_path: Path, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(unreachable_url(kind, tmp_path), clock=clock, controls=Controls())
    registry = CollectorRegistry(auto_describe=True)  # like prometheus_client.REGISTRY
    with caplog.at_level(logging.WARNING, logger="flask_idempotent.metrics"):
        instrument_prometheus(app, registry)  # registering describes the gauges: no query
    assert metrics_logs(caplog) == []
    app.add_url_rule("/metrics", view_func=prometheus_view(registry))
    client = app.test_client()
    assert post(client, "/payments", json={"amount": 1}).status_code == 503

    with caplog.at_level(logging.WARNING, logger="flask_idempotent.metrics"):
        assert requests_total(registry) == {("store_unavailable", "create_payment"): 1}
        assert gauges(registry) == {}
        scraped = scrape(client)
    assert scraped["idempotency_requests_total"] == {
        (("endpoint", "create_payment"), ("outcome", "store_unavailable")): 1
    }
    assert metrics.STUCK_RECORDS not in scraped and metrics.FAILED_RECORDS not in scraped
    logged = metrics_logs(caplog)
    assert len(logged) == 3 and all("gauges skipped" in line for line in logged), logged
    assert all("[SQL:" not in line for line in logged)


def test_a_store_error_during_a_scrape_skips_the_gauges_until_the_store_is_back(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    instrument_prometheus(app, registry)
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    no_records = {
        "idempotency_stuck_records": 0,
        "idempotency_failed_records{retryable=false}": 0,
        "idempotency_failed_records{retryable=true}": 0,
        "idempotency_awaiting_decision_records": 0,
    }
    assert gauges(registry) == no_records
    records_table = ext(app)["db"].metadata.tables["idempotency_records"]
    with app.app_context():
        records_table.drop(ext(app)["db"].engine)
    with caplog.at_level(logging.WARNING, logger="flask_idempotent.metrics"):
        assert requests_total(registry) == {("executed", "create_payment"): 1}
        assert gauges(registry) == {}
    assert len(metrics_logs(caplog)) == 2
    with app.app_context():
        records_table.create(ext(app)["db"].engine)
    assert gauges(registry) == no_records


def metrics_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flask_idempotent.metrics"]


# Wiring ---------------------------------------------------------------------------------------------------------


def test_only_the_instrumented_apps_requests_count_and_each_once(
    app: Flask, client: FlaskClient, clock: Any, tmp_path: Path, otel: Otel
) -> None:
    registry = CollectorRegistry()
    for _ in range(2):  # instrumenting again replaces the app's receivers: never counted twice
        instrument_prometheus(app, registry)
        instrument_otel(app, meter_provider=otel.meter_provider)
    gc.collect()  # the signal holds receivers weakly: the app keeps them alive
    other_controls = Controls()
    other = build_app(f"sqlite:///{tmp_path / 'other.db'}", clock=clock, controls=other_controls)
    with other.app_context():
        ext(other)["db"].create_all()
    try:
        assert post(other.test_client(), "/payments", json={"amount": 1}).status_code == 201  # not instrumented
        assert post(client, "/payments", json={"amount": 1}).status_code == 201
        assert requests_total(registry) == {("executed", "create_payment"): 1}
        assert otel.counts() == {("executed", "create_payment"): 1}

        # An app factory called again on the same registry: one shared counter; the gauges read the newest app.
        instrument_prometheus(other, registry)
        other_controls.status = 500
        assert post(other.test_client(), "/payments", key="k-2", json={"amount": 1}).status_code == 500
        assert post(client, "/payments", key="k-3", json={"amount": 1}).status_code == 201
        assert requests_total(registry) == {("executed", "create_payment"): 3}
        assert otel.counts() == {("executed", "create_payment"): 2}
        assert gauges(registry)["idempotency_failed_records{retryable=false}"] == 1
    finally:
        with other.app_context():
            ext(other)["db"].engine.dispose()


def test_init_metrics_defaults_to_the_global_provider_and_registry(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_registry = CollectorRegistry(auto_describe=True)
    monkeypatch.setattr(prometheus_client, "REGISTRY", default_registry)
    init_metrics(app, otel=True, prometheus=True)  # otel: the global meter provider (a no-op one here)
    app.add_url_rule("/metrics", view_func=prometheus_view())
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert requests_total(default_registry) == {("executed", "create_payment"): 1}
    assert scrape(client)["idempotency_stuck_records"] == {(): 0.0}


def test_the_gauges_on_a_scrape_registry_of_ones_own(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    """The README's multiprocess layout: workers count (gauges=False); the scrape registry gathers the workers'
    files and reads the store once."""
    counting = CollectorRegistry()
    instrument_prometheus(app, counting, gauges=False)
    scraping = CollectorRegistry()
    MultiProcessCollector(scraping, path=str(tmp_path))
    scraping.register(StoreGauges(app))
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert requests_total(counting) == {("executed", "create_payment"): 1}
    assert gauges(counting) == {}
    assert gauges(scraping)["idempotency_stuck_records"] == 0


def test_the_view_serves_prometheus_text_or_openmetrics_behind_the_apps_auth(app: Flask, client: FlaskClient) -> None:
    registry = CollectorRegistry()
    instrument_prometheus(app, registry)
    serve_metrics = prometheus_view(registry)

    @app.get("/internal/metrics")
    def internal_metrics() -> Any:
        if request.headers.get("Authorization") != "Bearer s3cret":
            abort(401)
        return serve_metrics()

    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert client.get("/internal/metrics").status_code == 401
    text = client.get("/internal/metrics", headers={"Authorization": "Bearer s3cret"})
    assert text.status_code == 200
    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert text.headers["Cache-Control"] == "no-store"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.get_data(as_text=True))
        for s in family.samples
    }
    assert samples[("idempotency_requests_total", (("endpoint", "create_payment"), ("outcome", "executed")))] == 1
    assert samples[("idempotency_stuck_records", ())] == 0
    openmetrics = client.get(
        "/internal/metrics",
        headers={"Authorization": "Bearer s3cret", "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.get_data(as_text=True).endswith("# EOF\n")


def test_a_failing_metrics_backend_never_changes_the_answer_or_the_record(
    app: Flask, client: FlaskClient, otel: Otel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("metrics backend down")

    monkeypatch.setattr(metrics.otel_trace, "get_current_span", broken)
    registry = CollectorRegistry()
    init_metrics(app, otel=otel.meter_provider, prometheus=registry)
    monkeypatch.setattr(metrics._registered[registry].counter, "labels", broken)
    with caplog.at_level(logging.ERROR, logger="flask_idempotent.metrics"):
        first = post(client, "/payments", json={"amount": 1})
        again = post(client, "/payments", json={"amount": 1})
    assert first.status_code == 201
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert record(app, "k-1")["state"] == "COMPLETED"
    assert ext(app)["controls"].runs["payments"] == 1
    assert len(metrics_logs(caplog)) == 4  # each backend, each request
    assert all("metrics backend down" in r.exc_text for r in caplog.records if r.name == "flask_idempotent.metrics")


# Import cost ----------------------------------------------------------------------------------------------------


def test_importing_the_package_imports_no_metrics_library() -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import flask_idempotent
        for path in sorted(Path(flask_idempotent.__file__).parent.glob("*.py")):
            if path.stem not in ("__init__", "metrics"):
                __import__(f"flask_idempotent.{path.stem}")
        loaded = [m for m in ("flask_idempotent.metrics", "opentelemetry", "prometheus_client") if m in sys.modules]
        assert loaded == [], loaded
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_without_the_extras_the_module_imports_and_names_the_missing_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = sys.modules["prometheus_client"] = None  # not installed
        from flask import Flask
        from flask_idempotent import metrics
        app = Flask("app")
        for call, extra in (
            (lambda: metrics.instrument_otel(app), "otel"),
            (lambda: metrics.init_metrics(app, otel=True), "otel"),
            (lambda: metrics.instrument_prometheus(app), "prometheus"),
            (lambda: metrics.prometheus_view(), "prometheus"),
        ):
            try:
                call()
            except ImportError as exc:
                assert f"pip install 'flask-idempotency[{extra}]'" in str(exc), exc
            else:
                raise AssertionError(f"no ImportError for the [{extra}] extra")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_an_acknowledged_failure_leaves_the_awaiting_decision_gauge_but_stays_a_final_failure(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    registry = CollectorRegistry()
    instrument_prometheus(app, registry)
    controls = ext(app)["controls"]
    controls.status = 500
    assert post(client, "/payments", key="f-1", json={"amount": 1}).status_code == 500
    assert post(client, "/payments", key="f-2", json={"amount": 1}).status_code == 500
    controls.status = None
    assert gauges(registry)["idempotency_awaiting_decision_records"] == 2
    with app.app_context():
        ops.acknowledge(record(app, "f-1")["id"], actor="oncall")
    assert record(app, "f-1")["acknowledged_by"] == "oncall"  # the database state the gauge reads
    assert gauges(registry) == {
        "idempotency_stuck_records": 0,
        "idempotency_failed_records{retryable=false}": 2,  # both still FAILED final
        "idempotency_failed_records{retryable=true}": 0,
        "idempotency_awaiting_decision_records": 1,  # f-2 only: f-1 was decided
    }
