"""The pytest plugin of flask_idempotent's testing kit (docs/testing.md): the ``lease_clock`` fixture.

Installing flask-idempotency registers this module with pytest (entry point ``pytest11``, name
``flask_idempotent``), so it loads into every pytest run of the environment, also in projects that never use the
kit. Loading it therefore imports pytest only: the fixture imports the kit, and with it Flask and SQLAlchemy,
when a test asks for it. It is a top-level module because any module inside the ``flask_idempotent`` package
would first run the package's ``__init__``, which imports the extension (Flask, SQLAlchemy, Flask-SQLAlchemy).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flask_idempotent.testing import LeaseClock


@pytest.fixture
def lease_clock(request: pytest.FixtureRequest) -> Iterator[LeaseClock]:
    """A :class:`~flask_idempotent.testing.LeaseClock`, installed on pytest-flask's ``app`` fixture when the test
    uses it; every installed app gets its own clock back afterwards."""
    from flask import Flask  # imported here, not at load: see the module's docstring

    from flask_idempotent.testing import LeaseClock

    clock = LeaseClock()
    if "app" in request.fixturenames:
        app = request.getfixturevalue("app")
        if isinstance(app, Flask) and "idempotency" in app.extensions:
            clock.install(app)
    yield clock
    clock.uninstall()
