"""The views: ``bump/<name>`` (the burst's write) and ``sleep/<seconds>`` (a slow query)."""

from __future__ import annotations

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse

from devtools.djangoapp.models import Counter


def bump(request: HttpRequest, name: str) -> JsonResponse:
    """get_or_create + select_for_update + update, in one atomic() (one lease)."""
    with transaction.atomic():
        counter, _ = Counter.objects.get_or_create(name=name)
        locked = Counter.objects.select_for_update().get(pk=counter.pk)
        locked.value += 1
        locked.save(update_fields=["value"])
    return JsonResponse({"name": name, "value": locked.value})


def sleep(request: HttpRequest, seconds: float) -> JsonResponse:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(seconds)])
    return JsonResponse({"slept": seconds})
