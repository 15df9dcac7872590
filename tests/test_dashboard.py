"""The operator dashboard, through the Flask test client: pages, actions, access, CSRF, escaping, paging."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import finish, make_stuck
from flask import Flask
from flask.testing import FlaskClient
from helpers import events, ext, post, record, records
from werkzeug.test import TestResponse

from flask_idempotent.dashboard import ReadOnly

PREFIX = "/idempotency"
PAGES = ["/", "/stuck", "/failed", "/failed?kind=final", "/conflicts", "/search?q=k", "/records/1"]


# Helpers ----------------------------------------------------------------------------------------------------


def allow(app: Flask, who: Any = "alice") -> None:
    ext(app)["idempotency"].dashboard_access(lambda: who)


def insert(app: Flask, clock: Any, key: str, **values: Any) -> int:
    """Insert a record row directly (FAILED final unless told otherwise); return its id."""
    now = clock.now
    row: dict[str, Any] = {
        "scope": "",
        "key": key,
        "request_hash": "v1:" + "0" * 64,
        "method": "POST",
        "path": "/payments",
        "endpoint": "create_payment",
        "state": "FAILED",
        "retryable": False,
        "attempts": 1,
        "event_count": 0,
        "response_status": 500,
        "response_headers": [["Content-Type", "application/json"]],
        "response_body": b'{"error": "boom"}',
        "error": "RuntimeError: boom",
        "created_at": now,
        "updated_at": now,
        "expires_at": now + timedelta(hours=24),
    }
    row.update(values)
    with app.app_context():
        db = ext(app)["db"]
        table = db.metadata.tables["idempotency_records"]
        with db.engine.begin() as conn:
            return int(conn.execute(sa.insert(table).values(**row)).inserted_primary_key[0])


def insert_stuck(app: Flask, clock: Any, key: str, **values: Any) -> int:
    """An IN_PROGRESS record claimed 12 minutes ago whose 60 s lease ran out 11 minutes ago."""
    now = clock.now
    defaults: dict[str, Any] = {
        "state": "IN_PROGRESS",
        "lease_token": "a" * 32,
        "locked_until": now - timedelta(minutes=11),
        "created_at": now - timedelta(minutes=12),
        "updated_at": now - timedelta(minutes=12),
        "response_status": None,
        "response_headers": None,
        "response_body": None,
        "error": None,
        "recovery_point": "charged",
    }
    return insert(app, clock, key, **{**defaults, **values})


def get(client: FlaskClient, path: str, status: int = 200) -> str:
    response = client.get(PREFIX + path)
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    return response.get_data(as_text=True)


def form_fields(page: str, action: str) -> dict[str, str]:
    """The hidden fields of the form posting to ``action`` on ``page``."""
    pattern = '<form[^>]*action="' + re.escape(PREFIX + action) + '"[^>]*>(.*?)</form>'
    match = re.search(pattern, page, re.S)
    assert match, f"no form posting to {action}"
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', match.group(1))
    return {name: html.unescape(value) for name, value in fields}


def act(client: FlaskClient, record_id: int, action: str, **overrides: str | None) -> TestResponse:
    """Load the record page like an operator, then submit the action's form (fields overridable)."""
    page = get(client, f"/records/{record_id}/release" if action == "release" else f"/records/{record_id}")
    data = form_fields(page, f"/records/{record_id}/{action}")
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return client.post(f"{PREFIX}/records/{record_id}/{action}", data=data)


def only(app: Flask, key: str, scope: str = "") -> dict[str, Any]:
    found = record(app, key, scope)
    assert found is not None
    return found


# Access -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, "/records/1/release", "/static/flask_idempotent/dashboard.css"])
def test_every_page_is_403_until_dashboard_access_is_set(
    app: Flask, client: FlaskClient, clock: Any, path: str
) -> None:
    insert(app, clock, "k")
    response = client.get(PREFIX + path)
    assert response.status_code == 403
    assert "dashboard_access" in response.get_data(as_text=True)


