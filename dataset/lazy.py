"""Lazy re-exports for package ``__init__`` files: public names whose (slow to import) module loads on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``modules[name]`` when ``name`` is first used.

    Args:
        package: the package's ``__name__`` (for the error message).
        modules: public name -> the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["lazy_exports"]
