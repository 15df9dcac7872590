"""What each variant gets right or wrong, checked by the effects in the database, not by the responses alone.

Every check counts ``bench_payments`` rows (the view body's effect) for its key afterwards.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

from infra import pg_connect, request

ROUTES = {
    "bare": "/bare",
    "leased": "/leased",
    "atomic": "/atomic",
    "peer": "/peer",
    "peer_validated": "/peer-validated",
}
ROUTE_NAMES = {
    "bare": "bare",
    "leased": "leased",
    "atomic": "atomic",
    "peer": "peer",
    "peer_validated": "peer_validated",
}
BODY_A = {"amount": 1250, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}
BODY_B = {**BODY_A, "amount": 9999}


def _effects(db: str, route: str, key: str) -> list[int]:
    conn = pg_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT amount FROM bench_payments WHERE route = %s AND idem_key = %s ORDER BY id", (route, key)
            )
            return [int(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()


def _amount(body: bytes) -> Any:
    try:
        return json.loads(body).get("amount")
    except (ValueError, AttributeError):
        return None


def check_different_payload(port: int, db: str, variant: str, key: str) -> dict[str, Any]:
    path = ROUTES[variant]
    s1, _, _ = request(port, "POST", path, BODY_A, {"Idempotency-Key": key})
    s2, _, b2 = request(port, "POST", path, BODY_B, {"Idempotency-Key": key})
    effects = _effects(db, ROUTE_NAMES[variant], key)
    ok = s2 == 422 and effects == [BODY_A["amount"]]
    if s2 < 300 and 9999 not in effects:
        what = f"answered {s2} with the first command's result (amount {_amount(b2)}) though 9999 was never charged"
    elif s2 < 300:
        what = f"answered {s2} and charged again ({len(effects)} payments for one key)"
    else:
        what = f"answered {s2}; {len(effects)} payment(s)"
    return {"first": s1, "second": s2, "effects": effects, "ok": ok, "what": what}


def check_concurrent_duplicate(port: int, db: str, variant: str, key: str, n: int = 16) -> dict[str, Any]:
    path = ROUTES[variant]
    barrier = threading.Barrier(n)
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            status, _, body = request(port, "POST", path, {**BODY_A, "sleep_ms": 300}, {"Idempotency-Key": key})
            payment = json.loads(body).get("id") if status < 300 else None
        except OSError as exc:
            status, payment = 0, str(exc)
        with lock:
            results.append((status, payment))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    effects = _effects(db, ROUTE_NAMES[variant], key)
    statuses = Counter(str(s) for s, _ in results)
    ids = {p for s, p in results if s < 300}
    ok = len(effects) == 1 and len(ids) <= 1 and all(s < 300 or s == 409 for s, _ in results)
    return {
        "statuses": dict(statuses),
        "effects": len(effects),
        "distinct_payment_ids_answered": len(ids),
        "ok": ok,
        "what": f"{n} concurrent requests: {len(effects)} payment(s), statuses {dict(statuses)}",
    }


def check_failure_after_effect(port: int, db: str, variant: str, key: str) -> dict[str, Any]:
    """The view writes the payment, then a downstream call fails (first attempt only); the client retries."""
    path = ROUTES[variant]
    body = {**BODY_A, "fail_after_effect": True}
    s1, _, _ = request(port, "POST", path, body, {"Idempotency-Key": key})
    s2, h2, _ = request(port, "POST", path, body, {"Idempotency-Key": key})
    effects = _effects(db, ROUTE_NAMES[variant], key)
    ok = len(effects) <= 1
    what = f"first {s1}, retry {s2}: {len(effects)} payment(s)"
    if len(effects) > 1:
        what += " - the retry charged again"
    elif variant == "leased":
        what += " - record FAILED (final): the retry gets the stored failure and an operator decides"
    elif variant == "atomic":
        what += " - the first attempt's write was rolled back, the retry ran once"
    return {
        "first": s1,
        "retry": s2,
        "retry_replayed": h2.get("Idempotent-Replayed"),
        "effects": len(effects),
        "ok": ok,
        "what": what,
    }


def check_keyless(port: int, db: str, variant: str) -> dict[str, Any]:
    path = ROUTES[variant]
    before = _count_route(db, ROUTE_NAMES[variant])
    s, _, _ = request(port, "POST", path, BODY_A)
    ran = _count_route(db, ROUTE_NAMES[variant]) - before
    protected = variant in ("leased", "atomic")
    ok = (s == 400 and ran == 0) if protected else True
    what = f"{s}; view ran: {'yes' if ran else 'no'}"
    if variant.startswith("peer"):
        what += " (no key: Powertools warns and runs the function unprotected)"
    return {"status": s, "view_ran": bool(ran), "ok": ok, "what": what}


def check_replay_marked(port: int, db: str, variant: str, key: str) -> dict[str, Any]:
    path = ROUTES[variant]
    s1, h1, b1 = request(port, "POST", path, BODY_A, {"Idempotency-Key": key})
    s2, h2, b2 = request(port, "POST", path, BODY_A, {"Idempotency-Key": key})
    same = (s1, b1, h1.get("Location")) == (s2, b2, h2.get("Location"))
    marked = h2.get("Idempotent-Replayed") == "true"
    effects = _effects(db, ROUTE_NAMES[variant], key)
    return {
        "same_response": same,
        "marked_as_replay": marked,
        "effects": len(effects),
        "ok": same and len(effects) == 1,
        "what": f"same status/body/Location: {same}; marked as replay: {marked}; {len(effects)} payment(s)",
    }


def _count_route(db: str, route: str) -> int:
    conn = pg_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM bench_payments WHERE route = %s", (route,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


CHECKS = {
    "different_payload": "Same key, different payload (amount 1250, then 9999)",
    "concurrent_duplicate": "16 concurrent duplicates of one key (view takes 300 ms)",
    "failure_after_effect": "View writes, then fails (first attempt only); client retries",
    "keyless_required": "No key on a protected route",
    "replay": "Plain retry after success",
}


def run_checks(port: int, db: str, run_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"checks": CHECKS, "results": {}}
    for variant in ROUTES:
        k = f"{run_id}-check-{variant}"
        out["results"][variant] = {
            "different_payload": check_different_payload(port, db, variant, f"{k}-payload"),
            "concurrent_duplicate": check_concurrent_duplicate(port, db, variant, f"{k}-dup"),
            "failure_after_effect": check_failure_after_effect(port, db, variant, f"{k}-fail"),
            "keyless_required": check_keyless(port, db, variant),
            "replay": check_replay_marked(port, db, variant, f"{k}-replay"),
        }
    return out
