"""The Django example (``examples/django_lambda``) served by Zappa's handler in this process.

`make demo DJANGO=1` runs it as the plain demo runs ``examples/handler.py``: one thread per
Lambda container, each calling ``zappa.handler.lambda_handler(event, context)`` with an API
Gateway event, Zappa's Django WSGI app and the project's own settings, views and models.
Django keeps one connection per thread, so each simulated container has its own: a psycopg
connection with the stock backend, a `lambda_client.django` connection with a gRPC channel of
its own through pgbroker (`DjangoInvocation.setup`).

`LocalTaskInvoke` stands in for Lambda's Invoke API under Zappa's async tasks: a ``@task``
call becomes Zappa's own task message, handed to the handler in a new thread, as Lambda would
run it in another container.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from demo.burst import Invocation
from devtools.lambda_context import FakeLambdaContext

__all__ = [
    "EXAMPLE",
    "DjangoInvocation",
    "LocalTaskInvoke",
    "api_gateway_event",
    "clicks_recorded",
    "load_handler",
    "migrate",
    "use_database",
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_lambda"
LAMBDA_TIMEOUT = 30.0  # seconds, the function's configured timeout
TALLIES = 100  # the burst's clicks go to this many names (row locks contend, as in a real app)

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
_failures = threading.local()  # the exception Django turned into this thread's last 500


def load_handler(database_url: str | None = None) -> Handler:
    """Zappa's ``lambda_handler`` for the example, its project on ``sys.path`` as in
    ``/var/task``. The project's settings choose the database from the environment; with
    *database_url*, the stock backend on it (``PGBROKER_URL`` removed). Django is set up
    once per process: `use_database` switches it afterwards."""
    if database_url is not None:
        os.environ.pop("PGBROKER_URL", None)
        os.environ["DATABASE_URL"] = database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "clicks.settings"
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from django.core.signals import got_request_exception
    from zappa.handler import LambdaHandler, lambda_handler

    with contextlib.redirect_stdout(sys.stderr):  # Zappa prints "Instancing.." on stdout
        LambdaHandler()  # the handler's singleton, as a cold start makes it: settings, Django
    _quiet_logs()
    got_request_exception.connect(_keep_failure, dispatch_uid="pgbroker-demo")
    handler: Handler = lambda_handler
    return handler


def _quiet_logs() -> None:
    """Zappa logs each request at INFO, and Django each 500 with its traceback: a thousand of
    them would bury the demo's table, which counts the failures by their message. (Each
    Django set-up, as Zappa's ``manage`` event does again, resets django.request's level.)"""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("zappa").setLevel(logging.WARNING)
    logging.getLogger("django.request").setLevel(logging.CRITICAL)


def _keep_failure(sender: Any, request: Any = None, **kwargs: Any) -> None:
    """Django's signal for an exception it turns into a 500: keep it (we are inside the
    ``except``), so the demo reports Postgres' or the broker's own message."""
    _failures.exc = sys.exc_info()[1]


def clicks_recorded() -> int:
    """Every click the example's table counts (this thread's connection, closed after)."""
    from clicks.models import Tally
    from django.db import connections
    from django.db.models import Sum

    try:
        return int(Tally.objects.aggregate(total=Sum("clicks"))["total"] or 0)
    finally:
        connections.close_all()


def use_database(database: dict[str, Any]) -> None:
    """Make *database* Django's ``default`` in this process (a real deployment changes
    ``DATABASES`` and redeploys; the demo runs both deployments in one process)."""
    from asgiref.local import Local
    from django.conf import settings
    from django.db import connections

    connections.close_all()
    settings.DATABASES = {"default": database}
    # Django reads DATABASES once into the connection handler; let it read them again.
    connections._settings = None  # type: ignore[attr-defined]
    connections.__dict__.pop("settings", None)
    connections._connections = Local(connections.thread_critical)  # type: ignore[attr-defined]


def api_gateway_event(
    method: str, path: str, query: dict[str, str] | None = None
) -> dict[str, Any]:
    """An API Gateway (REST, payload 1.0) proxy event, as Lambda hands it to the handler."""
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {"Host": "example.execute-api.local", "X-Forwarded-Proto": "https"},
        "multiValueHeaders": {},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in (query or {}).items()} or None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {"stage": "demo", "httpMethod": method, "path": path},
        "body": None,
        "isBase64Encoded": False,
    }


class RequestFailed(Exception):
    """A request the app answered with an error status; `report` is its reason."""

    def __init__(self, report: str) -> None:
        super().__init__(report)
        self.report = report


def migrate(handler: Handler) -> None:
    """The example's migrations, run as a deployment pipeline runs them: Zappa's ``manage``
    event to the function (``zappa manage <stage> migrate``); the connection is closed after."""
    from django.db import connections

    handler({"manage": "migrate clicks --noinput --verbosity 0"}, FakeLambdaContext())
    connections.close_all()
    _quiet_logs()


def describe(exc: BaseException) -> str:
    """An exception as a person would report it: Postgres' own ``FATAL: …`` line when the
    connection was refused, else the error's class and first line."""
    cause = exc.__cause__ or exc
    text = str(exc)
    if match := re.search(r"(FATAL|ERROR):\s+(.+)", text):
        message = f"{match[1]}: {match[2].strip()}"
        sqlstate = getattr(cause, "sqlstate", None)
        return f"{message} (SQLSTATE {sqlstate})" if sqlstate else message
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else type(cause).__name__}"


