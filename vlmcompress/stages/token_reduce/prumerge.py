"""`algorithm: prumerge` (Shang et al., 2024): at the output of LLaVA's feature layer, keep the patches whose CLS
attention is an outlier (`mode: adaptive`, IQR per image, so the count depends on the image) or the `keep_ratio`
most attended (`mode: fixed`); each kept patch absorbs its `neighbours` most key-similar patches weighted by their
CLS attention, and one extra token sums the dropped patches (`extra_token`). `plus: true` is PruMerge+ (adaptive:
the stride points `max(1, int(int(1 / ratio) / 3))` apart that are not outliers are added, as the paper's code;
fixed: an addition to the paper, a quarter of the kept patches by attention and the rest on a uniform stride).
The CLS attention is one full-width softmax from the layer after the feature layer, as in the paper's code.
Runtime: `modeling/prumerge.py` (variant 2; checkpoints of variant 1 keep their computation)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ...modeling.spec import TokenReductionSpec
from .llava import LlavaReductionConfig, feature_layer, vision_block
from .stage import NonNegInt, register_algorithm


@register_algorithm
class PruMergeConfig(LlavaReductionConfig):
    """PruMerge(+): CLS-attention outliers absorbing their key-similar neighbours, plus an extra token."""

    algorithm: Literal["prumerge"] = "prumerge"
    mode: Literal["adaptive", "fixed"] | None = Field(
        None, description="prumerge: adaptive (IQR outliers, count chosen per image) or fixed (keep_ratio); default "
                          "fixed when keep_ratio is given, else adaptive")
    neighbours: NonNegInt = Field(32, description="prumerge: key-similar patches each kept patch absorbs (default 32)")
    plus: bool = Field(False, description="prumerge: PruMerge+ (add patches on a uniform stride)")
    keep_positions: bool = Field(
        False, description="visionzip / prumerge: the kept image tokens keep the position ids they had in the full "
                           "prompt, in their original order (an addition to the papers, which close the gaps; default "
                           "false)")
    extra_token: bool = Field(True, description="prumerge: add one token summing the dropped patches (default true)")
    order: Literal["attention", "raster"] = Field(
        "attention", description="prumerge: order of the kept patches: attention (descending CLS attention, PruMerge+'s "
                                 "stride points after the outliers: the paper's) or raster (an addition)")

    modeling_module = "vlmcompress.modeling.prumerge"
    # 2: the paper's class attention (layer after the feature layer, one full-width softmax), per-image adaptive
    # counts with PruMerge+'s stride points, kept patches in attention order (variant 1: see modeling/prumerge.py)
    variant = 2

    @model_validator(mode="after")
    def _mode_and_ratio(self):
        if self.mode == "adaptive" and self.keep_ratio is not None:
            raise ValueError("prumerge mode: adaptive chooses the count itself; drop keep_ratio or use mode: fixed")
        if self.mode == "fixed" and self.keep_ratio is None:
            raise ValueError("prumerge mode: fixed needs keep_ratio (the fraction of image tokens kept)")
        return self

    def details(self, block: TokenReductionSpec) -> dict:
        details = super().details(block)
        o = block.options
        if o["attention_layer"] == o["layer"]:
            details["note"] = ("the feature layer is the vision tower's last layer, so the CLS attention comes from its "
                               "own q / k projections (the paper's code reads the layer after it)")
        return details

    def block(self, model, adapter) -> TokenReductionSpec:
        from ...modeling.token_ops import keep_count

        self.check_components(adapter)
        patches = adapter.vision_tower(model).num_tokens - 1
        mode = self.mode or ("fixed" if self.keep_ratio is not None else "adaptive")
        layer = feature_layer(model)
        last = len(model.get_submodule(adapter.vision_tower(model).layers_path)) - 1
        options = {"layer": layer, "mode": mode, "neighbours": self.neighbours, "plus": self.plus,
                   "extra_token": self.extra_token, "keep_positions": bool(self.keep_positions), "order": self.order,
                   # the paper reads q / k of the layer after the feature layer; the last layer has none after it
                   "attention_layer": min(layer + 1, last)}
        if mode == "adaptive":
            return vision_block(self, model, adapter, options, None)
        total = keep_count(patches, self.keep_ratio)
        selected = max(1, total - int(self.extra_token))
        # PruMerge+ keeps about one outlier per three stride points
        outliers = max(1, math.floor(selected / 4 + 0.5)) if self.plus else selected
        options |= {"selected": selected, "outliers": outliers}
        return vision_block(self, model, adapter, options, 1 + selected + int(self.extra_token))
