"""The schema base classes every recipe section builds on: strict pydantic models, a stage's config and its
plug-in choice. The bottom of the package: imports pydantic only, so that recipes validate and methods list without
torch or transformers."""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

Component = Literal["vision", "text", "qformer", "projector", "llm"]
COMPONENTS: tuple[str, ...] = ("vision", "text", "qformer", "projector", "llm")


def accepts_bool(annotation: Any) -> bool:
    """Whether a field's type takes `true` / `false` (bool, Any, or a union / Literal that holds one)."""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return accepts_bool(typing.get_args(annotation)[0])
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(accepts_bool(a) for a in typing.get_args(annotation))
    return False


class StrictModel(BaseModel):
    """Base of every user-authored schema: unknown keys are errors, assignments are validated, `.inf` / `.nan`
    are not numbers, and `true` / `false` are not numbers either (pydantic would read them as 1 / 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if isinstance(value, bool) and field is not None and not accepts_bool(field.annotation):
            raise ValueError(f"expected a number or a name, got {str(value).lower()} (a yes/no value)")
        return value


class StageConfig(StrictModel):
    """Base class of a stage's recipe entry; subclasses narrow `method` to a `Literal`."""

    method: str

    @classmethod
    def config_class(cls, data: Any) -> type[StageConfig]:
        """The class that validates the recipe entry `data`: this one, or (for a method with plug-in choices, such
        as token_reduce's `algorithm:`) the registered subclass that `data` chooses; raises `UnknownChoiceError`."""
        return cls

    @classmethod
    def parse(cls, data: dict[str, Any]) -> StageConfig:
        """Validate a recipe entry with the class it chooses (as recipes do)."""
        return cls.config_class(data).model_validate(data)

    @classmethod
    def choices(cls) -> tuple[str, dict[str, type[StageConfig]]] | None:
        """`(key, {value: class})` of a method with plug-in choices (`("algorithm", {...})`), else None."""
        return None


class UnknownChoiceError(ValueError):
    """A recipe value that chooses a plug-in (`algorithm:`, `importance:`, `backend:`) which is not registered."""

    def __init__(self, key: str, given: Any, allowed: list[str]):
        self.key, self.given, self.allowed = key, given, allowed
        super().__init__(f"{key}: {given!r} is not one of {', '.join(allowed)}")


class PluggableStageConfig(StageConfig):
    """A method whose recipe key `choice_key` (`algorithm:`, `importance:`, `backend:`) picks one of the registered
    subclasses in `registry` (`choice_default` when absent): the discriminated union that keeps recipes as they are.
    Each method's base class sets the three class attributes; `register_choice` adds a plug-in."""

    choice_key: ClassVar[str] = ""
    choice_default: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[StageConfig]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _keys_of_other_choices(cls, data: Any) -> Any:
        """A key that another registered choice has, given with this one: one line naming where it belongs."""
        if not isinstance(data, dict) or cls.registry.get(data.get(cls.choice_key, cls.choice_default)) is not cls:
            return data
        foreign = {k: [n for n, other in cls.registry.items() if k in other.model_fields] for k in data
                   if k not in cls.model_fields}
        foreign = {k: owners for k, owners in foreign.items() if owners}
        if foreign:
            raise ValueError(cls.foreign_keys_message(data, foreign))
        return data

    @classmethod
    def foreign_keys_message(cls, data: dict[str, Any], foreign: dict[str, list[str]]) -> str:
        """The error for keys of other choices (`{key: the choices that have it}`) given with this one."""
        chosen = data.get(cls.choice_key, cls.choice_default)
        keys = ", ".join(foreign)
        owners = sorted({o for names in foreign.values() for o in names})
        verb = "does" if len(foreign) == 1 else "do"
        return (f"{keys} {verb} not apply to {cls.choice_key}: {chosen} (only to {', '.join(owners)}); remove "
                f"{'it' if len(foreign) == 1 else 'them'} or change {cls.choice_key}")

    @classmethod
    def config_class(cls, data: Any) -> type[StageConfig]:
        name = data.get(cls.choice_key, cls.choice_default) if isinstance(data, dict) else cls.choice_default
        if not isinstance(name, str) or name not in cls.registry:
            raise UnknownChoiceError(cls.choice_key, name, list(cls.registry))
        return cls.registry[name]

    @classmethod
    def choices(cls) -> tuple[str, dict[str, type[StageConfig]]]:
        return cls.choice_key, dict(cls.registry)

    @classmethod
    def register_choice(cls, config_cls: type, what: str) -> str:
        """Check and register a plug-in class: a subclass of `cls` whose `choice_key` field is a one-value
        `Literal`, under a name not taken by another class. Returns the name. `what` names the kind in errors."""
        from .errors import VlmCompressError

        if not (isinstance(config_cls, type) and issubclass(config_cls, cls)):
            raise VlmCompressError(f"a {what} is registered as a {cls.__name__} subclass, got {config_cls!r}")
        names = typing.get_args(config_cls.model_fields[cls.choice_key].annotation)
        if len(names) != 1:
            raise VlmCompressError(f"{config_cls.__name__}.{cls.choice_key} must be a Literal of one name, e.g. "
                                   f"{cls.choice_key}: Literal['mine'] = 'mine'")
        known = cls.registry.get(names[0])
        if known is not None and known.__qualname__ != config_cls.__qualname__:
            raise VlmCompressError(f"{what} {names[0]!r} is already registered by {known.__name__}")
        cls.registry[names[0]] = config_cls
        return names[0]
