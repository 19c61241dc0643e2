"""The recipe's `data:` section: where calibration / training data (`train`) and evaluation data (`eval`) come
from. Owned by the data package (its loaders read it); the recipe schema includes it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import StrictModel


class DataSource(StrictModel):
    """One split of image-text data: the built-in generator, a local folder, or a Hugging Face dataset."""

    builtin: Literal["shapes"] | None = None
    path: str | None = Field(None, description="image folder with metadata.jsonl, or a `save_to_disk` folder")
    hf: str | None = Field(None, description="Hugging Face dataset id")
    split: str = "train"
    size: int | None = Field(None, gt=0, le=10_000_000, description="number of examples to use (all when unset; at "
                                                                     "most 10,000,000)")
    image_column: str = "image"
    text_column: str = "text"
    question_column: str | None = Field(None, description="VQA data (LLaVA, BLIP-2 eval): the column of questions, "
                                                         "renamed to `question`")
    answer_column: str | None = Field(None, description="VQA data: the column of short answers, renamed to "
                                                       "`answer`")

    @model_validator(mode="after")
    def _builtin_split(self):
        if self.builtin == "shapes" and self.split not in ("train", "validation", "test"):
            raise ValueError(f"split {self.split!r} is not a split of the built-in shapes world; expected one of: "
                             "train, validation, test")
        return self

    @model_validator(mode="after")
    def _exactly_one_source(self):
        given = [k for k in ("builtin", "path", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of builtin / path / hf (got {', '.join(given) or 'none'}); "
                "e.g. {builtin: shapes, split: train, size: 512}"
            )
        return self


class DataSpec(StrictModel):
    """Calibration / training data (`train`) and evaluation data (`eval`)."""

    train: DataSource | None = None
    eval: DataSource | None = None
