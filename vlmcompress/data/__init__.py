"""Image-text data: the built-in `shapes` world, local folders and Hugging Face datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .sources import DataError, export_image_folder, load_source

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DataError", "batches", "export_image_folder", "load_rows", "load_source", "row_stream"]


def load_rows(source: Any, model: nn.Module, seed: int = 0, size: int | None = None) -> list[dict]:
    """Rows (`image`, `text`, and for `shapes` also `question` / `answer`) of a recipe data source.

    The built-in world is generated at the model's image size; `size` overrides the source's size. Images of local
    folders and Hugging Face datasets come back as RGB PIL images.
    """
    n = size or source.size
    if source.builtin == "shapes":
        return row_stream(source, image_size_of(model), seed)(0, n or 1000)
    return _rgb_rows(load_source(source.model_copy(update={"size": n}) if n else source))


def row_stream(source: Any, image_size: int, seed: int, shuffle: bool = False) -> Callable[[int, int], list[dict]]:
    """`rows(start, count)`: rows `start ... start + count - 1` of a data source, by index.

    The built-in world generates row i from the seed and i alone (an endless stream of fresh examples); other
    sources are loaded once and indexed modulo their length, pass `e = i // length` in the order of a permutation
    seeded by `seed + e` when `shuffle` (as a training epoch), else in file order.
    """
    if source.builtin == "shapes":
        from . import shapes

        config = shapes.ShapesConfig(image_size=image_size)

        def generated(start: int, count: int) -> list[dict]:
            return [r | {"shapes": True} for r in shapes.generate(source.split, count, seed=seed, config=config,
                                                                   start=start)]

        return generated
    rows = _rgb_rows(load_source(source))
    if not rows:
        raise DataError(f"data source {source.model_dump(exclude_none=True)} holds no rows")
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in orders:
            import random

            index = list(range(len(rows)))
            if shuffle:
                random.Random(seed + epoch).shuffle(index)
            orders[epoch] = index
        return orders[epoch]

    def indexed(start: int, count: int) -> list[dict]:
        return [rows[order(i // len(rows))[i % len(rows)]] for i in range(start, start + count)]

    return indexed


def batches(source: Any, image_size: int, seed: int, n: int, batch_size: int) -> Iterator[list[dict]]:
    """`n` rows of a data source in batches of `batch_size` (the last one may be shorter): how stages read
    calibration and gradient data, and the zoo its training data.

    The built-in world is generated batch by batch (row i is a function of the seed and i alone, so batches are the
    rows `load_rows` would give, without holding them all: zoo training reads hundreds of thousands); other sources
    are loaded once, `n` rows at most, in file order.
    """
    if source.builtin == "shapes":
        rows = row_stream(source, image_size, seed)
        for start in range(0, n, batch_size):
            yield rows(start, min(batch_size, n - start))
        return
    loaded = _rgb_rows(load_source(source.model_copy(update={"size": n})))
    for start in range(0, len(loaded), batch_size):
        yield loaded[start:start + batch_size]


def _rgb_rows(dataset) -> list[dict]:
    return [dict(row) | {"image": row["image"].convert("RGB")} for row in dataset]


def image_size_of(model: nn.Module) -> int:
    """The image size a model's vision tower expects (what the built-in world is generated at)."""
    return getattr(model.config, "vision_config", model.config).image_size
