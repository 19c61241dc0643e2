"""The `README.md` model card written into every checkpoint: Hub metadata built with `huggingface_hub.ModelCardData`
(so that the Hub parses it: `base_model`, `base_model_relation`, `pipeline_tag`, `model-index` results with their
dataset), and a body saying what was done and measured, how to load the model, and its limits."""

from __future__ import annotations

from typing import Any

import yaml
from torch import nn

# the pipeline of each family's stock class (`checkpoint.task_auto_classes`): BLIP's retrieval model has none
PIPELINE_TAGS = {"clip": "zero-shot-image-classification", "siglip": "zero-shot-image-classification",
                 "llava": "image-text-to-text", "blip2": "image-text-to-text"}
TRAINING_METHODS = {"finetune", "distill"}
# the methods that leave the weights as they are (training-free token reduction re-routes tokens only)
WEIGHTS_KEPT = {"token_reduce"}


def base_model_relation(methods: list[str]) -> str | None:
    """`finetune` when a stage trained, `quantized` when quantize is the only stage that changed weights, else None
    (pruned models have no relation the Hub names; never `adapter`: LoRA adapters are merged)."""
    if TRAINING_METHODS & set(methods):
        return "finetune"
    changed = {m for m in methods if m not in WEIGHTS_KEPT}
    return "quantized" if changed == {"quantize"} else None


def hub_base_model(source: str, local_source: bool, given: str | None = None) -> str | None:
    """The `base_model` of the card: `given` (push --base-model), else the source when it is a Hub id (not a local
    folder, not a built-in name)."""
    if given:
        return given
    if local_source or "/" not in source:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .models import builtin_names

    if source in builtin_names():
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _data_source(recipe) -> Any:
    data = getattr(recipe, "data", None)
    return None if data is None else data.eval


def _dataset_names(recipe) -> list[str]:
    """Hub dataset ids among the recipe's data sources (built-in worlds and local files are named in the body)."""
    data = getattr(recipe, "data", None)
    found = []
    for split in ("train", "eval"):
        source = getattr(data, split, None) if data is not None else None
        if source is not None and source.hf and source.hf not in found:
            found.append(source.hf)
    return found


def eval_results(recipe, report: dict[str, Any]) -> list:
    """`model-index` results: every metric after compression, with the data it was measured on."""
    from huggingface_hub import EvalResult

    accuracy = report.get("accuracy")
    if not accuracy:
        return []
    source = _data_source(recipe)
    data = accuracy.get("data", {})
    dataset = data.get("hf") or (f"{data['builtin']} (vlmcompress built-in)" if data.get("builtin") else
                                 data.get("path") or "local data")
    task = "visual-question-answering" if report["family"] in ("llava", "blip2") else "image-text-retrieval"
    return [EvalResult(task_type=task, dataset_type=data.get("hf") or data.get("builtin") or "local",
                       dataset_name=dataset, dataset_split=data.get("split") or getattr(source, "split", None),
                       metric_type=metric, metric_value=round(float(value), 4), metric_name=metric)
            for metric, value in accuracy["after"].items() if isinstance(value, (int, float))]


def card_data(recipe, report: dict[str, Any], local_source: bool, base_model: str | None = None):
    from huggingface_hub import ModelCardData

    methods = [s.method for s in recipe.stages]
    algorithms = [a for a in (getattr(s, "algorithm", None) for s in recipe.stages) if a]
    base = hub_base_model(recipe.model, local_source, base_model)
    extra = {}
    if base is not None and base_model_relation(methods):
        extra["base_model_relation"] = base_model_relation(methods)
    return ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag=PIPELINE_TAGS.get(report["family"]),
        tags=list(dict.fromkeys(["vlmcompress", "compressed", report["family"], *methods, *algorithms])),
        datasets=_dataset_names(recipe) or None, eval_results=eval_results(recipe, report) or None,
        model_name=recipe.output, **extra)


