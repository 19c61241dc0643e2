"""Image-text data: the built-in `shapes` world, local folders and Hugging Face datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sources import DataError, export_image_folder, load_source

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DataError", "export_image_folder", "load_rows", "load_source"]


def load_rows(source: Any, model: nn.Module, seed: int = 0, size: int | None = None) -> list[dict]:
    """Rows (`image`, `text`, and for `shapes` also `question` / `answer`) of a recipe data source.

    The built-in world is generated at the model's image size; `size` overrides the source's size. Images of local
    folders and Hugging Face datasets come back as RGB PIL images.
    """
    n = size or source.size
    if source.builtin == "shapes":
        from . import shapes

        vision = getattr(model.config, "vision_config", model.config)
        config = shapes.ShapesConfig(image_size=vision.image_size)
        return [r | {"shapes": True} for r in shapes.generate(source.split, n or 1000, seed=seed, config=config)]
    dataset = load_source(source.model_copy(update={"size": n}) if n else source)
    return [dict(row) | {"image": row["image"].convert("RGB")} for row in dataset]
