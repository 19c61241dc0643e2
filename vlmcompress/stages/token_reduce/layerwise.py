"""What the per-layer algorithms (ToMe, Turbo, CrossGET) share: `r` tokens leave after every encoder layer, on
the vision tower and (where the algorithm supports it) the text towers of CLIP and SigLIP.

At most half of the tokens go per layer; a larger `r` is clamped and the clamp recorded per layer in the report.
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from ...errors import VlmCompressError
from ...modeling.spec import TextTowerSpec, TokenReductionSpec, TowerSpec
from .stage import TokenReduceConfig


class LayerwiseConfig(TokenReduceConfig):
    """Base of the algorithms that reduce `r` tokens after every layer of a tower."""

    @model_validator(mode="before")
    @classmethod
    def _default_r(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("r") is None and data.get("keep_ratio") is None:
            data = {**data, "r": 8}
        return data

    @model_validator(mode="after")
    def _r_or_keep_ratio(self):
        if self.r is not None and self.keep_ratio is not None:
            raise ValueError("give either r or keep_ratio, not both")
        return self

    def min_tokens(self) -> int:
        """Layers entered by fewer tokens merge nothing (Turbo's `r_threshold`; 0 for the others)."""
        return 0

    def tower_for(self, component: str, model, adapter):
        """The adapter's tower for `component` (a `VisionTower` description), or an error naming the alternative."""
        tower = adapter.vision_tower(model) if component == "vision" else adapter.text_tower(model)
        if tower is None:
            raise VlmCompressError(f"token_reduce: the {adapter.family} adapter has no {component} tower that "
                                   f"{self.algorithm} supports (text towers: CLIP and SigLIP); use components: "
                                   "[vision]")
        return tower

    def tower_entry(self, component: str, tower, model) -> TowerSpec:
        """The checkpoint entry of one reduced tower: per-layer `r` (as applied and as requested) and tokens."""
        from ...modeling.token_ops import parse_r, r_for_keep_ratio, token_schedule

        num_layers = len(model.get_submodule(tower.layers_path))
        # protected tokens besides any the algorithm adds and protects itself (CrossGET's cross token)
        protected = 2 if tower.text is not None else int(tower.class_token)
        if self.keep_ratio is not None:
            r = r_for_keep_ratio(tower.num_tokens, num_layers, self.keep_ratio, protected, self.min_tokens())
        else:
            r = self.r
        try:
            requested = parse_r(num_layers, r)
        except (ValueError, TypeError) as e:
            raise VlmCompressError(f"token_reduce.r: {e}") from None
        effective, tokens = token_schedule(tower.num_tokens, requested, protected, self.min_tokens())
        text = None if tower.text is None else TextTowerSpec.from_dict(tower.text)
        return TowerSpec(component=component, layers_path=tower.layers_path, r=effective, requested_r=requested,
                         class_token=tower.class_token, proportional_attention=self.proportional_attention,
                         num_tokens=tower.num_tokens, tokens_per_layer=tokens, text=text,
                         hook_path=tower.hook_path if text is not None else None)

    def block(self, model, adapter) -> TokenReductionSpec:
        self.check_components(adapter)
        towers = [self.tower_entry(c, self.tower_for(c, model, adapter), model)
                  for c in dict.fromkeys(self.components)]
        return self.spec(towers)

    def plan(self, model, adapter) -> dict[str, Any]:
        plan: dict[str, Any] = {"algorithm": self.algorithm}
        for s in self.block(model, adapter).towers:
            plan |= self.plan_tower(s, model, adapter)
        return plan

    def plan_tower(self, s: TowerSpec, model, adapter) -> dict[str, Any]:
        """Tokens per layer, clamped layers and the tower's GFLOPs estimate before / after, for one entry."""
        from ...measure.estimate import tower_gflops

        before = tower_gflops(model, adapter, s.component, [s.num_tokens] * len(s.r))
        after = tower_gflops(model, adapter, s.component, s.tokens_in, reducing=s, algorithm=self.algorithm,
                             options=self.algorithm_options())
        prefix = "" if s.component == "vision" else f"{s.component}_"
        return {f"{prefix}tokens": [s.num_tokens, s.tokens_per_layer[-1]],
                f"{prefix}tokens_per_layer": s.tokens_per_layer, f"{prefix}clamped_layers": s.clamped,
                f"{s.component}_encoder_gflops_estimate": [round(before, 4), round(after, 4)]}
