"""`token_reduce`: merge or drop tokens inside the encoder layers; the reducing layers ship in the checkpoint.

Per-layer algorithms (after each layer's attention residual, before its MLP; at most half of the tokens go per
layer, a larger `r` is clamped and the clamp recorded per layer in the report):
- `tome` (Bolya et al., ICLR 2023): bipartite soft matching on the keys averaged over heads, size-weighted merging,
  proportional attention, CLS never merged.
- `turbo` (Ju et al., ECCV 2024): ToMe's matching with tokens ranked by redundancy minus `alpha`-weighted CLS
  attention (informativity), `beta` / `gamma` shape the weight over layers, no merging once fewer than
  `r_threshold` tokens are left. On BLIP, `components: [vision, text]` also prunes the image tokens inside the text
  encoder: after text layer i only the `max(N0 · text_min_keep, (1 − text_step · (i + 1)) · N0)` image tokens that
  received the most cross-attention go on (`modeling/cross_pruning.py`).
- `crossget` (Shi et al., ICML 2024): complete-graph matching guided by a cross token (a per-layer parameter,
  zero-initialised until a training stage learns it), importance-weighted ensemble, order kept; also on the text
  towers of CLIP and SigLIP (the end-of-text token protected, padding never merged into text).

Visual-token reduction for LLaVA-style models (`llava_reduce.py`): `fastv` drops image tokens inside the language
model after decoder layer `layer`; `visionzip` and `prumerge` reduce the output of the vision encoder's feature
layer; `keep_ratio` is the fraction of the image tokens kept at that point.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_serializer, model_validator

from ..adapters.base import encoder_gflops
from ..errors import VlmCompressError
from ..modeling.cross_pruning import KIND as CROSS_PRUNING
from ..modeling.reduction import patch_tower
from ..modeling.token_ops import cross_attention_keep_counts, parse_r, r_for_keep_ratio, token_schedule
from ..registry import register_method
from . import llava_reduce
from .base import RunContext, Stage, StageConfig, StageReport, count_params

NonNegInt = Annotated[int, Field(ge=0)]
# knobs that belong to one algorithm: filled with these defaults when that algorithm is chosen, must stay unset
# otherwise, and are left out of the resolved recipe when unset
ALGORITHM_KNOBS: dict[str, dict[str, Any]] = {
    "turbo": {"alpha": 5.0, "beta": 1.0, "gamma": 0.0, "r_threshold": 0, "text_step": 0.07, "text_min_keep": 0.2},
    "fastv": {"layer": 2},
    "visionzip": {"dominant": None, "contextual": None, "keep_positions": False},  # None: from keep_ratio / default
    # mode None: from keep_ratio
    "prumerge": {"mode": None, "neighbours": 32, "plus": False, "extra_token": True, "keep_positions": False},
}
# which towers each algorithm can reduce
TOWERS = {"tome": ("vision",), "turbo": ("vision", "text"), "crossget": ("vision", "text"), "fastv": ("llm",),
          "visionzip": ("vision",), "prumerge": ("vision",)}


class TokenReduceConfig(StageConfig):
    """Reduce the number of tokens inside a tower's layers."""

    method: Literal["token_reduce"]
    algorithm: Literal["tome", "turbo", "crossget", "fastv", "visionzip", "prumerge"] = "tome"
    r: NonNegInt | list[NonNegInt] | tuple[NonNegInt, float] | None = Field(
        None, description="tokens removed per layer: an int, [r, inflect] (a linear ramp) or a per-layer list "
                          "(8 unless keep_ratio is given)"
    )
    keep_ratio: float | None = Field(None, gt=0.0, le=1.0,
                                     description="fraction of the tokens left after the last layer (a constant r "
                                                 "is chosen to hit it); instead of r. fastv / visionzip / prumerge: "
                                                 "fraction of the image tokens kept at the reduction point")
    components: list[Literal["vision", "text", "llm"]] = Field(["vision"], min_length=1,
                                                             description="towers to reduce (fastv: [llm])")
    proportional_attention: bool = Field(True, description="weight attention by merged-token sizes (log size bias)")
    alpha: float | None = Field(None, ge=0.0, description="turbo: weight of the CLS attention (default 5)")
    beta: float | None = Field(None, gt=0.0,
                               description="turbo: the weight is scaled by beta ** |gamma - merging layer| (default 1)")
    gamma: float | None = Field(None, ge=0.0, description="turbo: the merging layer where that scale peaks (default 0)")
    r_threshold: NonNegInt | None = Field(None, description="turbo: layers entered by fewer tokens merge nothing "
                                                            "(default 0)")
    text_step: float | None = Field(None, ge=0.0, lt=1.0,
                                    description="turbo, BLIP text: fraction of the image tokens dropped after each "
                                                "text layer (default 0.07)")
    text_min_keep: float | None = Field(None, gt=0.0, le=1.0,
                                        description="turbo, BLIP text: fraction of the image tokens always kept "
                                                    "(default 0.2)")
    layer: Annotated[int, Field(ge=1)] | None = Field(
        None, description="fastv: drop image tokens after this decoder layer K, ranked by layer K's attention (default 2)")
    dominant: NonNegInt | None = Field(None, description="visionzip: patches kept by CLS attention")
    contextual: NonNegInt | None = Field(None, description="visionzip: tokens merged from the other patches")
    mode: Literal["adaptive", "fixed"] | None = Field(
        None, description="prumerge: adaptive (IQR outliers, count chosen per batch) or fixed (keep_ratio); default "
                          "fixed when keep_ratio is given, else adaptive")
    neighbours: NonNegInt | None = Field(None, description="prumerge: key-similar patches each kept patch absorbs "
                                                           "(default 32)")
    plus: bool | None = Field(None, description="prumerge: PruMerge+ (add patches on a uniform stride)")
    keep_positions: bool | None = Field(
        None, description="visionzip / prumerge: the kept image tokens keep the position ids they had in the full "
                          "prompt, in their original order (an addition to the papers, which close the gaps; default "
                          "false)")
    extra_token: bool | None = Field(None, description="prumerge: add one token summing the dropped patches "
                                                       "(default true)")

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        llava = data.get("algorithm") in llava_reduce.LLAVA_ALGORITHMS
        if data.get("r") is None and data.get("keep_ratio") is None and not llava:
            data["r"] = 8
        if data.get("algorithm") == "fastv" and data.get("components") is None:
            data["components"] = ["llm"]
        for key, default in ALGORITHM_KNOBS.get(data.get("algorithm", "tome"), {}).items():
            if data.get(key) is None:
                data[key] = default
        return data

    @model_validator(mode="after")
    def _check_knobs(self):
        if self.r is not None and self.keep_ratio is not None:
            raise ValueError("give either r or keep_ratio, not both")
        own = ALGORITHM_KNOBS.get(self.algorithm, {})
        stray = [k for knobs in ALGORITHM_KNOBS.values() for k in knobs if k not in own and getattr(self, k) is not None]
        if stray:
            raise ValueError(f"{', '.join(dict.fromkeys(stray))} do not apply to algorithm: {self.algorithm}")
        return self

    @model_validator(mode="after")
    def _check_llava_knobs(self):
        if self.algorithm in llava_reduce.LLAVA_ALGORITHMS and self.r is not None:
            raise ValueError(f"r does not apply to algorithm: {self.algorithm}; give keep_ratio (the fraction of "
                             "image tokens kept)")
        if self.algorithm == "visionzip" and self.keep_ratio is not None and (self.dominant or self.contextual):
            raise ValueError("give either keep_ratio or dominant / contextual, not both")
        if self.algorithm == "prumerge" and self.mode == "adaptive" and self.keep_ratio is not None:
            raise ValueError("prumerge mode: adaptive chooses the count itself; drop keep_ratio or use mode: fixed")
        if self.algorithm == "prumerge" and self.mode == "fixed" and self.keep_ratio is None:
            raise ValueError("prumerge mode: fixed needs keep_ratio (the fraction of image tokens kept)")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None}

    def algorithm_options(self) -> dict[str, Any]:
        """The knobs the reducing layers read at run time (saved in the checkpoint's token_reduction block)."""
        return {k: getattr(self, k) for k in ALGORITHM_KNOBS.get(self.algorithm, {})}


