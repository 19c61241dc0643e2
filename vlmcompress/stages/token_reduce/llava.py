"""What the LLaVA-side algorithms of `token_reduce` share (each has its own file: `fastv.py`, `visionzip.py`,
`prumerge.py`).

- `fastv` (Chen et al., ECCV 2024): after decoder layer `layer` (K, default 2) of the language model, the image tokens
  that the last prompt token attends to least (mean over heads, at layer K) are dropped for the remaining layers of
  the prefill; `keep_ratio` (default 0.5) of each prompt's image tokens stay. `components: [llm]`.
- `visionzip` (Yang et al., 2024): at the output of LLaVA's feature layer (`vision_feature_layer`), keep `dominant`
  tokens (CLS and the `dominant - 1` patches with the highest CLS attention) and `contextual` tokens (an anchor plus
  the mean of the remaining patches most key-similar to it); CLS goes on to the language model. Or `keep_ratio` of
  the patches, split 54:10 as VisionZip's 64-token setting. Default: VisionZip's default 191 + 30 for 576 patches,
  scaled to the tower.
- `prumerge` (Shang et al., 2024): at the same point, keep the patches whose CLS attention is an outlier
  (`mode: adaptive`, IQR per image, so the count depends on the image) or the `keep_ratio` most attended
  (`mode: fixed`); each kept patch absorbs its `neighbours` most key-similar patches weighted by their CLS
  attention, and one extra token sums the dropped patches (`extra_token`). `plus: true` is PruMerge+ (a uniform
  stride of patches added, about three per outlier).
- `keep_positions: true` (VisionZip, PruMerge; not in the papers): the kept image tokens reach the language model in
  their original order at the position ids they had in the full prompt (a contextual token at its anchor's, the
  extra token at the first dropped patch's, VisionZip's CLS token at the first image placeholder's, which it shares
  with patch 1 when that is kept), as FastV keeps them, instead of closing the gaps; the text after the image keeps
  its positions too. The number of image placeholders kept per image is `llava_image_token_counts` (modeling
  `llava_tokens.py`): VisionZip's `dominant + contextual`, PruMerge's kept patches + the extra token.

The LLaVA class of the checkpoint shortens the processor's image placeholders to the reduced count (adaptive mode:
after running the vision tower, so the block is flagged `data_dependent: true` and cannot be exported with fixed
shapes).
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from ...errors import VlmCompressError
from ...modeling.spec import TokenReductionSpec, TowerSpec
from .stage import TokenReduceConfig

PROMPT_TEXT_TOKENS = 32  # text tokens of the prompt in GFLOPs estimates (as `vlmcompress bench`'s prefill)


def check_family(algorithm: str, adapter) -> None:
    if adapter.family != "llava":
        raise VlmCompressError(f"token_reduce: algorithm {algorithm} works on LLaVA-style models (family llava), "
                               f"not on a {adapter.family} model; use algorithm tome, turbo or crossget")


def feature_layer(model) -> int:
    """Index of the vision encoder layer whose output LLaVA hands to the projector."""
    from ...modeling.llava_tokens import feature_layer_index

    try:
        applied = feature_layer_index(model.config)
    except ValueError:
        raise VlmCompressError(f"token_reduce: this model concatenates several vision feature layers "
                               f"({model.config.vision_feature_layer}); visionzip and prumerge need a single int "
                               "vision_feature_layer") from None
    if applied == 0:
        raise VlmCompressError("token_reduce: vision_feature_layer selects the patch embeddings, before any encoder "
                               "layer; visionzip and prumerge reduce an encoder layer's output")
    return applied - 1


def image_tokens(model) -> int:
    """Image tokens per image in the language model's input (patches, plus CLS with the "full" strategy)."""
    from ...modeling.llava_tokens import image_tokens_per_image

    return image_tokens_per_image(model.config)


