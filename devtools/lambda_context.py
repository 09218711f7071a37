"""A stand-in for the AWS Lambda ``context`` object, for tests, the demo and benchmarks.

`FakeLambdaContext(remaining=1.2)` reports the time left until a deadline taken from
`time.monotonic()` when it was built, so a call that uses it sees the clock run down exactly as
in Lambda. Each instance gets a fresh ``aws_request_id`` (a UUID, like Lambda's).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

__all__ = ["FakeLambdaContext"]


@dataclass
class FakeLambdaContext:
    """The attributes and the one method of a Lambda context that handlers use."""

    remaining: float = 30.0
    function_name: str = "pgbroker-example"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 128
    log_group_name: str = "/aws/lambda/pgbroker-example"
    log_stream_name: str = "local"
    _deadline: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.remaining
        self.invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"
        )

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds until the deadline (never negative), as Lambda reports them."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))
