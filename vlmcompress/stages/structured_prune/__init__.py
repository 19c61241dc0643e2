"""`structured_prune`: remove attention heads and MLP neurons for real (smaller tensors).

One file per importance (its config class and per-element score), registered by `register_importance`:
`magnitude.py` (the default), `taylor.py`. The stage itself (`stage.py`) names none of them. Adding one:
docs/extending.md.
"""

from ...registry import register_method

# each registers itself; the order is the one error messages and docs list them in (the default first)
from . import magnitude, taylor  # noqa: F401, I001
from .stage import (IMPORTANCES, StructuredPruneConfig, StructuredPruneStage, choose_removals,  # noqa: F401
                    head_importance, neuron_importance, register_importance)

register_method("structured_prune", StructuredPruneConfig, StructuredPruneStage)

__all__ = ["IMPORTANCES", "StructuredPruneConfig", "StructuredPruneStage", "choose_removals", "head_importance",
           "neuron_importance", "register_importance"]
