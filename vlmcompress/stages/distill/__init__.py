"""`distill`: a student with fewer layers per component, trained against the frozen teacher (EfficientVLM)."""

from ...registry import register_method
from .stage import DistillConfig, DistillLoss, DistillStage  # noqa: F401

register_method("distill", DistillConfig, DistillStage,
                "a smaller student (fewer layers per component) distilled from the teacher: task, logit, "
                "hidden-state and attention losses")

__all__ = ["DistillConfig", "DistillLoss", "DistillStage"]