def model_card(recipe, report: dict[str, Any], model: nn.Module, local_source: bool = False,
               prompt: str | None = None, base_model: str | None = None) -> str:
    """The card of an output; `recipe` as the output records it (local paths by their last part); `local_source`:
    the source model was a local folder (no Hub `base_model` then, and the card says so); `prompt`: the prompt its
    chat template builds for one image and a question (generative models); `base_model`: a Hub id to name as the
    base whatever the source was."""
    from huggingface_hub import ModelCard

    data = card_data(recipe, report, local_source, base_model)
    body = body_lines(recipe, report, model, local_source, prompt)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def body_lines(recipe, report: dict[str, Any], model: nn.Module, local_source: bool, prompt: str | None) -> list[str]:
    methods = [s.method for s in recipe.stages]
    lines = [f"# {recipe.model} — compressed with vlmcompress", "",
             f"This checkpoint was produced from `{recipe.model}`"
             f"{' (a local folder, recorded by its name only)' if local_source else ''} by the recipe below "
             f"({' → '.join(methods)}) with vlmcompress.", ""]
    lines += result_lines(report)
    lines += quantization_lines(model)
    lines += stage_lines(recipe, report)
    lines += ["", "## Stages", ""]
    for i, stage in enumerate(report["stages"], 1):
        lines.append(f"{i}. `{stage['method']}`: {len(stage['matched'])} modules changed, parameters "
                     f"{stage['params_before']:,} → {stage['params_after']:,} ({stage['seconds']} s)")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).strip(), "```"]
    lines += load_lines(report["family"], prompt)
    lines += limitation_lines(report, methods)
    versions = report.get("versions") or {}
    if versions:
        lines += ["", "## Library versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return lines + [""]


def result_lines(report: dict[str, Any]) -> list[str]:
    """The before / after table: parameters, tokens, GFLOPs, latency and throughput (machine named), accuracy."""
    lines = ["## Results", "", "| | before | after | ratio |", "|---|---|---|---|",
             f"| parameters | {report['params_before']:,} | {report['params_after']:,} | {report['params_ratio']} |"]
    for comp, tokens in report["tokens_per_layer"].items():
        lines.append(f"| {comp} tokens (input → last layer) | {tokens[0]} | {tokens[-1]} | "
                     f"{round(tokens[-1] / tokens[0], 3)} |")
    speed = report.get("speed")
    if speed:
        b, a = speed["before"], speed["after"]
        lines += [f"| GFLOPs per sample | {b['gflops_per_sample']} | {a['gflops_per_sample']} | "
                  f"{speed['flops_reduction']}× fewer |",
                  f"| ms per batch of {b['batch_size']} (median) | {b['ms_median']} | {a['ms_median']} | "
                  f"{speed['speedup']}× faster |",
                  f"| samples per second | {round(b['batch_size'] * 1e3 / b['ms_median'], 2)} | "
                  f"{round(a['batch_size'] * 1e3 / a['ms_median'], 2)} | |"]
    accuracy = report.get("accuracy")
    if accuracy:
        for metric in ("recall@1", "recall@5", "i2t_R@1", "t2i_R@1", "zero_shot_shape", "vqa_exact_match"):
            if metric in accuracy["before"]:
                lines.append(f"| {metric} | {accuracy['before'][metric]:.4f} | {accuracy['after'][metric]:.4f} | |")
    if speed:
        how = (f"{speed['interleaved']['rounds']} interleaved rounds of the uncompressed and the compressed model"
               if speed.get("interleaved") else "measured before and after the stages, not interleaved")
        machine = speed.get("machine") or _machine()
        lines += ["", f"Speed: `{speed['before']['workload']}` on {machine}, {speed['before']['threads']} CPU "
                      f"threads, {how}, by `vlmcompress apply` (`vlmcompress bench --against` measures every "
                      "workload)."]
    if accuracy:
        data = accuracy["data"]
        lines += ["", f"Accuracy on `{data.get('builtin') or data.get('path') or data.get('hf')}` ({data['split']}, "
                      f"{data.get('size') or 'all'} examples), measured by `vlmcompress apply`."]
    elif report.get("accuracy_not_measured"):
        lines += ["", report["accuracy_not_measured"]]
    return lines


def _machine() -> str:
    from .cpu import detect

    return f"CPU {detect().label()}"


def load_lines(family: str, prompt: str | None) -> list[str]:
    lines = ["", "## How to load", "", "```python", "from transformers import AutoModel",
             'model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True)',
             "# or, with vlmcompress installed, without running code from the folder:", "import vlmcompress",
             'model = vlmcompress.load("path/or/hub-id")', "```"]
    tag = PIPELINE_TAGS.get(family)
    if tag == "zero-shot-image-classification":
        lines += ["", "```python", "from transformers import pipeline",
                  'classify = pipeline("zero-shot-image-classification", model="path/or/hub-id", '
                  "trust_remote_code=True)", 'classify(image, candidate_labels=["a red circle", "a blue square"])',
                  "```"]
    elif tag == "image-text-to-text":
        lines += ["", "```python", "from transformers import pipeline",
                  'chat = pipeline("image-text-to-text", model="path/or/hub-id", trust_remote_code=True)',
                  'chat(text=[{"role": "user", "content": [{"type": "image", "image": image}, '
                  '{"type": "text", "text": "What shape is it?"}]}], max_new_tokens=8)', "```"]
    if prompt:
        lines += ["", "Prompt (what `processor.apply_chat_template` builds for an image and a question, and what the "
                      "`image-text-to-text` pipeline sends for chat-style input):", "", "```text", prompt, "```"]
    return lines


def limitation_lines(report: dict[str, Any], methods: list[str]) -> list[str]:
    lines = ["", "## Limitations", "",
             "- The token-reduction layers and per-layer shapes are rebuilt from `config.json` (`token_reduction`, "
             "`vlmcompress`) by the modeling files in this folder. The stock class without remote code (e.g. "
             "`LlavaForConditionalGeneration.from_pretrained`, or `AutoModel.from_pretrained` without "
             "`trust_remote_code`) gives the *unreduced* model (its token reduction is not applied), and fails on "
             "pruned shapes: load with `trust_remote_code=True` or `vlmcompress.load` for the compressed one."]
    if "quantize" in methods:
        lines.append("- Quantized layers are CPU kernels chosen for the CPU the model was quantized on (see "
                     "Quantization); speed differs on other CPUs. Without `trust_remote_code` the stock class "
                     "finds no `weight` for them and initialises them randomly (transformers lists them as missing).")
    if not report.get("accuracy"):
        lines.append("- Accuracy was not measured by `apply` (no `data.eval` in the recipe, or a family its "
                     "evaluation does not cover).")
    if report.get("base_model") and "shapes" in str(report.get("base_model")):
        lines.append("- Built from a model of the built-in `shapes` world (tiny, trained on synthetic images): a "
                     "demonstration of the pipeline, not a model for real images.")
    return lines


def quantization_lines(model: nn.Module) -> list[str]:
    """The quantization scheme per component and, honestly, whether it makes the model faster on CPU."""
    spec = getattr(model.config, "quantization", None)
    if not spec:
        return []
    lines = ["", "## Quantization", ""]
    resolved = spec.get("resolved")
    if resolved and "path" in resolved:  # chosen for the CPU it was quantized on (stages/quantize/int8_paths.py)
        options = ", ".join(f"{k}: {v}" for k, v in resolved.get("options", {}).items())
        lines += [f"`scheme: int8` resolved to the int8 path `{resolved['path']}` ({options}) for a "
                  f"{resolved['cpu_class']} CPU ({resolved['cpu']}): {resolved['why']}. The model always runs this "
                  "path; on another kind of CPU `vlmcompress.load` says when quantizing again there would pick a "
                  "faster one.", ""]
    elif resolved:
        lines += [f"`scheme: int8` resolved to `{resolved['int8']}` ({resolved['why']}).", ""]
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
    backend = next(iter(spec["schemes"].values()), {}).get("backend", "?")
    lines += ["", f"Quantized layers hold integer weights in memory; loading needs the backend `{backend}` installed "
                  "(`pip install 'vlmcompress[<backend>]'` for torchao, quanto and neural_compressor)."]
    return lines


def stage_lines(recipe, report: dict) -> list[str]:
    """What each stage's plug-in says about its result in the card: the `card_lines(details)` of its config class,
    where it has one (e.g. the ONNX Runtime graphs that `quantize: {backend: onnxruntime}` wrote into `onnx/`)."""
    lines: list[str] = []
    for config, stage in zip(recipe.stages, report["stages"]):
        card = getattr(config, "card_lines", None)
        if card is not None:
            lines += card(stage["details"])
    return lines
