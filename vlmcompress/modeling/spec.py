"""The checkpoint's records, typed: the one contract between the stages that write them, `config.json`, and the
modeling code that rebuilds the model from them.

Three records live in a compressed checkpoint's `config.json`, each a plain JSON block:

    `vlmcompress`      `CheckpointRecord`: format version, base model, the pruning record, per-layer widths.
    `token_reduction`  `TokenReductionSpec`: the algorithm, its options, its variant, one `TowerSpec` per tower.
    `quantization`     `QuantizationSpec`: schemes per component and per quantized layer its tensors.

Every reader goes through `from_dict`, which checks each key's type and refuses keys it does not know (a config may
change shapes and settings, never set arbitrary attributes); every writer through `to_dict`, which leaves out
fields at their "absent" value so that the JSON stays as short as it was.

Versions: `FORMAT_VERSION` 2 adds `variant` to the token-reduction block: the version of the algorithm's computation
that produced the checkpoint. A fix that changes what an algorithm computes (the fidelity work) raises that
algorithm's variant and keeps the old computation reachable, so that a checkpoint written before the fix computes
what it computed then. A version 1 checkpoint has no `variant` and reads as variant 1 of every algorithm. Blocks are
otherwise unchanged from version 1, so version 1 checkpoints load as they are. `FORMAT_VERSION` 3 writes the stock
family's `model_type` into `config.json` (`clip`, `llava`, ...; versions 1-2 wrote `vlmcompress_clip`, ...) so that
stock clients resolve the processor and tokenizer without remote code; a compressed checkpoint is recognised by its
`vlmcompress` block and its `architectures`. The blocks are unchanged.

Pure Python on purpose (no torch): the stages import it to validate recipes, and it travels with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

FORMAT_VERSION = 3
# the `quantization` block has its own version (unchanged by format 2)
QUANTIZATION_FORMAT = 1
# the variant a block without one was written with: everything before `variant` existed
FIRST_VARIANT = 1


# the module attributes a pruning record may set (head counts and widths that structured pruning rewrites): a
# closed list, so that a checkpoint's config can change shapes and settings, never arbitrary attributes
SHAPE_ATTRIBUTES = frozenset({"num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size",
                              "intermediate_size", "embed_dim"})


class SpecError(ValueError):
    """A checkpoint record that does not follow its schema (a ValueError: the modeling code needs nothing else)."""


def _check_path(path: Any, where: str) -> None:
    """A dotted path of plain names (`a.b.0.c`): no private or dunder parts, nothing but identifiers and indices."""
    parts = path.split(".") if isinstance(path, str) else None
    if not parts or any(not (p.isidentifier() or p.isdigit()) or p.startswith("_") for p in parts):
        raise SpecError(f"{where}: {path!r} is not a dotted path of module names (private and dunder names are not "
                        "allowed); this checkpoint was not written by vlmcompress or was edited by hand")


def _check(value: Any, kind: Any, where: str) -> Any:
    """`value` if it has the JSON type `kind` (`int`, `float`, `str`, `bool`, `list`, `dict` or a tuple of them)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise SpecError(f"{where} must be {names}, got {type(value).__name__} {value!r}; the checkpoint's "
                        "config.json was edited by hand or is corrupt")
    return value


class Record:
    """`to_dict` / `from_dict` for a dataclass of JSON values; `TYPES` gives each field's JSON type, `NESTED` the
    fields that hold another record (or a list / dict of them)."""

    TYPES: ClassVar[dict[str, Any]] = {}
    NESTED: ClassVar[dict[str, type]] = {}
    NAME: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.metadata.get("omit_default") and value == _default(f)):
                continue
            out[f.name] = _dump(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None):
        where = where or cls.NAME
        _check(data, dict, where)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"{where} has unknown key(s) {unknown} (known: {sorted(names)}); the checkpoint was "
                            "written by a newer vlmcompress (pip install -U vlmcompress) or edited by hand")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SpecError(f"{where} lacks the key {f.name!r}; the checkpoint's config.json is incomplete")
                continue
            value = data[f.name]
            key = f"{where}.{f.name}"
            if value is None:
                values[f.name] = None
            elif f.name in cls.NESTED:
                values[f.name] = _load(cls.NESTED[f.name], value, key, cls.TYPES.get(f.name))
            else:
                values[f.name] = _check(value, cls.TYPES.get(f.name, object), key)
        return cls(**values)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load(record: type, value: Any, where: str, container: Any) -> Any:
    if container is list:
        return [record.from_dict(v, f"{where}[{i}]") for i, v in enumerate(_check(value, list, where))]
    if container is dict:
        return {k: record.from_dict(v, f"{where}.{k}") for k, v in _check(value, dict, where).items()}
    return record.from_dict(value, where)


