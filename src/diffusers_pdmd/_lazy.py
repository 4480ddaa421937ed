"""Public names imported on first use, so that importing a package of diffusers-pdmd loads no heavy dependency."""

from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, names: dict[str, str]):
    """`(__getattr__, __dir__)` for `package`, whose public `names` map to the submodule that defines each.

    A name is imported on first access and then stored in the package, so later lookups skip `__getattr__`.
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*namespace, *names})

    return __getattr__, __dir__
