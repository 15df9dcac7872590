"""``Idempotency.openapi()``: the layer's part of an OpenAPI 3.1 document, for the routes it protects.

The IETF draft on the ``Idempotency-Key`` header asks a resource to publish its idempotency policy, expiry
included. :func:`fragment` writes that policy as OpenAPI: for each protected operation the key header parameter,
the problem responses the layer can answer with their ``type`` URIs, and the route's options as the
``x-idempotency`` extension field. :func:`merge` folds it into a document the app already has (apispec,
flask-smorest, a hand-written file). docs/publishing.md shows both.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask
from werkzeug.routing import AnyConverter, FloatConverter, IntegerConverter, PathConverter, UUIDConverter

from . import errors
from .constants import REPLAYED_HEADER, UNSAFE_METHODS, ConfigKey
from .decorator import RouteOptions, route_options
from .keys import MAX_KEY_LENGTH
from .state import Resolved, app_state

#: The extension field each protected operation carries: ``mode``, ``required``, ``ttl``, ``lease``, ``keySource``.
EXTENSION_FIELD = "x-idempotency"

_PARAMETERS = "#/components/parameters/"
_HEADERS = "#/components/headers/"
_SCHEMAS = "#/components/schemas/"
_PROBLEM = "IdempotencyProblem"
_PROBLEM_MEDIA_TYPE = errors.PROBLEM_MEDIA_TYPE

#: A bare key: 1..255 visible ASCII characters (0x21-0x7E) but the comma (0x2C); keys.py holds the rule.
KEY_PATTERN = r"^[\x21-\x2B\x2D-\x7E]+$"

# Werkzeug's rule syntax: ``<name>``, ``<converter:name>``, ``<converter(args):name>``.
_VARIABLE = re.compile(r"<(?:(?P<converter>[a-zA-Z_]\w*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_]\w*)>")


@dataclass(frozen=True)
class _Problem:
    error: type[errors.IdempotencyError]
    #: Problems answered from a stored record carry ``Idempotent-Replayed: true``.
    replayed: bool = False
    retry_after: bool = False

    @property
    def code(self) -> str:
        return self.error.problem_code

    @property
    def schema_name(self) -> str:
        return _PROBLEM + "".join(part.capitalize() for part in self.code.split("-"))


_MISSING_KEY = _Problem(errors.MissingKey)
_INVALID_KEY = _Problem(errors.InvalidKey)
_TOO_LARGE = _Problem(errors.BodyTooLargeToFingerprint)
_KEY_REUSED = _Problem(errors.KeyReused)
_IN_PROGRESS = _Problem(errors.RequestInProgress, retry_after=True)
_STUCK = _Problem(errors.RecordStuck)
_STORE_UNAVAILABLE = _Problem(errors.StoreUnavailable, retry_after=True)
_TRANSIENT = _Problem(errors.TransientError, retry_after=True)
_RESOURCE_GONE = _Problem(errors.ResourceGone, replayed=True)
_FAILED = _Problem(errors.RequestFailed)
_NOT_STORED = _Problem(errors.ResponseNotStored, replayed=True)
_COMMIT_FAILED = _Problem(errors.CommitFailed)
_COMMIT_CONFLICT = _Problem(errors.CommitConflict, retry_after=True)
_SCOPE_ERROR = _Problem(errors.ScopeError)


def _problems(options: Resolved) -> Iterator[tuple[int, _Problem]]:
    """The problems a route with ``options`` can answer, with their HTTP status (docs: Behaviour)."""
    if options.required:
        yield 400, _MISSING_KEY
    yield 400, _INVALID_KEY
    yield options.in_progress_status, _IN_PROGRESS
    if options.on_stale == "hold":
        yield 409, _STUCK
    yield 413, _TOO_LARGE
    yield 422, _KEY_REUSED
    yield 503, _STORE_UNAVAILABLE
    yield 503, _TRANSIENT
    if options.replay is not None:
        yield 410, _RESOURCE_GONE
    yield 500, _FAILED
    yield 500, _NOT_STORED
    if options.atomic:
        yield 500, _COMMIT_FAILED
        yield 503, _COMMIT_CONFLICT
    if options.scope is None:
        yield 500, _SCOPE_ERROR


def protected_routes(app: Flask) -> Iterator[tuple[str, str, Resolved]]:
    """``(rule, method, options)`` for every unsafe method of every route the layer protects on ``app``.

    The same choice the request hooks make: a view marked ``@idempotent``, or any view under
    ``IDEMPOTENCY_PROTECT_ALL``, unless it is ``exempt``.
    """
    state = app_state(app)
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        for method in sorted(UNSAFE_METHODS & set(rule.methods or ())):
            route = route_options(view, method)  # a MethodView's options may differ by method
            if route is None and state.protect_all and view is not None:
                route = RouteOptions()
            if route is not None and not route.exempt:
                yield rule.rule, method, state.resolve(route)


def _path_template(app: Flask, rule: str) -> tuple[str, list[dict[str, Any]]]:
    """An OpenAPI path template for a Werkzeug rule (``/a/<int:id>`` -> ``/a/{id}``) and its path parameters."""
    parameters: list[dict[str, Any]] = []

    def template(match: re.Match[str]) -> str:
        converter = app.url_map.converters.get(match["converter"] or "default")
        schema: dict[str, Any] = {"type": "string"}
        if converter is not None and issubclass(converter, IntegerConverter):
            signed = "signed=True" in (match["args"] or "")
            schema = {"type": "integer"} if signed else {"type": "integer", "minimum": 0}
        elif converter is not None and issubclass(converter, FloatConverter):
            schema = {"type": "number"}
        elif converter is not None and issubclass(converter, UUIDConverter):
            schema = {"type": "string", "format": "uuid"}
        elif converter is not None and issubclass(converter, AnyConverter):
            schema = {"type": "string", "enum": re.findall(r"[\w.-]+", match["args"] or "")}
        parameter: dict[str, Any] = {"name": match["name"], "in": "path", "required": True, "schema": schema}
        if converter is not None and issubclass(converter, PathConverter):
            parameter["description"] = "May contain slashes (a Werkzeug `path` variable)."
        parameters.append(parameter)
        return "{" + match["name"] + "}"

    return _VARIABLE.sub(template, rule), parameters


def _response(problems: list[_Problem], docs_url: bool) -> dict[str, Any]:
    refs = [{"$ref": _SCHEMAS + p.schema_name} for p in problems]
    headers: dict[str, Any] = {}
    if any(p.retry_after for p in problems):
        headers["Retry-After"] = {"$ref": _HEADERS + "IdempotencyRetryAfter"}
    if any(p.replayed for p in problems):
        headers[REPLAYED_HEADER] = {"$ref": _HEADERS + "IdempotentReplayed"}
    if docs_url:
        headers["Link"] = {"$ref": _HEADERS + "IdempotencyLink"}
    response: dict[str, Any] = {
        "description": "Idempotency layer: " + "; ".join(f"`{p.code}` ({p.error.title})" for p in problems),
        "content": {_PROBLEM_MEDIA_TYPE: {"schema": refs[0] if len(refs) == 1 else {"oneOf": refs}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _key_parameter(header: str, required: bool) -> dict[str, Any]:
    return {
        "name": header,
        "in": "header",
        "required": required,
        "description": (
            "A unique value per operation, sent again unchanged on every retry of it. The same key with another"
            ' request is refused (422 `key-reused`). The RFC 8941 string form (`"..."`) names the same key;'
            " the schema describes the bare form."
            + ("" if required else " Optional here: without it the request runs unprotected.")
        ),
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": KEY_PATTERN},
    }


def _components(
    problems: Mapping[str, _Problem], key_parameters: set[bool], header: str, docs_url: bool
) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        _PROBLEM: {
            "type": "object",
            "description": "An RFC 9457 problem details object (`application/problem+json`).",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "format": "uri", "description": "The problem's URI; ends with its code."},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string", "description": "What happened to this request, for people."},
            },
        }
    }
    for problem in problems.values():
        schemas[problem.schema_name] = {
            "allOf": [{"$ref": _SCHEMAS + _PROBLEM}],
            "description": (problem.error.__doc__ or problem.error.title).strip().splitlines()[0],
            "properties": {
                "type": {"const": errors.problem_type(problem.code)},
                "title": {"const": problem.error.title},
            },
        }
    parameters = {}
    if True in key_parameters:
        parameters["IdempotencyKey"] = _key_parameter(header, True)
    if False in key_parameters:
        parameters["IdempotencyKeyOptional"] = _key_parameter(header, False)
    headers = {
        "IdempotentReplayed": {
            "description": "`true` on a response replayed from the stored outcome; the view did not run again.",
            "schema": {"type": "string", "const": "true"},
        },
        "IdempotencyRetryAfter": {
            "description": "Seconds to wait before retrying with the same key.",
            "schema": {"type": "integer", "minimum": 0},
        },
    }
    if docs_url:
        headers["IdempotencyLink"] = {
            "description": 'The documentation of the problem: `<type>; rel="describedby"` (IDEMPOTENCY_DOCS_URL).',
            "schema": {"type": "string"},
        }
    return {"parameters": parameters, "headers": headers, "schemas": schemas}


def fragment(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 ``paths`` and ``components`` the layer adds for ``app`` (see ``Idempotency.openapi``)."""
    state = app_state(app)
    with app.app_context():  # problem ``type`` URIs follow the app's config
        docs_url = bool(app.config.get(ConfigKey.DOCS_URL))
        paths: dict[str, Any] = {}
        used: dict[str, _Problem] = {}
        key_parameters: set[bool] = set()
        for rule, method, options in protected_routes(app):
            path, path_parameters = _path_template(app, rule)
            item = paths.setdefault(path, {})
            if path_parameters:
                item["parameters"] = path_parameters
            by_status: dict[int, list[_Problem]] = {}
            for status, problem in _problems(options):
                by_status.setdefault(status, []).append(problem)
                used[problem.code] = problem
            parameters = []
            if options.key is None:
                key_parameters.add(options.required)
                name = "IdempotencyKey" if options.required else "IdempotencyKeyOptional"
                parameters.append({"$ref": _PARAMETERS + name})
            operation: dict[str, Any] = {
                "responses": {str(s): _response(p, docs_url) for s, p in sorted(by_status.items())},
                EXTENSION_FIELD: {
                    "mode": "atomic" if options.atomic else "leased",
                    "required": options.required,
                    "ttl": _number(options.ttl),
                    "lease": _number(options.lease),
                    "keySource": "header" if options.key is None else "route",
                },
            }
            if parameters:
                operation["parameters"] = parameters
            item[method.lower()] = operation
        components = _components(used, key_parameters, state.header, docs_url)
    return {"paths": dict(sorted(paths.items())), "components": components}