# ----------------------------------------------------------------------------------------------------------------
# token reduction


@dataclass
class TextTowerSpec(Record):
    """How a text tower pools, so that reduction keeps the pooled token: `eot` is `"eos"` (the first
    `eos_token_id`), `"argmax"` (the largest id: legacy CLIP configs) or `"last"` (SigLIP)."""

    causal: bool
    eot: str
    eos_token_id: int | None = None

    TYPES = {"causal": bool, "eot": str, "eos_token_id": int}
    NAME = "token_reduction tower text"


@dataclass
class TowerSpec(Record):
    """One reduced tower. `r[i]` tokens leave in layer i (as applied; `requested_r` as asked, before clamping);
    `num_tokens` enter the first layer and `tokens_per_layer[i]` leave layer i.

    `kind` names a tower that is not a stack of encoder layers and is patched by the algorithm's own patcher (Turbo's
    image-token pruning in BLIP's text encoder); `hook_path` is the module whose forward starts a pass (default: the
    layers' parent); `text` describes a text tower. FastV's tower (the language model's decoder layers) also records
    its `layer` K, `keep_ratio`, the `image_token_id` and the module (`inputs_path`) whose inputs locate the image
    tokens. `data_dependent`: the counts are upper bounds, chosen per image at run time.
    """

    component: str
    layers_path: str
    num_tokens: int
    r: list[int]
    tokens_per_layer: list[int]
    requested_r: list[int] | None = None
    class_token: bool | None = None
    proportional_attention: bool | None = None
    kind: str | None = None
    hook_path: str | None = None
    text: TextTowerSpec | None = None
    data_dependent: bool = field(default=False, metadata={"omit_default": True})
    inputs_path: str | None = None
    layer: int | None = None
    keep_ratio: float | None = None
    image_token_id: int | None = None

    TYPES = {"component": str, "layers_path": str, "num_tokens": int, "r": list, "tokens_per_layer": list,
             "requested_r": list, "class_token": bool, "proportional_attention": bool, "kind": str, "hook_path": str,
             "data_dependent": bool, "inputs_path": str, "layer": int, "keep_ratio": float, "image_token_id": int}
    NESTED = {"text": TextTowerSpec}
    NAME = "token_reduction tower"

    @classmethod
    def read(cls, tower: dict[str, Any] | TowerSpec) -> TowerSpec:
        """The typed tower, from a block's dict (or already typed)."""
        return tower if isinstance(tower, TowerSpec) else cls.from_dict(tower)

    @property
    def tokens_in(self) -> list[int]:
        """Tokens entering each layer: `[num_tokens, tokens_per_layer[0], ..., tokens_per_layer[-2]]`."""
        return [self.num_tokens, *self.tokens_per_layer[:-1]]

    @property
    def clamped(self) -> list[int]:
        """Layers where fewer tokens left than were asked for."""
        return [i for i, (a, b) in enumerate(zip(self.r, self.requested_r or self.r)) if a < b]


@dataclass
class TokenReductionSpec(Record):
    """The `token_reduction` block: which algorithm (and which `variant` of its computation), its options, its
    towers. `data_dependent`: some tower's token count is chosen per image at run time."""

    algorithm: str
    towers: list[TowerSpec]
    options: dict[str, Any] = field(default_factory=dict)
    variant: int = FIRST_VARIANT
    data_dependent: bool = field(default=False, metadata={"omit_default": True})

    TYPES = {"algorithm": str, "towers": list, "options": dict, "variant": int, "data_dependent": bool}
    NESTED = {"towers": TowerSpec}
    NAME = "token_reduction"

    def tower(self, component: str, kind: str | None = None) -> TowerSpec | None:
        """The tower of `component` (of that `kind`: None for the tower's own tokens), or None."""
        found = [t for t in self.towers if t.component == component and t.kind == kind]
        return found[0] if found else None

    @classmethod
    def read(cls, block: dict[str, Any] | TokenReductionSpec | None) -> TokenReductionSpec | None:
        """The typed block, from a config's `token_reduction` (a dict, already typed, or None: no reduction)."""
        if block is None or isinstance(block, TokenReductionSpec):
            return block
        if not block:
            return None
        data = dict(block)
        data.setdefault("variant", FIRST_VARIANT)  # version 1 blocks have none
        return cls.from_dict(data)


def token_reduction(config) -> TokenReductionSpec | None:
    """The typed `token_reduction` block of a (compressed) config, or None."""
    return TokenReductionSpec.read(getattr(config, "token_reduction", None))


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint's own record


