"""What every stage shares: its config base class, capability flags, the run context and the report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def decision_key(stage_index: int, name: str) -> str:
    """`stage-03/int8`: where a stage's machine-dependent decision is kept (`RunContext.decisions`)."""
    return f"stage-{stage_index + 1:02d}/{name}"


def decision_stage(key: str) -> int:
    """The (1-based) stage number of a `decision_key`."""
    return int(key.split("/", 1)[0].removeprefix("stage-"))


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
    progress: bool = True  # whether `apply` shows progress (the trainer's display follows it)
    processor: Any = None  # the source model's processor (tokenizer + image processor), when it has one
    # files a stage wrote beside the checkpoint: name inside the output folder → file or folder to copy there
    artifacts: dict[str, Any] = field(default_factory=dict)
    # what users run instead of `model` when a stage produced it (the ONNX Runtime graphs of the onnxruntime
    # backend): accuracy and speed after that stage are measured on it; None: on `model`
    deployed: Any = None
    # the run's working folder (stage checkpoints, training state) when the run saves, and the running stage
    work: Any = None
    stage_index: int = 0
    # the teacher's loader, set by the orchestrator only while a stage that declares `needs_teacher` runs
    teacher_loader: Callable[[], Any] | None = None
    _teacher: Any = field(default=None, repr=False)
    world_size: int = 1  # processes in this run
    # what stages decided from the machine rather than the recipe (`{"stage-03/int8": {...}}`): part of the resume
    # hash of the stages after them, written to `decisions_file` (the main process's work folder) when taken, and
    # read back from it on `--resume` so a resumed run keeps the same decision
    decisions: dict[str, Any] = field(default_factory=dict)
    decisions_file: Any = None

    def record_decision(self, key: str, value: dict[str, Any]) -> None:
        import json

        self.decisions[key] = value
        if self.decisions_file is not None:
            self.decisions_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.decisions_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.decisions, indent=2, sort_keys=True))
            tmp.replace(self.decisions_file)

    @property
    def teacher(self):
        """The source model as it was before the first stage: frozen (eval mode, no gradients), loaded on first
        access (again after `--resume`), and only for a stage that declares `needs_teacher`."""
        if self.teacher_loader is None:
            from ..errors import VlmCompressError

            raise VlmCompressError("a stage asked for the teacher without declaring needs_teacher = True")
        if self._teacher is None:
            teacher = self.teacher_loader()
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._teacher = teacher
        return self._teacher

    def batches(self, split: str, n: int, batch_size: int) -> Iterator[list[dict]]:
        """`n` rows of the recipe's `data.<split>` (`train` or `eval`), seeded by the run's seed, in batches of
        `batch_size` rows (`image`, `text`, for shapes also `question` / `answer`): the one way stages read data
        (calibration, gradients, training)."""
        from ..data import batches, image_size_of

        yield from batches(self._source(split), image_size_of(self.model), self.seed, n, batch_size)

    def rows(self, split: str = "train") -> Callable[[int, int], list[dict]]:
        """`rows(start, count)` of the recipe's `data.<split>` by index (an endless stream for the built-in world,
        epochs in a seeded shuffled order otherwise): how the trainer reads its steps, so that a step's rows depend
        on the step alone."""
        from ..data import image_size_of, row_stream

        return row_stream(self._source(split), image_size_of(self.model), self.seed, shuffle=True)

    def train_size(self) -> int | None:
        """`data.train.size`: the samples in a training epoch (None when unset)."""
        data = self.recipe.data if self.recipe is not None else None
        return None if data is None or data.train is None else data.train.size

    def _source(self, split: str):
        from ..errors import VlmCompressError

        source = getattr(self.recipe.data, split, None) if self.recipe.data is not None else None
        if source is None:
            raise VlmCompressError(f"this stage reads data.{split}, which the recipe does not have; add e.g. "
                                   f"data: {{{split}: {{builtin: shapes, split: {split}, size: 256}}}}")
        return source


class Stage:
    """A recipe step. Subclasses set the capability flags and implement `plan` and `run`.

    Capability flags drive the orchestrator, never `isinstance` checks; each is read there:
    `requires_data` (needs the recipe's `data.train`: checked before anything runs; per configuration through
    `needs_data()`), `trains` (updates weights with gradients: runs in train mode with gradients on, and the model
    is back in eval mode after), `needs_teacher` (reads `ctx.teacher`, the frozen source model, loaded lazily only
    then), `changes_architecture` (may change parameter shapes: any other stage that does is an error),
    `must_be_last` (nothing may follow).
    """

    requires_data: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    changes_architecture: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False
    reduces_tokens: ClassVar[bool] = False  # patches layers with per-forward state (no activation checkpointing)

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

