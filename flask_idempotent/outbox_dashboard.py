"""The dashboard's Outbox page (docs: "The outbox"): pending jobs with the oldest's age, dead jobs with their last
error, and the redeliver and discard actions under the operator rules (versioned, audited, CSRF, refused with the
rule's words), on the dashboard's own blueprint, access check and CSRF token."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from flask import abort, current_app, flash, redirect, request, url_for
from flask.typing import ResponseReturnValue

from .dashboard import _FLASH_OK, _VERSION, _check_csrf, _exempt, _render, _require_operator, blueprint
from .operations import RecordChanged, RecordNotFound, TransitionError
from .outbox import Outbox, refusal

logger = logging.getLogger("flask_idempotent")

#: Jobs listed per state on the page (oldest first); the CLI's ``outbox list --limit`` shows more.
PAGE_JOBS = 50
ACTIONS = ("redeliver", "discard")


def _outbox() -> Outbox:
    outbox: Outbox = current_app.extensions["idempotency"].outbox
    return outbox


@blueprint.context_processor
def _outbox_card() -> dict[str, Any]:
    """``fi_outbox_stats()`` for the overview's Outbox card: ``None`` when the outbox cannot be read (a database
    without the outbox table), so that the overview still shows the records."""

    def stats() -> dict[str, Any] | None:
        try:
            return _outbox().stats()
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("the overview's outbox card is left out: %s", type(exc).__name__)
            return None

    return {"fi_outbox_stats": stats}


@blueprint.get("/outbox")
@_exempt
def outbox_page() -> ResponseReturnValue:
    """Pending and dead outbox jobs, oldest first, with what an operator may do to each."""
    outbox = _outbox()
    lists = {which: outbox.jobs(which, limit=PAGE_JOBS) for which in ("pending", "dead")}
    for job in lists["pending"] + lists["dead"]:
        job["refused"] = {action: refusal(action, job) for action in ACTIONS}
    return _render("outbox.html", stats=outbox.stats(), pending=lists["pending"], dead=lists["dead"])


@blueprint.post("/outbox/<int:job_id>/<action>")
@_exempt
def outbox_action(job_id: int, action: str) -> ResponseReturnValue:
    """Redeliver or discard one job, at the version the page showed."""
    if action not in ACTIONS:
        abort(404, f"There is no outbox action {action!r}: redeliver or discard.")
    viewer = _require_operator()
    _check_csrf()
    seen = request.form.get("version", "")
    if not _VERSION.fullmatch(seen):
        abort(400, "The form does not say which version of the job it acts on. Reload the page.")
    try:
        _outbox().act(action, job_id, actor=viewer.name, expected_version=int(seen))
    except RecordNotFound:
        abort(404, f"There is no outbox job {job_id}; it may have been discarded or purged.")
    except RecordChanged:
        abort(409, "The job changed since you loaded the page. Look at it again, then decide.")
    except TransitionError as exc:
        abort(409, f"Not applied: {exc}.")
    flash(f"Job {job_id}: {'redelivered (due now)' if action == 'redeliver' else 'discarded'}.", _FLASH_OK)
    return redirect(url_for(".outbox_page"), 303)
