"""ONNX export of the encoders and ONNX Runtime dynamic int8: the `onnxruntime` backend of the `quantize` stage, and
the runtime that lets `vlmcompress eval` / `vlmcompress bench` use an exported folder like a model.

What is exported, per family (each graph has a dynamic batch axis; text graphs also a dynamic sequence axis):

- CLIP, SigLIP: `image_encoder.onnx` `pixel_values [batch, 3, H, W]` → `image_embeds [batch, D]` (vision tower +
  projection / pooling head, as `get_image_features`; not L2-normalised) and `text_encoder.onnx` `input_ids,
  attention_mask [batch, sequence]` (int64) → `text_embeds [batch, D]` (as `get_text_features`);
- LLaVA: `image_encoder.onnx` `pixel_values` → `image_features [batch, tokens, D_llm]`, the vision tower (at
  `vision_feature_layer`, `vision_feature_select_strategy`) plus the multi-modal projector: what the language model
  receives. The language model stays in the PyTorch checkpoint.

Token reduction inside the vision tower is exported with it when its token counts are fixed by the schedule (ToMe:
`r` per layer, so the tokens after every layer depend only on the input size). Anything that decides the number of
tokens from the data would make a traced graph silently wrong on other inputs, so `check_exportable` refuses it:
by the algorithm's declaration (`data_dependent` in the modeling code's reducer registry)
and by measuring the tokens per layer on different inputs.

Path taken and why (transformers 5.23, torch 2.13, measured here):

- optimum-onnx (the home of Optimum's ONNX exporter and `ORTQuantizer`) 0.1.0 requires transformers < 4.58 and,
  installed anyway, fails at import (`ImportError: cannot import name 'get_parameter_dtype' from
  'transformers.modeling_utils'`), so it is not used;
- the legacy TorchScript exporter (`torch.onnx.export(dynamo=False)`) exports the plain towers but not ToMe
  (`Unsupported: ONNX export of operator Sort, Out parameter is not supported` on the stable argsort), and it is
  deprecated; the dynamo exporter (`torch.onnx.export(dynamo=True)`, needs onnxscript) exports everything with one
  custom translation: `aten.sort.stable` → ONNX `TopK` over the whole axis, which the ONNX spec defines to break ties
  by the lower index, i.e. a stable sort;
- quantization: `onnxruntime.quantization.quantize_dynamic` (int8 weights, per output channel; uint8 activations
  quantized at run time) on the MatMul nodes that come from `nn.Linear` modules (found through the exporter's
  `pkg.torch.onnx.name_scopes` node metadata, which names the torch module), so `ignore:` and per-component
  overrides mean the same as in the torch backends. Attention matmuls, convolutions, embeddings and norms stay fp32,
  and so do linear layers on 2-D inputs (the dual encoders' projections), which the exporter writes as `Gemm`, for
  which ONNX Runtime's dynamic quantizer has no rule.

Folder layout (inside the quantize stage's output folder, next to the fp32 checkpoint): `onnx/config.json` (marker
`vlmcompress_onnx`, what every graph takes and returns, the model config, processor settings, versions),
`onnx/*.onnx` and the processor files. `load_onnx(folder)` returns an `OnnxModel`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackendNotInstalledError, ModelLoadError, UnsupportedModelError, VlmCompressError
from ..selectors import matches

ONNX_DIR = "onnx"
MARKER = "vlmcompress_onnx"
FORMAT_VERSION = 1
OPSET = 18
SCHEMES = ("int8_dynamic", "fp32")
FAMILIES = ("clip", "siglip", "llava")
# an fp32 graph must reproduce torch within this (relative to the largest output), or the export is refused
FP32_TOLERANCE = 1e-4


class OnnxExportError(VlmCompressError):
    """A model (or a part of it) that cannot be exported to a correct ONNX graph."""


def require() -> None:
    """Import the optional packages once, turning a missing one into the one-line install hint."""
    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            raise BackendNotInstalledError(package, "onnx") from None


# ----------------------------------------------------------------------------------------------------------------
# what is exported


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageEncoder(nn.Module):
    """`get_image_features` of a dual encoder: `[B, 3, H, W]` pixels → `[B, D]` image embeddings (not normalised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))


