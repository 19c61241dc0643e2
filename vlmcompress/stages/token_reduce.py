"""`token_reduce`: merge or drop tokens inside the encoder layers; the reducing layers ship in the checkpoint.

`algorithm: tome` (Bolya et al., ICLR 2023): after each layer's attention, bipartite soft matching on the keys
(averaged over heads) merges the `r` most similar token pairs by size-weighted averaging; sizes feed proportional
attention in the next layers; the CLS token is never merged; at most half of the tokens go per layer (larger `r` is
clamped, and the clamp is recorded per layer in the report).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..adapters.base import encoder_gflops
from ..errors import VlmCompressError
from ..modeling.reduction import patch_tower
from ..modeling.token_ops import parse_r, token_schedule
from ..registry import register_method
from .base import RunContext, Stage, StageConfig, StageReport, count_params

NonNegInt = Annotated[int, Field(ge=0)]


class TokenReduceConfig(StageConfig):
    """Reduce the number of tokens inside a tower's layers."""

    method: Literal["token_reduce"]
    algorithm: Literal["tome"] = "tome"
    r: NonNegInt | list[NonNegInt] | tuple[NonNegInt, float] = Field(
        8, description="tokens removed per layer: an int, [r, inflect] (a linear ramp) or a per-layer list"
    )
    components: list[Literal["vision"]] = Field(["vision"], min_length=1)
    proportional_attention: bool = Field(True, description="weight attention by merged-token sizes (log size bias)")


class TokenReduceStage(Stage):
    """Token merging inside vision encoder layers (ToMe)."""

    changes_architecture = True

    def schedule(self, model, adapter) -> dict[str, Any]:
        tower = adapter.vision_tower(model)
        num_layers = len(model.get_submodule(tower.layers_path))
        try:
            requested = parse_r(num_layers, self.config.r)
        except ValueError as e:
            raise VlmCompressError(f"token_reduce.r: {e}") from None
        effective, tokens = token_schedule(tower.num_tokens, requested, num_protected=int(tower.class_token))
        return {"component": "vision", "layers_path": tower.layers_path, "r": effective, "requested_r": requested,
                "class_token": tower.class_token, "proportional_attention": self.config.proportional_attention,
                "num_tokens": tower.num_tokens, "tokens_per_layer": tokens}

    def check(self, model, adapter) -> None:
        self.schedule(model, adapter)

    def plan(self, model, adapter) -> dict[str, Any]:
        s = self.schedule(model, adapter)
        clamped = [i for i, (a, b) in enumerate(zip(s["r"], s["requested_r"])) if a < b]
        n0 = s["num_tokens"]
        units = [u for u in adapter.attention_units(model) if u.component == "vision"]
        mlps = [u for u in adapter.mlp_units(model) if u.component == "vision"]
        tokens_in = [n0, *s["tokens_per_layer"][:-1]]
        before = encoder_gflops(model, units, mlps, [n0] * len(tokens_in))
        after = encoder_gflops(model, units, mlps, tokens_in)
        return {"tokens": [n0, s["tokens_per_layer"][-1]], "tokens_per_layer": s["tokens_per_layer"],
                "clamped_layers": clamped, "vision_encoder_gflops_estimate": [round(before, 4), round(after, 4)]}

    def run(self, ctx: RunContext) -> StageReport:
        existing = ctx.compression.get("token_reduction")
        if existing:
            raise VlmCompressError("the vision tower already has token reduction; use one token_reduce stage for it")
        tower = self.schedule(ctx.model, ctx.adapter)
        patch_tower(ctx.model, tower)
        ctx.compression["token_reduction"] = {"algorithm": self.config.algorithm, "towers": [tower]}
        params = count_params(ctx.model)
        clamped = {i: [b, a] for i, (a, b) in enumerate(zip(tower["r"], tower["requested_r"])) if a < b}
        return StageReport(method="token_reduce", matched=[tower["layers_path"]], params_before=params,
                           params_after=params,
                           details={"algorithm": self.config.algorithm, "r": tower["r"],
                                    "tokens_per_layer": [tower["num_tokens"], *tower["tokens_per_layer"]],
                                    "clamped": {str(k): {"requested": v[0], "applied": v[1]}
                                                for k, v in clamped.items()}})


register_method("token_reduce", TokenReduceConfig, TokenReduceStage)