def _number(seconds: float) -> float | int:
    return int(seconds) if seconds.is_integer() else seconds


def merge(document: Mapping[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (an OpenAPI 3.1 dict, such as apispec's ``spec.to_dict()``) with ``fragment`` folded in.

    Objects merge key by key; where both have a value, the document's wins (its descriptions, its own
    responses), and nothing is added to a ``$ref`` of the document. ``parameters`` lists are joined, skipping
    one the document already has (same ``$ref``, or same ``name`` and ``in``). Every response the document
    already declares for a protected operation gets the ``Idempotent-Replayed`` header (a replay answers with
    the stored status, whatever it was), unless it is a ``$ref`` (add the header to that component yourself).
    ``document`` is not changed; anything but a mapping is a ``TypeError``.
    """
    if not isinstance(document, Mapping) or not isinstance(fragment, Mapping):
        raise TypeError("merge(document, fragment) takes two dicts (apispec: spec.to_dict(); idempotency.openapi())")
    merged = copy.deepcopy(dict(document))
    originals = {
        (path, method): set((operation.get("responses") or {}).keys())
        for path, item in (merged.get("paths") or {}).items()
        for method, operation in item.items()
        if isinstance(operation, dict) and path in fragment.get("paths", {}) and method in fragment["paths"][path]
    }
    # Components first, so that a parameter ``$ref`` of the fragment resolves when the paths are joined.
    _deep_merge(merged, {name: fragment[name] for name in sorted(fragment, key=lambda name: name != "components")})
    for (path, method), statuses in originals.items():
        responses = merged["paths"][path][method]["responses"]
        for status in statuses:
            if "$ref" not in responses[status]:
                headers = responses[status].setdefault("headers", {})
                headers.setdefault(REPLAYED_HEADER, {"$ref": _HEADERS + "IdempotentReplayed"})
    return merged


def _deep_merge(target: dict[str, Any], update: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> None:
    root = target if root is None else root
    for name, value in update.items():
        if name not in target:
            target[name] = copy.deepcopy(value)
        elif isinstance(target[name], dict) and "$ref" in target[name]:
            continue  # the document points elsewhere for this one: nothing may be added beside a reference
        elif isinstance(target[name], dict) and isinstance(value, Mapping):
            _deep_merge(target[name], value, root)
        elif name == "parameters" and isinstance(target[name], list) and isinstance(value, list):
            present = {_parameter_identity(p, root) for p in target[name]}
            target[name] += [copy.deepcopy(p) for p in value if _parameter_identity(p, root) not in present]


def _parameter_identity(parameter: Mapping[str, Any], root: Mapping[str, Any]) -> tuple[str, str]:
    """``(in, name)`` of a parameter or of the component its ``$ref`` names (header names are case-blind)."""
    ref = parameter.get("$ref")
    if isinstance(ref, str) and ref.startswith(_PARAMETERS):
        parameter = root.get("components", {}).get("parameters", {}).get(ref[len(_PARAMETERS) :], parameter)
    where, name = str(parameter.get("in")), str(parameter.get("name", ref))
    return where, name.lower() if where == "header" else name
