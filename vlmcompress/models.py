"""Resolve a recipe's `model:` into a model (and its processor).

Order: an existing local folder (an ONNX export written by the quantize stage's `onnxruntime` backend, which runs
with ONNX Runtime, or a `save_pretrained` folder), then a built-in name (`tiny-clip`, ...), then a Hub id. Remote
code of the *source* model runs only when the recipe sets `trust_remote_code: true`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ADAPTERS, BUILTIN_TINY
from .errors import ModelLoadError, UnsupportedModelError, closest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STOCK_CLASSES = tuple(c for a in ADAPTERS for c in a.stock_classes)


def builtin_names() -> list[str]:
    from .zoo import ZOO

    return sorted(BUILTIN_TINY) + sorted(ZOO)


def load_model(
    name: str, dtype: str = "float32", trust_remote_code: bool = False, meta: bool = False
) -> tuple[nn.Module, Any]:
    """Load `name` as `(model, processor or None)`; `meta=True` builds it on the meta device without weights, from
    configs only: a check, which reads no weights, writes nothing and runs no code of the model's own."""
    if meta:
        trust_remote_code = False
    path = Path(name)
    try:
        path.is_dir()
    except OSError as e:  # e.g. a name longer than the filesystem allows
        raise ModelLoadError(f"model '{name[:60]}{'…' if len(name) > 60 else ''}' is not a usable name "
                             f"({e.strerror}); give a local folder, a built-in name or a Hub id") from None
    if path.is_file():
        raise ModelLoadError(f"model '{name}' is a file; give the folder that holds its config.json (written by "
                             "save_pretrained), a built-in name or a Hub id")
    if path.is_dir() and _is_onnx_folder(path):
        return _load_onnx(path, meta)
    if path.is_dir():
        return _load_folder(str(path), dtype, trust_remote_code, meta)
    from .zoo import ZOO, zoo_folder

    if name in ZOO:
        return _load_folder(str(zoo_folder(name, config_only=meta)), dtype, trust_remote_code, meta)
    if name in BUILTIN_TINY:
        adapter = BUILTIN_TINY[name]
        with torch.device("meta") if meta else _nullcontext():
            model = adapter.tiny_model()
        return model.to(DTYPES[dtype]), adapter.tiny_processor()
    if name.startswith(("tiny-", "shapes-")) or "/" not in name:
        near = closest(name, builtin_names())
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ModelLoadError(
            f"model '{name}' is neither a local folder nor a built-in name; {hint}"
            f"built-ins: {', '.join(builtin_names())}; or give a Hub id like 'openai/clip-vit-base-patch32'"
        )
    from .checkpoint import is_compressed, load
    from .hub import compressed_snapshot

    snapshot = compressed_snapshot(name, is_compressed, config_only=meta)  # a checkpoint `vlmcompress push` published
    if snapshot is not None:
        return load(snapshot, dtype=dtype, meta=meta), (None if meta else _load_processor(str(snapshot)))
    return _load_folder(name, dtype, trust_remote_code, meta)  # a stock Hub id


def _is_onnx_folder(path: Path) -> bool:
    from .integrations.onnx_runtime import is_onnx_folder  # reads config.json only; onnxruntime is imported on loading

    return is_onnx_folder(path)


def _load_onnx(path: Path, meta: bool) -> tuple[nn.Module, Any]:
    """An `onnx/` folder written by the quantize stage's onnxruntime backend, run with ONNX Runtime."""
    if meta:
        raise ModelLoadError(f"'{path}' holds ONNX graphs, not a PyTorch model; inspect or validate with the "
                             f"checkpoint folder next to it ('{path.parent}')")
    from .integrations.onnx_runtime import load_onnx

    return load_onnx(path), _load_processor(str(path))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stock_class(config) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        if arch in STOCK_CLASSES:
            return getattr(transformers, arch)
    raise UnsupportedModelError(
        f"architecture {getattr(config, 'architectures', None)} (model_type '{config.model_type}') is not supported; "
        f"expected one of: {', '.join(STOCK_CLASSES)}"
    )


def _load_folder(name: str, dtype: str, trust_remote_code: bool, meta: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig

    local = Path(name).is_dir()
    if local:
        config_file = Path(name) / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"folder '{name}' has no config.json; expected a folder written by save_pretrained")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(
                f"'{config_file}' is not valid JSON ({e}); re-save or re-download the model") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"'{config_file}' holds a JSON {type(raw).__name__}, not a config (a JSON object); "
                                 "re-save the model with save_pretrained")
        from .checkpoint import compressed_classes, load

        if compressed_classes(raw) is not None:
            return load(name, dtype=dtype, meta=meta), _load_processor(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError / ValueError / HTTP errors depending on the cause
        where = "folder" if local else "file" if Path(name).exists() else "Hub id"
        if meta and "trust_remote_code" in str(e):
            raise ModelLoadError(f"the config of {where} '{name}' needs the model's own code, which a check never "
                                 "runs; apply runs it when the recipe says trust_remote_code: true") from None
        raise ModelLoadError(f"could not read the config of {where} '{name}' ({_short(e)}); check the name") from None
    cls = _stock_class(config)
    _check_token_ids(config, name)
    stale = _drop_stale_records(config, name, cls)
    try:
        if meta:
            with torch.device("meta"):
                model = cls._from_config(config)
        else:
            model = cls.from_pretrained(name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                        **({"config": config} if stale else {}))
    except Exception as e:
        raise ModelLoadError(
            f"could not load the weights of '{name}' ({_short(e)}); the files may be corrupt") from None
    return model.eval(), (None if meta else _load_processor(name))


def _drop_stale_records(config, name: str, cls: type) -> list[str]:
    """A compressed checkpoint loaded with a stock class and saved again keeps the compressed config's blocks, but the
    stock class applied none of them (token reduction off, no record of pruning): they describe the checkpoint it came
    from, not these weights. Compressing it further must not carry them over, so they are dropped, with one line."""
    from .checkpoint import RECORD_KEYS

    stale = [key for key in RECORD_KEYS if getattr(config, key, None) is not None]
    if not stale:
        return []
    for key in [*stale, "auto_map"]:
        if key in config.__dict__:
            delattr(config, key)
    print(f"vlmcompress: '{name}' is a {cls.__name__} saved from a vlmcompress checkpoint by the stock class, which "
          f"applies none of its {' / '.join(stale)} records; they are dropped (load the original checkpoint with "
          "vlmcompress.load to keep them)", file=sys.stderr)
    return stale


def _check_token_ids(config, name: str) -> None:
    """A text config whose special token ids lie outside its vocabulary (e.g. CLIP's default `eos_token_id` 49407 with
    a 1,000-token vocabulary: transformers only warns) would fail deep inside a forward; say so now."""
    for key, sub in (("text_config", getattr(config, "text_config", None)), (None, config)):
        vocab = getattr(sub, "vocab_size", None)
        if not isinstance(vocab, int):
            continue
        for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(sub, attr, None)
            if isinstance(value, int) and not 0 <= value < vocab:
                where = f"{key}.{attr}" if key else attr
                raise ModelLoadError(f"model '{name}': {where} is {value}, outside its vocabulary of {vocab:,} tokens; "
                                     f"set {where} in its config.json to the tokenizer's id")


def _load_processor(name: str) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(name, trust_remote_code=False)
        except Exception:  # a model without a processor or tokenizer is fine
            continue
    return None


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
