"""The LLaVA-side algorithms of `token_reduce`, called by `TokenReduceStage` for them.

- `fastv` (Chen et al., ECCV 2024): after decoder layer `layer` (K, default 2) of the language model, the image tokens
  that the last prompt token attends to least (mean over heads, at layer K) are dropped for the remaining layers of
  the prefill; `keep_ratio` (default 0.5) of each prompt's image tokens stay. `components: [llm]`.
- `visionzip` (Yang et al., 2024): at the output of LLaVA's feature layer (`vision_feature_layer`), keep the CLS
  token, the `dominant` patches with the highest CLS attention and `contextual` tokens that average the remaining
  patches grouped by key similarity; or `keep_ratio` of the patches, split 54:10 as VisionZip's 64-token setting.
  Default: VisionZip's default 191 + 30 of 576 patches, scaled to the tower.
- `prumerge` (Shang et al., 2024): at the same point, keep the patches whose CLS attention is an outlier
  (`mode: adaptive`, IQR over the batch, so the count depends on the images) or the `keep_ratio` most attended
  (`mode: fixed`); each kept patch absorbs its `neighbours` most key-similar patches weighted by their CLS
  attention, and one extra token sums the dropped patches (`extra_token`). `plus: true` is PruMerge+ (a uniform
  stride of patches added, about three per outlier).
- `keep_positions: true` (VisionZip, PruMerge; not in the papers): the kept image tokens reach the language model in
  their original order at the position ids they had in the full prompt (a contextual token at its anchor's, the
  extra token at the first dropped patch's), as FastV keeps them, instead of closing the gaps; the text after the
  image keeps its positions too.

The LLaVA class of the checkpoint shortens the processor's image placeholders to the reduced count (adaptive mode:
after running the vision tower, so the block is flagged `data_dependent: true` and cannot be exported with fixed
shapes).
"""

from __future__ import annotations

import math
from typing import Any

from ..adapters.base import encoder_gflops
from ..errors import VlmCompressError
from ..modeling.llava_reduction import apply_fastv
from ..modeling.reduction import patch_tower
from ..modeling.token_ops import keep_count

LLAVA_ALGORITHMS = ("fastv", "visionzip", "prumerge")
KNOBS = {"fastv": ("layer",), "visionzip": ("dominant", "contextual"),
         "prumerge": ("mode", "neighbours", "plus", "extra_token")}
PROMPT_TEXT_TOKENS = 32  # text tokens of the prompt in GFLOPs estimates (as `vlmcompress bench`'s prefill)
# VisionZip's API default (dominant 191, contextual 30 of 576 patches) and its 64-token split (54 + 10)
VISIONZIP_DEFAULT = (191 / 576, 30 / 576)
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64


def check_family(algorithm: str, adapter) -> None:
    if adapter.family != "llava":
        raise VlmCompressError(f"token_reduce: algorithm {algorithm} works on LLaVA-style models (family llava), "
                               f"not on a {adapter.family} model; use algorithm tome, turbo or crossget")