@pytest.mark.parametrize("action", ["mark-retryable", "mark-failed", "release"])
def test_actions_are_403_until_dashboard_access_is_set(
    app: Flask, client: FlaskClient, clock: Any, action: str
) -> None:
    record_id = insert(app, clock, "k")
    before = records(app)
    response = client.post(f"{PREFIX}/records/{record_id}/{action}", data={"confirm": "release", "version": "x"})
    assert response.status_code == 403
    assert records(app) == before and events(app) == []


@pytest.mark.parametrize("who", [None, "", False])
def test_a_falsy_access_hook_answer_is_403(app: Flask, client: FlaskClient, who: Any) -> None:
    allow(app, who)
    assert client.get(PREFIX + "/").status_code == 403
    assert client.get(PREFIX + "/stuck").status_code == 403


def test_read_only_viewer_sees_pages_but_no_buttons_and_cannot_act(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app, ReadOnly("rita"))
    record_id = insert_stuck(app, clock, "stuck-1")
    page = get(client, f"/records/{record_id}")
    assert "Read-only access" in page and "rita" in page
    assert "<form" not in page.split("</header>", 1)[1]  # only the search form in the header
    assert "Release…" not in page
    get(client, "/")
    with client.session_transaction() as session:  # a valid own token, as if a form had been rendered
        session["_flask_idempotent_csrf"] = "token"
    before = records(app)
    for action in ("mark-retryable", "mark-failed", "release"):
        response = client.post(
            f"{PREFIX}/records/{record_id}/{action}", data={"csrf_token": "token", "version": "x", "confirm": "release"}
        )
        assert response.status_code == 403, action
    assert records(app) == before and events(app) == []


def test_the_access_hook_may_answer_with_its_own_http_error(app: Flask, client: FlaskClient) -> None:
    from flask import abort

    def login_first() -> str:
        abort(401)

    ext(app)["idempotency"].dashboard_access(login_first)
    assert client.get(PREFIX + "/").status_code == 401


def test_stylesheet_is_served_from_the_namespaced_static_folder(app: Flask, client: FlaskClient) -> None:
    allow(app)
    page = get(client, "/")
    assert f'href="{PREFIX}/static/flask_idempotent/dashboard.css"' in page
    with client.get(PREFIX + "/static/flask_idempotent/dashboard.css") as css:
        assert css.status_code == 200 and css.mimetype == "text/css"
        text = css.get_data(as_text=True)
    classes = set(re.findall(r"\.([a-zA-Z][\w-]*)", re.sub(r"/\*.*?\*/", "", text, flags=re.S)))
    assert classes and all(c.startswith("fi-") for c in classes), classes - {c for c in classes if c[:3] == "fi-"}


# Pages ------------------------------------------------------------------------------------------------------


def seed(app: Flask, client: FlaskClient, clock: Any) -> dict[str, int]:
    """One record of each kind an operator cares about, through the app's routes where possible."""
    controls = ext(app)["controls"]
    post(client, "/payments", key="done", json={"amount": 1})
    post(client, "/other", key="done", json={"amount": 2})  # the same key for another command: conflict
    controls.status = 500
    post(client, "/payments", key="final", json={"amount": 3})
    controls.status = 503
    post(client, "/payments", key="retry", json={"amount": 4})
    controls.status = None
    stuck = insert_stuck(app, clock, "stuck-1")
    return {
        "done": only(app, "done")["id"],
        "final": only(app, "final")["id"],
        "retry": only(app, "retry")["id"],
        "stuck": stuck,
    }


