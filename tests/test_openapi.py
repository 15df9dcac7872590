"""``Idempotency.openapi()``: the policy of every protected route, as an OpenAPI 3.1 fragment an app can merge."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apispec import APISpec
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from helpers import post, records
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from testapp import Controls, build_app

from example_app import create_app
from flask_idempotent import Idempotency, errors, idempotent
from flask_idempotent.keys import KeyFormatError, parse_key
from flask_idempotent.openapi import merge

KEY = {"$ref": "#/components/parameters/IdempotencyKey"}
OPTIONAL_KEY = {"$ref": "#/components/parameters/IdempotencyKeyOptional"}


def build(**config: Any) -> Flask:
    return build_app("sqlite://", clock=lambda: 0.0, controls=Controls(), **config)


def document(fragment: dict[str, Any]) -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "test", "version": "1"}, **fragment}


def problem_types(fragment: dict[str, Any], operation: dict[str, Any], status: int) -> set[str]:
    """The problem ``type``s an operation's response for ``status`` documents."""
    schema = operation["responses"][str(status)]["content"]["application/problem+json"]["schema"]
    refs = [s["$ref"] for s in schema.get("oneOf", [schema])]
    schemas = fragment["components"]["schemas"]
    return {schemas[ref.rsplit("/", 1)[1]]["properties"]["type"]["const"] for ref in refs}


def urn(*codes: str) -> set[str]:
    return {f"urn:flask-idempotent:problem:{code}" for code in codes}


@pytest.fixture(scope="module")
def fragment() -> dict[str, Any]:
    app = build()
    return app.extensions["idempotency"].openapi(app)


def test_a_leased_route_documents_its_key_its_problems_and_its_policy(fragment: dict[str, Any]) -> None:
    post_payments = fragment["paths"]["/payments"]["post"]
    assert post_payments["parameters"] == [KEY]
    assert post_payments["x-idempotency"] == {
        "mode": "leased",
        "required": True,
        "ttl": 86400,
        "lease": 60,
        "keySource": "header",
    }
    assert sorted(post_payments["responses"]) == ["400", "409", "413", "422", "500", "503"]
    assert problem_types(fragment, post_payments, 400) == urn("missing-key", "invalid-key")
    assert problem_types(fragment, post_payments, 409) == urn("in-progress", "stuck")
    assert problem_types(fragment, post_payments, 413) == urn("body-too-large")
    assert problem_types(fragment, post_payments, 422) == urn("key-reused")
    assert problem_types(fragment, post_payments, 503) == urn("store-unavailable", "transient-error")
    assert problem_types(fragment, post_payments, 500) == urn("failed", "response-not-stored", "scope-error")
    headers = {status: set(response.get("headers", {})) for status, response in post_payments["responses"].items()}
    assert headers["409"] == headers["503"] == {"Retry-After"}
    assert headers["500"] == {"Idempotent-Replayed"}  # response-not-stored is answered from the record
    assert "get" not in fragment["paths"]["/payments"]  # GET /payments is not protected


def test_route_options_shape_each_operation(fragment: dict[str, Any]) -> None:
    paths = fragment["paths"]
    transfers = paths["/transfers"]["post"]
    assert transfers["x-idempotency"]["mode"] == "atomic"
    assert "urn:flask-idempotent:problem:commit-failed" in problem_types(fragment, transfers, 500)
    optional = paths["/optional"]["post"]
    assert optional["parameters"] == [OPTIONAL_KEY] and optional["x-idempotency"]["required"] is False
    assert problem_types(fragment, optional, 400) == urn("invalid-key")
    assert fragment["components"]["parameters"]["IdempotencyKeyOptional"]["required"] is False
    assert fragment["components"]["parameters"]["IdempotencyKey"]["required"] is True
    resources = paths["/resources"]["post"]
    assert problem_types(fragment, resources, 410) == urn("resource-gone")
    assert "410" not in paths["/payments"]["post"]["responses"]  # only routes with replay= rebuild a resource
    phases = paths["/phases"]["post"]  # on_stale="takeover", lease=30: a stale key is taken over, never "stuck"
    assert phases["x-idempotency"]["lease"] == 30
    assert problem_types(fragment, phases, 409) == urn("in-progress")