class TextEncoder(nn.Module):
    """`get_text_features` of a dual encoder: `[B, L]` token ids and mask → `[B, D]` text embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class LlavaImageEncoder(nn.Module):
    """LLaVA's image path up to the language model: `[B, 3, H, W]` → `[B, T, D_llm]` projected image features
    (vision tower at `config.vision_feature_layer`, CLS dropped with the "default" strategy, projector)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # as LlavaModel.get_image_features, written out: its per-image list of features would fix the batch size
        config = self.model.config
        hidden = self.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        picked = [hidden[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return self.model.model.multi_modal_projector(torch.cat(picked, dim=-1))


@dataclass
class Graph:
    """One exported graph: the torch module that defines it and how it is described in `onnx/config.json`."""

    name: str  # file stem, e.g. "image_encoder"
    module: nn.Module
    example: dict[str, torch.Tensor]  # example inputs, batch 2
    dynamic: dict[str, dict[int, str]]  # input name → {axis: dimension name}
    output: str  # name of the single output
    components: tuple[str, ...]  # adapter components inside the graph (the first is the graph's own)
    workload: str  # the `vlmcompress bench` workload this graph runs
    description: str
    vision: bool = False  # holds the vision tower (token reduction, tokens per layer)


def _strip_config(model: nn.Module) -> dict[str, Any]:
    data = model.config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    return data


def graphs_for(model: nn.Module, adapter) -> list[Graph]:
    """The graphs exported for `model` (see the module docstring)."""
    family = adapter.family
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"the onnxruntime backend exports {', '.join(FAMILIES)} models; this one is a {family} model; use "
            "backend: torch (or torchao, quanto) to quantize it")
    pixels = adapter.example_inputs(model, batch_size=2, seed=0)["pixel_values"].float()
    batch = {0: "batch"}
    if family == "llava":
        return [Graph("image_encoder", LlavaImageEncoder(model), {"pixel_values": pixels}, {"pixel_values": batch},
                      "image_features", ("vision", "projector"), "image",
                      "vision tower (at vision_feature_layer) + multi-modal projector: the image features handed to "
                      "the language model", vision=True)]
    text = model.config.text_config
    length = min(8, text.max_position_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, text.vocab_size, (2, length), generator=g)
    ids[:, -1] = text.eos_token_id if isinstance(text.eos_token_id, int) else ids[:, -1]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so the mask is not constant-folded away
    sequence = {0: "batch", 1: "sequence"}
    return [Graph("image_encoder", ImageEncoder(model), {"pixel_values": pixels}, {"pixel_values": batch},
                  "image_embeds", ("vision",), "image", "get_image_features: vision tower + projection "
                  "(not L2-normalised)", vision=True),
            Graph("text_encoder", TextEncoder(model), {"input_ids": ids, "attention_mask": mask},
                  {"input_ids": sequence, "attention_mask": sequence}, "text_embeds", ("text",), "text",
                  "get_text_features: text tower + projection (not L2-normalised)")]


# ----------------------------------------------------------------------------------------------------------------
# exportability of token reduction


def fixed_schedule(algorithm: str | None) -> bool:
    """Whether a token-reduction algorithm keeps a fixed number of tokens per layer (so it can be exported).

    The algorithm's reducer decides (`data_dependent`, in the modeling code's registry); a checkpoint's block or
    tower may also say `"data_dependent": true` (see `check_exportable`). Unknown algorithms are not exportable.
    """
    from ..modeling import algorithms  # noqa: F401  (registers the built-in reducers)
    from ..modeling.reduction import REDUCERS

    reducer = REDUCERS.get(algorithm)
    return reducer is not None and not reducer.data_dependent


def _tokens_seen(model: nn.Module, adapter, run) -> list[int]:
    """Tokens entering the first vision layer, then after each layer, during one call of `run`."""
    from ..measure.flops import tokens_per_layer

    return tokens_per_layer(model, adapter, run)


def check_exportable(model: nn.Module, adapter) -> list[int]:
    """Refuse token reduction whose token counts depend on the data; returns the vision tokens per layer (or None).

    Three checks: the algorithm must be declared fixed-schedule (`fixed_schedule`; a tower may also say
    `"data_dependent": true`); only the vision tower may be reduced (the text graphs have a dynamic length); and the
    tokens per layer measured on two different images (and the recorded schedule, where there is one) must agree.
    """
    spec = getattr(model.config, "token_reduction", None) or {}
    for tower in spec.get("towers", []):
        algorithm = tower.get("algorithm", spec.get("algorithm"))
        component = tower.get("component", "vision")
        if component not in ("vision", "text"):
            continue  # inside LLaVA's language model (FastV): not part of any exported graph
        if not fixed_schedule(algorithm) or tower.get("data_dependent") or spec.get("data_dependent"):
            raise OnnxExportError(
                f"token reduction '{algorithm}' on the {component} tower chooses how many tokens to keep from the "
                "data, so an ONNX graph traced on one input would be wrong for others; ONNX export supports "
                "fixed-schedule token reduction only; export the model before that stage, or quantize with "
                "backend: torch")
        if component != "vision":
            raise OnnxExportError(
                f"token reduction on the {component} tower depends on the text length, which the exported text "
                "graph leaves open (dynamic sequence axis); ONNX export supports token reduction in the vision "
                "tower only; reduce components: [vision], or quantize with backend: torch")
    config = model.config.vision_config
    seen = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size, generator=g) * seed
        with torch.no_grad():
            seen.append(_tokens_seen(model, adapter, lambda: _vision_forward(model, adapter, pixels)))
    recorded = None
    towers = [t for t in spec.get("towers", []) if t.get("component", "vision") == "vision"]
    if towers and towers[0].get("tokens_per_layer"):
        recorded = [towers[0]["num_tokens"], *towers[0]["tokens_per_layer"]]
    if seen[0] != seen[1] or (recorded is not None and seen[0] != recorded):
        raise OnnxExportError(
            f"the vision tower's token counts depend on the input (tokens per layer {seen[0]} on one image, {seen[1]} "
            f"on another{'' if recorded is None else f', schedule {recorded}'}), so an ONNX graph traced on one "
            "input would be wrong for others; ONNX export needs a fixed token schedule")
    return seen[0]


