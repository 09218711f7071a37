"""``grpc``, imported without the asyncio that the blocking client never uses.

Importing grpcio imports asyncio twice over: its Cython core (``grpc._cython.cygrpc``) runs
``import asyncio`` (and ``import socket``, for its asyncio I/O manager) when it loads, and
``grpc/__init__.py`` ends with ``from grpc import aio``, whose classes touch asyncio as they
are defined. asyncio brings ssl (OpenSSL), subprocess, socket and concurrent.futures with it:
on a cold start that is about half of what ``import grpc`` costs (docs/performance.md, "Cold
start"), for a Lambda handler whose client never runs an event loop; gRPC's C core opens its
own sockets.

So when this process has not imported asyncio yet, grpc is imported without them
(`lambda_client._deferred.import_without`): stand-ins for ``asyncio``, ``grpc.aio`` and
``socket`` while grpc imports, which load the real module when something first uses one, so
grpc's asyncio parts (and `lambda_client.aio`) work exactly as before. A process that already
has asyncio (an asyncio application, Django) gets the plain ``import grpc``.

Every client module gets grpc from here (``from lambda_client._grpc import grpc``) so that
the first import of grpc in the process is this one.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from lambda_client._deferred import import_without

__all__ = ["grpc"]

# What grpc imports that only its asyncio API needs; a stand-in for each while grpc imports.
_DEFERRED = ("asyncio", "grpc.aio", "socket")


def _import_grpc() -> types.ModuleType:
    """``import grpc``, without asyncio, ``grpc.aio`` and socket unless asyncio is loaded."""
    if "grpc" in sys.modules or "asyncio" in sys.modules:
        return importlib.import_module("grpc")
    return import_without("grpc", _DEFERRED)


if TYPE_CHECKING:
    import grpc as grpc
else:
    grpc = _import_grpc()
