"""Run a function right after a module is first imported (a post-import hook).

Written by hand: the standard library has import hooks (importlib's meta path) but no
"after import" callback, and the packages that offered one (wrapt's, importlib-metadata's
entry points) are either a large dependency for 30 lines or do something else.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and find the real module below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_call(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_call
        return spec


def call_after_import(name: str, callback: Callable[[], None]) -> None:
    """`callback()` once `import name` has finished (at once if it already has)."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))