@dataclass
class CheckpointRecord(Record):
    """The `vlmcompress` block: `param_shapes` / `module_attrs` are the pruning record that `shapes.py` replays
    (shapes and a few integer attributes, nothing else); `layer_num_heads` / `layer_intermediate_sizes` per
    component are for people; `versions` lists the libraries that wrote the checkpoint."""

    format_version: int
    base_model: str | None = None
    param_shapes: dict[str, list[int]] = field(default_factory=dict)
    module_attrs: dict[str, dict[str, int]] = field(default_factory=dict)
    layer_num_heads: dict[str, list[int]] = field(default_factory=dict)
    layer_intermediate_sizes: dict[str, list[int]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    TYPES = {"format_version": int, "base_model": str, "param_shapes": dict, "module_attrs": dict,
             "layer_num_heads": dict, "layer_intermediate_sizes": dict, "versions": dict}
    NAME = "vlmcompress"

    @classmethod
    def read(cls, block: dict[str, Any] | None) -> CheckpointRecord:
        record = cls.from_dict(block) if block else cls(format_version=FORMAT_VERSION)
        if record.format_version > FORMAT_VERSION:
            raise SpecError(f"this checkpoint's format is version {record.format_version}, newer than this "
                            f"modeling code (version {FORMAT_VERSION}); upgrade: pip install -U vlmcompress")
        for name, shape in record.param_shapes.items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise SpecError(f"vlmcompress.param_shapes[{name!r}] must be a list of sizes, got {shape!r}")
        for name in record.param_shapes:
            _check_path(name, f"vlmcompress.param_shapes[{name!r}]")
        for name, attrs in record.module_attrs.items():
            _check_path(name, f"vlmcompress.module_attrs[{name!r}]")
            if not (isinstance(attrs, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                    for v in attrs.values())):
                raise SpecError(f"vlmcompress.module_attrs[{name!r}] must map attribute names to positive integers, "
                                f"got {attrs!r}")
            for attr in attrs:
                _check_path(attr, f"vlmcompress.module_attrs[{name!r}][{attr!r}]")
                if attr.rpartition(".")[2] not in SHAPE_ATTRIBUTES:
                    raise SpecError(f"vlmcompress.module_attrs[{name!r}]: {attr!r} is not an attribute structured "
                                    f"pruning sets (allowed: {', '.join(sorted(SHAPE_ATTRIBUTES))}); this checkpoint "
                                    "was not written by vlmcompress or was edited by hand")
        return record


# ----------------------------------------------------------------------------------------------------------------
# quantization


@dataclass
class QuantSchemeSpec(Record):
    """How one component's layers are quantized: the backend, the scheme, its options, the measured CPU speed."""

    backend: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)
    cpu_speed: str | None = None

    TYPES = {"backend": str, "scheme": str, "options": dict, "cpu_speed": str}
    NAME = "quantization scheme"


@dataclass
class QuantModuleSpec(Record):
    """One quantized linear layer: its component's `scheme`, its shape, and the name → (shape, dtype) of every
    tensor it stores (integer data, scales, zero points, bias)."""

    scheme: str
    in_features: int
    out_features: int
    dtype: str
    tensors: dict[str, list] = field(default_factory=dict)
    bias: bool | None = None

    TYPES = {"scheme": str, "in_features": int, "out_features": int, "dtype": str, "tensors": dict, "bias": bool}
    NAME = "quantization module"


@dataclass
class QuantizationSpec(Record):
    """The `quantization` block (not `quantization_config`, which transformers would hand to its own
    quantizers)."""

    format_version: int
    schemes: dict[str, QuantSchemeSpec] = field(default_factory=dict)
    modules: dict[str, QuantModuleSpec] = field(default_factory=dict)
    compile: list[str] = field(default_factory=list)
    requested: dict[str, Any] | None = None
    resolved: dict[str, Any] | None = None
    library_version: str | None = None

    TYPES = {"format_version": int, "schemes": dict, "modules": dict, "compile": list, "requested": dict,
             "resolved": dict, "library_version": str}
    NESTED = {"schemes": QuantSchemeSpec, "modules": QuantModuleSpec}
    NAME = "quantization"

    @classmethod
    def read(cls, block: dict[str, Any] | QuantizationSpec | None) -> QuantizationSpec | None:
        """The typed block (None: not quantized); refuses a block newer than `QUANTIZATION_FORMAT`."""
        if block is None or isinstance(block, QuantizationSpec):
            return block
        if not block:
            return None
        spec = cls.from_dict(block)
        if spec.format_version > QUANTIZATION_FORMAT:
            raise SpecError(f"this checkpoint's quantization format is version {spec.format_version}, newer than "
                            f"this modeling code (version {QUANTIZATION_FORMAT}); upgrade: pip install -U vlmcompress")
        return spec
