"""A small Django app for the backend's tests and the demo: a counter view that does what a
Lambda handler behind a burst does (get_or_create, select_for_update, update in atomic()).

`configure(databases)` sets Django up for it in this process; `create_tables()` makes its
tables without migrations.
"""

from __future__ import annotations

from typing import Any


def configure(databases: dict[str, Any], **extra: Any) -> None:
    """Configure Django (once per process) for this app with *databases*."""
    import django
    from django.conf import settings

    settings.configure(
        DATABASES=databases,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "devtools.djangoapp"],
        ROOT_URLCONF="devtools.djangoapp.urls",
        MIDDLEWARE=["lambda_client.django.middleware.LambdaDeadlineMiddleware"],
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="pgbroker-tests",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        **extra,
    )
    django.setup()


def create_tables(using: str = "default") -> None:
    """Create (or recreate) this app's tables."""
    from django.db import connections

    from devtools.djangoapp.models import Counter, Event

    with connections[using].schema_editor() as editor:
        for model in (Counter, Event):
            editor.execute(f"DROP TABLE IF EXISTS {model._meta.db_table} CASCADE")
            editor.create_model(model)
