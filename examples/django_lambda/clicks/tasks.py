"""Zappa async tasks: in Lambda (AWS_LAMBDA_FUNCTION_NAME set) each call of a @task function
is an asynchronous invocation of this same function (Lambda's Invoke API, InvocationType
Event) whose handler runs it; elsewhere it runs in place."""

from django.db import transaction
from zappa.asynchronous import task

from clicks.models import Click, Tally


def record(name: str, request_id: str) -> int:
    """Count one click for *name*: get_or_create, lock the row, add one, record who did it;
    one transaction (one pgbroker lease). Returns the new count."""
    with transaction.atomic():
        tally, _ = Tally.objects.get_or_create(name=name)
        tally = Tally.objects.select_for_update().get(pk=tally.pk)
        tally.clicks += 1
        tally.save(update_fields=["clicks"])
        Click.objects.create(tally=tally, request_id=request_id)
    return tally.clicks


@task
def record_click(name: str, request_id: str) -> None:
    """`record` as a task of its own Lambda invocation (no HTTP request, so no middleware:
    the database's OPTIONS timeout bounds it)."""
    record(name, request_id)
