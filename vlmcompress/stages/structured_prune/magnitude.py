"""`importance: magnitude` (the default): a weight's importance is its square, so a head's or neuron's importance is
the squared L2 norm of its weights across every projection it is coupled to. Needs no data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .stage import StructuredPruneConfig, register_importance

if TYPE_CHECKING:
    import torch


@register_importance
class MagnitudeConfig(StructuredPruneConfig):
    """Magnitude importance: weight norms."""

    importance: Literal["magnitude"] = "magnitude"

    def element_score(self, p: torch.Tensor) -> torch.Tensor:
        return p.pow(2)
