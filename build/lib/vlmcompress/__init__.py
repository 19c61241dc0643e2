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

from .checkpoint import load
from .orchestrator import apply
from .recipe import Recipe, load_recipe
from .registry import list_methods, register_method

__all__ = ["Recipe", "__version__", "apply", "list_methods", "load", "load_recipe", "register_method"]
