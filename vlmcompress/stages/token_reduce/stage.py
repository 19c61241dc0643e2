"""The `token_reduce` stage and the base of every algorithm's config.

An algorithm is one file in this package (or a plug-in anywhere) holding a `TokenReduceConfig` subclass: its
`algorithm: Literal[...]`, its knobs with their defaults and validation, the components it reduces, and its planner
(`block`: the checkpoint's `token_reduction` block, from shapes only), registered by one `register_algorithm` call.
Its runtime half is one flat file of the shipped modeling code (`vlmcompress/modeling/<name>.py`), named by
`modeling_module`. The stage names no algorithm: it asks the chosen config class.

Recipes stay as they were: `algorithm:` picks the class (a discriminated union, `tome` when absent).
"""

from __future__ import annotations

import importlib
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_serializer

from ...errors import VlmCompressError
from ...modeling.spec import FIRST_VARIANT, TokenReductionSpec, TowerSpec
from ...schema import PluggableStageConfig
from ..base import RunContext, Stage, StageConfig, StageReport, count_params

NonNegInt = Annotated[int, Field(ge=0)]

ALGORITHMS: dict[str, type[TokenReduceConfig]] = {}


class TokenReduceConfig(PluggableStageConfig):
    """Reduce the number of tokens inside a tower's layers."""

    method: Literal["token_reduce"]
    algorithm: str = "tome"
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

    # what an algorithm declares (class attributes, not recipe keys)
    towers: ClassVar[tuple[str, ...]] = ("vision",)  # components it can reduce
    knobs: ClassVar[tuple[str, ...]] = ()  # its own keys, saved in the checkpoint block's `options`
    # the version of its computation this code runs (raised by a change of what it computes; see modeling/spec.py)
    variant: ClassVar[int] = FIRST_VARIANT
    # its runtime half: a dotted module (the built-ins: `vlmcompress.modeling.<name>`), or a plug-in's flat file,
    # loaded as part of vlmcompress's modeling package so that its `from .reduction import ...` resolves
    modeling_module: ClassVar[str] = ""
    modeling_file: ClassVar[str | None] = None

    choice_key: ClassVar[str] = "algorithm"
    choice_default: ClassVar[str] = "tome"
    registry: ClassVar[dict[str, type[StageConfig]]] = ALGORITHMS

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None}

    def algorithm_options(self) -> dict[str, Any]:
        """The knobs the reducing layers read at run time (saved in the checkpoint's token_reduction block)."""
        return {k: getattr(self, k) for k in self.knobs}

    def check_components(self, adapter) -> None:
        for component in self.components:
            if component not in self.towers:
                raise VlmCompressError(f"token_reduce: algorithm {self.algorithm} reduces {', '.join(self.towers)} "
                                       f"tokens, not {component}; remove {component!r} from components")

    # the planner: every algorithm implements `block`; `plan` and `details` have defaults in the layer-wise base

    def block(self, model, adapter) -> TokenReductionSpec:
        """The checkpoint's `token_reduction` block (shapes only): `self.spec(towers)` with one `TowerSpec` per
        reduced tower."""
        raise NotImplementedError

    def spec(self, towers: list[TowerSpec], **extra: Any) -> TokenReductionSpec:
        """The typed block of this algorithm with `towers`, its options and the variant it computes."""
        return TokenReductionSpec(algorithm=self.algorithm, towers=towers, options=self.algorithm_options(),
                                  variant=self.variant, **extra)

    def plan(self, model, adapter) -> dict[str, Any]:
        """What `validate` / `--dry-run` show: tokens per layer and GFLOPs estimates before / after."""
        raise NotImplementedError

    def details(self, block: TokenReductionSpec) -> dict[str, Any]:
        """The report's details for the applied `block` (tokens per layer per tower, clamped layers)."""
        towers = {}
        for tower in block.towers:
            requested = tower.requested_r or tower.r
            clamped = {str(i): {"requested": requested[i], "applied": tower.r[i]} for i in tower.clamped}
            towers[tower.component] = {"r": tower.r, "clamped": clamped,
                                       "tokens_per_layer": [tower.num_tokens, *tower.tokens_per_layer]}
        first = towers[block.towers[0].component]
        return {"algorithm": block.algorithm, "options": block.options, "towers": towers, "r": first["r"],
                "tokens_per_layer": first["tokens_per_layer"], "clamped": first["clamped"]}


def register_algorithm(config_cls: type[TokenReduceConfig]) -> type[TokenReduceConfig]:
    """Register a token-reduction algorithm: its config class (a `TokenReduceConfig` subclass whose `algorithm` is a
    one-value `Literal`) and, through `modeling_module` or `modeling_file`, its runtime reducer. Checked: a name is
    taken once, and the runtime must register a reducer of that name (a plug-in's `modeling_file` is loaded now; a
    built-in module when the algorithm is first used, so that listing methods needs no torch). Usable as a
    decorator."""
    if isinstance(config_cls, type) and bool(getattr(config_cls, "modeling_module", "")) == bool(
            getattr(config_cls, "modeling_file", None)):
        raise VlmCompressError(f"{config_cls.__name__} needs exactly one of modeling_module (a dotted module) and "
                               "modeling_file (a path): where its reducer is")
    TokenReduceConfig.register_choice(config_cls, "token-reduction algorithm")
    if config_cls.modeling_file:
        load_runtime(config_cls)
    return config_cls


def load_runtime(config_cls: type[TokenReduceConfig]) -> None:
    """Import the algorithm's runtime file (which registers its reducer) and check that it did."""
    from ...modeling.reduction import REDUCERS

    name = typing.get_args(config_cls.model_fields["algorithm"].annotation)[0]
    if name in REDUCERS:
        return
    if config_cls.modeling_file:
        import sys
        from importlib import util
        from pathlib import Path

        path = Path(config_cls.modeling_file)
        module_name = f"vlmcompress.modeling.{path.stem}"
        spec = util.spec_from_file_location(module_name, path)
        if spec is None or not path.is_file():
            raise VlmCompressError(f"{config_cls.__name__}.modeling_file '{path}' is not a Python file")
        module = util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        where = str(path)
    else:
        importlib.import_module(config_cls.modeling_module)
        where = config_cls.modeling_module
    if name not in REDUCERS:
        raise VlmCompressError(f"{where} registers no reducer named {name!r}; end it with "
                               f"REDUCER = register_reducer(Reducer({name!r}, ...))")


class TokenReduceStage(Stage):
    """Token reduction inside the layers of a model (ToMe, Turbo, CrossGET, FastV, VisionZip, PruMerge, plug-ins)."""

    changes_architecture = True
    reduces_tokens = True

    def check(self, model, adapter) -> None:
        load_runtime(type(self.config))
        self.config.block(model, adapter)

    def plan(self, model, adapter) -> dict[str, Any]:
        return self.config.plan(model, adapter)

    def run(self, ctx: RunContext) -> StageReport:
        from ...modeling.reduction import apply_token_reduction

        load_runtime(type(self.config))

        if ctx.compression.get("token_reduction"):
            raise VlmCompressError("the model already has token reduction; use one token_reduce stage per model")
        block = self.config.block(ctx.model, ctx.adapter)
        apply_token_reduction(ctx.model, block)
        ctx.compression["token_reduction"] = block.to_dict()
        params = count_params(ctx.model)
        return StageReport(method="token_reduce", matched=[t.layers_path for t in block.towers],
                           params_before=params, params_after=count_params(ctx.model),
                           details=self.config.details(block))