def _vision_forward(model: nn.Module, adapter, pixels: torch.Tensor):
    module = LlavaImageEncoder(model) if adapter.family == "llava" else ImageEncoder(model)
    return module(pixels)


# ----------------------------------------------------------------------------------------------------------------
# export and quantization


def _sort_stable_translation():
    """ONNX translation of `aten.sort.stable`, which ToMe's matching uses and the exporter has no rule for.

    ONNX `TopK` with `k` = the axis length and `sorted=1` sorts the whole axis, and the spec makes it break ties by
    the lower index: exactly a stable sort (ascending with `largest=0`, descending with `largest=1`).
    """
    from onnxscript import opset18 as op

    def sort_stable(self, stable: bool = True, dim: int = -1, descending: bool = False):
        k = op.Reshape(op.Gather(op.Shape(self), dim), op.Constant(value_ints=[1]))
        values, indices = op.TopK(self, k, axis=dim, largest=descending, sorted=True)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable}


def export_graph(graph: Graph, path: Path) -> dict[str, Any]:
    """Export `graph` with the dynamo exporter to `path`; returns how long it took and the exporter used."""
    require()
    from torch.export import Dim

    dims: dict[str, Any] = {}
    dynamic_shapes = {}
    for name, axes in graph.dynamic.items():
        dynamic_shapes[name] = {axis: dims.setdefault(dim, Dim(dim)) for axis, dim in axes.items()}
    start = time.perf_counter()
    quiet = io.StringIO()
    try:
        # the exporter prints its progress on stdout; keep `apply`'s output readable and show it only on failure
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter internals (axis renaming, pytree deprecations)
            torch.onnx.export(graph.module.eval(), (), str(path), kwargs=graph.example, dynamo=True,
                              opset_version=OPSET, input_names=list(graph.example), output_names=[graph.output],
                              dynamic_shapes=dynamic_shapes, custom_translation_table=_sort_stable_translation(),
                              external_data=False, optimize=True, verbose=False)
    except Exception as e:
        raise OnnxExportError(_export_failure(graph.name, e)) from e
    return {"exporter": f"torch.onnx.export(dynamo=True), opset {OPSET}", "seconds": round(time.perf_counter() -
                                                                                         start, 2)}


