"""``POST /clicks/<name>`` records one click; ``POST /clicks/<name>/fanout?n=N`` queues N
clicks as Zappa async tasks, N concurrent Lambda invocations from one request."""

import uuid

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from clicks.tasks import record, record_click
from lambda_client.django.middleware import lambda_context_of

MAX_FANOUT = 1000


def _request_id(request: HttpRequest) -> str:
    context = lambda_context_of(request)
    return getattr(context, "aws_request_id", None) or str(uuid.uuid4())


@require_POST
def click(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse({"name": name, "clicks": record(name, _request_id(request))})


@require_POST
def fanout(request: HttpRequest, name: str) -> JsonResponse:
    try:
        count = int(request.GET.get("n", "10"))
    except ValueError:
        count = -1
    if not 1 <= count <= MAX_FANOUT:
        return JsonResponse({"error": f"n must be 1..{MAX_FANOUT}"}, status=400)
    request_id = _request_id(request)
    for i in range(count):
        record_click(name, f"{request_id}/{i}")
    return JsonResponse({"name": name, "queued": count})
