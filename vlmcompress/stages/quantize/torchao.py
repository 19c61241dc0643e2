"""`backend: torchao`: int8 dynamic-activation + int8 weight (fast on CPU under torch.compile), int8 and int4
weight-only. Library glue: `vlmcompress/integrations/torchao.py`; runtime: `modeling/quantized.py`."""

from __future__ import annotations

from typing import Literal

from .library import LibraryConfig
from .stage import register_backend


@register_backend
class TorchAOConfig(LibraryConfig):
    """torchao's quantizers, moved into vlmcompress's checkpoint format."""

    backend: Literal["torchao"] = "torchao"

    schemes = ("int8_dynamic", "int8_weight_only", "int4_weight_only")
    package = "vlmcompress.integrations.torchao"
    cpu_speed = {
        "int8_dynamic": "faster on CPU (2.2x fp32 eager, 4.9x with compile: true, measured on ViT-B/16)",
        "int8_weight_only": "smaller only; not faster than fp32 on CPU (0.96x measured)",
        "int4_weight_only": "smaller only; far slower than fp32 on CPU (about 0.02x measured: use it on GPU)",
    }
    compiled_cpu_speed = {"int8_dynamic": "faster on CPU: compiled when the checkpoint loads, 4.9x fp32 measured on "
                                          "ViT-B/16 (the first call per input shape compiles, tens of seconds)"}

    def wants_compile(self, schemes: dict[str, str]) -> bool:
        """`compile:` as given, or (unset) on when an int8_dynamic layer gains from it (2.2x → 4.9x fp32)."""
        if self.compile is not None:
            return self.compile
        return "int8_dynamic" in schemes.values()
