"""Whatever an operator (or a link someone sent them) feeds the dashboard and the CLI, the answer is a page or a
line, never a 500 or a traceback: odd query arguments, ids beyond 64 bits, unknown methods, bad option values,
and a database that cannot be reached. And every dashboard response refuses to be framed or cached.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from helpers import events, ext, post, records
from procs import flask_cli
from test_dashboard import PAGES, PREFIX, allow, form_fields, get, insert, insert_stuck
from test_dashboard_browser import browser, served  # noqa: F401 - fixtures
from test_store_unavailable import unreachable_url
from testapp import Controls, build_app
from werkzeug.test import TestResponse

from flask_idempotent import operations as ops
from flask_idempotent.errors import SchemaVersionError
from flask_idempotent.state import AppState

HUGE = "99999999999999999999"  # above int64
BEYOND_INT64 = [str(2**63), HUGE]
ACTIONS = ["mark-retryable", "mark-failed", "acknowledge", "release"]
#: The only query arguments a pagination link may carry.
LIST_ARGS = {"page", "per_page", "kind", "record_kind", "window", "q"}


def framed_or_cached(response: TestResponse) -> list[str]:
    """What is missing of the headers docs/operating.md promises on every dashboard response."""
    missing = []
    if response.headers.get("X-Frame-Options") != "DENY":
        missing.append("X-Frame-Options")
    if "frame-ancestors 'none'" not in response.headers.get("Content-Security-Policy", ""):
        missing.append("CSP frame-ancestors")
    if "no-store" not in response.headers.get("Cache-Control", ""):
        missing.append("Cache-Control")
    return missing


def links(page: str) -> list[str]:
    return [href.replace("&amp;", "&") for href in re.findall(r'(?:href|action|src)="([^"]*)"', page)]


# Dashboard: query arguments ---------------------------------------------------------------------------------

ODD_ARGS = [
    f"page={HUGE}",
    f"page={2**63 - 1}",
    f"page={2**63}",
    f"page=-{HUGE}",
    f"per_page={HUGE}",
    f"page={'9' * 5000}",  # more digits than int() parses
    "page=1e5",
    "page=1_0",
    "page=%00",
    "page=%C3%A9",
    "page=%D9%A3",  # an Arabic-Indic digit
    "page=2&page=3",
    "_method=DELETE",
    "_anchor=evil",
    "_external=1",
    "_scheme=javascript&_external=1",
    "_scheme=https",
    "endpoint=x",
    "values=x",
    "record_id=1",
    "kind=%00",
    "window=%00",
    "q=" + "x" * 5000,
]


@pytest.mark.parametrize("odd", ODD_ARGS)
def test_no_query_argument_however_odd_is_a_500(app: Flask, client: FlaskClient, clock: Any, odd: str) -> None:
    allow(app)
    for i in range(3):
        insert(app, clock, f"f{i}")
    post(client, "/payments", key="c", json={"amount": 1})
    post(client, "/payments", key="c", json={"amount": 2})  # a conflict, so the conflicts list pages too
    record_id = insert_stuck(app, clock, "s")
    for path in ["/", "/stuck", "/failed", "/failed?kind=final", "/conflicts", "/search?q=f0", f"/records/{record_id}"]:
        url = f"{path}{'&' if '?' in path else '?'}{odd}&per_page=1"
        page = get(client, url)  # the test app propagates exceptions: a 500 would raise here
        for link in links(page):
            assert link.startswith(PREFIX), (url, link)  # never absolute (_external, _scheme)
            assert "#" not in link and "evil" not in link, (url, link)
            query = link.partition("?")[2]
            assert {arg.partition("=")[0] for arg in query.split("&") if arg} <= LIST_ARGS, (url, link)


def test_a_huge_page_is_clamped_and_pages_back_from_there(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    for i in range(3):
        insert(app, clock, f"f{i}")
    for path in (f"/failed?page={HUGE}&per_page=200", f"/failed?page={2**63 - 1}&per_page=200"):
        page = get(client, path)
        assert f"3 records · page {ops.MAX_PAGE} of 1 · 200 per page" in page
        assert "<tbody>" not in page  # past the end: no rows, no overflow
        previous = re.search(r'href="([^"]*)" rel="prev"', page)
        assert previous is not None
        assert f"page {ops.MAX_PAGE - 1} of 1" in get(client, previous.group(1).replace("&amp;", "&")[len(PREFIX) :])
    with app.app_context():  # the operations API clamps the same way, for the CLI and Python callers
        assert ops.list_failed(page=10**20).page == ops.MAX_PAGE
        assert ops.search("f0", page=10**20, per_page=10**20).items == []
        assert ops.list_conflicts(page=10**20).items == []


def test_pagination_links_carry_only_the_list_parameters(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    for i in range(3):
        insert(app, clock, f"f{i}")
    page = get(client, "/failed?kind=final&_anchor=x&_external=1&junk=zq9&per_page=1&page=2")
    assert f'href="{PREFIX}/failed?kind=final&amp;per_page=1&amp;page=3" rel="next"' in page
    assert f'href="{PREFIX}/failed?kind=final&amp;per_page=1&amp;page=1" rel="prev"' in page
    assert "zq9" not in page and "http://" not in page


def test_a_search_for_text_with_nul_finds_nothing_instead_of_failing(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    insert(app, clock, "k")
    assert "No record has that key or scope" in get(client, "/search?q=k%00")  # PostgreSQL cannot compare NUL
    assert "No record has that key or scope" in get(client, "/search?q=%00&page=2")


# Dashboard: ids and methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("record_id", BEYOND_INT64)
def test_record_ids_beyond_64_bits_are_404(app: Flask, client: FlaskClient, clock: Any, record_id: str) -> None:
    allow(app)
    real = insert_stuck(app, clock, "s")
    assert f"no idempotency record with id {record_id}" in get(client, f"/records/{record_id}", 404)
    get(client, f"/records/{record_id}/release", 404)
    fields = form_fields(get(client, f"/records/{real}"), f"/records/{real}/mark-failed")  # a valid CSRF token
    before = records(app)
    for action in ACTIONS:
        response = client.post(f"{PREFIX}/records/{record_id}/{action}", data={**fields, "confirm": "release"})
        assert response.status_code == 404, action
    assert records(app) == before and events(app) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/"),
        ("PUT", "/stuck"),
        ("PATCH", "/records/1"),
        ("DELETE", "/records/1"),
        ("PROPFIND", "/failed"),
        ("POST", "/search"),
        ("GET", "/records/1/mark-failed"),
        ("PUT", "/records/1/release"),
    ],
)
def test_unknown_methods_are_405_with_the_dashboard_headers(
    app: Flask, client: FlaskClient, clock: Any, method: str, path: str
) -> None:
    allow(app)
    insert(app, clock, "k")
    before = records(app)
    response = client.open(PREFIX + path, method=method)
    assert response.status_code == 405
    assert framed_or_cached(response) == []
    assert records(app) == before


def test_a_method_override_argument_is_ignored(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert(app, clock, "k")
    get(client, "/?_method=DELETE")
    get(client, f"/records/{record_id}?_method=DELETE")
    fields = form_fields(get(client, f"/records/{record_id}/release"), f"/records/{record_id}/release")
    response = client.post(
        f"{PREFIX}/records/{record_id}/mark-failed?_method=DELETE", data={**fields, "_method": "DELETE"}
    )
    assert response.status_code == 409  # mark failed on a final failure: refused, not a delete
    assert [r["key"] for r in records(app)] == ["k"]


@pytest.mark.parametrize("version", ["²", "٣", "1e3", "-1", " 1", "1 ", "0x1", "9" * 21])
def test_a_version_field_of_anything_but_ascii_digits_is_400(
    app: Flask, client: FlaskClient, clock: Any, version: str
) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "s")
    fields = form_fields(get(client, f"/records/{record_id}"), f"/records/{record_id}/mark-failed")
    response = client.post(f"{PREFIX}/records/{record_id}/mark-failed", data={**fields, "version": version})
    assert response.status_code == 400
    assert events(app) == []


# Dashboard: framing and caching -----------------------------------------------------------------------------


def test_every_dashboard_response_refuses_framing_and_caching(app: Flask, client: FlaskClient, clock: Any) -> None:
    stuck = insert_stuck(app, clock, "s")
    final = insert(app, clock, "f")
    done: dict[str, TestResponse] = {"403 closed": client.get(PREFIX + "/")}
    allow(app)
    for path in [*PAGES, f"/records/{stuck}", f"/records/{stuck}/release", "/records/424242"]:
        done[path] = client.get(PREFIX + path)
    done["css"] = css = client.get(PREFIX + "/static/flask_idempotent/dashboard.css")
    css.close()  # a file: close it at once (an unclosed one warns, and warnings are errors here)
    done["unknown path"] = client.get(PREFIX + "/nowhere")
    fields = form_fields(done[f"/records/{stuck}"].text, f"/records/{stuck}/mark-failed")
    done["400 csrf"] = client.post(f"{PREFIX}/records/{stuck}/mark-failed", data={**fields, "csrf_token": "x"})
    done["409 refused"] = client.post(f"{PREFIX}/records/{final}/mark-failed", data={**fields, "version": "1"})
    done["303 action"] = client.post(f"{PREFIX}/records/{stuck}/mark-failed", data=fields)
    done["after the action"] = client.get(f"{PREFIX}/records/{stuck}")
    assert {name: r.status_code for name, r in done.items()} == {
        "403 closed": 403,
        **{path: 404 if path == "/records/424242" else 200 for path in done if path.startswith("/")},
        "css": 200,
        "unknown path": 404,
        "400 csrf": 400,
        "409 refused": 409,
        "303 action": 303,
        "after the action": 200,
    }
    assert {name: framed_or_cached(r) for name, r in done.items() if framed_or_cached(r)} == {}
    app_page = client.get("/nowhere")  # the app's own responses are the app's business
    assert "X-Frame-Options" not in app_page.headers and "Content-Security-Policy" not in app_page.headers
    created = post(client, "/payments", key="app", json={"amount": 1})
    assert created.status_code == 201 and "X-Frame-Options" not in created.headers


def test_the_content_security_policy_leaves_the_pages_whole(app: Flask, client: FlaskClient, clock: Any) -> None:
    """``default-src 'self'`` blocks scripts, inline styles and anything from elsewhere: the pages use none."""
    allow(app)
    record_id = insert_stuck(app, clock, "s", scope="u")
    pages = [*PAGES, f"/records/{record_id}", f"/records/{record_id}/release", "/records/424242", "/search"]
    for path in pages:
        response = client.get(PREFIX + path)
        page = response.text
        assert "'self'" in response.headers["Content-Security-Policy"]
        assert not re.search(r"<script|<style|\sstyle=|\son\w+=|javascript:", page, re.I), path
        assert [link for link in links(page) if not link.startswith(PREFIX + "/")] == [], path
        assert f'<link rel="stylesheet" href="{PREFIX}/static/flask_idempotent/dashboard.css">' in page


def test_a_browser_refuses_to_frame_the_dashboard_and_sees_no_policy_violation(
    browser: Any,  # noqa: F811 - the fixtures imported from test_dashboard_browser
    served: tuple[Flask, str],  # noqa: F811
) -> None:
    """In headless Chromium (skipped without it, as ``test_dashboard_browser.py``): the pages render under the
    policy, and a page of another origin that frames the dashboard gets nothing (the app's own pages: framed)."""
    app, base = served
    context = browser.new_context()
    messages: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda message: messages.append(message.text))
        for path in ("/", "/stuck", "/failed", "/search?q=x"):
            assert page.goto(f"{base}{PREFIX}{path}").status == 200
            assert page.locator(".fi-header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(31, 42, 60)"
        assert not [m for m in messages if "Content Security Policy" in m], messages
        page.set_content(
            f'<iframe id="dashboard" src="{base}{PREFIX}/"></iframe><iframe id="app" src="{base}/nowhere"></iframe>'
        )
        page.wait_for_timeout(1000)
        framed = {frame.url: frame.content() for frame in page.frames[1:]}
    finally:
        context.close()
    assert any("Not Found" in html for html in framed.values()), framed  # control: framing works elsewhere
    assert not any("fi-header" in html for html in framed.values()), framed
    assert any("frame-ancestors" in m for m in messages), messages


# Dashboard: the database cannot be reached ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_outage_is_a_503_dashboard_page(kind: str, tmp_path: Path, clock: Any) -> None:
    app = build_app(unreachable_url(kind, tmp_path), clock=clock, controls=Controls())
    client = app.test_client()
    assert client.get(PREFIX + "/").status_code == 403  # no access: closed, and the database is not asked
    allow(app, "alice")
    for path in [*PAGES, "/records/1/release", f"/search?q=k&page={HUGE}"]:
        response = client.get(PREFIX + path)
        assert response.status_code == 503, path
        text = response.text
        assert "The database cannot be reached" in text and "Service Unavailable" in text, path
        assert "Traceback" not in text and "SELECT" not in text, path
        assert "alice" in text and 'class="fi-nav"' in text  # a dashboard page, with its navigation
        assert framed_or_cached(response) == []
    with client.session_transaction() as session:
        session["_flask_idempotent_csrf"] = "token"
    response = client.post(f"{PREFIX}/records/1/mark-failed", data={"csrf_token": "token", "version": "1"})
    assert response.status_code == 503
    assert "sending it again is refused" in response.text and "Back to record 1" in response.text


def test_an_access_hook_that_cannot_reach_its_database_gets_a_503_without_details(
    app: Flask, client: FlaskClient
) -> None:
    def check() -> str:
        raise sa.exc.OperationalError("SELECT role FROM users", {}, Exception("db-secret-host: connection refused"))

    ext(app)["idempotency"].dashboard_access(check)
    response = client.get(PREFIX + "/stuck")
    assert response.status_code == 503
    assert "unavailable" in response.text and "db-secret-host" not in response.text and "SELECT" not in response.text
    assert framed_or_cached(response) == []


def test_tables_of_an_older_schema_are_a_503_naming_the_upgrade(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def old_schema(self: AppState) -> None:
        raise SchemaVersionError("the idempotency_records table lacks the columns version: run upgrade-schema")

    allow(app)
    monkeypatch.setattr(AppState, "check_schema", old_schema)
    response = client.get(PREFIX + "/")
    assert response.status_code == 503 and "run upgrade-schema" in response.text


# CLI --------------------------------------------------------------------------------------------------------


def cli(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["idempotency", *args])


def error_line(result: Result, status: int = 1) -> str:
    """The one line of a failed command without ``--json``: on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled: never an exception escaping
    assert result.stdout == "" and "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    return line


def json_error(result: Result, status: int = 1) -> dict[str, str]:
    """The error of a failed ``--json`` command: one JSON object on stdout, nothing on stderr."""
    assert result.exit_code == status, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr == ""
    [line] = result.stdout.splitlines()
    error: dict[str, str] = json.loads(line)["error"]
    assert set(error) == {"code", "message"}
    return error


@pytest.mark.parametrize("actor", ["", "   ", "x" * 256])
def test_cli_actions_need_an_actor_of_1_to_255_characters(app: Flask, clock: Any, actor: str) -> None:
    record_id = str(insert_stuck(app, clock, "s"))
    before = records(app)
    for action in ACTIONS:
        assert "--actor" in error_line(cli(app, action, record_id, "--actor", actor), status=2)
        assert json_error(cli(app, action, record_id, "--actor", actor, "--json"), status=2)["code"] == "usage"
    assert records(app) == before and events(app) == []
    done = cli(app, "mark-failed", record_id, "--actor", "  bob  ", "--json")
    assert done.exit_code == 0, done.output
    assert events(app, "mark_failed")[0]["actor"] == "bob"


@pytest.mark.parametrize("record_id", [*BEYOND_INT64, str(-(2**63) - 1)])
def test_cli_ids_beyond_64_bits_are_no_record(app: Flask, record_id: str) -> None:
    for action in ACTIONS:
        line = error_line(cli(app, action, "--actor", "alice", "--", record_id))
        assert line == f"Error: no idempotency record with id {record_id}"
        error = json_error(cli(app, action, "--json", "--", record_id))
        assert error == {"code": "not-found", "message": f"no idempotency record with id {record_id}"}


@pytest.mark.parametrize(
    "args",
    [
        ["stuck", "--page", "0"],
        ["stuck", "--page", HUGE],
        ["stuck", "--page", "1000000001"],  # operations.MAX_PAGE + 1
        ["stuck", "--per-page", "0"],
        ["stuck", "--per-page", "201"],
        ["stuck", "--per-page", HUGE],
        ["stuck", "--page", "abc"],
        ["purge", "--batch-size", HUGE],
        ["purge", "--batch-size", "0"],
        ["purge", "--pause", "nan"],
        ["purge", "--pause", "inf"],
        ["purge", "--pause", "-1"],
        ["mark-failed", "abc"],
        ["mark-failed"],
        ["nope"],
    ],
)
def test_cli_usage_errors_are_one_line(app: Flask, args: list[str]) -> None:
    line = error_line(cli(app, *args), status=2)
    assert "--help" in line
    assert json_error(cli(app, *args, "--json"), status=2)["code"] == "usage"


def test_cli_paging_at_the_bounds_works(app: Flask, client: FlaskClient) -> None:
    result = cli(app, "stuck", "--page", str(ops.MAX_PAGE), "--per-page", str(ops.MAX_PER_PAGE), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["items"] == []


def test_cli_refusals_are_one_line_and_json_with_json(app: Flask, client: FlaskClient, clock: Any) -> None:
    post(client, "/payments", key="done", json={"amount": 1})
    record_id = str(records(app)[0]["id"])
    assert "COMPLETED" in error_line(cli(app, "mark-failed", record_id))
    assert json_error(cli(app, "mark-failed", record_id, "--json"))["code"] == "refused"
    assert json_error(cli(app, "release", record_id, "--expect-version", "7", "--json"))["code"] == "changed"
    assert json_error(cli(app, "show", "", "nope", "--json"))["code"] == "not-found"
    assert len(records(app)) == 1 and events(app) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_cli_database_outage_is_one_line_for_every_command(kind: str, tmp_path: Path, clock: Any) -> None:
    app = build_app(unreachable_url(kind, tmp_path), clock=clock, controls=Controls())
    commands = [
        ["stats"],
        ["stuck"],
        ["failed"],
        ["conflicts"],
        ["conflicts", "--hours", "1"],
        ["search", "k"],
        ["show", "", "k"],
        ["show", "1"],
        *([action, "1"] for action in ACTIONS),
        ["purge"],
        ["upgrade-schema"],
    ]
    for args in commands:
        line = error_line(cli(app, *args))
        assert line.startswith("Error: the database cannot be reached: "), (args, line)
        assert "SELECT" not in line and "sqlalche.me" not in line
        error = json_error(cli(app, *args, "--json"))
        assert error["code"] == "database-unreachable" and error["message"] == line.removeprefix("Error: ")


def test_cli_database_outage_in_a_real_flask_process() -> None:
    """``flask idempotency stats`` as an operator runs it: it printed a 142-line traceback before."""
    env = {"FAULTAPP_DATABASE_URL": unreachable_url("postgresql", Path("."))}
    human = flask_cli(env, "idempotency", "stats")
    assert human.returncode == 1 and human.stdout == ""
    [line] = human.stderr.splitlines()
    assert line.startswith("Error: the database cannot be reached: ") and "Connection refused" in line
    machine = flask_cli(env, "idempotency", "stats", "--json")
    assert machine.returncode == 1 and machine.stderr == ""
    assert json.loads(machine.stdout)["error"]["code"] == "database-unreachable"


def test_cli_an_unexpected_error_is_one_line_too_unless_debugging(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(ops, "stats", broken)
    monkeypatch.delenv("FLASK_DEBUG", raising=False)
    assert error_line(cli(app, "stats")) == "Error: unexpected error: RuntimeError: boom second line"
    assert json_error(cli(app, "stats", "--json"))["code"] == "internal-error"
    monkeypatch.setenv("FLASK_DEBUG", "1")  # flask --debug: whoever debugs the app gets the traceback
    assert isinstance(cli(app, "stats").exception, RuntimeError)


def test_the_cli_error_codes_are_the_ones_it_answers_and_the_docs_list() -> None:
    """``cli.ERROR_CODES`` is the list a script branches on: every code the CLI can answer, and what the docs say."""
    from flask_idempotent import cli

    source = Path(cli.__file__).read_text()
    answered = set(re.findall(r'return "([a-z-]+)", ', source)) | {"usage"}
    docs = (Path(__file__).parents[1] / "docs" / "operating.md").read_text()
    listed = re.search(r"Codes: (.*?)\. An unexpected", docs, re.S)
    assert listed is not None
    assert set(cli.ERROR_CODES) == answered == set(re.findall(r"`([a-z-]+)`", listed.group(1)))