def test_an_atomic_route_documents_the_commit_conflict_a_retry_resolves(fragment: dict[str, Any]) -> None:
    transfers = fragment["paths"]["/transfers"]["post"]
    assert problem_types(fragment, transfers, 503) == urn("store-unavailable", "transient-error", "commit-conflict")
    assert transfers["responses"]["503"]["headers"] == {
        "Retry-After": {"$ref": "#/components/headers/IdempotencyRetryAfter"}
    }
    assert "commit-conflict" not in str(fragment["paths"]["/payments"]["post"]["responses"])  # leased: never


def _problem_classes(cls: type[errors.IdempotencyError]) -> Iterator[type[errors.IdempotencyError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _problem_classes(sub)


def test_every_problem_code_the_package_defines_is_documented_by_some_route(fragment: dict[str, Any]) -> None:
    defined = {
        cls.problem_code for cls in _problem_classes(errors.IdempotencyError) if cls.__module__ == errors.__name__
    }
    assert {"commit-conflict", "scope-error", "resource-gone"} <= defined  # the walk finds the classes
    documented = {
        schema["properties"]["type"]["const"]
        for name, schema in fragment["components"]["schemas"].items()
        if name != "IdempotencyProblem"
    }
    # The test app has a route for every option that adds a problem (atomic, replay=, required=False, takeover).
    assert documented == urn(*defined)


def test_flask_rules_become_path_templates_with_typed_parameters(fragment: dict[str, Any]) -> None:
    assert "/accounts/<int:account>/refunds" not in fragment["paths"]
    item = fragment["paths"]["/accounts/{account}/refunds"]
    assert item["parameters"] == [
        {"name": "account", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
    ]


def test_the_key_parameter_describes_the_keys_the_layer_accepts(fragment: dict[str, Any]) -> None:
    schema = fragment["components"]["parameters"]["IdempotencyKey"]["schema"]
    assert fragment["components"]["parameters"]["IdempotencyKey"]["name"] == "Idempotency-Key"
    pattern = re.compile(schema["pattern"])

    def accepted(key: str) -> bool:
        try:
            return parse_key([key]) == key
        except KeyFormatError:
            return False

    def documented(key: str) -> bool:
        return bool(pattern.search(key)) and schema["minLength"] <= len(key) <= schema["maxLength"]

    candidates = [chr(c) for c in range(128)] + ["", "a" * 255, "a" * 256, "order-1001", "a,b", "a b", "é"]
    assert [k for k in candidates if documented(k) != accepted(k)] == ['"']  # a lone quote opens an sf-string


def test_the_header_name_follows_the_config() -> None:
    app = build(IDEMPOTENCY_HEADER="X-Request-Id")
    fragment = app.extensions["idempotency"].openapi(app)
    assert fragment["components"]["parameters"]["IdempotencyKey"]["name"] == "X-Request-Id"


def test_in_progress_answered_with_202_is_documented_as_202() -> None:
    app = build(IDEMPOTENCY_IN_PROGRESS_STATUS=202)
    fragment = app.extensions["idempotency"].openapi(app)
    operation = fragment["paths"]["/payments"]["post"]
    assert problem_types(fragment, operation, 202) == urn("in-progress")
    assert problem_types(fragment, operation, 409) == urn("stuck")


def test_the_documented_problem_types_are_the_ones_the_app_answers(app: Flask, client: FlaskClient) -> None:
    fragment = app.extensions["idempotency"].openapi(app)
    operation = fragment["paths"]["/payments"]["post"]
    missing = post(client, "/payments", key=None, json={"amount": 1})
    assert missing.get_json()["type"] in problem_types(fragment, operation, missing.status_code)
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    reused = post(client, "/payments", json={"amount": 2})
    assert reused.get_json()["type"] in problem_types(fragment, operation, reused.status_code)
    assert [r["state"] for r in records(app)] == ["COMPLETED"]


def test_with_a_docs_url_the_fragment_documents_its_types_and_link() -> None:
    app = build(IDEMPOTENCY_DOCS_URL="https://pay.example/docs/errors/")
    fragment = app.extensions["idempotency"].openapi(app)
    operation = fragment["paths"]["/payments"]["post"]
    assert problem_types(fragment, operation, 422) == {"https://pay.example/docs/errors/key-reused"}
    assert all("Link" in response["headers"] for response in operation["responses"].values())
    assert "IdempotencyLink" in fragment["components"]["headers"]
    validate(document(fragment), cls=OpenAPIV31SpecValidator)


def test_protect_all_documents_every_unsafe_route_but_exempt_ones_and_the_dashboard(database_url: str) -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, IDEMPOTENCY_PROTECT_ALL=True, SECRET_KEY="x")
    db = SQLAlchemy()
    db.init_app(app)
    idempotency = Idempotency(app, db)

    @app.put("/items/<uuid:item>")
    def put_item(item: Any) -> str:
        return "ok"

    @app.post("/ping")
    @idempotent(exempt=True)
    def ping() -> str:
        return "pong"

    @app.post("/hooks/<path:rest>")
    @idempotent(key=lambda: "k", scope="hooks", ttl=60)
    def hook(rest: str) -> str:
        return "ok"

    fragment = idempotency.openapi(app)
    assert sorted(fragment["paths"]) == ["/hooks/{rest}", "/items/{item}"]
    assert fragment["paths"]["/items/{item}"]["parameters"][0]["schema"] == {"type": "string", "format": "uuid"}
    hook_operation = fragment["paths"]["/hooks/{rest}"]["post"]
    assert "parameters" not in hook_operation  # the key comes from the request, not from the header
    assert hook_operation["x-idempotency"]["keySource"] == "route" and hook_operation["x-idempotency"]["ttl"] == 60
    assert "urn:flask-idempotent:problem:scope-error" not in problem_types(fragment, hook_operation, 500)
    validate(document(fragment), cls=OpenAPIV31SpecValidator)


def test_the_example_app_serves_a_valid_openapi_31_document(tmp_path: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'example.db'}",
            "SECRET_KEY": "x",
            "OPERATOR_PASSWORD": "x",
            "PROVIDER_HANG_DIR": str(tmp_path),
        }
    )
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    served = response.get_json()
    validate(served, cls=OpenAPIV31SpecValidator)
    assert sorted(served["paths"]) == ["/payments", "/transfers", "/webhooks/provider"]
    payments = served["paths"]["/payments"]["post"]
    assert payments["summary"].startswith("Charge") and payments["x-idempotency"]["mode"] == "leased"
    assert payments["responses"]["201"]["headers"]["Idempotent-Replayed"] == {
        "$ref": "#/components/headers/IdempotentReplayed"
    }
    assert "bearer" in served["components"]["securitySchemes"]
    # The validator does check what the fragment adds: a path variable left undeclared is refused.
    broken = {**served, "paths": {**served["paths"], "/payments/{id}": served["paths"]["/payments"]}}
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV31SpecValidator)


