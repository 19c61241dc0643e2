"""`backend: quanto` (optimum-quanto): int8 / int4 weights, and int8 activations calibrated on the recipe's data
(`int8_static`). Library glue: `vlmcompress/integrations/quanto.py`; runtime: `modeling/quantized.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from .library import LibraryConfig
from .stage import register_backend


@register_backend
class QuantoConfig(LibraryConfig):
    """optimum-quanto's quantizers, moved into vlmcompress's checkpoint format."""

    backend: Literal["quanto"] = "quanto"

    schemes = ("int8_weight_only", "int4_weight_only", "int8_static")
    package = "vlmcompress.integrations.quanto"
    cpu_speed = {
        "int8_weight_only": "smaller only; not faster than fp32 on CPU (0.96x measured)",
        "int4_weight_only": "smaller only; not faster than fp32 on CPU (1.0x measured)",
        "int8_static": "smaller only; CPU speed not measured",
    }

    @model_validator(mode="after")
    def _no_group_size(self):
        # optimum-quanto's quantize() takes no group size (its int4 groups are fixed by the library): a given one
        # would silently do nothing
        if self.group_size is not None:
            raise ValueError(f"group_size: {self.group_size} has no effect with backend: quanto (its groups are "
                             "fixed); remove it, or use backend: torchao or neural_compressor for a chosen group size")
        return self