def feature_layer(model) -> int:
    """Index of the vision encoder layer whose output LLaVA hands to the projector."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise VlmCompressError(f"token_reduce: this model concatenates several vision feature layers "
                               f"({layer}); visionzip and prumerge need a single int vision_feature_layer")
    applied = layer % (config.vision_config.num_hidden_layers + 1)  # hidden_states[0] is the embedding output
    if applied == 0:
        raise VlmCompressError("token_reduce: vision_feature_layer selects the patch embeddings, before any encoder "
                               "layer; visionzip and prumerge reduce an encoder layer's output")
    return applied - 1


def _llm_layers_path(adapter) -> str:
    return adapter.component_paths["llm"] + ".layers"


def schedule(cfg, model, adapter) -> dict[str, Any]:
    """The checkpoint's `token_reduction` block for `cfg` (its tower says how many tokens remain after each layer)."""
    check_family(cfg.algorithm, adapter)
    if cfg.algorithm == "fastv":
        return _fastv_block(cfg, model, adapter)
    bad = [c for c in cfg.components if c != "vision"]
    if bad:
        raise VlmCompressError(f"token_reduce: algorithm {cfg.algorithm} reduces vision tokens, not {bad[0]}; use "
                               "components: [vision]")
    tower = adapter.vision_tower(model)
    layers = model.get_submodule(tower.layers_path)
    f = feature_layer(model)
    n, patches = tower.num_tokens, tower.num_tokens - 1
    data_dependent = False
    if cfg.algorithm == "visionzip":
        options = {"layer": f, **_visionzip_counts(cfg, patches), "keep_positions": bool(cfg.keep_positions)}
        after = 1 + options["dominant"] + options["contextual"]
    else:
        mode = cfg.mode or ("fixed" if cfg.keep_ratio is not None else "adaptive")
        options = {"layer": f, "mode": mode, "neighbours": cfg.neighbours, "plus": cfg.plus,
                   "extra_token": cfg.extra_token, "keep_positions": bool(cfg.keep_positions)}
        if mode == "fixed":
            total = keep_count(patches, cfg.keep_ratio)
            selected = max(1, total - int(cfg.extra_token))
            # PruMerge+ keeps about one outlier per three stride points
            outliers = max(1, math.floor(selected / 4 + 0.5)) if cfg.plus else selected
            options |= {"selected": selected, "outliers": outliers}
            after = 1 + selected + int(cfg.extra_token)
        else:
            data_dependent = True
            after = n  # at most (the count is chosen per batch at run time)
    removed = n - after if not data_dependent else 0
    r = [0] * len(layers)
    r[f] = max(0, removed)
    vision = {"component": "vision", "layers_path": tower.layers_path, "r": r, "requested_r": list(r),
              "class_token": True, "proportional_attention": False, "num_tokens": n,
              "tokens_per_layer": [n] * f + [after] * (len(layers) - f)}
    block = {"algorithm": cfg.algorithm, "options": options, "towers": [vision]}
    if data_dependent:
        block["data_dependent"] = True
        vision["data_dependent"] = True
    return block


def _visionzip_counts(cfg, patches: int) -> dict[str, int]:
    if cfg.keep_ratio is not None:
        total = keep_count(patches, cfg.keep_ratio)
        contextual = min(total - 1, math.floor(total * VISIONZIP_CONTEXTUAL_SHARE + 0.5)) if total > 1 else 0
        return {"dominant": total - contextual, "contextual": contextual}
    if cfg.dominant is None and cfg.contextual is None:
        return {"dominant": math.floor(patches * VISIONZIP_DEFAULT[0] + 0.5),
                "contextual": math.floor(patches * VISIONZIP_DEFAULT[1] + 0.5)}
    dominant, contextual = cfg.dominant or 0, cfg.contextual or 0
    if dominant + contextual > patches or dominant + contextual == 0:
        raise VlmCompressError(f"token_reduce: dominant + contextual = {dominant + contextual}, but the vision tower "
                               f"has {patches} patches; keep between 1 and {patches} tokens")
    return {"dominant": dominant, "contextual": contextual}


def _fastv_block(cfg, model, adapter) -> dict[str, Any]:
    bad = [c for c in cfg.components if c != "llm"]
    if bad:
        raise VlmCompressError(f"token_reduce: algorithm fastv drops image tokens inside the language model, not in "
                               f"the {bad[0]} tower; use components: [llm]")
    layers_path = _llm_layers_path(adapter)
    depth = len(model.get_submodule(layers_path))
    k = 2 if cfg.layer is None else cfg.layer
    if depth < 2:
        raise VlmCompressError(f"token_reduce: FastV needs a language model with at least 2 decoder layers (it keeps "
                               f"the first K and prunes the rest); this one has {depth}")
    if not 1 <= k < depth:
        raise VlmCompressError(f"token_reduce.layer: FastV drops image tokens after decoder layer K, which must be "
                               f"between 1 and {depth - 1} for this {depth}-layer language model; got {k}")
    ratio = 0.5 if cfg.keep_ratio is None else cfg.keep_ratio
    n = image_tokens(model)
    kept = keep_count(n, ratio)
    r = [0] * depth
    r[k - 1] = n - kept
    tower = {"component": "llm", "layers_path": layers_path, "inputs_path": adapter.component_paths["llm"]
             .rpartition(".")[0], "layer": k, "keep_ratio": ratio, "image_token_id": model.config.image_token_id,
             "num_tokens": n, "r": r, "tokens_per_layer": [n] * (k - 1) + [kept] * (depth - k + 1)}
    return {"algorithm": "fastv", "options": {"layer": k, "keep_ratio": ratio}, "towers": [tower]}


