"""What every stage shares: its config base class, capability flags, the run context and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..schema import COMPONENTS, Component, StageConfig, StrictModel, UnknownChoiceError  # noqa: F401

if TYPE_CHECKING:  # torch is imported where a stage runs, not where recipes are validated
    import torch

@dataclass
class StageReport:
    """What one stage matched, changed and measured. Written into `report.json`."""

    method: str
    matched: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "matched": self.matched,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "details": self.details,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunContext:
    """Explicit state of one `apply` run, handed to every stage (there is no global session).

    `compression` is the record that the checkpoint is built from: the parameter shapes and module attributes that
    pruning changed, and the token-reduction block. Stages append to it; nothing else mutates it.
    """

    model: Any  # torch.nn.Module
    adapter: Any
    recipe: Any
    seed: int = 0
    compression: dict[str, Any] = field(
        default_factory=lambda: {"param_shapes": {}, "module_attrs": {}, "token_reduction": None}
    )
    reports: list[StageReport] = field(default_factory=list)
    progress: Any = None  # a callable(description: str) supplied by the orchestrator's progress display
    processor: Any = None  # the source model's processor (tokenizer + image processor), when it has one
    # files a stage wrote beside the checkpoint: name inside the output folder → file or folder to copy there
    artifacts: dict[str, Any] = field(default_factory=dict)
    # what users run instead of `model` when a stage produced it (the ONNX Runtime graphs of the onnxruntime
    # backend): accuracy and speed after that stage are measured on it; None: on `model`
    deployed: Any = None


class Stage:
    """A recipe step. Subclasses set the capability flags and implement `plan` and `run`.

    Capability flags drive the orchestrator (ordering, data, saving), never `isinstance` checks:
    `requires_data` (needs the recipe's `data:`), `trains` (updates weights with gradients),
    `changes_architecture` (changes parameter shapes or the forward pass), `must_be_last` (nothing may follow).
    """

    requires_data: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    changes_architecture: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False

    def __init__(self, config: StageConfig):
        self.config = config

    def needs_data(self) -> bool:
        """Whether this stage, as configured, reads the recipe's `data.train` (defaults to `requires_data`)."""
        return self.requires_data

    def check(self, model: torch.nn.Module, adapter: Any) -> None:
        """Resolve selectors and components against `model` (may be on the meta device); raise on bad input."""

    def plan(self, model: torch.nn.Module, adapter: Any) -> dict[str, Any]:
        """What this stage would do, computed without weights (for `validate` / `--dry-run`)."""
        return {}

    def run(self, ctx: RunContext) -> StageReport:
        raise NotImplementedError


def count_params(model) -> int:
    """Parameters as the float model has them: a quantized linear layer counts its `in × out` weight and its bias,
    whatever its integer storage (which lives in buffers and backend kernel modules)."""
    from ..modeling.quantized import QuantizedLinear

    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    total = sum(m.in_features * m.out_features + (m.out_features if "bias" in m.keys else 0)
                for m in quantized.values())
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in quantized and owner.rpartition(".")[0] not in quantized:
            total += p.numel()
    return total

