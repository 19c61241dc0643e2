"""`algorithm: turbo` (Ju et al., ECCV 2024): ToMe's matching with tokens ranked by redundancy minus `alpha`-weighted
CLS attention (informativity), `beta` / `gamma` shape the weight over layers, no merging once fewer than
`r_threshold` tokens are left. On BLIP, `components: [vision, text]` also prunes the image tokens inside the text
encoder: after text layer i only the `max(N0 · text_min_keep, (1 − text_step · (i + 1)) · N0)` image tokens that
received the most cross-attention go on. Runtime: `modeling/turbo.py`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...errors import VlmCompressError
from ...modeling.spec import TokenReductionSpec, TowerSpec
from .layerwise import LayerwiseConfig
from .stage import NonNegInt, register_algorithm


@register_algorithm
class TurboConfig(LayerwiseConfig):
    """Turbo: informativity-ranked merging; on BLIP also image-token pruning in the text encoder."""

    algorithm: Literal["turbo"] = "turbo"
    alpha: float = Field(5.0, ge=0.0, description="turbo: weight of the CLS attention (default 5)")
    beta: float = Field(1.0, gt=0.0,
                        description="turbo: the weight is scaled by beta ** |gamma - merging layer| (default 1)")
    gamma: float = Field(0.0, ge=0.0, description="turbo: the merging layer where that scale peaks (default 0)")
    r_threshold: NonNegInt = Field(0, description="turbo: layers entered by fewer tokens merge nothing (default 0)")
    text_step: float = Field(0.07, ge=0.0, lt=1.0, description="turbo, BLIP text: fraction of the image tokens "
                                                                "dropped after each text layer (default 0.07)")
    text_min_keep: float = Field(0.2, gt=0.0, le=1.0, description="turbo, BLIP text: fraction of the image tokens "
                                                                  "always kept (default 0.2)")

    towers = ("vision", "text")
    knobs = ("alpha", "beta", "gamma", "r_threshold", "text_step", "text_min_keep")
    modeling_module = "vlmcompress.modeling.turbo"

    def min_tokens(self) -> int:
        return self.r_threshold

    def tower_for(self, component: str, model, adapter):
        if component != "text":
            return super().tower_for(component, model, adapter)
        tower = adapter.cross_attention_tower(model)
        if tower is None:
            raise VlmCompressError(f"token_reduce: algorithm turbo reduces only vision tokens on a {adapter.family} "
                                   "model (the text side exists for BLIP, whose text encoder reads image tokens); use "
                                   "components: [vision]")
        return tower

    def block(self, model, adapter) -> TokenReductionSpec:
        self.check_components(adapter)
        towers, cross = [], []
        for component in dict.fromkeys(self.components):
            tower = self.tower_for(component, model, adapter)
            if component == "text":
                cross.append(tower)  # after the vision tower: it reads the vision tower's output
            else:
                towers.append(self.tower_entry(component, tower, model))
        for tower in cross:
            vision = [e for e in towers if e.component == "vision"]
            n0 = vision[0].tokens_per_layer[-1] if vision else tower.num_tokens
            towers.append(self.cross_pruning_entry(model, tower, n0))
        return self.spec(towers)

    def cross_pruning_entry(self, model, tower, num_tokens: int) -> TowerSpec:
        """The checkpoint entry of the image-token pruning in a text encoder: `num_tokens` image tokens enter, the
        counts after each layer follow `cross_attention_keep_counts`, except after the last layer (nothing reads
        them)."""
        from ...modeling.turbo import KIND, cross_attention_keep_counts

        num_layers = len(model.get_submodule(tower.layers_path))
        keep = cross_attention_keep_counts(num_tokens, num_layers, self.text_step, self.text_min_keep)
        keep = keep[:num_layers - 1]
        tokens = [*keep, keep[-1] if keep else num_tokens]
        r = [a - b for a, b in zip([num_tokens, *tokens], tokens)]
        return TowerSpec(component="text", kind=KIND, layers_path=tower.layers_path, hook_path=tower.hook_path, r=r,
                         requested_r=r, class_token=True, num_tokens=num_tokens, tokens_per_layer=tokens)

    def plan_tower(self, s: TowerSpec, model, adapter) -> dict[str, Any]:
        if s.kind is not None:  # the text encoder's image tokens
            return {"text_image_tokens": [s.num_tokens, s.tokens_per_layer[-1]],
                    "text_image_tokens_per_layer": s.tokens_per_layer}
        return super().plan_tower(s, model, adapter)
