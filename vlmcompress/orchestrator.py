"""`apply()`: load → adapter → check and order stages → run each → stage checkpoints → final checkpoint.

No algorithm code lives here. Every stage's result is written atomically into a working folder next to the output
(`<output>.vlmcompress-work/`) with the hash of the recipe prefix that produced it, so `resume=True` continues after
the last stage whose hash still matches. The output folder appears only by an atomic rename at the very end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accuracy import check_guards, eval_rows, measure, not_measured
from .adapters import adapter_for
from .bench import quick_speed
from .checkpoint import compression_record, library_versions, load, save_checkpoint, to_compressed
from .errors import ModelLoadError, StageOrderError
from .model_card import model_card
from .outputs import (RunLock, apply_umask, atomic_write_dir, check_output, public_recipe, reset_work_dir,
                      work_dir_for)
from .modeling.reduction import counted_tokens
from .modeling.spec import TokenReductionSpec
from .models import load_model
from .progress import Progress
from .recipe import Recipe, load_recipe
from .registry import get_method
from .stages.base import RunContext, Stage, StageReport, count_params, decision_stage

STAGE_META = "vlmcompress_stage.json"


def build_stages(recipe: Recipe) -> list[Stage]:
    """Instantiate the recipe's stages and check the ordering rules before anything runs."""
    stages = [get_method(cfg.method).stage_cls(cfg) for cfg in recipe.stages]
    for i, stage in enumerate(stages[:-1]):
        if stage.must_be_last:
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}) must be the last stage, but stages[{i + 1}] "
                f"({stages[i + 1].config.method}) follows it; move it to the end of the recipe"
            )
    if not stages:
        raise StageOrderError("the recipe has no stages; add at least one, e.g. {method: token_reduce, r: 8}")
    for i, stage in enumerate(stages):
        if stage.needs_data() and (recipe.data is None or recipe.data.train is None):
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}) needs training / calibration data, but the recipe has no "
                "data.train; add e.g. data: {train: {builtin: shapes, split: train, size: 256}}"
            )
        train = getattr(stage.config, "train", None)
        if getattr(train, "epochs", None) is not None and recipe.data is not None and recipe.data.train is not None \
                and recipe.data.train.size is None:
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}).train.epochs is {train.epochs}, but data.train has no size (the "
                "samples in an epoch); give data.train.size, or train.steps instead of epochs")
        if getattr(train, "gradient_checkpointing", False) and any(s.reduces_tokens for s in stages[:i]):
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}).train.gradient_checkpointing: token reduction runs before it, "
                "and its layers keep per-forward state that recomputing a layer in backward would replay wrongly; "
                "set gradient_checkpointing: false")
        if getattr(train, "patch_dropout", 0) and any(s.reduces_tokens for s in stages[:i]):
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}).train.patch_dropout: token reduction runs before it and "
                "expects every patch token; set patch_dropout: 0, or move token_reduce after this stage")
        if stage.trains and recipe.data is not None and _same_source(recipe.data.train, recipe.data.eval):
            raise StageOrderError(
                f"stages[{i}] ({stage.config.method}) trains on data.train, which is the same data as data.eval "
                f"({_describe(recipe.data.eval)}); accuracy measured on training data is inflated; train on another "
                "split, e.g. data.train: {builtin: shapes, split: train}")
    return stages


def _same_source(a, b) -> bool:
    """Whether two data sources name the same examples (sizes aside)."""
    if a is None or b is None:
        return False
    keys = ("builtin", "path", "hf", "split")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _describe(source) -> str:
    return ", ".join(f"{k}: {v}" for k, v in source.model_dump(exclude_none=True).items() if k != "size")


DECISIONS = "decisions.json"  # in the work folder: what stages decided from the machine (RunContext.decisions)


def _recorded_decisions(work: Path) -> dict[str, Any]:
    try:
        return json.loads((work / DECISIONS).read_text())
    except (OSError, ValueError):
        return {}


