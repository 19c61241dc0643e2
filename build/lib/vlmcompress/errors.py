"""One error hierarchy. Every message says what was given, what was expected and what to do next.

The CLI prints `str(error)` on one line and exits with code 1; `VLMCOMPRESS_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmCompressError(Exception):
    """Base class for all errors that vlmcompress reports to users."""


class RecipeError(VlmCompressError):
    """A recipe file that cannot be read or does not match the schema."""


class UnknownMethodError(VlmCompressError):
    """A stage `method:` or `algorithm:` that is not registered."""


class NoMatchingModulesError(VlmCompressError):
    """A selector (`ignore:`, `components:`) that matches nothing in the model."""


class UnsupportedModelError(VlmCompressError):
    """A model whose family has no adapter, or a folder that is not a model."""


class ModelLoadError(VlmCompressError):
    """A model id / folder that exists but cannot be loaded (corrupt or incomplete)."""


class OutputError(VlmCompressError):
    """An output folder that exists (without --overwrite) or cannot be written."""


class StageOrderError(VlmCompressError):
    """Stages in an order that cannot work (for example anything after `quantize`)."""


class BackendNotInstalledError(VlmCompressError):
    """An optional engine that is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this step needs the Python package '{package}', which is not installed; "
            f"run: pip install 'vlmcompress[{extra}]'"
        )


def closest(given: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The `n` entries of `choices` that look most like `given` (may be empty)."""
    choices = list(choices)
    found = difflib.get_close_matches(given, choices, n=n, cutoff=0.5)
    if not found:
        # substring matches help for long module names where the edit distance is large
        found = [c for c in choices if given.split(".")[-1] in c][:n]
    return found


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` or `""`."""
    found = closest(given, choices, n=1)
    return f" (did you mean '{found[0]}'?)" if found else ""
