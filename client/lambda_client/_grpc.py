"""``grpc``, imported without the asyncio that the blocking client never uses.

Importing grpcio imports asyncio twice over: its Cython core (``grpc._cython.cygrpc``) runs
``import asyncio`` (and ``import socket``, for its asyncio I/O manager) when it loads, and
``grpc/__init__.py`` ends with ``from grpc import aio``, whose classes touch asyncio as they
are defined. asyncio brings ssl (OpenSSL), subprocess, socket and concurrent.futures with it:
on a cold start that is about half of what ``import grpc`` costs (docs/performance.md, "Cold
start"), for a Lambda handler whose client never runs an event loop; gRPC's C core opens its
own sockets.

So when this process has not imported asyncio yet, grpc is imported with a stand-in
(`_Deferred`) registered as ``asyncio``, ``grpc.aio`` and ``socket`` (each one not loaded
yet). Nothing in grpc touches them while it imports; the stand-ins are taken out of
``sys.modules`` as soon as it has, so any later ``import asyncio`` (``grpc.aio``,
``socket``) loads the real module. Only the names that grpc bound during its import
(``cygrpc.asyncio``, ``cygrpc.socket``, ``grpc.aio``) still hold a stand-in: the first
attribute asked of one imports the real module and rebinds those names to it, so grpc's
asyncio parts (and `lambda_client.aio`) work exactly as before, with the import paid only by
code that uses them. A process that already has asyncio (an asyncio application, Django)
gets the plain ``import grpc``.

Every client module gets grpc from here (``from lambda_client._grpc import grpc``) so that
the first import of grpc in the process is this one.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import TYPE_CHECKING, Any

__all__ = ["grpc"]

# What grpc imports that only its asyncio API needs; a stand-in for each while grpc imports.
_DEFERRED = ("asyncio", "grpc.aio", "socket")


class _Deferred(types.ModuleType):
    """A stand-in for the module *name*: the first attribute asked of it imports the real
    module and puts it where grpc's import had bound the stand-in (`holders`)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__spec__ = None  # what `import` checks on a module found in sys.modules
        # (module namespace, name) pairs that hold this stand-in, found once grpc is imported.
        self.holders: list[tuple[dict[str, Any], str]] = []
        self.lock = threading.Lock()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.load(), attribute)

    def load(self) -> types.ModuleType:
        """The real module, imported now if need be; every holder then names it."""
        name = self.__name__
        with self.lock:
            if sys.modules.get(name) is self:  # still inside grpc's own import
                del sys.modules[name]
            module = importlib.import_module(name)
            for namespace, key in self.holders:
                if namespace.get(key) is self:
                    namespace[key] = module
            return module


def _import_grpc() -> types.ModuleType:
    """``import grpc``, without asyncio and ``grpc.aio`` unless they are loaded already."""
    if "grpc" in sys.modules or "asyncio" in sys.modules:
        return importlib.import_module("grpc")
    before = set(sys.modules)
    # Never one for a module already loaded: a second copy of it would be imported later.
    stand_ins = [_Deferred(name) for name in _DEFERRED if name not in sys.modules]
    for stand_in in stand_ins:
        sys.modules[stand_in.__name__] = stand_in
    try:
        module = importlib.import_module("grpc")
    finally:
        for stand_in in stand_ins:
            if sys.modules.get(stand_in.__name__) is stand_in:
                del sys.modules[stand_in.__name__]
    for loaded in set(sys.modules) - before:
        namespace = getattr(sys.modules[loaded], "__dict__", {})
        for key, value in list(namespace.items()):
            if isinstance(value, _Deferred):
                value.holders.append((namespace, key))
    return module


if TYPE_CHECKING:
    import grpc as grpc
else:
    grpc = _import_grpc()
