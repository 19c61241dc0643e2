"""`algorithm: visionzip` (Yang et al., 2024): at the output of LLaVA's feature layer (`vision_feature_layer`), keep
`dominant` tokens (the CLS token and the `dominant - 1` patches with the highest CLS attention) and `contextual`
tokens (an anchor patch plus the mean of the remaining patches that are most key-similar to it); the language model
receives these `dominant + contextual` tokens, CLS first, as with the paper's code. Or `keep_ratio` of the patches,
split 54:10 as VisionZip's 64-token setting. Default: VisionZip's default 191 + 30 for 576 patches, scaled to the
tower. Runtime: `modeling/visionzip.py` (variant 2; checkpoints of variant 1 keep their computation).
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
    dominant: NonNegInt | None = Field(None, description="visionzip: tokens kept by CLS attention, the CLS token "
                                                          "included (VisionZip's convention: 191 keeps CLS + 190 "
                                                          "patches)")
    contextual: NonNegInt | None = Field(None, description="visionzip: tokens merged from the other patches")
    keep_positions: bool = Field(
        False, description="visionzip / prumerge: the kept image tokens keep the position ids they had in the full "
                           "prompt, in their original order (an addition to the papers, which close the gaps; default "
                           "false)")

    modeling_module = "vlmcompress.modeling.visionzip"
    # 2: `dominant` counts the CLS token, which goes on to the language model; contextual = anchor + mean of the
    # joined patches (variant 1: dominant patches besides CLS, CLS dropped, anchor averaged with them)
    variant = 2

    @model_validator(mode="after")
    def _ratio_or_counts(self):
        if self.keep_ratio is not None and (self.dominant or self.contextual):
            raise ValueError("give either keep_ratio or dominant / contextual, not both")
        return self

    def counts(self, patches: int) -> dict[str, int]:
        """`{"dominant", "contextual"}` image tokens handed to the language model (dominant includes CLS), for a
        tower of `patches` patches."""
        from ...modeling.token_ops import keep_count

        if self.keep_ratio is not None:
            total = keep_count(patches, self.keep_ratio)
            contextual = min(total - 1, math.floor(total * VISIONZIP_CONTEXTUAL_SHARE + 0.5)) if total > 1 else 0
            return {"dominant": total - contextual, "contextual": contextual}
        if self.dominant is None and self.contextual is None:
            return {"dominant": max(1, math.floor(patches * VISIONZIP_DEFAULT[0] + 0.5)),
                    "contextual": math.floor(patches * VISIONZIP_DEFAULT[1] + 0.5)}
        dominant, contextual = (1 if self.dominant is None else self.dominant), self.contextual or 0
        if dominant == 0:
            raise VlmCompressError("token_reduce.dominant: 0 given, but VisionZip's dominant tokens include the CLS "
                                   "token; give at least 1 (1 keeps CLS alone)")
        if dominant - 1 + contextual > patches:
            raise VlmCompressError(f"token_reduce: dominant + contextual = {dominant + contextual} image tokens (CLS "
                                   f"included), but the vision tower has {patches} patches plus CLS; keep at most "
                                   f"{patches + 1}")
        return {"dominant": dominant, "contextual": contextual}

    def block(self, model, adapter) -> TokenReductionSpec:
        self.check_components(adapter)
        patches = adapter.vision_tower(model).num_tokens - 1
        counts = self.counts(patches)
        options = {"layer": feature_layer(model), **counts, "keep_positions": bool(self.keep_positions),
                   "class_token_to_llm": True}
        return vision_block(self, model, adapter, options, counts["dominant"] + counts["contextual"])
