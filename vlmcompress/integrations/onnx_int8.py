"""ONNX Runtime dynamic int8 of an exported graph: which MatMul nodes come from `nn.Linear` modules (the exporter's
module name scopes), the int8 layout that is exact on the CPU at hand (`int8_format`), the quantization itself and
the bookkeeping of the written file."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .onnx_runtime import require


def _module_of(node, prefix: str = "model.") -> tuple[str | None, str | None]:
    """`(torch module name, class name)` of the innermost module a node was exported from (exporter metadata)."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return None, None
    if len(scopes) < 2 or len(classes) < 2:
        return None, None
    name = scopes[-2]  # the last entry is the aten op, the one before it the innermost module
    return (name[len(prefix):] if name.startswith(prefix) else name), classes[-2]


def linear_nodes(path: Path) -> dict[str, str]:
    """`{ONNX node name: torch module name}` of the MatMul nodes that compute an `nn.Linear` with a constant weight:
    the nodes dynamic quantization may touch (a linear layer on 2-D input is a `Gemm`, which it cannot)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        name, cls = _module_of(node)
        if name is not None and cls is not None and cls.endswith("torch.nn.modules.linear.Linear"):
            found[node.name] = name
    return found


@dataclass(frozen=True)
class Int8Format:
    """How ONNX Runtime's dynamic int8 is laid out: uint8 activations (quantized per tensor at run time) times int8
    weights (per output channel), with the weights on 7 bits (`reduce_range`) where the CPU needs it."""

    reduce_range: bool
    reason: str
    activations: str = "uint8"
    weights: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        return {"activations": self.activations, "weights": self.weights, "reduce_range": self.reduce_range,
                "reason": self.reason}


def int8_format(cpu, reduce_range: bool | None = None) -> Int8Format:
    """The int8 layout that ONNX Runtime computes exactly on `cpu` (a `vlmcompress.cpu.CpuFeatures`).

    On x86 without an int8 dot-product instruction (no AVX-512 VNNI, AVX-VNNI or AMX: AVX2-only and early AVX-512
    CPUs), ONNX Runtime's u8s8 kernels add two uint8 × int8 products in int16 (`vpmaddubsw`) before widening, and
    2 × 255 × 127 overflows int16: the sums saturate and the outputs drift (a cosine of 0.94 against torch measured
    on a tiny LLaVA tower). With 7-bit weights (|w| ≤ 64) every pair sum fits (2 × 255 × 64 < 32768), so the
    integer arithmetic is exact again, for half a bit of weight precision. With a dot-product instruction, and on
    Arm (`sdot` / `udot`), products accumulate straight into int32: full 8-bit weights are exact and more precise.
    The u8u8 layout is exact too, but its AVX2 kernel widens both operands to 16 bits first, so it was not chosen.
    An explicit `reduce_range` (the recipe's) is kept as given.
    """
    if reduce_range is not None:
        return Int8Format(reduce_range, "set in the recipe")
    if cpu.x86 and not cpu.int8_dot_product:
        return Int8Format(True, "x86 without VNNI / AMX: 7-bit weights keep ONNX Runtime's int16 pair sums from "
                                "saturating")
    return Int8Format(False, "int8 dot products accumulate in int32 on this CPU: full 8-bit weights are exact")


def quantize_graph(source: Path, target: Path, nodes: list[str], reduce_range: bool = False) -> list[str]:
    """ONNX Runtime dynamic int8 (weights int8 per output channel, on 7 bits with `reduce_range`; activations uint8
    per tensor at run time) of the given MatMul nodes; returns those that were quantized (each is replaced by integer
    ops under new names)."""
    require()
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Please consider to run pre-processing" (the dynamo exporter already optimised)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
    finally:
        quiet.setLevel(level)
    import onnx

    left = {n.name for n in onnx.load(str(target), load_external_data=False).graph.node}
    return [n for n in nodes if n not in left]


def strip_metadata(path: Path, keep: tuple[str, ...] = ("pkg.torch.onnx.name_scopes",)) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, class hierarchies: half of a small graph's bytes)
    except the module name scopes, which map every node to the torch module it came from."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key in keep]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def initializer_types(path: Path) -> dict[str, int]:
    """Number of initializer elements per data type name (e.g. `{"int8": ..., "float32": ...}`)."""
    import onnx
    from onnx import helper

    counts: dict[str, int] = {}
    for init in onnx.load(str(path)).graph.initializer:
        kind = helper.tensor_dtype_to_np_dtype(init.data_type).name
        counts[kind] = counts.get(kind, 0) + math.prod(init.dims)
    return counts
