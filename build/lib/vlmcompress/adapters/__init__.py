"""Model-family adapters, looked up by the transformers class name of the loaded model."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionUnit, MlpUnit, ModelAdapter, VisionTower, get_submodule
from .blip import BlipAdapter
from .blip2 import Blip2Adapter
from .clip import CLIPAdapter
from .llava import LlavaAdapter
from .siglip import SiglipAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (CLIPAdapter(), SiglipAdapter(), BlipAdapter(), Blip2Adapter(), LlavaAdapter())
BUILTIN_TINY = {a.builtin_name: a for a in ADAPTERS}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter whose stock class is `model`'s class or one of its bases (compressed classes subclass them)."""
    family = getattr(model, "vlmc_family", None)  # models that are not torch modules of a family (ONNX Runtime)
    if family is not None:
        return next(a for a in ADAPTERS if a.family == family)
    names = [cls.__name__ for cls in type(model).__mro__]
    for adapter in ADAPTERS:
        if any(name in adapter.stock_classes for name in names):
            return adapter
    supported = ", ".join(c for a in ADAPTERS for c in a.stock_classes)
    raise UnsupportedModelError(
        f"model class {type(model).__name__} is not supported; expected one of: {supported}; "
        "open an issue with the model id to request it"
    )


__all__ = ["ADAPTERS", "BUILTIN_TINY", "AttentionUnit", "MlpUnit", "ModelAdapter", "VisionTower", "adapter_for",
           "get_submodule"]
