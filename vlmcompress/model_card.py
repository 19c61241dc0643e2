"""The `README.md` model card written into every checkpoint: Hub metadata plus what was done and measured."""

from __future__ import annotations

from typing import Any

import yaml
from torch import nn


def model_card(recipe, report: dict[str, Any], model: nn.Module, local_source: bool = False,
               prompt: str | None = None) -> str:
    """The card of an output; `recipe` as the output records it (local paths by their last part); `local_source`:
    the source model was a local folder (no Hub `base_model` then, and the card says so); `prompt`: the prompt its
    chat template builds for one image and a question (generative models)."""
    methods = [s.method for s in recipe.stages]
    algos = [getattr(s, "algorithm", None) for s in recipe.stages]
    meta = {
        **({} if local_source else {"base_model": recipe.model}),
        **({"model-index": [{"name": recipe.output, "results": [{
            "task": {"type": "image-text-retrieval"},
            "metrics": [{"type": k, "value": v} for k, v in report["accuracy"]["after"].items()
                        if k.startswith(("recall@", "zero_shot_shape"))]}]}]} if report.get("accuracy") else {}),
        "library_name": "transformers",
        "tags": ["vlmcompress", "compressed", report["family"], *methods, *[a for a in algos if a]],
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {recipe.model} — compressed with vlmcompress", "",
             f"This checkpoint was produced from `{recipe.model}`"
             f"{' (a local folder, recorded by its name only)' if local_source else ''} by the recipe in "
             f"`recipe.yaml` ({' → '.join(methods)}).", "",
             "| | before | after | ratio |", "|---|---|---|---|",
             f"| parameters | {report['params_before']:,} | {report['params_after']:,} | {report['params_ratio']} |"]
    for comp, tokens in report["tokens_per_layer"].items():
        lines.append(f"| {comp} tokens (input → last layer) | {tokens[0]} | {tokens[-1]} | "
                     f"{round(tokens[-1] / tokens[0], 3)} |")
    accuracy = report.get("accuracy")
    if accuracy:
        data = accuracy["data"]
        lines += ["", f"Accuracy on `{data.get('builtin') or data.get('path') or data.get('hf')}` "
                      f"({data['split']}, {data.get('size') or 'all'} pairs), measured by `vlmcompress apply`:", "",
                  "| metric | before | after |", "|---|---|---|"]
        for metric in ("recall@1", "recall@5", "i2t_R@1", "t2i_R@1", "zero_shot_shape"):
            if metric in accuracy["before"]:
                lines.append(f"| {metric} | {accuracy['before'][metric]:.4f} | {accuracy['after'][metric]:.4f} |")
    speed = report.get("speed")
    if speed:
        b, a = speed["before"], speed["after"]
        how = (f"{speed['interleaved']['rounds']} interleaved rounds of the uncompressed and the compressed model"
               if speed.get("interleaved") else "measured before and after the stages, not interleaved")
        lines += ["", f"Speed of `{b['workload']}` at batch {b['batch_size']} ({b['threads']} CPU threads, {how}, by "
                      "`apply`; `vlmcompress bench --against` measures every workload):", "",
                  "| | before | after | ratio |", "|---|---|---|---|",
                  f"| ms per batch (median) | {b['ms_median']} | {a['ms_median']} | {speed['speedup']}× faster |",
                  f"| GFLOPs per sample | {b['gflops_per_sample']} | {a['gflops_per_sample']} | "
                  f"{speed['flops_reduction']}× fewer |"]
    lines += quantization_lines(model)
    lines += stage_lines(recipe, report)
    lines += ["", "## Stages", ""]
    for i, stage in enumerate(report["stages"], 1):
        lines.append(f"{i}. `{stage['method']}`: {len(stage['matched'])} modules changed, parameters "
                     f"{stage['params_before']:,} → {stage['params_after']:,} ({stage['seconds']} s)")
    lines += ["", "## How to load", "", "```python", "from transformers import AutoModel",
              'model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True)',
              "# or, without running code from the folder:", "import vlmcompress",
              'model = vlmcompress.load("path/or/hub-id")', "```", "",
              *(["Prompt (what `processor.apply_chat_template` builds for an image and a question, and what the "
                 "`image-text-to-text` pipeline sends for chat-style input):", "", "```text", prompt, "```", ""]
                if prompt else []),
              "The token-reduction layers and per-layer shapes are rebuilt from `config.json` "
              "(`token_reduction`, `vlmcompress`) by the modeling files in this folder. The stock class without "
              "remote code (e.g. `LlavaForConditionalGeneration.from_pretrained`) gives the *unreduced* model "
              "(its token reduction is not applied), and fails on pruned shapes: load with "
              "`trust_remote_code=True` or `vlmcompress.load` for the compressed one.", ""]
    return "\n".join(lines)


def stage_lines(recipe, report: dict) -> list[str]:
    """What each stage's plug-in says about its result in the card: the `card_lines(details)` of its config class,
    where it has one (e.g. the ONNX Runtime graphs that `quantize: {backend: onnxruntime}` wrote into `onnx/`)."""
    lines: list[str] = []
    for config, stage in zip(recipe.stages, report["stages"]):
        card = getattr(config, "card_lines", None)
        if card is not None:
            lines += card(stage["details"])
    return lines


def quantization_lines(model: nn.Module) -> list[str]:
    """The quantization scheme per component and, honestly, whether it makes the model faster on CPU."""
    spec = getattr(model.config, "quantization", None)
    if not spec:
        return []
    lines = ["", "## Quantization", ""]
    requested = spec.get("requested", {})
    resolved = spec.get("resolved")
    if resolved:
        lines.append(f"`scheme: int8` resolved to `{resolved['int8']}` ({resolved['why']}).")
        lines.append("")
    lines += ["| component | backend | scheme | layers | CPU speed |", "|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for entry in spec["modules"].values():
        counts[entry["scheme"]] = counts.get(entry["scheme"], 0) + 1
    for comp, scheme in spec["schemes"].items():
        lines.append(f"| {comp} | {scheme['backend']} | `{scheme['scheme']}` | {counts.get(comp, 0)} | "
                     f"{scheme.get('cpu_speed', 'not measured')} |")
    if spec.get("compile"):
        lines += ["", f"The quantized components ({', '.join(spec['compile'])}) are `torch.compile`d when the model "
                      "loads; the first call of each input shape compiles (tens of seconds)."]
    lines += ["", f"Quantized layers hold integer weights in memory; loading needs the backend "
                  f"`{requested.get('backend', '?')}` installed (`pip install 'vlmcompress[<backend>]'` for torchao, "
                  "quanto and neural_compressor)."]
    return lines
