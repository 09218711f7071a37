"""The code ``make proto`` generates from protos/ (this file is not generated).

``broker_pb2`` is imported here, before anything else of the package, without protobuf's
pure-Python message classes (``google.protobuf.internal.python_message``, with text_format,
the wire decoders and the containers): protobuf's descriptor pool and the generated code's
builder import them even when the upb backend runs the messages, which never uses them. That
is about 10 % of a cold start's import + first query (docs/performance.md); they load on first
use if anything needs them (`lambda_client._deferred`).
"""

from google.protobuf.internal import api_implementation

from lambda_client._deferred import import_without

if api_implementation.Type() == "upb":
    import_without(
        "lambda_client._proto.pgbroker.v1.broker_pb2", ("google.protobuf.internal.python_message",)
    )
