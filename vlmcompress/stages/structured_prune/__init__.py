"""`structured_prune`: remove attention heads and MLP neurons for real (smaller tensors).

One file per importance (its config class and per-element score), registered by `register_importance`:
`magnitude.py` (the default), `taylor.py`. The stage itself (`stage.py`) names none of them. Adding one:
docs/extending.md.
"""

from ...registry import register_method

# each registers itself; the order is the one error messages and docs list them in (the default first)
# isort: off
from . import magnitude, taylor  # noqa: F401
# isort: on
from .stage import (  # noqa: F401
    IMPORTANCES,
    StructuredPruneConfig,
    StructuredPruneStage,
    head_importance,
    neuron_importance,
    register_importance,
)

register_method("structured_prune", StructuredPruneConfig, StructuredPruneStage)

def __getattr__(name: str):
    # the pruning kernels import torch: loaded on first use, so that listing methods does not
    if name == "choose_removals":
        from .pruning import choose_removals

        return choose_removals
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IMPORTANCES", "StructuredPruneConfig", "StructuredPruneStage", "choose_removals", "head_importance",
           "neuron_importance", "register_importance"]