def _find_resume_point(work: Path, recipe: Recipe) -> tuple[int, Path | None]:
    """(number of completed stages that still match the recipe and the recorded decisions, their checkpoint
    folder)."""
    done, folder = 0, None
    decisions = _recorded_decisions(work)
    for i in range(len(recipe.stages)):
        candidate = work / f"stage-{i + 1:02d}"
        meta_file = candidate / STAGE_META
        if not meta_file.is_file():
            break
        meta = json.loads(meta_file.read_text())
        if meta.get("prefix_hash") != recipe.prefix_hash(i + 1, decisions):
            break
        done, folder = i + 1, candidate
    return done, folder


def apply(
    recipe: str | Path | dict | Recipe,
    model: nn.Module | None = None,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    save: bool = True,
    progress: bool = True,
    processor: Any = None,
) -> nn.Module:
    """Run a recipe and return the compressed model; also write it to the recipe's `output` unless `save=False`.

    Args:
        recipe: a recipe file, YAML text, dict or `Recipe`.
        model: an in-memory model to compress instead of loading `recipe.model` (it is modified in place).
        output: overrides `recipe.output`.
        resume: continue after the last completed stage whose recipe prefix still matches.
        overwrite: replace an existing output folder.
        save: write the output folder (stage checkpoints are only written when saving).
    Returns:
        The compressed model (its class is the compressed class that `from_pretrained` rebuilds).
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(output or recipe.output)
    stages = build_stages(recipe)
    # launched on several processes (torchrun / accelerate launch): every process runs every stage on its replica
    # (the trainer shards the data), only the main process measures and writes
    main, world_size = is_main_process(), process_count()
    progress = progress and main
    if save:
        check_output(out, overwrite, recipe.model)
    # one run at a time per output (the main process writes): held until the output folder is in place
    with RunLock(out) if save and main else contextlib.nullcontext():
        return _apply(recipe, stages, model, out, resume, overwrite, save, progress, processor, main, world_size)


def _apply(recipe, stages, model, out, resume, overwrite, save, progress, processor, main, world_size) -> nn.Module:
    given_model = model is not None
    torch.manual_seed(recipe.seed)
    if model is None:
        model, loaded_processor = load_model(recipe.model, recipe.dtype, recipe.trust_remote_code)
        if getattr(model, "vlmc_onnx", False):
            raise ModelLoadError(f"model '{recipe.model}' is an ONNX export, which cannot be compressed further; "
                                 "use the checkpoint folder it was exported from (its parent folder)")
        processor = processor if processor is not None else loaded_processor
    adapter = adapter_for(model)
    for stage in stages:
        stage.check(model, adapter)
    _check_finite(model, recipe.model)
    teacher = _teacher_loader(recipe, model if given_model else None, stages)

    ctx = RunContext(model=model, adapter=adapter, recipe=recipe, seed=recipe.seed,
                     compression=compression_record(model), processor=processor, progress=progress)
    rows = eval_rows(recipe, model) if main else None
    accuracy_before = measure(model, processor, adapter.family, rows)
    speed_before = quick_speed(model, adapter) if rows is not None else None
    if main:
        check_guards(recipe.guards, accuracy_before, accuracy_before, "0")  # metric names and eval data, first
    accuracy_out, speed_out = accuracy_before, speed_before
    params_before = count_params(model)
    work = work_dir_for(out)
    start = 0
    ctx.world_size = world_size
    if save and main:
        ctx.decisions_file = work / DECISIONS
    if save and resume:
        start, folder = _find_resume_point(work, recipe)
        # decisions of stages that still match are kept; those of stages that run again are taken again
        ctx.decisions = {k: v for k, v in _recorded_decisions(work).items() if decision_stage(k) <= start + 1}
        if folder is not None:
            ctx.model = load(folder)
            ctx.compression = compression_record(ctx.model)
            meta = json.loads((folder / STAGE_META).read_text())
            params_before = meta["params_before_recipe"]
            ctx.reports = [StageReport(**r) for r in meta["reports"]]
            ctx.artifacts = {name: folder / name for name in meta.get("artifacts", [])}
    elif save and main:
        reset_work_dir(out)  # a fresh run never reuses stale stage results

    if start > 0:
        accuracy_out = measure(ctx.model, processor, adapter.family, rows)
        speed_out = quick_speed(ctx.model, adapter) if speed_before is not None else None
    with Progress("vlmcompress", total=len(stages), unit="stages", enabled=progress) as bar:
        for _ in range(start):
            bar.update(advance=1)
        for i in range(start, len(stages)):
            stage = stages[i]
            bar.update(description=f"stage {i + 1}/{len(stages)}: {stage.config.method}")
            torch.manual_seed(recipe.seed + i)  # each stage's randomness is independent of where a run resumed
            t0 = time.perf_counter()
            ctx.work, ctx.stage_index = (work if save else None), i
            accuracy_in = accuracy_out
            report = _run_stage(stage, ctx, teacher)
            report.seconds = time.perf_counter() - t0
            # measure the model as it is saved: its compressed class (a token-reduced LLaVA shrinks the processor's
            # image placeholders to the tokens its vision tower now hands on)
            to_compressed(ctx.model, ctx.compression, adapter, recipe.model)
            measured = ctx.model if ctx.deployed is None else ctx.deployed  # e.g. the exported ONNX graphs
            accuracy_out = measure(measured, processor, adapter.family, rows)
            if accuracy_out is not None:
                report.details["accuracy"] = {"before": accuracy_in, "after": accuracy_out}
            if speed_before is not None:
                speed_in, speed_out = speed_out, quick_speed(measured, adapter)
                report.details["speed"] = {"before": speed_in, "after": speed_out}
            ctx.reports.append(report)
            if save and main:
                _save_stage(ctx, work, i, recipe, params_before)
            if main:
                check_guards(recipe.guards, accuracy_before, accuracy_out, f"{i + 1} ({stage.config.method})")
            bar.update(advance=1)

        # what the output records of its sources: Hub ids as they are, local paths by their last part only
        shared = public_recipe(recipe)
        model = to_compressed(ctx.model, ctx.compression, adapter, shared.model)
        report = run_report(ctx, shared, params_before) | {"world_size": world_size}
        if accuracy_before is not None:
            report["accuracy"] = {"before": accuracy_before, "after": accuracy_out,
                                  "data": shared.data.eval.model_dump(mode="json")}
        elif rows is not None:
            report["accuracy_not_measured"] = not_measured(adapter.family, rows, processor)
        if speed_before is not None:
            report["speed"] = _final_speed(recipe, model, adapter, speed_before, speed_out, given_model, ctx)
        if save and main:
            bar.update(description="writing the checkpoint")
            def write(tmp: Path) -> None:
                save_checkpoint(model, tmp, recipe_yaml=shared.to_yaml(), report=report, processor=processor,
                                card=model_card(shared, report, model, local_source=shared.model != recipe.model,
                                                prompt=_prompt_example(processor)),
                                artifacts=ctx.artifacts)
                apply_umask(tmp)

            atomic_write_dir(out, write, replace=overwrite)
            shutil.rmtree(work, ignore_errors=True)
    model.vlmcompress_report = report
    return model


def _final_speed(recipe, model, adapter, before: dict, after: dict, given_model: bool, ctx) -> dict[str, Any]:
    """The speed line of the report: the uncompressed model (re-loaded, or the teacher a stage already loaded)
    against the compressed one, interleaved (`bench.compare_speed`); a model handed to `apply` in memory cannot be
    re-loaded, so its before / after stay the separate measurements taken around the stages."""
    from .bench import compare_speed

    speed = {"before": before, "after": after,
             "flops_reduction": round(before["gflops_per_sample"] / after["gflops_per_sample"], 3)}
    if given_model or ctx.deployed is not None:
        return speed | {"speedup": round(before["ms_median"] / after["ms_median"], 3), "interleaved": False}
    base = ctx._teacher if ctx._teacher is not None else load_model(recipe.model, recipe.dtype,
                                                                  recipe.trust_remote_code)[0]
    compared = compare_speed(base, model, adapter, before["batch_size"])
    before = before | {"ms_median": compared["ms_median_before"]}
    after = after | {"ms_median": compared["ms_median_after"]}
    return speed | {"before": before, "after": after, "speedup": compared["speedup"], "interleaved": compared}


def _prompt_example(processor) -> str | None:
    """The prompt a generative model's chat template builds for an image and a question, for its model card."""
    if not getattr(processor, "chat_template", None):
        return None
    from .evaluate import vqa_prompts

    return vqa_prompts(processor, ["QUESTION"])[0]


