"""Modules imported on first use: `torch = lazy("torch")` at the top of a plugin costs nothing
until the plugin runs, so answering `--help`, `--list-plugins`, `--check` or a misspelt plugin
option does not pay for importing torch (3 s here) or timm (6 s).

Written by hand (ten lines) because the standard library's importlib.util.LazyLoader, and the
lazy_loader package built on it, must import a package to find its submodules: deferring
`torch.nn.functional` that way imports torch at once."""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module of its name; an attribute read is answered by the real module,
    imported the first time, and kept here, so that later reads (torch.* in a training step) are
    plain attribute reads, not import-system lookups."""

    def __getattr__(self, attr: str):
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def lazy(name: str) -> types.ModuleType:
    """The module `name`, imported when one of its attributes is first read."""
    return LazyModule(name)
