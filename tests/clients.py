"""The two client libraries behind one face, for the tests of ``flask_idempotent.client``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import requests
from helpers import code_of

from flask_idempotent.client import IdempotentSession, IdempotentTransport, sent_key, was_replayed


@dataclass
class Answer:
    """The final response of one logical call, whichever library made it."""

    status: int
    body: bytes
    replayed: bool
    key: str | None  # the Idempotency-Key the request carried
    headers: Any  # case-insensitive

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str:
        return code_of(str(self.json()["type"]))


Call = Callable[..., Answer]  # call(method, url, **request_kwargs)


class Flavour:
    """One client library: a client with retry options, one logical call, the errors it raises for lost calls."""

    name: str
    lost: tuple[type[BaseException], ...]

    @contextmanager
    def client(self, options: dict[str, Any]) -> Iterator[Call]:
        raise NotImplementedError
        yield

    def call(self, method: str, url: str, options: dict[str, Any], **kwargs: Any) -> Answer:
        with self.client(options) as call:
            return call(method, url, **kwargs)

    def __repr__(self) -> str:
        return self.name


class RequestsFlavour(Flavour):
    name = "requests"
    lost = (requests.ConnectionError, requests.Timeout)

    @contextmanager
    def client(self, options: dict[str, Any]) -> Iterator[Call]:
        with IdempotentSession(**options) as session:

            def call(method: str, url: str, **kwargs: Any) -> Answer:
                if "follow_redirects" in kwargs:  # requests spells it allow_redirects= (and follows by default)
                    kwargs["allow_redirects"] = kwargs.pop("follow_redirects")
                response = session.request(method, url, **kwargs)
                return Answer(
                    response.status_code,
                    response.content,
                    was_replayed(response),
                    sent_key(response),
                    response.headers,
                )

            yield call


class HttpxFlavour(Flavour):
    name = "httpx"
    lost = (httpx.TransportError,)

    @contextmanager
    def client(self, options: dict[str, Any]) -> Iterator[Call]:
        with httpx.Client(transport=IdempotentTransport(**options)) as client:

            def call(method: str, url: str, **kwargs: Any) -> Answer:
                if "data" in kwargs:  # httpx spells raw bodies content=
                    kwargs["content"] = kwargs.pop("data")
                response = client.request(method, url, **kwargs)
                return Answer(
                    response.status_code,
                    response.content,
                    was_replayed(response),
                    sent_key(response),
                    response.headers,
                )

            yield call


FLAVOURS = [RequestsFlavour(), HttpxFlavour()]
