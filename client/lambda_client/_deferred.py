"""Import a third-party module without the parts of it that a cold start never uses.

`import_without(name, deferred)` imports *name* while a stand-in (`StandIn`) is registered in
``sys.modules`` for each module in *deferred* that is not loaded yet. The stand-ins are taken
out of ``sys.modules`` as soon as *name* is imported, so any later ``import`` of one loads the
real module. Only the names that *name*'s import bound to a stand-in still hold it: the first
attribute asked of a stand-in imports the real module and rebinds those names to it, so the
library works exactly as before and the import is paid only by code that uses it.

Used for grpc without asyncio (`lambda_client._grpc`) and for the generated protobuf code
without protobuf's pure-Python message classes (`lambda_client._proto`); docs/performance.md,
"A/B: cold start without asyncio".
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["StandIn", "import_without"]


class StandIn(types.ModuleType):
    """A stand-in for the module *name*: the first attribute asked of it imports the real
    module and puts it where the stand-in had been bound (`holders`)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__spec__ = None  # what `import` checks on a module found in sys.modules
        # (module namespace, name) pairs that hold this stand-in, found after the import.
        self.holders: list[tuple[dict[str, Any], str]] = []
        self.lock = threading.Lock()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.load(), attribute)

    def load(self) -> types.ModuleType:
        """The real module, imported now if need be; every holder then names it."""
        name = self.__name__
        with self.lock:
            if sys.modules.get(name) is self:  # still inside the import that deferred it
                del sys.modules[name]
            module = importlib.import_module(name)
            for namespace, key in self.holders:
                if namespace.get(key) is self:
                    namespace[key] = module
            return module


def import_without(name: str, deferred: Sequence[str]) -> types.ModuleType:
    """``import name``, with a `StandIn` for each module of *deferred* not loaded yet."""
    before = set(sys.modules)
    # Never one for a module already loaded: a second copy of it would be imported later.
    stand_ins = {id(s): s for s in (StandIn(d) for d in deferred if d not in sys.modules)}
    for stand_in in stand_ins.values():
        sys.modules[stand_in.__name__] = stand_in
    try:
        module = importlib.import_module(name)
    finally:
        for stand_in in stand_ins.values():
            if sys.modules.get(stand_in.__name__) is stand_in:
                del sys.modules[stand_in.__name__]
    for loaded in set(sys.modules) - before:
        namespace = getattr(sys.modules[loaded], "__dict__", {})
        for key, value in list(namespace.items()):
            if id(value) in stand_ins:
                stand_ins[id(value)].holders.append((namespace, key))
    return module
