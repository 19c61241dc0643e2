"""The schema base classes every recipe section builds on: strict pydantic models, a stage's config and its
plug-in choice. The bottom of the package: imports pydantic only, so that recipes validate and methods list without
torch or transformers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Component = Literal["vision", "text", "qformer", "projector", "llm"]
COMPONENTS: tuple[str, ...] = ("vision", "text", "qformer", "projector", "llm")


class StrictModel(BaseModel):
    """Base of every user-authored schema: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
