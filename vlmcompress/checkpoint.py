"""Compressed checkpoints: a folder that stock transformers loads with `trust_remote_code=True`.

Layout: `config.json` (the stock `model_type`, the compressed class in `architectures` and `auto_map`, the pruning
record, `token_reduction` and `quantization` blocks),
`model*.safetensors`, the modeling files copied flat, `recipe.yaml` (resolved), `report.json`, `README.md` (model
card) and the source's processor files.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .modeling import modeling_vlmcompress as model_mod
from .modeling.spec import FORMAT_VERSION, CheckpointRecord, QuantizationSpec, TokenReductionSpec, token_reduction
from .versions import library_versions  # noqa: F401  (part of this module's interface)

# the blocks a compressed checkpoint's config carries (configuration_vlmcompress.py): the pruning record, the token
# reduction, the quantization; `auto_map` points at its code
RECORD_KEY, REDUCTION_KEY, QUANTIZATION_KEY = RECORD_KEYS = ("vlmcompress", "token_reduction", "quantization")

MODELING_DIR = Path(__file__).parent / "modeling"
ENTRY_FILE = "modeling_vlmcompress.py"
# the token-reduction algorithms' index; extended in a checkpoint whose algorithm is a plug-in (`modeling_files`)
ALGORITHM_INDEX = "algorithms.py"
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def _with_relative_imports(path: Path, found: dict[str, Path]) -> dict[str, Path]:
    """`path` and every sibling file it imports (`from .x import ...`, anywhere in the file), recursively; a plug-in's
    file outside the package finds its siblings beside it, or else among vlmcompress's modeling files."""
    if path.name in found:
        return found
    found[path.name] = path
    for name in _RELATIVE_IMPORT.findall(path.read_text()):
        sibling = path.parent / f"{name}.py"
        _with_relative_imports(sibling if sibling.is_file() else MODELING_DIR / f"{name}.py", found)
    return found


def modeling_files(algorithm: str | None) -> dict[str, str]:
    """`{file name: text}` of the modeling code a checkpoint ships: the entry file and every file it imports (with
    the index `algorithms.py`, every built-in algorithm's file), and, when the checkpoint's token-reduction
    `algorithm` is a registered plug-in, its file and what that imports, with the index extended to import it (so
    stock transformers' remote-code loader, which copies the files a module imports, finds it)."""
    import sys

    from .modeling.reduction import REDUCERS

    files = _with_relative_imports(MODELING_DIR / ENTRY_FILE, {})
    index = MODELING_DIR / ALGORITHM_INDEX
    files = _with_relative_imports(index, files)
    texts = {name: path.read_text() for name, path in sorted(files.items())}
    if algorithm is None or algorithm not in REDUCERS:
        return texts
    reducer = REDUCERS[algorithm]
    path = Path(sys.modules[(reducer.reduce or reducer.patch).__module__].__file__)
    if path.parent == MODELING_DIR and path.name in texts:
        return texts  # a built-in algorithm: the static index already imports it
    for name, source in _with_relative_imports(path, {}).items():
        texts.setdefault(name, source.read_text())
    built_in = texts[ALGORITHM_INDEX].replace("NAMES = (", f"NAMES = ({algorithm!r}, ")
    texts[ALGORITHM_INDEX] = built_in.replace("\nNAMES = ", f"\nfrom .{path.stem} import REDUCER as PLUG_IN  "
                                                             "# noqa: F401  (written by vlmcompress)\n\nNAMES = ", 1)
    return texts


def stock_class_name(model: nn.Module) -> str:
    name = model_mod.stock_class_name(model)
    if name is None:
        raise ModelLoadError(f"no compressed class for {type(model).__name__}")
    return name