def test_overview_shows_counts_stuck_age_conflicts_and_failures_awaiting_a_decision(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    seed(app, client, clock)
    page = get(client, "/")
    assert 'data-fi-count="stuck">1<' in page and "oldest stuck for 11 min" in page
    assert 'data-fi-count="awaiting_decision">1<' in page
    assert 'data-fi-count="conflicts_24h">1<' in page
    assert 'data-fi-count="failed_retryable">1<' in page
    for state, count in {"IN_PROGRESS": 1, "COMPLETED": 1, "FAILED": 2}.items():
        assert f'data-fi-state="{state}">{count}<' in page
    assert "stuck-1" in page and "final" in page  # the previews link to the records
    clock.advance(hours=25)  # the conflict leaves the 24 h window
    assert 'data-fi-count="conflicts_24h">0<' in get(client, "/")


def test_overview_of_an_empty_store(app: Flask, client: FlaskClient) -> None:
    allow(app)
    page = get(client, "/")
    assert "Nothing is stuck" in page and "No final failures" in page


def test_stuck_page_lists_expired_leases_longest_first_with_human_ages(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    insert_stuck(app, clock, "stuck-recent", locked_until=clock.now - timedelta(seconds=30))
    insert_stuck(app, clock, "stuck-old", locked_until=clock.now - timedelta(hours=3, minutes=5))
    insert_stuck(app, clock, "live", locked_until=clock.now + timedelta(seconds=30))  # owner still running
    page = get(client, "/stuck")
    assert "stuck for 3 h 5 min" in page and "stuck for 30 s" in page
    assert page.index("stuck-old") < page.index("stuck-recent")
    assert "live" not in re.sub(r"<[^>]+>", " ", page.split("<tbody>", 1)[1])
    assert "charged" in page  # the recovery point


def test_failed_page_filters_final_and_retryable(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    seed(app, client, clock)
    all_failed, final, retryable = (
        get(client, "/failed"),
        get(client, "/failed?kind=final"),
        get(client, "/failed?kind=retryable"),
    )
    assert ">final<" in all_failed and ">retry<" in all_failed
    assert ">final<" in final and ">retry<" not in final and "failed · final" in final
    assert ">retry<" in retryable and ">final<" not in retryable and "failed · retryable" in retryable
    assert get(client, "/failed?kind=bogus") == get(client, "/failed")


def test_conflicts_page_shows_the_original_and_the_conflicting_request(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    seed(app, client, clock)
    original = only(app, "done")
    [event] = events(app, "conflict")
    page = get(client, "/conflicts")
    row = page.split("<tbody>", 1)[1]
    assert row.index("/payments") < row.index("/other")  # original first, then the conflicting request
    assert original["request_hash"][:15] in row and event["detail"]["request_hash"][:15] in row
    assert original["request_hash"] != event["detail"]["request_hash"]
    assert "ago" in row
    assert "/other" in get(client, "/conflicts?window=24h")
    clock.advance(hours=25)
    assert "No conflicts in this window" in get(client, "/conflicts?window=24h")
    assert "/other" in get(client, "/conflicts?window=all")


def test_record_page_shows_every_field_events_and_response_but_hides_the_body(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    ids = seed(app, client, clock)
    done = only(app, "done")
    page = get(client, f"/records/{ids['done']}")
    for text in (
        done["request_hash"],
        "create_payment",
        'data-fi-field="state">COMPLETED<',
        'data-fi-field="attempts">1<',
        'data-fi-field="response_status">201<',
        "Location",
        "/payments/1",
        "Conflict",  # the event timeline
        "/other",
        "none (settled)",
        "bytes, hidden",
    ):
        assert text in page, text
    assert '"amount"' not in page  # the response body is hidden by default
    assert "X-Not-Replayed" not in page and "session_hint" not in page  # never stored, never shown

    stuck = get(client, f"/records/{ids['stuck']}")
    assert "expired 11 min ago" in stuck and "charged" in stuck
    assert "Recovery data" in stuck


def test_record_page_of_a_missing_record_is_404(app: Flask, client: FlaskClient) -> None:
    allow(app)
    assert "no idempotency record with id 4242" in get(client, "/records/4242", 404)
    assert client.get(PREFIX + "/records/4242/release").status_code == 404


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_DASHBOARD_SHOW_BODIES": True}])
def test_bodies_are_shown_truncated_when_configured(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    big = insert(app, clock, "big", response_body=b"A" * 5000 + b"TAIL", recovery_data={"charge": "ch_123"})
    page = get(client, f"/records/{big}")
    assert "5004 bytes, first 4096 shown" in page and "A" * 4096 in page and "TAIL" not in page
    assert "(truncated)" in page and "ch_123" in page
    binary = insert(app, clock, "bin", response_body=b"\xff\xfe\x00")
    assert "binary (base64)" in get(client, f"/records/{binary}")


def test_search_by_exact_key_or_scope(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    insert(app, clock, "order-1", scope="user-1")
    insert(app, clock, "order-2", scope="user-1")
    insert(app, clock, "order-1", scope="user-2")
    by_key = get(client, "/search?q=order-1")
    assert by_key.count("<tr>") == 3  # header + two records
    by_scope = get(client, "/search?q=user-1")
    assert ">order-1<" in by_scope and ">order-2<" in by_scope and "user-2" not in by_scope.split("<tbody>", 1)[1]
    assert "No record has that key or scope" in get(client, "/search?q=order")  # exact, not a prefix
    assert "Type an idempotency key" in get(client, "/search")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("page=0", "page 1 of 3 · 2 per page"),
        ("page=-1", "page 1 of 3 · 2 per page"),
        ("page=abc", "page 1 of 3 · 2 per page"),
        ("page=99", "page 99 of 3 · 2 per page"),
        ("page=3", "page 3 of 3 · 2 per page"),
        ("page=99999999999999999999", "page 1000000000 of 3 · 2 per page"),
        ("per_page=100000", "page 1 of 1 · 200 per page"),
        ("per_page=abc", "page 1 of 1 · 50 per page"),
        ("per_page=0", "page 1 of 5 · 1 per page"),
        ("per_page=-5", "page 1 of 5 · 1 per page"),
    ],
)
def test_pagination_is_bounded(app: Flask, client: FlaskClient, clock: Any, query: str, expected: str) -> None:
    allow(app)
    for i in range(5):
        insert(app, clock, f"f{i}")
    extra = "" if "per_page" in query else "&per_page=2"
    assert f"5 records · {expected}" in get(client, f"/failed?{query}{extra}")
    for path in ("/stuck?", "/conflicts?", "/search?q=f1&", "/failed?kind=final&"):
        assert "per page" in get(client, f"{path}{query}{extra}")


def test_pagination_links_keep_the_filter(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    for i in range(5):
        insert(app, clock, f"f{i}")
    page = get(client, "/failed?kind=final&per_page=2")
    assert html.escape(f"{PREFIX}/failed?kind=final&per_page=2&page=2") in page
    second = get(client, "/failed?kind=final&per_page=2&page=3")
    assert second.count("<tr>") == 2 and 'rel="prev"' in second and 'rel="next"' not in second


def test_html_in_keys_scopes_and_paths_is_escaped(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    key, scope = "<script>alert(1)</script>", "<script>alert(2)</script>"
    controls = ext(app)["controls"]
    controls.status = 500
    post(client, "/payments", key=key, user=scope, json={"amount": 1})
    controls.status = None
    post(client, "/other", key=key, user=scope, json={"amount": 1})  # a conflict with the same key
    insert_stuck(app, clock, key, scope="<b>x</b>", path="/<img src=x onerror=alert(3)>")
    record_id = only(app, key, scope)["id"]
    stuck_id = only(app, key, "<b>x</b>")["id"]
    pages = [
        "/",
        "/stuck",
        "/failed",
        "/conflicts",
        f"/search?q={key}",
        f"/search?q={scope}",
        f"/records/{record_id}",
        f"/records/{stuck_id}",
        f"/records/{record_id}/release",
    ]
    for path in pages:
        page = get(client, path)
        assert "<script>alert" not in page and "<img src=x" not in page and "<b>x</b>" not in page, path
        assert "&lt;script&gt;alert(" in page or "&lt;img src=x" in page, path


# Actions ----------------------------------------------------------------------------------------------------


def test_operator_marks_a_stuck_request_retryable_and_the_retry_runs(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app, "alice")
    owner = make_stuck(app, clock, "stuck-1", amount=7)
    try:
        stuck_page = get(client, "/stuck")
        assert "stuck for 11 min" in stuck_page
        row = only(app, "stuck-1")
        response = act(client, row["id"], "mark-retryable")
        assert response.status_code == 303 and response.location.endswith(f"{PREFIX}/records/{row['id']}")
        after = only(app, "stuck-1")
        assert (after["state"], after["retryable"], after["lease_token"]) == ("FAILED", True, None)
        [event] = events(app, "mark_retryable")
        assert (event["actor"], event["record_id"], event["detail"]["from_state"]) == (
            "alice",
            row["id"],
            "IN_PROGRESS",
        )
        page = get(client, f"/records/{row['id']}")
        assert "is now retryable" in page and "retry allowed" in page

        retry = post(client, "/payments", key="stuck-1", json={"amount": 7})
        assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
        assert ext(app)["controls"].runs["payments"] == 2
    finally:
        finish(owner)
    assert only(app, "stuck-1")["state"] == "COMPLETED"  # the presumed-dead owner could not overwrite it


def test_operator_marks_a_stuck_request_failed_for_good(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app, "bob")
    record_id = insert_stuck(app, clock, "stuck-1")
    response = act(client, record_id, "mark-failed")
    assert response.status_code == 303
    after = only(app, "stuck-1")
    assert (after["state"], after["retryable"]) == ("FAILED", False)
    [event] = events(app, "mark_failed")
    assert event["actor"] == "bob" and event["key"] == "stuck-1"
    assert "is now failed for good" in get(client, f"/records/{record_id}")


def test_operator_marks_a_final_failure_retryable(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app, "alice")
    ext(app)["controls"].status = 500
    post(client, "/payments", key="final", json={"amount": 3})
    ext(app)["controls"].status = None
    record_id = only(app, "final")["id"]
    assert act(client, record_id, "mark-retryable").status_code == 303
    assert only(app, "final")["retryable"] is True
    assert post(client, "/payments", key="final", json={"amount": 3}).status_code == 201


def test_release_needs_confirmation_then_deletes_and_audits(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app, "carol")
    post(client, "/payments", key="r", json={"amount": 1})
    record_id = only(app, "r")["id"]
    page = get(client, f"/records/{record_id}")
    assert f'href="{PREFIX}/records/{record_id}/release"' in page  # a link to the confirmation step, not a form

    unconfirmed = act(client, record_id, "release", confirm=None)
    assert unconfirmed.status_code == 303 and unconfirmed.location.endswith(f"/records/{record_id}/release")
    assert record(app, "r") is not None and events(app) == []

    confirm_page = get(client, f"/records/{record_id}/release")
    assert "deletes" in confirm_page and 'name="confirm" value="release"' in confirm_page
    done = act(client, record_id, "release")
    assert done.status_code == 303 and done.location.endswith(f"{PREFIX}/")
    assert record(app, "r") is None
    [event] = events(app, "release")
    assert (event["actor"], event["record_id"], event["key"]) == ("carol", record_id, "r")
    assert "was released" in get(client, "/")
    assert post(client, "/payments", key="r", json={"amount": 2}).status_code == 201  # the key is free


def test_actions_the_state_does_not_allow_answer_409_and_change_nothing(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    post(client, "/payments", key="done", json={"amount": 1})
    record_id = only(app, "done")["id"]
    page = get(client, f"/records/{record_id}")
    assert "a COMPLETED record is replayed" in page  # the reason, shown next to the disabled button
    before = records(app)
    for action in ("mark-retryable", "mark-failed"):
        response = act(client, record_id, action)
        assert response.status_code == 409, action
        assert "COMPLETED" in response.get_data(as_text=True)
        assert f"Back to record {record_id}" in response.get_data(as_text=True)
    live = insert_stuck(app, clock, "live", locked_until=clock.now + timedelta(seconds=30))
    assert act(client, live, "mark-retryable").status_code == 409
    assert "still live" in get(client, f"/records/{live}")
    assert records(app)[: len(before)] == before and events(app) == []


def test_an_action_on_a_record_that_changed_since_it_was_viewed_is_409(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    record_id = insert(app, clock, "final")
    page = get(client, f"/records/{record_id}/release")
    seen = form_fields(page, f"/records/{record_id}/release")
    # Meanwhile another operator marks it retryable and a retry fails again.
    with app.app_context():
        db = ext(app)["db"]
        table = db.metadata.tables["idempotency_records"]
        with db.engine.begin() as conn:
            conn.execute(sa.update(table).values(attempts=2, version=table.c.version + 1))
    before = records(app)
    response = client.post(f"{PREFIX}/records/{record_id}/release", data={**seen, "confirm": "release"})
    assert response.status_code == 409 and "changed since you loaded the page" in response.get_data(as_text=True)
    assert records(app) == before and events(app) == []


@pytest.mark.parametrize("action", ["mark-retryable", "mark-failed", "release"])
def test_an_action_on_a_missing_record_is_404(app: Flask, client: FlaskClient, clock: Any, action: str) -> None:
    allow(app)
    record_id = insert(app, clock, "gone")
    page = get(client, f"/records/{record_id}/release" if action == "release" else f"/records/{record_id}")
    data = form_fields(page, f"/records/{record_id}/{action}")
    with app.app_context():
        db = ext(app)["db"]
        with db.engine.begin() as conn:
            conn.execute(sa.delete(db.metadata.tables["idempotency_records"]))
    assert client.post(f"{PREFIX}/records/{record_id}/{action}", data=data).status_code == 404
    assert events(app) == []


@pytest.mark.parametrize("action", ["mark-retryable", "mark-failed", "release"])
@pytest.mark.parametrize("token", [None, "", "wrong", "é"])
def test_a_missing_or_wrong_csrf_token_is_400_and_changes_nothing(
    app: Flask, client: FlaskClient, clock: Any, action: str, token: str | None
) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "stuck-1")
    before = records(app)
    response = act(client, record_id, action, csrf_token=token)
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)
    assert records(app) == before and events(app) == []


def test_a_token_from_another_session_is_refused(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "stuck-1")
    other = app.test_client()
    theirs = form_fields(get(other, f"/records/{record_id}"), f"/records/{record_id}/mark-failed")
    get(client, f"/records/{record_id}")  # this client has its own session token
    assert client.post(f"{PREFIX}/records/{record_id}/mark-failed", data=theirs).status_code == 400
    fresh = app.test_client()  # no session at all
    assert fresh.post(f"{PREFIX}/records/{record_id}/mark-failed", data=theirs).status_code == 400
    assert only(app, "stuck-1")["state"] == "IN_PROGRESS" and events(app) == []


def test_a_form_without_the_record_version_is_400(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "stuck-1")
    assert act(client, record_id, "mark-failed", version=None).status_code == 400
    assert only(app, "stuck-1")["state"] == "IN_PROGRESS" and events(app) == []


def test_without_a_secret_key_pages_render_and_actions_are_off(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    app.secret_key = None
    record_id = insert_stuck(app, clock, "stuck-1")
    page = get(client, f"/records/{record_id}")
    assert "Actions are off" in page and f"/records/{record_id}/mark-failed" not in page
    response = client.post(f"{PREFIX}/records/{record_id}/mark-failed", data={"version": "x"})
    assert response.status_code == 403
    assert events(app) == []


# Integration with the rest of the app -----------------------------------------------------------------------


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_PROTECT_ALL": True}])
def test_protect_all_never_applies_to_dashboard_posts(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    assert post(client, "/payments", key=None, json={}).status_code == 400  # the app's own routes are protected
    record_id = insert_stuck(app, clock, "stuck-1")
    response = act(client, record_id, "mark-retryable")  # no Idempotency-Key header
    assert response.status_code == 303
    assert only(app, "stuck-1")["retryable"] is True
    assert [r["key"] for r in records(app)] == ["stuck-1"]  # the dashboard's POST made no record of its own


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_DASHBOARD_URL_PREFIX": "/ops/idempotency/"}])
def test_the_url_prefix_is_configurable(app: Flask, client: FlaskClient) -> None:
    allow(app)
    assert client.get("/ops/idempotency/").status_code == 200
    assert client.get("/idempotency/").status_code == 404
    assert "/ops/idempotency/static/flask_idempotent/dashboard.css" in client.get("/ops/idempotency/").text


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_DASHBOARD_URL_PREFIX": None}])
def test_no_prefix_mounts_no_dashboard(app: Flask, client: FlaskClient) -> None:
    assert "idempotency_dashboard" not in app.blueprints
    assert client.get("/idempotency/").status_code == 404


def test_dashboard_pages_keep_the_apps_own_error_handlers_elsewhere(app: Flask, client: FlaskClient) -> None:
    @app.errorhandler(404)
    def not_found(exc: Exception) -> tuple[str, int]:
        return "the app's 404", 404

    allow(app)
    assert client.get("/nowhere").text == "the app's 404"
    assert "no idempotency record" in client.get(PREFIX + "/records/99").text


def test_flask_wtf_csrf_protect_is_used_when_the_app_registered_it(app: Flask, clock: Any) -> None:
    csrf_module = pytest.importorskip("flask_wtf.csrf")
    csrf_module.CSRFProtect(app)
    app.config["WTF_CSRF_ENABLED"] = True
    allow(app)
    client = app.test_client()
    record_id = insert_stuck(app, clock, "stuck-1")
    page = get(client, f"/records/{record_id}")
    fields = form_fields(page, f"/records/{record_id}/mark-failed")
    with client.session_transaction() as session:
        assert "csrf_token" in session and "_flask_idempotent_csrf" not in session
    wrong = client.post(f"{PREFIX}/records/{record_id}/mark-failed", data={**fields, "csrf_token": "wrong"})
    assert wrong.status_code == 400 and only(app, "stuck-1")["state"] == "IN_PROGRESS"
    assert client.post(f"{PREFIX}/records/{record_id}/mark-failed", data=fields).status_code == 303
    assert only(app, "stuck-1")["state"] == "FAILED" and events(app, "mark_failed")[0]["actor"] == "alice"


def test_an_async_access_hook_works(app: Flask, client: FlaskClient) -> None:
    pytest.importorskip("asgiref")

    async def operator() -> str:
        return "async-alice"

    ext(app)["idempotency"].dashboard_access(operator)
    assert "async-alice" in get(client, "/")


def test_counts_past_the_limit_show_a_plus_and_pages_go_on(
    app: Flask, client: FlaskClient, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask_idempotent import reports

    monkeypatch.setattr(reports, "COUNT_LIMIT", 3)
    allow(app)
    for i in range(5):
        insert(app, clock, f"f{i}")
    post(client, "/payments", key="c", json={"amount": 1})
    for amount in range(2, 7):
        assert post(client, "/payments", key="c", json={"amount": amount}).status_code == 422
    overview = get(client, "/")
    assert re.search(r'data-fi-count="conflicts_24h">3\+<', overview)
    first = get(client, "/failed?kind=final&per_page=2")
    assert "3+ records · page 1 of 2+" in first and 'rel="next"' in first and ">Last<" not in first
    third = get(client, "/failed?kind=final&per_page=2&page=3")  # past the counted pages, the rows are there
    assert third.count("<tr>") == 2 and "page 3 of 3+" in third and 'rel="next"' not in third
    assert "3+ conflicts" in get(client, "/conflicts?per_page=2")