def cross_pruning_entry(model, tower, num_tokens: int, step: float, min_keep: float) -> dict[str, Any]:
    """The checkpoint entry of Turbo's image-token pruning in a text encoder: `num_tokens` image tokens enter, the
    counts after each layer follow `cross_attention_keep_counts`, except after the last layer (nothing reads them)."""
    num_layers = len(model.get_submodule(tower.layers_path))
    keep = cross_attention_keep_counts(num_tokens, num_layers, step, min_keep)[:num_layers - 1]
    tokens = [*keep, keep[-1] if keep else num_tokens]
    r = [a - b for a, b in zip([num_tokens, *tokens], tokens)]
    return {"component": "text", "kind": CROSS_PRUNING, "layers_path": tower.layers_path,
            "hook_path": tower.hook_path, "r": r, "requested_r": r, "class_token": True, "num_tokens": num_tokens,
            "tokens_per_layer": tokens}


class TokenReduceStage(Stage):
    """Token reduction inside encoder layers (ToMe, Turbo, CrossGET)."""

    changes_architecture = True

    def towers(self, model, adapter) -> list[tuple[str, Any]]:
        algorithm = self.config.algorithm
        out = []
        for component in dict.fromkeys(self.config.components):
            if component not in TOWERS[algorithm]:
                raise VlmCompressError(f"token_reduce: algorithm {algorithm} reduces {', '.join(TOWERS[algorithm])} "
                                       f"tokens, not {component}; remove {component!r} from components")
            if algorithm == "turbo" and component == "text":
                tower = adapter.cross_attention_tower(model)
                if tower is None:
                    raise VlmCompressError(f"token_reduce: algorithm turbo reduces vision tokens, not text, on "
                                           f"{adapter.family} (its text side prunes image tokens in BLIP's "
                                           "cross-attention); use components: [vision]")
                out.append((component, tower))
                continue
            tower = adapter.vision_tower(model) if component == "vision" else adapter.text_tower(model)
            if tower is None:
                raise VlmCompressError(f"token_reduce: the {adapter.family} adapter has no {component} tower that "
                                       f"{algorithm} supports (text towers: CLIP and SigLIP); use components: "
                                       "[vision]")
            out.append((component, tower))
        return out

    def schedule(self, model, adapter) -> list[dict[str, Any]]:
        cfg = self.config
        result, cross = [], []
        for component, tower in self.towers(model, adapter):
            if cfg.algorithm == "turbo" and component == "text":
                cross.append(tower)  # after the vision tower: it reads the vision tower's output
                continue
            num_layers = len(model.get_submodule(tower.layers_path))
            # protected tokens besides the cross token (which CrossGET adds and protects itself)
            protected = 2 if tower.text is not None else int(tower.class_token)
            min_tokens = cfg.r_threshold if cfg.algorithm == "turbo" else 0
            if cfg.keep_ratio is not None:
                r = r_for_keep_ratio(tower.num_tokens, num_layers, cfg.keep_ratio, protected, min_tokens)
            else:
                r = cfg.r
            try:
                requested = parse_r(num_layers, r)
            except (ValueError, TypeError) as e:
                raise VlmCompressError(f"token_reduce.r: {e}") from None
            effective, tokens = token_schedule(tower.num_tokens, requested, protected, min_tokens)
            entry = {"component": component, "layers_path": tower.layers_path, "r": effective,
                     "requested_r": requested, "class_token": tower.class_token,
                     "proportional_attention": cfg.proportional_attention, "num_tokens": tower.num_tokens,
                     "tokens_per_layer": tokens}
            if tower.text is not None:
                entry |= {"text": tower.text, "hook_path": tower.hook_path}
            result.append(entry)
        for tower in cross:
            vision = [e for e in result if e["component"] == "vision"]
            n0 = vision[0]["tokens_per_layer"][-1] if vision else tower.num_tokens
            result.append(cross_pruning_entry(model, tower, n0, cfg.text_step, cfg.text_min_keep))
        return result

    def check(self, model, adapter) -> None:
        if self.config.algorithm in llava_reduce.LLAVA_ALGORITHMS:
            llava_reduce.schedule(self.config, model, adapter)
            return
        self.schedule(model, adapter)

    def plan(self, model, adapter) -> dict[str, Any]:
        if self.config.algorithm in llava_reduce.LLAVA_ALGORITHMS:
            return llava_reduce.plan(self.config, model, adapter)
        plan: dict[str, Any] = {"algorithm": self.config.algorithm}
        for s in self.schedule(model, adapter):
            n0 = s["num_tokens"]
            if s.get("kind") == CROSS_PRUNING:
                plan |= {"text_image_tokens": [n0, s["tokens_per_layer"][-1]],
                         "text_image_tokens_per_layer": s["tokens_per_layer"]}
                continue
            units = [u for u in adapter.attention_units(model) if u.component == s["component"]]
            mlps = [u for u in adapter.mlp_units(model) if u.component == s["component"]]
            tokens_in = [n0, *s["tokens_per_layer"][:-1]]
            before = encoder_gflops(model, units, mlps, [n0] * len(tokens_in))
            after = encoder_gflops(model, units, mlps, tokens_in)
            clamped = [i for i, (a, b) in enumerate(zip(s["r"], s["requested_r"])) if a < b]
            prefix = "" if s["component"] == "vision" else f"{s['component']}_"
            plan |= {f"{prefix}tokens": [n0, s["tokens_per_layer"][-1]],
                     f"{prefix}tokens_per_layer": s["tokens_per_layer"], f"{prefix}clamped_layers": clamped,
                     f"{s['component']}_encoder_gflops_estimate": [round(before, 4), round(after, 4)]}
        return plan

    def run(self, ctx: RunContext) -> StageReport:
        if ctx.compression.get("token_reduction"):
            raise VlmCompressError("the model already has token reduction; use one token_reduce stage per model")
        if self.config.algorithm in llava_reduce.LLAVA_ALGORITHMS:
            params = count_params(ctx.model)
            ctx.compression["token_reduction"], details = llava_reduce.run(self.config, ctx)
            return StageReport(method="token_reduce", matched=[ctx.compression["token_reduction"]["towers"][0]
                                                              ["layers_path"]],
                               params_before=params, params_after=count_params(ctx.model), details=details)
        towers = self.schedule(ctx.model, ctx.adapter)
        options = self.config.algorithm_options()
        for tower in towers:
            patch_tower(ctx.model, tower, self.config.algorithm, options)
        ctx.compression["token_reduction"] = {"algorithm": self.config.algorithm, "options": options,
                                              "towers": towers}
        params = count_params(ctx.model)
        details: dict[str, Any] = {"algorithm": self.config.algorithm, "options": options, "towers": {}}
        for tower in towers:
            clamped = {str(i): {"requested": b, "applied": a}
                       for i, (a, b) in enumerate(zip(tower["r"], tower["requested_r"])) if a < b}
            details["towers"][tower["component"]] = {"r": tower["r"], "clamped": clamped,
                                                     "tokens_per_layer": [tower["num_tokens"],
                                                                          *tower["tokens_per_layer"]]}
        first = details["towers"][towers[0]["component"]]
        details |= {"r": first["r"], "tokens_per_layer": first["tokens_per_layer"], "clamped": first["clamped"]}
        return StageReport(method="token_reduce", matched=[t["layers_path"] for t in towers], params_before=params,
                           params_after=count_params(ctx.model), details=details)


register_method("token_reduce", TokenReduceConfig, TokenReduceStage)
