"""Running an exported folder: ONNX Runtime sessions as vlmcompress sets them up, `load_onnx(folder)` → an
`OnnxModel` that evaluation and `vlmcompress bench` use like a PyTorch model, and the check that the folder's int8
layout suits the CPU it runs on. The folder layout is described in `onnx.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, VlmCompressError
from . import optional_import

ONNX_DIR = "onnx"
MARKER = "vlmcompress_onnx"
# 1: `config.json` is vlmcompress's description with the model config under `model_config`;
# 2: `config.json` is the transformers config of the exported model (stock `model_type`, as Optimum's ORT models
#    read it) with vlmcompress's description under `vlmcompress_onnx`; adds Optimum's whole-model `model.onnx`
FORMAT_VERSION = 2


def require() -> None:
    """Import the optional packages once, turning a missing one into the one-line install hint."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        optional_import(module, module, "onnx")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vlmcompress", "torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


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


def is_onnx_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a vlmcompress ONNX export (`config.json` with the `vlmcompress_onnx` marker)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return MARKER in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def write_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """`config.json` of an export (format 2): the model's transformers config, the description inside it."""
    block = {k: v for k, v in spec.items() if k not in (MARKER, "model_config")}
    return {**spec["model_config"], MARKER: {"format_version": spec[MARKER], **block}}


def read_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The description of an export, from its `config.json` of either format, as one dict: the format version
    under `MARKER`, the model config under `model_config`, the rest as written."""
    block = raw.get(MARKER)
    if not isinstance(block, dict):  # format 1: the description is the file
        return raw
    spec = {k: v for k, v in block.items() if k != "format_version"}
    return {MARKER: block.get("format_version", FORMAT_VERSION), **spec,
            "model_config": {k: v for k, v in raw.items() if k != MARKER}}


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
        # the graphs vlmcompress's evaluation and timing call (not Optimum's whole-model graph, which repeats them)
        self.graphs = {name: g for name, g in spec["graphs"].items() if g.get("workload", name) is not None}
        self.sessions = {name: session(folder / g["file"], self.threads) for name, g in self.graphs.items()}

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
        graphs = self.graphs.values()
        files = [self.folder / g["file"] for g in graphs]
        tokens = next((g.get("tokens_per_layer") for g in graphs if g.get("tokens_per_layer")), None)
        schemes = sorted({g["scheme"] for g in graphs})
        return {"class": f"OnnxModel ({', '.join(self.graphs)})",
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
    spec = read_spec(json.loads((folder / "config.json").read_text()))
    if spec[MARKER] > FORMAT_VERSION:
        raise ModelLoadError(f"'{folder}' was written by a newer vlmcompress (ONNX format {spec[MARKER]}, this "
                             f"version reads {FORMAT_VERSION}); upgrade: pip install -U vlmcompress")
    # only the graphs OnnxModel runs: Optimum's whole-model `model.onnx` repeats the encoders, and a user may drop it
    missing = [g["file"] for name, g in spec["graphs"].items()
               if g.get("workload", name) is not None and not (folder / g["file"]).is_file()]
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
    if layout is None and spec.get("scheme") == "int8_dynamic":
        # written before the layout was recorded (ONNX format 1 exports up to 98808e1): always full 8-bit weights
        layout = {"reduce_range": False, "chosen_for": {"label": "an unrecorded CPU"}}
    if not layout or layout.get("reduce_range", True):
        return None
    cpu = cpu or cpu_facts.detect()  # cpuid: what ONNX Runtime's kernels dispatch on
    if not cpu.x86 or cpu.int8_dot_product:
        return None
    chosen_for = layout.get("chosen_for", {}).get("label", "unknown")
    return (f"this ONNX export has full 8-bit int8 weights, chosen for a CPU with VNNI ({chosen_for}); this CPU "
            f"({cpu.label()} has no VNNI, where ONNX Runtime's int8 sums can saturate and outputs drift: export again "
            "on "
            "this machine or with reduce_range: true in the quantize stage")