class LlavaReductionConfig(TokenReduceConfig):
    """Base of the algorithms that reduce LLaVA's image tokens (before or inside the language model)."""

    @model_validator(mode="after")
    def _no_r(self):
        if self.r is not None:
            raise ValueError(f"r does not apply to algorithm: {self.algorithm}; give keep_ratio (the fraction of "
                             "image tokens kept)")
        return self

    def check_components(self, adapter) -> None:
        check_family(self.algorithm, adapter)
        bad = [c for c in self.components if c not in self.towers]
        if bad:
            raise VlmCompressError(self.wrong_component(bad[0]))

    def wrong_component(self, component: str) -> str:
        return (f"token_reduce: algorithm {self.algorithm} reduces vision tokens, not {component}; use "
                "components: [vision]")

    def plan(self, model, adapter) -> dict[str, Any]:
        return plan(self, model, adapter)

    def details(self, block: TokenReductionSpec) -> dict[str, Any]:
        details = super().details(block)
        tower = block.towers[0]
        if block.data_dependent:
            details["data_dependent"] = ("adaptive: the number of image tokens is chosen per image at run time (IQR "
                                         f"outliers of the CLS attention); at most {tower.num_tokens} per image")
        return details


def vision_block(cfg, model, adapter, options: dict[str, Any], after: int | None) -> TokenReductionSpec:
    """The block of a reduction at the output of the feature layer: `after` tokens from there on (None: chosen
    per batch, at most all of them)."""
    tower = adapter.vision_tower(model)
    layers = model.get_submodule(tower.layers_path)
    f = options["layer"]
    n = tower.num_tokens
    data_dependent = after is None
    after = n if data_dependent else after
    r = [0] * len(layers)
    r[f] = 0 if data_dependent else max(0, n - after)
    vision = TowerSpec(component="vision", layers_path=tower.layers_path, r=r, requested_r=list(r), class_token=True,
                       proportional_attention=False, num_tokens=n,
                       tokens_per_layer=[n] * f + [after] * (len(layers) - f), data_dependent=data_dependent)
    return TokenReductionSpec(algorithm=cfg.algorithm, towers=[vision], options=options, variant=cfg.variant,
                              data_dependent=data_dependent)


def plan(cfg, model, adapter) -> dict[str, Any]:
    """Tokens at the reduction point and GFLOPs estimates (one image + a 32-token prompt) before / after."""
    from ...measure.estimate import tower_gflops

    block = cfg.block(model, adapter)
    tower = block.towers[0]
    n_image = image_tokens(model)
    text = PROMPT_TEXT_TOKENS
    llm_layers = len(model.get_submodule(adapter.component_paths["llm"] + ".layers"))
    llm_before = tower_gflops(model, adapter, "llm", [n_image] * llm_layers, extra_tokens=text)
    if tower.component == "llm":
        llm_after = tower_gflops(model, adapter, "llm", tower.tokens_in, reducing=tower, algorithm=block.algorithm,
                                 options=block.options, extra_tokens=text)
        vision_gflops = None
    else:
        drop_cls = n_image == tower.num_tokens - 1 and not block.options.get("class_token_to_llm")
        after_image = tower.tokens_per_layer[block.options["layer"]] - int(drop_cls)
        llm_after = tower_gflops(model, adapter, "llm", [after_image] * llm_layers, extra_tokens=text)
        n0 = tower.num_tokens
        vision_gflops = [round(tower_gflops(model, adapter, "vision", [n0] * len(tower.r)), 4),
                         round(tower_gflops(model, adapter, "vision", tower.tokens_in, reducing=tower,
                                            algorithm=block.algorithm, options=block.options), 4)]
    out = {"algorithm": block.algorithm, "options": block.options, "component": tower.component,
           "tokens": [tower.num_tokens, tower.tokens_per_layer[-1]],
           "tokens_per_layer": tower.tokens_per_layer, "clamped_layers": [],
           "llm_prefill_gflops_estimate": [round(llm_before, 4), round(llm_after, 4)],
           "data_dependent": block.data_dependent}
    if vision_gflops is not None:
        out["vision_encoder_gflops_estimate"] = vision_gflops
    if block.data_dependent:  # the "after" figures are upper bounds
        out["tokens"] = [tower.num_tokens, f"at most {tower.num_tokens}, chosen per image at run time"]
    return out