def invoke(handler: Handler, event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Call *handler* as Lambda does; a non-2xx answer raises `RequestFailed` with the error
    Django turned into it."""
    _failures.exc = None
    response = handler(event, context)
    status = int(response.get("statusCode", 0))
    if not 200 <= status < 300:
        failure = _failures.exc
        raise RequestFailed(describe(failure) if failure else f"HTTP {status}")
    body: dict[str, Any] = json.loads(response.get("body") or "{}")
    return body


class DjangoInvocation(Invocation):
    """One container: ``POST /clicks/<name>`` through Zappa's handler; its database work could
    start when its first query was answered (connection opened, or pooled connection leased)."""

    def __init__(self, index: int, handler: Handler) -> None:
        self.index = index
        self.handler = handler
        self.first_answer: float | None = None

    def setup(self) -> None:
        """Through pgbroker, give this container's connection a gRPC channel (and TCP
        connection) of its own, as each Lambda container has: lambda_client.django shares one
        client per process and options, so a thread-distinct channel option keys its own.
        (1000 threads multiplexed on one channel would be one overloaded client, not 1000.)"""
        from django.db import connections

        connection = connections["default"]  # this thread's wrapper (not the proxy)
        if not type(connection).__module__.startswith("lambda_client."):
            return
        params = connection.get_connection_params
        channel = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.primary_user_agent", f"pgbroker-demo-container-{self.index}"),
        ]
        connection.get_connection_params = lambda: {**params(), "options": channel}  # type: ignore[method-assign]

    def _first_query(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if self.first_answer is None:
            self.first_answer = time.monotonic()
        return result

    def invoke(self) -> float | None:
        from django.db import connection

        event = api_gateway_event("POST", f"/clicks/burst{self.index % TALLIES}")
        context = FakeLambdaContext(remaining=LAMBDA_TIMEOUT, function_name="pgbroker-demo-django")
        with connection.execute_wrapper(self._first_query):
            invoke(self.handler, event, context)
        return self.first_answer

    def close(self) -> None:
        """The container goes away: its connection (this thread's) closes."""
        from django.db import connections

        connections.close_all()


class LocalTaskInvoke:
    """Zappa's Lambda async-task transport, delivered in this process: each ``@task`` call
    becomes the message Zappa would send with Lambda's Invoke API (InvocationType Event),
    run by the handler in a thread of its own. ``wait()`` joins them and returns their
    failures."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.threads: list[threading.Thread] = []
        self.failures: list[BaseException] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[LocalTaskInvoke]:
        """Replace Zappa's ``lambda`` task service for the block (and mark this process as a
        Lambda function, which makes ``@task`` dispatch instead of running in place)."""
        from zappa import asynchronous

        invoker = self

        class _LocalLambdaAsyncResponse(asynchronous.LambdaAsyncResponse):  # type: ignore[misc]
            def __init__(self, **kwargs: Any) -> None:
                self.capture_response = False
                self.response_id = None

            def _send(self, message: dict[str, Any]) -> None:
                message["command"] = "zappa.asynchronous.route_lambda_task"
                invoker.deliver(json.loads(json.dumps(message)))  # what Lambda would carry
                self.sent = True

        original = asynchronous.ASYNC_CLASSES["lambda"]
        previous = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        asynchronous.ASYNC_CLASSES["lambda"] = _LocalLambdaAsyncResponse
        os.environ["AWS_LAMBDA_FUNCTION_NAME"] = "pgbroker-django-example"
        try:
            yield self
        finally:
            asynchronous.ASYNC_CLASSES["lambda"] = original
            if previous is None:
                os.environ.pop("AWS_LAMBDA_FUNCTION_NAME", None)
            else:
                os.environ["AWS_LAMBDA_FUNCTION_NAME"] = previous

    def deliver(self, message: dict[str, Any]) -> None:
        thread = threading.Thread(target=self._run, args=(message,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, message: dict[str, Any]) -> None:
        from django.db import connections

        try:
            self.handler(message, FakeLambdaContext(remaining=LAMBDA_TIMEOUT))
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            connections.close_all()

    def wait(self, timeout: float = 60.0) -> list[BaseException]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            raise TimeoutError(f"async tasks still running after {timeout:.0f} s")
        return self.failures