def _check_finite(model: nn.Module, name: str) -> None:
    """Refuse a source model with NaN / inf weights (what `validate` cannot see without the weights)."""
    for param_name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ModelLoadError(f"model '{name}' has {bad:,} NaN / inf values in {param_name}; compressing it would "
                                 "give a broken checkpoint; fix or re-download the source model")


def is_main_process() -> bool:
    """Whether this process writes (rank 0 of a torchrun / accelerate launch, or the only process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def process_count() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _teacher_loader(recipe: Recipe, in_memory: nn.Module | None, stages: list[Stage]):
    """A loader of the teacher (the source model before the first stage), or None when no stage needs one. The
    teacher is loaded on first use from `recipe.model`; a model handed to `apply` in memory is copied now instead,
    since it is modified in place (and only then: recipes without a teacher never hold a second copy)."""
    if not any(stage.needs_teacher for stage in stages):
        return None
    if in_memory is not None:
        import copy

        frozen = copy.deepcopy(in_memory)
        return lambda: frozen
    return lambda: load_model(recipe.model, recipe.dtype, recipe.trust_remote_code)[0]


def _run_stage(stage: Stage, ctx: RunContext, teacher) -> StageReport:
    """Run one stage as its flags say: the teacher reachable only for `needs_teacher`, train mode and gradients
    for `trains` (eval mode after), and parameter shapes unchanged unless it `changes_architecture`."""
    shapes = None if stage.changes_architecture else {n: tuple(p.shape) for n, p in ctx.model.named_parameters()}
    ctx.teacher_loader = teacher if stage.needs_teacher else None
    try:
        if stage.trains:
            ctx.model.train()
            with torch.enable_grad():
                report = stage.run(ctx)
        else:
            report = stage.run(ctx)
    finally:
        ctx.teacher_loader = None
        if stage.trains:
            ctx.model.eval()
    if shapes is not None:
        after = {n: tuple(p.shape) for n, p in ctx.model.named_parameters()}
        if after != shapes:
            changed = sorted(n for n in shapes.keys() | after.keys() if shapes.get(n) != after.get(n))
            raise StageOrderError(f"stage {stage.config.method} changed parameter shapes ({', '.join(changed[:3])}"
                                  f"{', ...' if len(changed) > 3 else ''}) but does not declare "
                                  "changes_architecture = True; its checkpoint would not reload")
    return report


def _save_stage(ctx: RunContext, work: Path, index: int, recipe: Recipe, params_before: int) -> None:
    target = work / f"stage-{index + 1:02d}"
    work.mkdir(parents=True, exist_ok=True)
    model = to_compressed(ctx.model, ctx.compression, ctx.adapter, recipe.model)
    meta = {"stage": index + 1, "method": recipe.stages[index].method, "prefix_hash": recipe.prefix_hash(index + 1, ctx.decisions),
            "params_before_recipe": params_before, "reports": [r.to_dict() for r in ctx.reports],
            "artifacts": sorted(ctx.artifacts)}

    def write(tmp: Path) -> None:
        save_checkpoint(model, tmp, artifacts=ctx.artifacts)
        (tmp / STAGE_META).write_text(json.dumps(meta, indent=2))

    atomic_write_dir(target, write)


def run_report(ctx: RunContext, recipe: Recipe, params_before: int) -> dict[str, Any]:
    params_after = count_params(ctx.model)
    reduction = TokenReductionSpec.read(ctx.compression.get("token_reduction"))
    towers = {}
    for t in reduction.towers if reduction else []:
        # a tower may count another stream's tokens (Turbo in BLIP's text encoder: image tokens, "text image")
        stream, _ = counted_tokens(reduction.algorithm, t)
        towers[t.component + (f" {stream}" if stream else "")] = [t.num_tokens, *t.tokens_per_layer]
    return {
        "base_model": recipe.model,
        "family": ctx.adapter.family,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": round(params_after / max(params_before, 1), 4),
        "tokens_per_layer": towers,
        "stages": [r.to_dict() for r in ctx.reports],
        "versions": library_versions(),
    }
