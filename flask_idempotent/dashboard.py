"""The operator dashboard blueprint (being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from .extension import Idempotency


def init_dashboard(app: Flask, extension: Idempotency) -> None:
    """Mount the dashboard at ``IDEMPOTENCY_DASHBOARD_URL_PREFIX``."""
