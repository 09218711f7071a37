"""The Lambda context whose remaining time bounds the database calls of the current request.

::

    from lambda_client.django.deadline import lambda_deadline

    def handler(event, context):
        with lambda_deadline(context):      # every query and atomic() below ends in time
            return do_work(event)

`lambda_client.django.middleware.LambdaDeadlineMiddleware` does this for each Django request.
Without a context set, the ``timeout`` in the database's ``OPTIONS`` bounds each call (a
statement in autocommit, or the whole lease of an ``atomic()`` block). The context is a
`contextvars.ContextVar`, so threads and asyncio tasks see their own request's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["call_options", "current", "lambda_deadline"]

_current: ContextVar[Any] = ContextVar("lambda_client_django_context", default=None)


def current() -> Any:
    """The Lambda context set for this request, or None."""
    return _current.get()


@contextlib.contextmanager
def lambda_deadline(context: Any) -> Iterator[None]:
    """Bound the database calls inside the block by *context*'s remaining time (minus the
    client's margin): a call past it raises Django's ``OperationalError`` (the broker rolls
    back and frees the connection). *context* None leaves the ``OPTIONS`` timeout in force."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def call_options(timeout: float) -> dict[str, Any]:
    """Keyword arguments for a `BrokerClient` call: the request's context, else *timeout*."""
    context = _current.get()
    return {"timeout": timeout} if context is None else {"context": context}
