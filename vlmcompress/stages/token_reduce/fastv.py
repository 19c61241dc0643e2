"""`algorithm: fastv` (Chen et al., ECCV 2024): after decoder layer `layer` (K, default 2) of the language model, the
image tokens that the last prompt token attends to least (mean over heads, at layer K) are dropped for the remaining
layers of the prefill; `keep_ratio` (default 0.5) of each prompt's image tokens stay. `components: [llm]`. Runtime:
`modeling/fastv.py`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ...errors import VlmCompressError
from ...modeling.spec import TokenReductionSpec, TowerSpec
from .llava import LlavaReductionConfig, image_tokens
from .stage import register_algorithm


@register_algorithm
class FastVConfig(LlavaReductionConfig):
    """FastV: drop the least attended image tokens inside the language model after layer K."""

    algorithm: Literal["fastv"] = "fastv"
    layer: Annotated[int, Field(ge=1)] = Field(
        2, description="fastv: drop image tokens after this decoder layer K, ranked by layer K's attention (default 2)")

    towers = ("llm",)
    modeling_module = "vlmcompress.modeling.fastv"

    @model_validator(mode="before")
    @classmethod
    def _in_the_language_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("components") is None:
            data = {**data, "components": ["llm"]}
        return data

    def wrong_component(self, component: str) -> str:
        return (f"token_reduce: algorithm fastv drops image tokens inside the language model, not in the {component} "
                "tower; use components: [llm]")

    def block(self, model, adapter) -> TokenReductionSpec:
        from ...modeling.token_ops import keep_count

        self.check_components(adapter)
        layers_path = adapter.component_paths["llm"] + ".layers"
        depth = len(model.get_submodule(layers_path))
        k = self.layer
        if depth < 2:
            raise VlmCompressError(f"token_reduce: FastV needs a language model with at least 2 decoder layers (it "
                                   f"keeps the first K and prunes the rest); this one has {depth}")
        if not 1 <= k < depth:
            raise VlmCompressError(f"token_reduce.layer: FastV drops image tokens after decoder layer K, which must "
                                   f"be between 1 and {depth - 1} for this {depth}-layer language model; got {k}")
        ratio = 0.5 if self.keep_ratio is None else self.keep_ratio
        n = image_tokens(model)
        kept = keep_count(n, ratio)
        r = [0] * depth
        r[k - 1] = n - kept
        tower = TowerSpec(component="llm", layers_path=layers_path,
                          inputs_path=adapter.component_paths["llm"].rpartition(".")[0], layer=k, keep_ratio=ratio,
                          image_token_id=model.config.image_token_id, num_tokens=n, r=r,
                          tokens_per_layer=[n] * (k - 1) + [kept] * (depth - k + 1))
        return TokenReductionSpec(algorithm="fastv", towers=[tower], options={"layer": k, "keep_ratio": ratio},
                                  variant=self.variant)

    def details(self, block: TokenReductionSpec) -> dict[str, Any]:
        tower = block.towers[0]
        return super().details(block) | {"llm_image_tokens": {"entering": tower.num_tokens,
                                                              "after_layer_k": tower.tokens_per_layer[-1],
                                                              "layer_k": tower.layer}}
