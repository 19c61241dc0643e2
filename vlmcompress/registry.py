"""Method registry: maps a recipe's `method:` name to its config class and stage class.

Registration is one explicit, checked call per method (no package walking), in the spirit of PEFT's
`register_peft_method`. This module imports no method: the method packages import it and register themselves when
they are imported (`vlmcompress.stages` imports the built-in ones; the recipe schema imports `vlmcompress.stages`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UnknownMethodError, VlmCompressError, did_you_mean

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type
    stage_cls: type
    summary: str


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type, stage_cls: type, summary: str = "") -> None:
    """Register a stage method under `name` (snake_case, unique).

    `config_cls` is a pydantic model with a `method: Literal[name]` field; `stage_cls` implements
    `vlmcompress.stages.base.Stage`.
    """
    if not _NAME.match(name):
        raise VlmCompressError(f"method name {name!r} is not snake_case; expected e.g. 'structured_prune'")
    if name in _METHODS:
        raise VlmCompressError(f"method {name!r} is already registered by {_METHODS[name].stage_cls.__name__}")
    method_field = getattr(config_cls, "model_fields", {}).get("method")
    if method_field is None:
        raise VlmCompressError(f"{config_cls.__name__} has no `method` field; add `method: Literal[{name!r}]`")
    import typing

    allowed = typing.get_args(method_field.annotation)
    if allowed != (name,):
        raise VlmCompressError(
            f"{config_cls.__name__}.method is {method_field.annotation}, expected Literal[{name!r}] to match the name"
        )
    _METHODS[name] = MethodEntry(name, config_cls, stage_cls, summary or (stage_cls.__doc__ or "").split("\n")[0])


def get_method(name: str) -> MethodEntry:
    """The registered entry for `name`, or an error suggesting the closest registered name."""
    if name not in _METHODS:
        raise UnknownMethodError(
            f"unknown method {name!r}{did_you_mean(name, _METHODS)}; available: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def list_methods() -> list[MethodEntry]:
    """All registered methods, sorted by name."""
    return [_METHODS[k] for k in sorted(_METHODS)]
