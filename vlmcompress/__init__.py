"""vlmcompress: declarative compression recipes for vision-language models.

    import vlmcompress
    model = vlmcompress.apply("recipes/quickstart.yaml")          # writes the recipe's output folder too
    model = vlmcompress.load("out/tiny-clip-tome")                  # reload it (no remote code)
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging
import os as _os

if not _os.environ.get("VLMCOMPRESS_DEBUG"):
    # transformers imports torchao when it is installed, and torchao logs a warning for every optional CUDA kernel
    # library it cannot load on a CPU machine; torch logs deprecation notes for torchao's pytree registrations
    _logging.getLogger("torchao").setLevel(_logging.ERROR)
    _logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

# The public names load on first use (as transformers and PEFT do): `import vlmcompress`, `vlmcompress --help` and
# listing methods import neither torch nor transformers.
_LAZY = {
    "apply": ("orchestrator", "apply"),
    "load": ("checkpoint", "load"),
    "push": ("publish", "push"),
    "Recipe": ("recipe", "Recipe"),
    "load_recipe": ("recipe", "load_recipe"),
    "list_methods": ("recipe", "list_methods"),  # through recipe: the built-in methods registered
    "register_method": ("registry", "register_method"),
    "register_algorithm": ("stages.token_reduce", "register_algorithm"),
    "register_importance": ("stages.structured_prune", "register_importance"),
    "register_backend": ("stages.quantize", "register_backend"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
