"""`backend: onnxruntime`: export the encoders with `torch.onnx.export(dynamo=True)` and quantize their linear layers
with ONNX Runtime's dynamic int8, into the output folder's `onnx/`; the PyTorch checkpoint stays fp32. The int8
layout (7-bit weights on x86 without VNNI) is chosen by the CPU. Export and runtime:
`vlmcompress/integrations/onnx.py`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...errors import UnsupportedModelError, VlmCompressError
from ...selectors import matches
from ..base import RunContext
from .stage import QuantizeConfig, register_backend, resolve_scheme

@register_backend
class OnnxRuntimeConfig(QuantizeConfig):
    """ONNX Runtime dynamic int8 of the exported encoders."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    reduce_range: bool | None = Field(
        None, description="onnxruntime: int8 weights on 7 bits, which x86 CPUs without VNNI need against int16 "
                          "overflow; unset: chosen by this CPU (true without VNNI / AMX)")

    schemes = ("int8_dynamic", "fp32")
    package = "vlmcompress.integrations.onnx"

    def quantize(self, ctx: RunContext) -> dict[str, Any]:
        """Export and quantize into the output folder's `onnx/`.

        The PyTorch model is left as it is (the checkpoint stays fp32 and loads with `from_pretrained`); the graphs
        are written to a temporary folder registered in `ctx.artifacts["onnx"]`, which the orchestrator copies into
        the output folder. For dual encoders the exported graphs become `ctx.deployed`, so the accuracy and speed
        measured after this stage are those of ONNX Runtime.
        """
        import shutil
        import tempfile
        import weakref
        from pathlib import Path

        from ...integrations import onnx as vx

        scheme = resolve_scheme(self.backend, self.scheme)
        overrides = {c: resolve_scheme(self.backend, s) for c, s in self.overrides.items()}
        components = list(self.components) if self.components is not None else None
        family = ctx.adapter.family
        if family == "llava" and "llm" in (components or []) + [c for c, s in overrides.items() if s != "none"]:
            raise VlmCompressError("the onnxruntime backend exports LLaVA's vision tower and projector only; the "
                                   "language model stays in the PyTorch checkpoint: remove 'llm' from components / "
                                   "overrides (or quantize it with backend: torch)")
        tmp = Path(tempfile.mkdtemp(prefix="vlmcompress-onnx-"))
        weakref.finalize(ctx, shutil.rmtree, tmp, True)  # once the run (and its final save) is over
        result = vx.export(ctx.model, ctx.adapter, tmp / vx.ONNX_DIR, scheme=scheme, processor=ctx.processor,
                           components=components, overrides=overrides, ignore=list(self.ignore),
                           reduce_range=self.reduce_range)
        ctx.artifacts[vx.ONNX_DIR] = result.folder
        if family in ("clip", "siglip"):
            ctx.deployed = vx.load_onnx(result.folder)
        graphs = {}
        for name, g in result.config["graphs"].items():
            graphs[name] = {"file": f"{vx.ONNX_DIR}/{g['file']}", "scheme": g["scheme"],
                            "bytes": (result.folder / g["file"]).stat().st_size,
                            "quantized_modules": len(g.get("quantized_modules", [])), "check_fp32": g["check_fp32"],
                            "check": g.get("check"), "export_seconds": g["seconds"]}
        return {"backend": "onnxruntime", "scheme": self.scheme, "resolved_scheme": scheme,
                "output": f"{vx.ONNX_DIR}/", "graphs": graphs, "matched": result.quantized,
                "int8_format": result.config["int8_format"],
                "note": ("PyTorch weights stay fp32 (the checkpoint loads with from_pretrained); the ONNX graphs in "
                         "onnx/ are what was quantized" + ("; accuracy and speed after this stage are ONNX Runtime's"
                                                           if ctx.deployed is not None else
                                                           "; LLaVA's language model is not exported"))}

    def card_lines(self, details: dict[str, Any]) -> list[str]:
        """The model card's section on the graphs this stage wrote into `onnx/` (from its report details)."""
        after = ("Accuracy and speed *after* above are those of the ONNX graphs."
                 if "accuracy" in details or "speed" in details else "")
        lines = ["", "## ONNX Runtime", "",
                 "`onnx/` holds the encoders exported to ONNX and run with ONNX Runtime (scheme "
                 f"`{details['resolved_scheme']}`); the PyTorch weights in this folder are the unchanged fp32 model. "
                 + after, ""]
        layout = details.get("int8_format")
        if layout:
            lines += [f"int8 weights on {7 if layout['reduce_range'] else 8} bits, chosen for "
                      f"{layout['chosen_for']['label']}: {layout['reason']}.", ""]
        lines += ["| graph | scheme | bytes | int8 linear layers | min cosine vs torch fp32 |",
                  "|---|---|---|---|---|"]
        for name, g in details["graphs"].items():
            check = g.get("check") or g["check_fp32"]
            lines.append(f"| `{g['file']}` | {g['scheme']} | {g['bytes']:,} | {g['quantized_modules']} | "
                         f"{check['min_cosine']} |")
        lines += ["", "Evaluate and time them with `vlmcompress eval FOLDER/onnx` and `vlmcompress bench FOLDER "
                  "--against FOLDER/onnx`; `onnx/config.json` lists what every graph takes and returns."]
        return lines

    def plan(self, model, adapter) -> dict[str, Any]:
        """What would be exported and quantized, from shapes only (`validate`, dry runs).

        Linear layers are counted per component as the stage would select them (exact names and `re:` selectors of
        `ignore`); the dual encoders' projections sit outside the components and stay fp32 in the graphs anyway.
        """
        from torch import nn

        from ... import cpu as cpu_facts
        from ...integrations.onnx import int8_format
        from ...integrations.onnx_graphs import GRAPH_COMPONENTS

        family = adapter.family
        if family not in GRAPH_COMPONENTS:
            raise UnsupportedModelError(f"the onnxruntime backend exports {', '.join(GRAPH_COMPONENTS)} models; "
                                        f"this one is a {family} model")
        scheme = resolve_scheme(self.backend, self.scheme)
        overrides = {c: resolve_scheme(self.backend, s) for c, s in self.overrides.items()}
        components = adapter.components(model)
        layout = int8_format(cpu_facts.detect(), self.reduce_range)
        plan: dict[str, Any] = {"backend": "onnxruntime", "scheme": scheme, "graphs": {}, "int8 linear layers": {},
                                "int8 weights": f"{7 if layout.reduce_range else 8} bits ({layout.reason})"}
        for name, owned in GRAPH_COMPONENTS[family].items():
            chosen = [c for c in owned if (self.components is None or c in self.components)
                      and overrides.get(c, scheme) not in ("none", "fp32")]
            plan["graphs"][name] = f"{'int8_dynamic' if chosen else 'fp32'} ({'+'.join(owned)})"
            for component in chosen:
                path = adapter.component_paths[component]
                count = 0
                for sub, module in components[component].named_modules():
                    parts = f"{path}.{sub}".split(".") if sub else path.split(".")
                    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                    if type(module) is nn.Linear and not any(matches(s, n) for s in self.ignore for n in names):
                        count += 1
                plan["int8 linear layers"][component] = count
        if family == "llava":
            plan["not exported"] = "llm (stays in the PyTorch checkpoint)"
        return plan