def _export_failure(name: str, error: BaseException) -> str:
    """One line on why the exporter failed: the innermost cause, and where in vlmcompress's code it arose."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    first = text.splitlines()[0][:200] if text else type(root).__name__
    where = next((line.strip() for line in text.splitlines() if "/vlmcompress/" in line and "File " in line), None)
    message = f"torch.onnx.export could not export the {name} ({type(root).__name__}: {first})"
    if "data-dependent" in text:
        # torch.export reads the graph symbolically: a tensor value turned into a Python number (int(t), t.item(),
        # a branch on a tensor) cannot be traced into a graph that is right for every input
        message += "; the model turns a tensor value into a Python number or branch there"
    if where:
        message += f" at {where.removeprefix('File ')}"
    return message + "; set VLMCOMPRESS_DEBUG=1 for the traceback"


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


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (default: torch's thread count)."""
    require()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between calls: the threads would steal the CPU from whatever runs next (a torch model timed
    # in the same benchmark round, the evaluation's preprocessing)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _compare(graph: Graph, sess) -> dict[str, float]:
    """ORT vs torch on batches of 1 and 3 (different from the export batch of 2): max |Δ|, max |Δ| relative to the
    largest output, and the smallest cosine similarity of an output row."""
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "min_cosine": 1.0}
    for batch in (1, 3):
        inputs = {}
        g = torch.Generator().manual_seed(batch)
        for name, example in graph.example.items():
            if example.dtype.is_floating_point:
                inputs[name] = torch.randn(batch, *example.shape[1:], generator=g)
            else:
                inputs[name] = example[:1].repeat(batch, *[1] * (example.dim() - 1))
        with torch.no_grad():
            ref = graph.module(**inputs).float()
        out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
        if out.shape != ref.shape:
            raise OnnxExportError(f"the exported {graph.name} returns shape {tuple(out.shape)} at batch {batch}; "
                                  f"torch returns {tuple(ref.shape)}")
        diff = (out - ref).abs().max().item()
        cosine = nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1).min().item()
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_rel_diff"] = max(worst["max_rel_diff"], diff / max(ref.abs().max().item(), 1e-12))
        worst["min_cosine"] = min(worst["min_cosine"], cosine)
    return {k: float(f"{v:.6g}") for k, v in worst.items()}


def _graph_scheme(graph: Graph, scheme: str, components: list[str] | None, overrides: dict[str, str]) -> str:
    own = graph.components[0]
    if components is not None and own not in components:
        return "fp32"
    chosen = overrides.get(own, scheme)
    return "fp32" if chosen in ("none", "fp32") else chosen


def _quantized_modules(graph: Graph, nodes: dict[str, str], scheme: str, components: list[str] | None,
                       overrides: dict[str, str], ignore: list[str], adapter) -> dict[str, str]:
    """The subset of `nodes` (node → module) to quantize: in a quantized component, and neither the module nor a
    parent matched by an `ignore` selector (exact name or `re:` regex, as in the stages)."""
    paths = adapter.component_paths
    chosen = {}
    for node, module in nodes.items():
        component = next((c for c in graph.components if module.startswith(paths.get(c, "\0") + ".")),
                         graph.components[0])  # projections outside every component belong to the graph's own
        if component != graph.components[0]:
            if (components is not None and component not in components) or \
                    overrides.get(component, scheme) in ("none", "fp32"):
                continue
        parts = module.split(".")
        names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(matches(s, n) for s in ignore for n in names):
            continue
        chosen[node] = module
    return chosen


@dataclass
class ExportResult:
    folder: Path
    config: dict[str, Any]
    quantized: list[str] = field(default_factory=list)  # torch module names whose weights are int8 in some graph


