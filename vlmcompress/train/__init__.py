"""Training for the stages that learn: the shared `train:` block (`config.py`), the trainer (`trainer.py`), its
pickle-free state (`state.py`) and the distillation losses (`losses.py`). Importing this package imports no torch;
the trainer is loaded on first use."""

from .config import TrainConfig

__all__ = ["TrainConfig"]