def per_layer_summary(adapter, model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """`{"layer_num_heads": {component: [...]}, "layer_intermediate_sizes": {component: [...]}}` for people."""
    heads: dict[str, list[int]] = {}
    widths: dict[str, list[int]] = {}
    for unit in adapter.attention_units(model):
        q = unit.module.get_submodule(unit.qkv or unit.q)
        n = q.out_features // unit.head_dim // (3 if unit.qkv else 1)
        heads.setdefault(unit.component, []).append(n)
    for unit in adapter.mlp_units(model):
        widths.setdefault(unit.component, []).append(unit.module.get_submodule(unit.down).in_features)
    return {"layer_num_heads": heads, "layer_intermediate_sizes": widths}


def to_compressed(model: nn.Module, compression: dict[str, Any], adapter, base_model: str) -> nn.Module:
    """Turn `model` (already pruned / patched in place) into its compressed class with the record in its config.

    The class swap is safe: compressed classes only add construction steps (already done in place) and, for LLaVA,
    prompt shrinking. Returns the same object.
    """
    stock = stock_class_name(model)
    model_cls, config_cls, autos = model_mod.COMPRESSED_CLASSES[stock]
    import transformers

    stock_type = getattr(transformers, stock).config_class.model_type  # the config may already be compressed
    autos = tuple(dict.fromkeys((*autos, *task_auto_classes(stock, stock_type))))
    data = model.config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        data.pop(key, None)
    record = CheckpointRecord(format_version=FORMAT_VERSION, base_model=base_model,
                              param_shapes=compression["param_shapes"], module_attrs=compression["module_attrs"],
                              **per_layer_summary(adapter, model), versions=library_versions())
    data[RECORD_KEY] = record.to_dict()
    reduction = TokenReductionSpec.read(compression.get("token_reduction"))
    quantization = QuantizationSpec.read(compression.get("quantization"))
    data[REDUCTION_KEY] = None if reduction is None else reduction.to_dict()
    data[QUANTIZATION_KEY] = None if quantization is None else quantization.to_dict()
    config = config_cls.from_dict(data)
    config.architectures = [model_cls.__name__]
    config.auto_map = {"AutoConfig": f"configuration_vlmcompress.{config_cls.__name__}"}
    config.auto_map |= {auto: f"modeling_vlmcompress.{model_cls.__name__}" for auto in autos}
    config._attn_implementation = model.config._attn_implementation
    model.config = config
    model.__class__ = model_cls
    # a stock model loaded by from_pretrained remembers its legacy key renamings (e.g. LLaVA's
    # `language_model.lm_head`) and would re-apply them on save; the compressed model_type has no such mapping at
    # load time, so save with the module paths as they are
    model._weight_conversions = []
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "_from_model_config"):
        generation_config._from_model_config = False
    return model


def task_auto_classes(stock_class: str, model_type: str) -> tuple[str, ...]:
    """The transformers Auto classes that map `stock_class` for `model_type` (CLIPModel:
    AutoModelForZeroShotImageClassification; LLaVA: AutoModelForImageTextToText, ...), so that `auto_map` sends each
    of them, and the pipelines built on them, to the compressed class."""
    import transformers.models.auto.modeling_auto as auto

    found = []
    for name in sorted(dir(auto)):
        cls = getattr(auto, name)
        mapping = getattr(getattr(cls, "_model_mapping", None), "_model_mapping", None)
        if not (name.startswith("AutoModel") and isinstance(mapping, dict)):
            continue
        target = mapping.get(model_type)
        if target == stock_class or (isinstance(target, (tuple, list)) and stock_class in target):
            found.append(name)
    return tuple(found)


def compression_record(model: nn.Module) -> dict[str, Any]:
    """The pruning record, token-reduction and quantization blocks of a model (empty for an uncompressed model), so
    that compressing a compressed checkpoint further, or resuming from a stage checkpoint, keeps what was done
    before."""
    record = getattr(model.config, RECORD_KEY, None) or {}
    return {"param_shapes": dict(record.get("param_shapes", {})), "module_attrs": dict(record.get("module_attrs", {})),
            "token_reduction": getattr(model.config, REDUCTION_KEY, None),
            "quantization": getattr(model.config, QUANTIZATION_KEY, None)}


def save_checkpoint(model: nn.Module, folder: str | Path, *, recipe_yaml: str | None = None,
                    report: dict | None = None, processor: Any = None, card: str | None = None,
                    artifacts: dict[str, Path] | None = None) -> None:
    """Write a compressed model (see `to_compressed`) and everything beside it into `folder` (must not exist).

    `artifacts` maps a name inside `folder` to a file or folder that a stage wrote (e.g. `onnx/`); they are copied.
    """
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size="2GB")
    reduction = token_reduction(model.config)
    algorithm = None if reduction is None else reduction.algorithm
    for name, text in modeling_files(algorithm).items():
        (folder / name).write_text(text)
    if processor is not None:
        processor.save_pretrained(folder)
    if recipe_yaml is not None:
        (folder / "recipe.yaml").write_text(recipe_yaml)
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if card is not None:
        (folder / "README.md").write_text(card)
    for name, source in (artifacts or {}).items():
        source = Path(source)
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copyfile(source, folder / name)


