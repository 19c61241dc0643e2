"""`algorithm: visionzip` (Yang et al., 2024): at the output of LLaVA's feature layer (`vision_feature_layer`), keep
the CLS token, the `dominant` patches with the highest CLS attention and `contextual` tokens that average the
remaining patches grouped by key similarity; or `keep_ratio` of the patches, split 54:10 as VisionZip's 64-token
setting. Default: VisionZip's default 191 + 30 of 576 patches, scaled to the tower. Runtime: `modeling/visionzip.py`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ...errors import VlmCompressError
from ...modeling.spec import TokenReductionSpec
from .llava import LlavaReductionConfig, feature_layer, vision_block
from .stage import NonNegInt, register_algorithm

# VisionZip's API default (dominant 191, contextual 30 of 576 patches) and its 64-token split (54 + 10)
VISIONZIP_DEFAULT = (191 / 576, 30 / 576)
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


@register_algorithm
class VisionZipConfig(LlavaReductionConfig):
    """VisionZip: dominant + contextual tokens at the vision tower's feature layer."""

    algorithm: Literal["visionzip"] = "visionzip"
    dominant: NonNegInt | None = Field(None, description="visionzip: patches kept by CLS attention")
    contextual: NonNegInt | None = Field(None, description="visionzip: tokens merged from the other patches")
    keep_positions: bool = Field(
        False, description="visionzip / prumerge: the kept image tokens keep the position ids they had in the full "
                           "prompt, in their original order (an addition to the papers, which close the gaps; default "
                           "false)")

    modeling_module = "vlmcompress.modeling.visionzip"

    @model_validator(mode="after")
    def _ratio_or_counts(self):
        if self.keep_ratio is not None and (self.dominant or self.contextual):
            raise ValueError("give either keep_ratio or dominant / contextual, not both")
        return self

    def counts(self, patches: int) -> dict[str, int]:
        from ...modeling.token_ops import keep_count

        if self.keep_ratio is not None:
            total = keep_count(patches, self.keep_ratio)
            contextual = min(total - 1, math.floor(total * VISIONZIP_CONTEXTUAL_SHARE + 0.5)) if total > 1 else 0
            return {"dominant": total - contextual, "contextual": contextual}
        if self.dominant is None and self.contextual is None:
            return {"dominant": math.floor(patches * VISIONZIP_DEFAULT[0] + 0.5),
                    "contextual": math.floor(patches * VISIONZIP_DEFAULT[1] + 0.5)}
        dominant, contextual = self.dominant or 0, self.contextual or 0
        if dominant + contextual > patches or dominant + contextual == 0:
            raise VlmCompressError(f"token_reduce: dominant + contextual = {dominant + contextual}, but the vision "
                                   f"tower has {patches} patches; keep between 1 and {patches} tokens")
        return {"dominant": dominant, "contextual": contextual}

    def block(self, model, adapter) -> TokenReductionSpec:
        self.check_components(adapter)
        patches = adapter.vision_tower(model).num_tokens - 1
        options = {"layer": feature_layer(model), **self.counts(patches), "keep_positions": bool(self.keep_positions)}
        return vision_block(self, model, adapter, options, 1 + options["dominant"] + options["contextual"])