def export(model: nn.Module, adapter, folder: str | Path, *, scheme: str = "int8_dynamic", processor: Any = None,
           components: list[str] | None = None, overrides: dict[str, str] | None = None,
           ignore: list[str] | None = None, keep_fp32: bool = False, reduce_range: bool | None = None,
           cpu=None) -> ExportResult:
    """Export `model`'s encoders to `folder` (created; must not exist) and quantize them.

    Args:
        model: a CLIP, SigLIP or LLaVA model (stock or compressed, pruned and token-reduced).
        adapter: its adapter (`vlmcompress.adapters.adapter_for(model)`).
        scheme: `"int8_dynamic"` (ONNX Runtime dynamic int8) or `"fp32"` (export only).
        processor: saved into the folder when given (evaluation needs it).
        components / overrides / ignore: as in the `quantize` stage: which components are quantized, per-component
            schemes (`"none"` keeps one fp32), module names kept fp32.
        keep_fp32: also keep the fp32 graphs as `<name>.fp32.onnx` (tests, comparisons).
        reduce_range: 7-bit int8 weights; unset, `int8_format` chooses by the CPU.
        cpu: the `vlmcompress.cpu.CpuFeatures` the int8 layout is chosen for (default: this machine's).
    Returns:
        An `ExportResult` with the folder, the written `config.json` content and the quantized module names.
    """
    require()
    if scheme not in SCHEMES:
        raise VlmCompressError(f"onnxruntime scheme {scheme!r} is not supported; expected one of: "
                               f"{', '.join(SCHEMES)}")
    overrides = dict(overrides or {})
    ignore = list(ignore or [])
    model = model.eval()
    graphs = graphs_for(model, adapter)
    tokens = check_exportable(model, adapter)
    from .. import cpu as cpu_facts

    cpu = cpu or cpu_facts.detect()
    layout = int8_format(cpu, reduce_range)
    folder = Path(folder)
    folder.mkdir(parents=True)
    from ..measure.flops import count_gflops
    from ..measure.workloads import EXPORT_WORKLOADS

    # GFLOPs of the PyTorch model on the calls `vlmcompress bench` times (batch 1), reported for the graphs
    gflops = {w.key: float(f"{count_gflops(w.build(model, adapter, 1, torch.device('cpu'))):.6g}")
              for w in EXPORT_WORKLOADS[adapter.family]}
    described: dict[str, Any] = {}
    quantized: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vlmc-onnx-") as tmp:
        for graph in graphs:
            fp32_path = Path(tmp) / f"{graph.name}.onnx"
            info = export_graph(graph, fp32_path)
            check = _compare(graph, session(fp32_path))
            if check["max_rel_diff"] > FP32_TOLERANCE:
                raise OnnxExportError(
                    f"the exported {graph.name} disagrees with torch (max |Δ| {check['max_abs_diff']:.3g}, "
                    f"{check['max_rel_diff']:.3g} of the largest output); refusing to write a wrong graph")
            graph_scheme = _graph_scheme(graph, scheme, components, overrides)
            target = folder / f"{graph.name}.onnx"
            entry: dict[str, Any] = {"file": target.name, "scheme": graph_scheme, "components": list(graph.components),
                                     "workload": graph.workload, "description": graph.description, **info,
                                     "check_fp32": check}
            if graph_scheme == "int8_dynamic":
                nodes = _quantized_modules(graph, linear_nodes(fp32_path), scheme, components, overrides, ignore,
                                           adapter)
                done = quantize_graph(fp32_path, target, sorted(nodes), layout.reduce_range)
                entry["check"] = _compare(graph, session(target))
                entry["quantized_modules"] = sorted({nodes[n] for n in done})
                quantized += entry["quantized_modules"]
            else:
                shutil.copyfile(fp32_path, target)
            strip_metadata(target)
            if keep_fp32:
                shutil.copyfile(fp32_path, folder / f"{graph.name}.fp32.onnx")
            entry["initializers"] = initializer_types(target)
            entry["inputs"] = {name: {"dtype": str(x.dtype).removeprefix("torch."),
                                      "shape": [graph.dynamic[name].get(i, n) for i, n in enumerate(x.shape)]}
                               for name, x in graph.example.items()}
            with torch.no_grad():
                out_shape = list(graph.module(**graph.example).shape)
            entry["gflops_per_sample"] = gflops[graph.workload]
            entry["outputs"] = {graph.output: {"dtype": "float32", "shape": ["batch", *out_shape[1:]]}}
            if graph.vision:
                entry["tokens_per_layer"] = tokens
            described[graph.name] = entry
    config = {
        MARKER: FORMAT_VERSION,
        "family": adapter.family,
        "scheme": scheme,
        "graphs": described,
        "runtime": "onnxruntime CPUExecutionProvider; vlmcompress sets intra_op_num_threads (torch's thread count "
                   "unless given), inter_op_num_threads 1, sequential execution, all graph optimizations, "
                   "no spinning",
        "quantizer": ("onnxruntime.quantization.quantize_dynamic: int8 weights per output channel"
                      f"{' on 7 bits (reduce_range)' if layout.reduce_range else ''}, uint8 activations "
                      "quantized per tensor at run time, MatMul nodes of nn.Linear modules only")
        if scheme == "int8_dynamic" else None,
        # the layout depends on the CPU it was chosen for: a graph with full 8-bit weights saturates on x86 without
        # VNNI, so loading checks this record against the CPU it runs on
        "int8_format": {**layout.to_dict(), "chosen_for": cpu.to_dict()} if scheme == "int8_dynamic" else None,
        "processor": _processor_settings(processor, model),
        "model_config": _strip_config(model),
        "versions": _versions(),
    }
    if processor is not None:
        processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(_readme(config))
    return ExportResult(folder, config, sorted(set(quantized)))