def test_merging_into_an_apispec_document(fragment: dict[str, Any]) -> None:
    spec = APISpec(title="Payments", version="1.0", openapi_version="3.1.0")
    spec.components.parameter("RequestKey", "header", {"name": "idempotency-key", "schema": {"type": "string"}})
    spec.components.response("Outage", {"description": "We are down"})
    spec.path(
        path="/payments",
        operations={
            "get": {"responses": {"200": {"description": "The payments"}}},
            "post": {
                "parameters": ["RequestKey"],  # apispec turns a component name into its $ref
                "responses": {
                    "201": {"description": "Created"},
                    "422": {"description": "Invalid amount"},
                    "503": "Outage",  # apispec turns it into a $ref
                },
            },
        },
    )
    original = spec.to_dict()
    merged = merge(original, fragment)
    validate(merged, cls=OpenAPIV31SpecValidator)
    assert original == spec.to_dict()  # the document given is not changed
    post_payments = merged["paths"]["/payments"]["post"]
    # The app's own key parameter (same header, any case) is kept and not doubled.
    assert post_payments["parameters"] == [{"$ref": "#/components/parameters/RequestKey"}]
    assert post_payments["responses"]["422"]["description"] == "Invalid amount"  # the document's word wins
    assert "application/problem+json" in post_payments["responses"]["422"]["content"]
    replayed = {"$ref": "#/components/headers/IdempotentReplayed"}
    assert post_payments["responses"]["201"]["headers"]["Idempotent-Replayed"] == replayed
    assert post_payments["responses"]["422"]["headers"]["Idempotent-Replayed"] == replayed
    assert post_payments["responses"]["503"] == {"$ref": "#/components/responses/Outage"}  # nothing beside a $ref
    assert "413" in post_payments["responses"] and post_payments["x-idempotency"]["mode"] == "leased"
    assert merged["paths"]["/payments"]["get"] == original["paths"]["/payments"]["get"]
    assert "/transfers" in merged["paths"] and "IdempotencyKey" in merged["components"]["parameters"]


def test_merge_takes_dicts(fragment: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="spec.to_dict"):
        merge('{"openapi": "3.1.0"}', fragment)  # type: ignore[arg-type]
