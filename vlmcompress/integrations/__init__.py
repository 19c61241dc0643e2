"""Glue to external engines, one file per library, each imported lazily, and the one helper they all import their
library through (a missing optional package is then the same one-line install hint everywhere)."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(module: str, package: str, extra: str) -> ModuleType:
    """`importlib.import_module(module)`, or `BackendNotInstalledError` naming the pip `package` and the vlmcompress
    `extra` that installs it (`pip install 'vlmcompress[extra]'`)."""
    from ..errors import BackendNotInstalledError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendNotInstalledError(package, extra) from None