def _processor_settings(processor: Any, model: nn.Module) -> dict[str, Any]:
    vision = model.config.vision_config
    settings: dict[str, Any] = {"image_size": vision.image_size, "num_channels": vision.num_channels}
    image = getattr(processor, "image_processor", None)
    for key in ("image_mean", "image_std", "do_normalize", "rescale_factor", "size", "crop_size"):
        value = getattr(image, key, None)
        if value is not None:
            settings[key] = value if isinstance(value, (int, float, bool, str, list, dict)) else list(value)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        settings["tokenizer"] = type(tokenizer).__name__
        settings["padding_side"] = tokenizer.padding_side
    settings["files"] = "saved next to this file (processor.save_pretrained)" if processor is not None else None
    return settings


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vlmcompress", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _readme(config: dict[str, Any]) -> str:
    lines = ["# ONNX export (vlmcompress)", "",
             f"Family `{config['family']}`, scheme `{config['scheme']}`. Graphs (dynamic batch):", ""]
    for name, g in config["graphs"].items():
        ins = ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in g["inputs"].items())
        outs = ", ".join(f"{k} {v['dtype']} {v['shape']}" for k, v in g["outputs"].items())
        lines.append(f"- `{g['file']}` ({g['scheme']}): {ins} → {outs}; {g['description']}")
    lines += ["", "Run with vlmcompress (same evaluation and timing code as PyTorch models):", "",
              "    vlmcompress eval <this folder>",
              "    vlmcompress bench <checkpoint folder> --against <this folder>",
              "", "or with onnxruntime directly:", "", "    import onnxruntime as ort",
              "    sess = ort.InferenceSession('image_encoder.onnx', providers=['CPUExecutionProvider'])",
              "    embeds = sess.run(None, {'pixel_values': pixel_values})[0]", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# using an exported folder


def is_onnx_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a vlmcompress ONNX export (`config.json` with the `vlmcompress_onnx` marker)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return MARKER in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


CONFIG_CLASSES = {"clip": "CLIPConfig", "siglip": "SiglipConfig", "llava": "LlavaConfig"}


class OnnxModel(nn.Module):
    """An exported folder run by ONNX Runtime behind the methods that vlmcompress's evaluation and benchmark call.

    `get_image_features(pixel_values)` and (dual encoders) `get_text_features(input_ids, attention_mask)` return
    `torch.Tensor`s as the PyTorch model's do; `config` is the model's transformers config. It holds no torch
    parameters: everything runs in the ONNX Runtime sessions (`threads` intra-op threads).
    """

    vlmc_onnx = True

    def __init__(self, folder: Path, spec: dict[str, Any], threads: int | None = None):
        super().__init__()
        import transformers

        self.folder = folder
        self.spec = spec
        self.vlmc_family = spec["family"]
        self.config = getattr(transformers, CONFIG_CLASSES[spec["family"]]).from_dict(spec["model_config"])
        self.threads = threads or torch.get_num_threads()
        self.sessions = {name: session(folder / g["file"], self.threads) for name, g in spec["graphs"].items()}

    dtype = torch.float32
    device = torch.device("cpu")

    def _run(self, graph: str, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {k: v.detach().to("cpu").contiguous().numpy() for k, v in inputs.items()}
        return torch.from_numpy(self.sessions[graph].run(None, feed)[0])

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._run("image_encoder", pixel_values=pixel_values.float())

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
        if "text_encoder" not in self.sessions:
            raise VlmCompressError(f"'{self.folder}' has no text encoder graph")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self._run("text_encoder", input_ids=input_ids.long(), attention_mask=mask.long())

    def generate(self, *args, **kwargs):
        raise VlmCompressError(
            f"'{self.folder}' holds only the image encoder of the {self.vlmc_family} model (vision tower + projector) "
            "as ONNX, not its language model, so it cannot generate; evaluate VQA on the checkpoint folder next to "
            "it, and time the image encoder with `vlmcompress bench`")

    def forward(self, *args, **kwargs):
        raise VlmCompressError("call get_image_features / get_text_features on an ONNX Runtime model")

    def bench_static(self) -> dict[str, Any]:
        """What `vlmcompress bench` reports once per model: sizes, parameters, tokens and GFLOPs per workload."""
        graphs = self.spec["graphs"].values()
        files = [self.folder / g["file"] for g in graphs]
        tokens = next((g.get("tokens_per_layer") for g in graphs if g.get("tokens_per_layer")), None)
        schemes = sorted({g["scheme"] for g in graphs})
        return {"class": f"OnnxModel ({', '.join(self.spec['graphs'])})",
                "dtype": "+".join(schemes),
                "parameters": sum(sum(g["initializers"].values()) for g in graphs),
                "size_on_disk_bytes": sum(f.stat().st_size for f in files),
                "tokens_per_layer": tokens,
                "runtime": f"onnxruntime {_versions().get('onnxruntime')} CPUExecutionProvider, "
                           f"intra_op_num_threads={self.threads}, inter_op_num_threads=1, all graph optimizations, "
                           "no spinning",
                "gflops": {g["workload"]: g["gflops_per_sample"] for g in graphs}}


def load_onnx(folder: str | Path, threads: int | None = None) -> OnnxModel:
    """Open an exported folder (see `export`) with ONNX Runtime."""
    folder = Path(folder)
    if not is_onnx_folder(folder):
        raise ModelLoadError(f"'{folder}' is not a vlmcompress ONNX folder (no config.json with '{MARKER}')")
    spec = json.loads((folder / "config.json").read_text())
    if spec[MARKER] > FORMAT_VERSION:
        raise ModelLoadError(f"'{folder}' was written by a newer vlmcompress (ONNX format {spec[MARKER]}, this "
                             f"version reads {FORMAT_VERSION}); upgrade: pip install -U vlmcompress")
    missing = [g["file"] for g in spec["graphs"].values() if not (folder / g["file"]).is_file()]
    if missing:
        raise ModelLoadError(f"'{folder}' lacks {', '.join(missing)}; the export is incomplete, run it again")
    warning = saturation_warning(spec)
    if warning:
        print(f"vlmcompress: {warning}", file=sys.stderr)
    return OnnxModel(folder, spec, threads)


def saturation_warning(spec: dict[str, Any], cpu=None) -> str | None:
    """One line when an export with full 8-bit weights is run on a CPU whose int8 kernels saturate on them."""
    from .. import cpu as cpu_facts

    layout = spec.get("int8_format")
    if not layout or layout.get("reduce_range", True):
        return None
    cpu = cpu or cpu_facts.detect(with_torch=False)
    if not cpu.x86 or cpu.int8_dot_product:
        return None
    chosen_for = layout.get("chosen_for", {}).get("label", "unknown")
    return (f"this ONNX export has full 8-bit int8 weights, chosen for a CPU with VNNI ({chosen_for}); this CPU "
            f"({cpu.label()} has no VNNI, where ONNX Runtime's int8 sums can saturate and outputs drift: export again on "
            "this machine or with reduce_range: true in the quantize stage")
