"""`token_reduce`: merge or drop tokens inside a model's layers; the reducing layers ship in the checkpoint.

One file per algorithm (its config class, knobs, validation and planner), registered by `register_algorithm`:
`tome.py` (the default), `turbo.py`, `crossget.py` (per-layer, on encoder towers: `layerwise.py`), `fastv.py`,
`visionzip.py`, `prumerge.py` (LLaVA-style models: `llava.py`). The stage itself (`stage.py`) names none of them.
The runtime half of each is `vlmcompress/modeling/<algorithm>.py`. Adding one: docs/extending.md.
"""

from ...registry import register_method

# each registers itself; the order is the one error messages and docs list them in (the default first)
# isort: off
from . import tome, turbo, crossget, fastv, visionzip, prumerge  # noqa: F401
# isort: on
from .stage import ALGORITHMS, TokenReduceConfig, TokenReduceStage, register_algorithm

register_method("token_reduce", TokenReduceConfig, TokenReduceStage)

__all__ = ["ALGORITHMS", "TokenReduceConfig", "TokenReduceStage", "register_algorithm"]
