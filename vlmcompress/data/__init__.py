"""Image-text data: the built-in `shapes` world, local folders and Hugging Face datasets."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import VlmCompressError


def load_rows(source: Any, model: nn.Module, seed: int = 0, size: int | None = None) -> list[dict]:
    """Rows (`image`, `text`, and for `shapes` also `question` / `answer`) of a recipe data source.

    The built-in world is generated at the model's image size; `size` overrides the source's size.
    """
    n = size or source.size
    if source.builtin == "shapes":
        from . import shapes

        vision = getattr(model.config, "vision_config", model.config)
        config = shapes.ShapesConfig(image_size=vision.image_size)
        return [r | {"shapes": True} for r in shapes.generate(source.split, n or 1000, seed=seed, config=config)]
    try:
        from .sources import load_source
    except ImportError:
        raise VlmCompressError("local-folder and Hugging Face data sources are not available in this version; "
                               "use {builtin: shapes}") from None
    dataset = load_source(source)
    rows = [dict(row) for row in dataset]
    return rows[:n] if n else rows
