"""`quantize`: int8 / int4 linear layers; always the last stage.

One file per backend (its config class, knobs, schemes, CPU-speed notes and `quantize`), registered by
`register_backend`: `auto.py` (`backend: auto`, the default: picks the int8 path per CPU with `int8_paths.py`),
`torch_dynamic.py` (`backend: torch`), `torchao.py`, `quanto.py`,
`neural_compressor.py` (the last three on `library.py`), `onnxruntime.py`. The stage itself (`stage.py`) names
none of them. Adding one: docs/extending.md.
"""

from ...registry import register_method

# each registers itself; the order is the one error messages and docs list them in (the default first)
# isort: off
from . import auto, torch_dynamic, torchao, quanto, neural_compressor, onnxruntime  # noqa: F401
# isort: on
from .stage import BACKENDS, QuantizeConfig, QuantizeStage, backend_schemes, register_backend, resolve_scheme  # noqa: F401

register_method("quantize", QuantizeConfig, QuantizeStage)

__all__ = ["BACKENDS", "QuantizeConfig", "QuantizeStage", "backend_schemes", "register_backend", "resolve_scheme"]