def image_tokens(model) -> int:
    """Image tokens per image in the language model's input (patches, plus CLS with the "full" strategy)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (0 if model.config.vision_feature_select_strategy == "default" else 1)


def plan(cfg, model, adapter) -> dict[str, Any]:
    """Tokens at the reduction point and GFLOPs estimates (one image + a 32-token prompt) before / after."""
    block = schedule(cfg, model, adapter)
    tower = block["towers"][0]
    n_image = image_tokens(model)
    drop_cls = n_image == tower["num_tokens"] - 1 if tower["component"] == "vision" else False
    llm_units = [u for u in adapter.attention_units(model) if u.component == "llm"]
    llm_mlps = [u for u in adapter.mlp_units(model) if u.component == "llm"]
    text = PROMPT_TEXT_TOKENS
    if tower["component"] == "llm":
        llm_before = [n_image + text] * len(llm_units)
        llm_after = [t + text for t in [n_image, *tower["tokens_per_layer"][:-1]]]  # entering each layer
        vision_gflops = None
    else:
        after_image = tower["tokens_per_layer"][block["options"]["layer"]] - int(drop_cls)
        llm_before = [n_image + text] * len(llm_units)
        llm_after = [after_image + text] * len(llm_units)
        units = [u for u in adapter.attention_units(model) if u.component == "vision"]
        mlps = [u for u in adapter.mlp_units(model) if u.component == "vision"]
        n0 = tower["num_tokens"]
        tokens_in = [n0, *tower["tokens_per_layer"][:-1]]
        vision_gflops = [round(encoder_gflops(model, units, mlps, [n0] * len(units)), 4),
                         round(encoder_gflops(model, units, mlps, tokens_in), 4)]
    llm_gflops = [round(encoder_gflops(model, llm_units, llm_mlps, llm_before), 4),
                  round(encoder_gflops(model, llm_units, llm_mlps, llm_after), 4)]
    out = {"algorithm": block["algorithm"], "options": block["options"], "component": tower["component"],
           "tokens": [tower["num_tokens"], tower["tokens_per_layer"][-1]],
           "tokens_per_layer": tower["tokens_per_layer"], "clamped_layers": [], "llm_prefill_gflops_estimate": llm_gflops,
           "data_dependent": bool(block.get("data_dependent"))}
    if vision_gflops is not None:
        out["vision_encoder_gflops_estimate"] = vision_gflops
    if block.get("data_dependent"):  # the "after" figures are upper bounds
        out["tokens"] = [tower["num_tokens"], f"at most {tower['num_tokens']}, chosen per batch at run time"]
    return out


def run(cfg, ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """Patch `ctx.model`; returns (the `token_reduction` block, the report details)."""
    block = schedule(cfg, ctx.model, ctx.adapter)
    tower = block["towers"][0]
    if block["algorithm"] == "fastv":
        apply_fastv(ctx.model, tower)
    else:
        patch_tower(ctx.model, tower, block["algorithm"], block["options"])
    tokens = [tower["num_tokens"], *tower["tokens_per_layer"]]
    details = {"algorithm": block["algorithm"], "options": block["options"],
               "towers": {tower["component"]: {"r": tower["r"], "clamped": {}, "tokens_per_layer": tokens}},
               "r": tower["r"], "tokens_per_layer": tokens, "clamped": {}}
    if block["algorithm"] == "fastv":
        details["llm_image_tokens"] = {"entering": tower["num_tokens"], "after_layer_k": tower["tokens_per_layer"][-1],
                                       "layer_k": tower["layer"]}
    if block.get("data_dependent"):
        details["data_dependent"] = ("adaptive: the number of image tokens is chosen per batch at run time (IQR "
                                     f"outliers of the CLS attention); at most {tower['num_tokens']} per image")
    return block, details
