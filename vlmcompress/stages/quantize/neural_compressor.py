"""`backend: neural_compressor` (Intel neural-compressor, PyTorch): weight-only int8 / int4 by round-to-nearest or
GPTQ calibrated on the recipe's data. Library glue: `vlmcompress/integrations/neural_compressor.py`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .library import LibraryConfig
from .stage import register_backend


@register_backend
class NeuralCompressorConfig(LibraryConfig):
    """neural-compressor's weight-only quantizers, moved into vlmcompress's checkpoint format."""

    backend: Literal["neural_compressor"] = "neural_compressor"
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="neural_compressor weight-only rounding: rtn (round to nearest) or gptq (calibrated)")

    schemes = ("int8_weight_only", "int4_weight_only")
    package = "vlmcompress.integrations.neural_compressor"
    cpu_speed = {
        "int8_weight_only": "smaller only; not faster than fp32 on CPU (1.0x measured)",
        "int4_weight_only": "smaller only; not faster than fp32 on CPU (1.0x measured)",
    }

    def needs_data(self) -> bool:
        return self.algorithm == "gptq" or super().needs_data()
