"""The home page: what the example serves and where to go next."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template
from flask.typing import ResponseReturnValue

from .cli import DEMO_TOKENS

pages = Blueprint("pages", __name__)


@pages.get("/")
def index() -> ResponseReturnValue:
    demo = DEMO_TOKENS if current_app.debug else None
    return render_template("example_app/index.html", demo_tokens=demo)
