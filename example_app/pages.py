"""The home page: what the example serves and where to go next; ``/openapi.json``: the API's description."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, render_template
from flask.typing import ResponseReturnValue

from flask_idempotent.openapi import merge

from .cli import DEMO_TOKENS
from .extensions import idempotency

pages = Blueprint("pages", __name__)


@pages.get("/")
def index() -> ResponseReturnValue:
    demo = DEMO_TOKENS if current_app.debug else None
    return render_template("example_app/index.html", demo_tokens=demo)


#: The app's own part of its OpenAPI document: what a route answers when the idempotency layer lets it run.
API_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "flask_idempotent example: payments API", "version": "1.0"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/payments": {
            "post": {
                "summary": "Charge through the payment provider (leased mode)",
                "security": [{"bearer": []}],
                "responses": {"201": {"description": "The payment, with its Location"}},
            }
        },
        "/transfers": {
            "post": {
                "summary": "Move money between two ledger accounts (atomic mode)",
                "security": [{"bearer": []}],
                "responses": {"201": {"description": "The transfer"}},
            }
        },
        "/webhooks/provider": {
            "post": {
                "summary": "A payout reached an account (signed by the provider; its event id is the key)",
                "responses": {"200": {"description": "Credited, or already credited"}},
            }
        },
    },
}


@pages.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    """The API's OpenAPI 3.1 document: the app's own part with the idempotency layer's merged in."""
    return jsonify(merge(API_DOCUMENT, idempotency.openapi()))
