"""``flask --app example_app init-db`` (migrations + demo data) and ``add-user``."""

from __future__ import annotations

import secrets

import click
import flask_migrate
from flask import current_app
from flask.cli import with_appcontext

from .extensions import db
from .models import Account, ApiToken, User, hash_token

#: The demo users' API tokens, printed by ``init-db``. Demo data is for development only.
DEMO_TOKENS = {"alice": "alice-demo-token", "bob": "bob-demo-token"}
#: The demo ledger: (owner, account name, opening balance in cents).
DEMO_ACCOUNTS = [("alice", "checking", 100_000), ("alice", "savings", 0), ("bob", "checking", 50_000)]


def seed_demo() -> bool:
    """Add the demo users, tokens and accounts unless they exist; return whether anything was added."""
    if db.session.scalar(db.select(User).where(User.name == "alice")) is not None:
        return False
    users = {name: User(name=name) for name in DEMO_TOKENS}
    db.session.add_all(users.values())
    db.session.flush()
    for name, token in DEMO_TOKENS.items():
        db.session.add(ApiToken(token_hash=hash_token(token), user_id=users[name].id))
    for owner, name, balance in DEMO_ACCOUNTS:
        db.session.add(Account(owner_id=users[owner].id, name=name, balance=balance, currency="EUR"))
    db.session.commit()
    return True


@click.command("init-db")
@click.option(
    "--demo/--no-demo", default=None, help="Add demo users, tokens and accounts (default: only in debug mode)."
)
@with_appcontext
def init_db_command(demo: bool | None) -> None:
    """Apply the migrations (``flask db upgrade``: the app's tables and the extension's) and add demo data."""
    flask_migrate.upgrade()
    click.echo("Database is at the latest migration.")
    if demo is None:
        demo = current_app.debug or current_app.testing
    if not demo:
        return
    if seed_demo():
        click.echo("Added demo users with balances (EUR cents):")
    else:
        click.echo("Demo users already exist:")
    for owner, token in DEMO_TOKENS.items():
        accounts = db.session.scalars(db.select(Account).join(User).where(User.name == owner).order_by(Account.id))
        listed = ", ".join(f"#{a.id} {a.name} {a.balance}" for a in accounts)
        click.echo(f"  {owner}: Authorization: Bearer {token}   accounts: {listed}")


@click.command("add-user")
@click.argument("name")
@with_appcontext
def add_user_command(name: str) -> None:
    """Create user NAME with an empty checking account and print a new API token (shown once)."""
    token = secrets.token_urlsafe(24)
    user = User(name=name)
    db.session.add(user)
    db.session.flush()
    db.session.add(ApiToken(token_hash=hash_token(token), user_id=user.id))
    db.session.add(Account(owner_id=user.id, name="checking", balance=0, currency="EUR"))
    db.session.commit()
    click.echo(f"user {name} (id {user.id}): Authorization: Bearer {token}")
