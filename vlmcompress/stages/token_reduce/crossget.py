"""`algorithm: crossget` (Shi et al., ICML 2024): complete-graph matching guided by a cross token (a per-layer
parameter, zero-initialised until a training stage learns it), importance-weighted ensemble, order kept; also on
the text towers of CLIP and SigLIP (the end-of-text token protected, padding never merged into text). Runtime:
`modeling/crossget.py`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr

from ...modeling.spec import TokenReductionSpec
from .layerwise import LayerwiseConfig
from .stage import register_algorithm


@register_algorithm
class CrossGETConfig(LayerwiseConfig):
    """CrossGET: merge `r` tokens per layer, guided by a learned cross token."""

    algorithm: Literal["crossget"] = "crossget"
    scoring: Literal["auto", "clip", "llava"] = Field(
        "auto", description="crossget: the paper's rule set: clip (importance = cosine of each key with the cross "
                            "token's query, full-width keys matched) or llava (importance = attention received, "
                            "head-averaged keys matched); auto: llava on LLaVA models, else clip")
    towers = ("vision", "text")
    knobs = ("scoring",)
    _family: str | None = PrivateAttr(None)  # the model's family, known once `block` has seen it
    modeling_module = "vlmcompress.modeling.crossget"

    def block(self, model, adapter) -> TokenReductionSpec:
        self._family = adapter.family
        return super().block(model, adapter)

    def algorithm_options(self) -> dict[str, Any]:
        scoring = self.scoring
        if scoring == "auto":
            scoring = "llava" if self._family == "llava" else "clip"
        return {"scoring": scoring}
