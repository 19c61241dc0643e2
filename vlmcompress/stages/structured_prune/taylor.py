"""`importance: taylor`: first-order Taylor importance, `|w · ∂L/∂w|` of the family's task loss summed over
`calibration_batches` batches of `data.train` (Molchanov et al., 2019): what removing a weight would cost the loss,
to first order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ...errors import VlmCompressError
from ..base import RunContext
from .stage import StructuredPruneConfig, register_importance

if TYPE_CHECKING:
    import torch


@register_importance
class TaylorConfig(StructuredPruneConfig):
    """Taylor importance: |weight × gradient| of the task loss on data.train."""

    importance: Literal["taylor"] = "taylor"

    def needs_data(self) -> bool:
        return True

    def prepare(self, ctx: RunContext) -> None:
        """Sum the gradients of the family's task loss over `calibration_batches` batches of `data.train`."""
        import torch

        batches = ctx.batches("train", self.calibration_batches * self.calibration_batch_size,
                              self.calibration_batch_size)
        was_training = ctx.model.training
        ctx.model.zero_grad(set_to_none=True)
        ctx.model.train(False)  # dropout off: the scores should not depend on the random mask
        with torch.enable_grad():
            for rows in batches:
                ctx.adapter.task_loss(ctx.model, ctx.processor, rows).backward()
        ctx.model.train(was_training)

    def element_score(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise VlmCompressError("taylor importance needs gradients; none were computed for a pruned weight")
        return (p * p.grad).abs()
