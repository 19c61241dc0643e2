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

Folder layout (inside the quantize stage's output folder, next to the fp32 checkpoint), format 2:
`onnx/config.json` is the transformers config of the exported model (stock `model_type`, the stock class in
`architectures`, the exported shapes; `AutoConfig.from_pretrained("onnx")` reads it as Optimum's ORT models do)
with vlmcompress's description of the graphs under `vlmcompress_onnx` (what every graph takes and returns, checks,
int8 layout, processor settings, versions); `onnx/*.onnx`; the processor files. CLIP and SigLIP also get
`model.onnx`, the whole model with the file, input and output names of Optimum's zero-shot-image-classification
export (optimum-onnx 0.1.0: `input_ids`, `pixel_values`, CLIP's `attention_mask` → `logits_per_image`,
`logits_per_text`, `text_embeds`, `image_embeds`). Format 1 folders (the description was the whole file) still
load. `load_onnx(folder)` returns an `OnnxModel`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VlmCompressError
from ..selectors import matches
from .onnx_graphs import (  # noqa: F401
    FAMILIES,
    Graph,
    ImageEncoder,
    LlavaImageEncoder,
    OnnxExportError,
    TextEncoder,
    check_exportable,
    fixed_schedule,
    graphs_for,
    transformers_config,
)
from .onnx_int8 import Int8Format, initializer_types, int8_format, linear_nodes, quantize_graph, strip_metadata  # noqa: F401
from .onnx_runtime import (  # noqa: F401
    FORMAT_VERSION,
    MARKER,
    ONNX_DIR,
    OnnxModel,
    _versions,
    is_onnx_folder,
    load_onnx,
    require,
    saturation_warning,
    read_spec,
    session,
    write_spec,
)

OPSET = 18
SCHEMES = ("int8_dynamic", "fp32")
# an fp32 graph must reproduce torch within this (relative to the largest output), or the export is refused
FP32_TOLERANCE = 1e-4


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
                              opset_version=OPSET, input_names=list(graph.example), output_names=list(graph.outputs),
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


def _compare(graph: Graph, sess) -> dict[str, float]:
    """ORT vs torch on batches of 1 and 3 (different from the export batch of 2): max |Δ|, max |Δ| relative to the
    largest output, and the smallest cosine similarity of an output row, over every output of the graph."""
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
            refs = [r.float() for r in graph.run(**inputs)]
        outs = [torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in inputs.items()})]
        for name, out, ref in zip(graph.outputs, outs, refs):
            if out.shape != ref.shape:
                raise OnnxExportError(f"the exported {graph.name} returns {name} of shape {tuple(out.shape)} at "
                                      f"batch {batch}; torch returns {tuple(ref.shape)}")
            diff = (out - ref).abs().max().item()
            cosine = nn.functional.cosine_similarity(out.reshape(batch, -1), ref.reshape(batch, -1), dim=-1)
            worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
            worst["max_rel_diff"] = max(worst["max_rel_diff"], diff / max(ref.abs().max().item(), 1e-12))
            worst["min_cosine"] = min(worst["min_cosine"], cosine.min().item())
    return {k: float(f"{v:.6g}") for k, v in worst.items()}


def _quantized_component(component: str, scheme: str, components: list[str] | None,
                         overrides: dict[str, str]) -> bool:
    return (components is None or component in components) and overrides.get(component, scheme) not in ("none",
                                                                                                         "fp32")


def _graph_scheme(graph: Graph, scheme: str, components: list[str] | None, overrides: dict[str, str]) -> str:
    """int8 when any component of the graph is quantized (the whole model graph holds two), else fp32."""
    chosen = [c for c in graph.components if _quantized_component(c, scheme, components, overrides)]
    return "fp32" if not chosen else overrides.get(chosen[0], scheme)


def _quantized_modules(graph: Graph, nodes: dict[str, str], scheme: str, components: list[str] | None,
                       overrides: dict[str, str], ignore: list[str], adapter) -> dict[str, str]:
    """The subset of `nodes` (node → module) to quantize: in a quantized component, and neither the module nor a
    parent matched by an `ignore` selector (exact name or `re:` regex, as in the stages)."""
    paths = adapter.component_paths
    chosen = {}
    for node, module in nodes.items():
        component = next((c for c in graph.components if module.startswith(paths.get(c, "\0") + ".")),
                         graph.components[0])  # projections outside every component belong to the graph's own
        if not _quantized_component(component, scheme, components, overrides):
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
    gflops = {w.key: float(f"{count_gflops(w.build(model, adapter, 1, torch.device('cpu')), model):.6g}")
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
                shapes = [list(out.shape) for out in graph.run(**graph.example)]
            entry["gflops_per_sample"] = gflops.get(graph.workload)
            entry["outputs"] = {name: {"dtype": "float32", "shape": [*axes, *shape[len(axes):]]}
                                for (name, axes), shape in zip(graph.outputs.items(), shapes)}
            if graph.vision:
                entry["tokens_per_layer"] = tokens
            described[graph.name] = entry
    spec = {
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
        "model_config": transformers_config(model),
        "versions": _versions(),
    }
    if processor is not None:
        processor.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(write_spec(spec), indent=2) + "\n")
    (folder / "README.md").write_text(_readme(spec))
    return ExportResult(folder, spec, sorted(set(quantized)))


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


def _readme(config: dict[str, Any]) -> str:
    lines = ["# ONNX export (vlmcompress)", "",
             f"Family `{config['family']}`, scheme `{config['scheme']}`. `config.json` is the transformers config of "
             "the exported model (`AutoConfig.from_pretrained` reads it); its `vlmcompress_onnx` entry describes the "
             "graphs. Graphs (dynamic batch):", ""]
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
    if "model" in config["graphs"]:
        lines += ["`model.onnx` has the file, input and output names of Optimum's zero-shot-image-classification "
                  "export (optimum-onnx 0.1.0), which `ORTModelForZeroShotImageClassification.from_pretrained(<this "
                  "folder>)` loads; optimum-onnx 0.1.0 requires transformers < 4.58, so that client is not tested "
                  "here.", ""]
    return "\n".join(lines)
