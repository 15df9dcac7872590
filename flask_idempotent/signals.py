"""Blinker signals. Each is sent with the Flask app as sender; all but ``request_outcome`` with ``record``, a
read-only :class:`~flask_idempotent.RecordView`.

- ``record_claimed``: a request claimed a key and its view is about to run (new, retry, takeover).
- ``record_completed``: the outcome was stored as COMPLETED.
- ``record_failed``: the outcome was stored as FAILED (``retryable`` tells which kind).
- ``response_replayed``: a stored outcome was replayed.
- ``key_conflict``: a key was reused with another command (answered 422).
- ``lease_lost``: a request finished after losing its lease; its outcome was not stored.
- ``operator_action``: an operator changed a record (``action`` and ``actor`` keywords).
- ``request_outcome``: what a protected request's claim came to, for metrics: ``outcome`` (``executed``,
  ``replayed``, ``in_progress``, ``key_reused``, ``stuck``, ``store_unavailable``, ``rejected`` — a hook
  answered before the view, the claim was withdrawn —, or ``error``), ``endpoint``, ``kind`` and
  ``claim_seconds`` (how long the claim took). ``executed`` is sent once the view body ran.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

record_claimed = _signals.signal("idempotency-record-claimed")
record_completed = _signals.signal("idempotency-record-completed")
record_failed = _signals.signal("idempotency-record-failed")
response_replayed = _signals.signal("idempotency-response-replayed")
key_conflict = _signals.signal("idempotency-key-conflict")
lease_lost = _signals.signal("idempotency-lease-lost")
operator_action = _signals.signal("idempotency-operator-action")
request_outcome = _signals.signal("idempotency-request-outcome")
