"""`algorithm: crossget` (Shi et al., ICML 2024): complete-graph matching guided by a cross token (a per-layer
parameter, zero-initialised until a training stage learns it), importance-weighted ensemble, order kept; also on
the text towers of CLIP and SigLIP (the end-of-text token protected, padding never merged into text). Runtime:
`modeling/crossget.py`."""

from __future__ import annotations

from typing import Literal

from .layerwise import LayerwiseConfig
from .stage import register_algorithm


@register_algorithm
class CrossGETConfig(LayerwiseConfig):
    """CrossGET: merge `r` tokens per layer, guided by a learned cross token."""

    algorithm: Literal["crossget"] = "crossget"
    towers = ("vision", "text")
    modeling_module = "vlmcompress.modeling.crossget"
