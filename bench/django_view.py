"""W4: a Django view doing 10 ORM queries, one client, in a fresh process per competitor.

``python -m bench.django_view '<json spec>'`` configures Django (once per process, hence one
process per competitor) with the database the spec names:

* ``pgbroker``: ``ENGINE: lambda_client.django`` on the broker (``host:port``);
* ``psycopg``: Django's stock postgresql backend (psycopg, client-side binding, the default
  that transaction pooling needs) on PgBouncer, with ``CONN_MAX_AGE=None`` as a warm Lambda
  keeps its connection.

The view reads 10 accounts of pgbench's table by primary key, one ORM query each, in
autocommit (through pgbroker: 10 ``Execute`` calls). One client calls it through Django's
request handling (`django.test.Client`: URL resolution, middleware, JSON response) in a
closed loop; latency is per request. It prints the JSON lines `bench.load` prints:
``measure_start``, ``measure_end`` and ``result``.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

QUERIES = 10  # ORM queries per request


@dataclass(frozen=True)
class ViewSpec:
    competitor: str  # pgbroker | psycopg
    host: str
    port: int
    duration: float
    warmup: float
    scale: int
    user: str = "postgres"
    database: str = "postgres"


def _database(spec: ViewSpec) -> dict[str, Any]:
    if spec.competitor == "pgbroker":
        return {
            "ENGINE": "lambda_client.django",
            "NAME": spec.database,
            "OPTIONS": {"target": f"{spec.host}:{spec.port}", "tls": False, "timeout": 30},
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": spec.database,
        "USER": spec.user,
        "HOST": spec.host,
        "PORT": spec.port,
        "CONN_MAX_AGE": None,
    }


def _setup(spec: ViewSpec) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": _database(spec)},
        INSTALLED_APPS=[],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["lambda_client.django.middleware.LambdaDeadlineMiddleware"],
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="pgbroker-bench",
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    global urlpatterns
    from django.urls import path

    urlpatterns = [path("w4", _view)]


urlpatterns: list[Any] = []
_scale = 1


def _account_model() -> Any:
    from django.db import models

    class Account(models.Model):
        aid = models.IntegerField(primary_key=True)
        bid = models.IntegerField()
        abalance = models.IntegerField()

        class Meta:
            app_label = "bench"
            db_table = "pgbench_accounts"
            managed = False

    return Account


_Account: Any = None


def _view(request: Any) -> Any:
    """10 ORM queries: each a primary-key read of a random account."""
    from django.http import JsonResponse

    rng = random.Random()
    total = 0
    for _ in range(QUERIES):
        aid = rng.randint(1, 100_000 * _scale)
        total += _Account.objects.values_list("abalance", flat=True).get(aid=aid)
    return JsonResponse({"sum": total})


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run(spec: ViewSpec) -> dict[str, Any]:
    """Warm up, then call the view in a closed loop for *duration* seconds."""
    global _Account, _scale
    _setup(spec)
    _Account, _scale = _account_model(), spec.scale
    from django.test import Client

    client = Client()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = cpu.ru_utime + cpu.ru_stime
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.monotonic() + spec.warmup
    end = start + spec.duration
    measuring = False
    while (now := time.monotonic()) < end:
        if not measuring and now >= start:
            _emit("measure_start")
            measuring = True
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            cpu0 = cpu.ru_utime + cpu.ru_stime
        began = time.perf_counter()
        try:
            response = client.get("/w4")
            ok = response.status_code == 200
            if not ok:
                errors[f"HTTP {response.status_code}"] += 1
        except Exception as exc:  # a failed request is counted, the loop goes on
            ok = False
            errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        if measuring and ok:
            latencies.append(time.perf_counter() - began)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    used = cpu.ru_utime + cpu.ru_stime - cpu0
    _emit("measure_end")
    ordered = sorted(latencies)

    def pick(q: float) -> float | None:
        return (
            round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)
            if ordered
            else None
        )

    return {
        "tx": len(ordered),
        "tx_total": len(ordered),
        "tps": round(len(ordered) / spec.duration, 1),
        "latency_ms": {
            "p50": pick(0.50),
            "p95": pick(0.95),
            "p99": pick(0.99),
            "mean": round(sum(ordered) / len(ordered) * 1000, 3) if ordered else None,
        },
        "errors": sum(errors.values()),
        "error_messages": dict(errors.most_common(10)),
        "elapsed_s": spec.duration,
        "loadgen_cpu_s": round(used, 3),
        "loadgen_cpu_util": round(used / spec.duration, 3),
        "queries_per_request": QUERIES,
    }


def main(argv: list[str]) -> int:
    spec = ViewSpec(**json.loads(argv[0]))
    _emit("result", **run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
