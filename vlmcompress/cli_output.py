"""What the command line prints, apart from the commands themselves (`cli.py`): the plan of `validate` /
`--dry-run`, the evaluation tables, `apply`'s speed line, and the silencing of third-party import noise."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)  # summary lines stay whole in logs and pipes
err_console = Console(stderr=True)


def _print_plan(recipe_path: Path) -> None:
    from .adapters import adapter_for
    from .models import load_model
    from .orchestrator import build_stages
    from .recipe import load_recipe
    from .stages.base import count_params

    recipe = load_recipe(recipe_path)
    stages = build_stages(recipe)
    model, _ = load_model(recipe.model, recipe.dtype, recipe.trust_remote_code, meta=True)
    adapter = adapter_for(model)
    for stage in stages:
        stage.check(model, adapter)
    console.print(f"[bold]{recipe_path}[/bold]: model {recipe.model} ({adapter.family}, "
                  f"{count_params(model):,} parameters) → {recipe.output}", highlight=False)
    unchecked = "the weights (NaN / inf values, corrupt files), the data and the accuracy guards"
    if recipe.trust_remote_code:
        unchecked += "; the model's own code (trust_remote_code: a check never runs it)"
    console.print(f"not checked without weights: {unchecked}", highlight=False)
    table = Table("#", "method", "plan (before → after; estimated from shapes, no weights)")
    for i, stage in enumerate(stages, 1):
        plan = stage.plan(model, adapter)
        table.add_row(str(i), stage.config.method, _format_plan(plan))
    console.print(table)
    console.print("recipe is valid; nothing was written", style="green")


def _format_plan(plan: dict) -> str:
    lines = []
    for key, value in plan.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v[0]:,} → {v[1]:,}" if isinstance(v, list) and len(v) == 2 else f"{k} {v}"
                              for k, v in value.items())
            lines.append(f"{key}: {inner}")
        elif isinstance(value, list) and len(value) == 2 and key == "tokens":
            lines.append(f"tokens {value[0]} → {value[1]}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _eval_on_data(name: str, model, processor, family: str, data: str, size: int, as_json: bool) -> None:
    from .accuracy import measure, not_measured
    from .data import load_rows
    from .data.schema import DataSource
    from .errors import VlmCompressError

    if data.startswith("hf:"):
        dataset, _, split = data[3:].partition(":")
        source = DataSource(hf=dataset, split=split or "test")
    else:
        source = DataSource(path=data)
    rows = load_rows(source, model, 0, size)
    result = measure(model, processor, family, rows)
    if result is None:
        raise VlmCompressError(not_measured(family, rows, processor) or f"eval cannot measure a {family} model on "
                               f"{data}")
    if as_json:
        print(json.dumps({"model": name, "data": data, "size": len(rows), **result}, indent=2))
        return
    table = Table("metric", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}")
    console.print(f"[bold]{name}[/bold] on {data} ({len(rows)} examples)", highlight=False)
    console.print(table)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].rstrip(".")


def _print_vqa(model: str, result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"model": model, **result}, indent=2))
        return
    table = Table("VQA exact match", "value")
    for key, value in result.items():
        if key != "n":
            table.add_row(key.replace("_", " "), f"{value:.4f}")
    console.print(f"[bold]{model}[/bold] on {result['n']} shapes test questions", highlight=False)
    console.print(table)


def int8_lines(report: dict) -> list[str]:
    """What `scheme: int8` resolved to (path, why) and, where ONNX Runtime's int8 is known to be faster on this
    kind of CPU, the advice to use it."""
    lines = []
    for stage in report["stages"]:
        resolved = stage["details"].get("resolved") or {}
        if "path" in resolved:
            options = ", ".join(f"{k} {v}" for k, v in resolved["options"].items())
            lines.append(f"int8: {resolved['path']} ({options}): {resolved['why']}")
        if stage["details"].get("advice"):
            lines.append(stage["details"]["advice"])
    return lines


def speed_line(speed: dict) -> str:
    """`image (batch 8): 1.52× faster (median of 5 interleaved rounds, 1.41–1.63×), GFLOPs 1.74× fewer`, or the
    reason no ratio is printed."""
    head = f"{speed['before']['workload']} (batch {speed['before']['batch_size']})"
    flops = f"GFLOPs {speed['flops_reduction']}× fewer"
    compared = speed.get("interleaved")
    if not compared:
        return (f"{head}: {speed['before']['ms_median']} → {speed['after']['ms_median']} ms ({speed['speedup']}×, "
                f"measured before and after the stages, not interleaved), {flops}")
    if compared["busy"]:
        return f"{head}: machine too busy to measure speed (spread ×{compared['spread']}); {flops}"
    low, high = compared["speedup_range"]
    return (f"{head}: {speed['speedup']}× faster (median of {compared['rounds']} interleaved rounds, "
            f"{low}–{high}×), {flops}")


# libraries that log their own import-time notes (torchao's optional CUDA kernels, torch's _pytree deprecations,
# transformers' torchvision fallbacks, neural-compressor's accelerator detection): not the user's business on the
# command line
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch.onnx", "transformers", "neural_compressor")


def quiet_third_party() -> None:
    """Silence third-party import noise (warnings and below) unless VLMCOMPRESS_DEBUG=1."""
    import logging
    import os
    import warnings

    if os.environ.get("VLMCOMPRESS_DEBUG") == "1":
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torch's own logging re-sets its registered loggers (torch.onnx: the exporter's "torchvision is not installed"
    # lines) when it initialises, over a level set here; "-onnx" asks it for errors only
    os.environ.setdefault("TORCH_LOGS", "-onnx")
    # transformers' "Loading weights" bar (it reads huggingface_hub's switch at import); our own progress covers it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("LOGLEVEL", "ERROR")  # neural-compressor sets its logger's level from it at import
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchao|transformers)\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
