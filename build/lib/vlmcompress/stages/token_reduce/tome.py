"""`algorithm: tome` (Bolya et al., ICLR 2023), the default: bipartite soft matching on the keys averaged over heads,
size-weighted merging, proportional attention, the class token never merged. Runtime: `modeling/tome.py`."""

from __future__ import annotations

from typing import Literal

from .layerwise import LayerwiseConfig
from .stage import register_algorithm


@register_algorithm
class ToMeConfig(LayerwiseConfig):
    """ToMe: merge `r` tokens per layer of the vision tower."""

    algorithm: Literal["tome"] = "tome"
    modeling_module = "vlmcompress.modeling.tome"
