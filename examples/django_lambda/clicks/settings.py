"""Settings of the example: one app, the deadline middleware, and the database switch.

With ``PGBROKER_URL`` set the project talks to pgbroker (``ENGINE: lambda_client.django``);
without it, it connects straight to ``DATABASE_URL`` with Django's own postgresql backend,
as the same project did before pgbroker. That dict is the whole migration.
"""

import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["clicks"]
MIDDLEWARE = [
    # First: every query below it is bounded by the Lambda invocation's remaining time.
    "lambda_client.django.middleware.LambdaDeadlineMiddleware",
]
ROOT_URLCONF = "clicks.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def direct_database(url: str) -> dict[str, object]:
    """Django's stock postgresql backend (psycopg) for a ``postgresql://`` URL."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": parts.port or "",
        # Warm containers keep their connection, as Zappa projects usually configure it:
        # what runs a burst into max_connections.
        "CONN_MAX_AGE": None,
    }


def broker_database() -> dict[str, object]:
    """pgbroker: target and identity from PGBROKER_URL / PGBROKER_AUTH / ...; per call the
    Lambda deadline (the middleware), else 10 s."""
    return {"ENGINE": "lambda_client.django", "NAME": "app", "OPTIONS": {"timeout": 10}}


DATABASES = {
    "default": broker_database()
    if os.environ.get("PGBROKER_URL")
    else direct_database(os.environ.get("DATABASE_URL", "postgresql://localhost/app"))
}