def compressed_classes(config_dict: Any) -> tuple[type, type, tuple[str, ...]] | None:
    """`(model class, config class, Auto classes)` of the compressed checkpoint whose `config.json` holds
    `config_dict`, or None for anything else. Formats 1-2 name the compressed `model_type` (`vlmcompress_clip`);
    format 3 writes the stock one (`clip`) and is recognised by its `vlmcompress` block and compressed class in
    `architectures`."""
    if not isinstance(config_dict, dict):
        return None
    model_type = config_dict.get("model_type", "")
    architectures = config_dict.get("architectures") or []
    for entry in model_mod.COMPRESSED_CLASSES.values():
        model_cls, config_cls, _ = entry
        if model_type == config_cls.model_type:
            return entry
        if (model_type == config_cls.stock_model_type and isinstance(config_dict.get("vlmcompress"), dict)
                and model_cls.__name__ in architectures):
            return entry
    return None


def register_classes() -> None:
    """Register the compressed config / model classes with the transformers Auto classes (no remote code)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    autos = {"AutoModel": AutoModel, "AutoModelForImageTextToText": AutoModelForImageTextToText}
    for model_cls, config_cls, names in model_mod.COMPRESSED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for name in names:
            autos[name].register(config_cls, model_cls, exist_ok=True)


def is_compressed(config_dict: Any) -> bool:
    """Whether a `config.json`'s contents are a compressed checkpoint's (any format)."""
    return compressed_classes(config_dict) is not None


def load(folder: str | Path, dtype: str | torch.dtype | None = None, device_map: Any = None,
         meta: bool = False) -> nn.Module:
    """Load a vlmcompress checkpoint with the installed vlmcompress classes (never runs code from the folder).

    Args:
        folder: a folder written by `vlmcompress apply`, or the Hub id of one published by `vlmcompress push`
            (its data files are fetched into huggingface_hub's cache; its Python files never are).
        dtype: `"float32"`, `"bfloat16"`, a `torch.dtype`, or None for the checkpoint's dtype.
        device_map: passed to `from_pretrained` (e.g. `"auto"`, needs accelerate).
    """
    from .hub import looks_like_repo_id

    if not Path(folder).is_dir() and looks_like_repo_id(str(folder)):
        folder = _fetch(str(folder), meta)
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"'{folder}' has no config.json; expected a folder written by `vlmcompress apply`")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"'{config_file}' is not valid JSON ({e}); the checkpoint is corrupt") from None
    match = compressed_classes(config_dict)
    if match is None:
        model_type = config_dict.get("model_type", "") if isinstance(config_dict, dict) else ""
        raise ModelLoadError(f"'{folder}' has model_type '{model_type}' and no vlmcompress record, not a vlmcompress "
                             "checkpoint; load it with transformers directly")
    register_classes()
    model_cls, config_cls, _ = match
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if meta:
        config = config_cls.from_pretrained(folder)
        with torch.device("meta"):
            return model_cls._from_config(config).eval()
    try:
        model = model_cls.from_pretrained(folder, dtype=dtype, device_map=device_map).eval()
    except Exception as e:
        raise ModelLoadError(f"could not load '{folder}' ({str(e).splitlines()[0][:200]}); "
                             "the checkpoint may be incomplete or corrupt") from None
    quantization = getattr(model.config, "quantization", None)
    if quantization:
        from .cpu import detect
        from .stages.quantize.int8_paths import installed_paths, load_note

        note = load_note(quantization, detect(), installed_paths())
        if note:
            print(f"vlmcompress: {note}", file=sys.stderr)
    return model


def _fetch(repo_id: str, meta: bool) -> Path:
    from .hub import compressed_snapshot

    try:
        snapshot = compressed_snapshot(repo_id, is_compressed, config_only=meta)
    except ModelLoadError as e:
        raise ModelLoadError(f"'{repo_id}' is not a local folder; {e}") from None
    if snapshot is None:
        raise ModelLoadError(f"Hub id '{repo_id}' is a stock model, not a vlmcompress checkpoint (its config.json has "
                             "no vlmcompress record); load it with transformers, or compress it with a recipe")
    return snapshot
