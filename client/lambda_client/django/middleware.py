"""Django middleware: the Lambda deadline of each request bounds its database calls.

Add ``"lambda_client.django.middleware.LambdaDeadlineMiddleware"`` near the top of
``MIDDLEWARE``. It finds the Lambda context where the usual adapters put it in the WSGI
environ / ASGI scope: ``lambda.context`` (Zappa), ``apig_wsgi.context`` (apig-wsgi) or
``aws.context`` (Mangum). Without one, the request runs with the ``OPTIONS`` timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lambda_client.django.deadline import lambda_deadline

__all__ = ["CONTEXT_KEYS", "LambdaDeadlineMiddleware", "lambda_context_of"]

CONTEXT_KEYS = ("lambda.context", "apig_wsgi.context", "aws.context")


def lambda_context_of(request: Any) -> Any:
    """The Lambda context an adapter put in *request*, or None."""
    for source in (getattr(request, "META", {}), getattr(request, "scope", {})):
        for key in CONTEXT_KEYS:
            if (context := source.get(key)) is not None:
                return context
    return None


class LambdaDeadlineMiddleware:
    """Runs each request inside `lambda_deadline` with its Lambda context (sync only)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        with lambda_deadline(lambda_context_of(request)):
            return self.get_response(request)
