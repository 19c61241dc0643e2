"""The `vlmcompress` command line: a thin typer app over the Python API.

Every user error is one line on stderr and exit code 1; set VLMCOMPRESS_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress vision-language models with declarative YAML recipes.\n\n"
                       "Example: vlmcompress apply recipes/quickstart.yaml")
from .cli_output import (_eval_on_data, _first_line, _print_plan, _print_vqa, console, err_console,  # noqa: F401
                         int8_lines, quiet_third_party, speed_line)


def _friendly(fn):
    """Turn user errors into one line + exit 1 (tracebacks only with VLMCOMPRESS_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import VlmCompressError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if os.environ.get("VLMCOMPRESS_DEBUG") == "1":
                raise
            err_console.print("interrupted: no output folder was written; rerun with --resume to continue "
                              "after the last completed stage", style="red", highlight=False)
            raise typer.Exit(130) from None
        except VlmCompressError as e:
            if os.environ.get("VLMCOMPRESS_DEBUG") == "1":
                raise
            for line in str(e).splitlines():
                err_console.print(f"error: {line}", style="red", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as e:  # a bug, not a user error: still one line, with the way to the full story
            if os.environ.get("VLMCOMPRESS_DEBUG") == "1":
                raise
            err_console.print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                              "(set VLMCOMPRESS_DEBUG=1 for the traceback and report it)", style="red",
                              highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command(epilog="Examples:\n\n  vlmcompress apply recipes/quickstart.yaml\n\n"
                    "  vlmcompress apply recipes/llava_prune_tome.yaml --output out/llava-small --overwrite\n\n"
                    "  vlmcompress apply recipe.yaml --resume   # continue after an interrupted run")
@_friendly
def apply(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (overrides the recipe)"),
    resume: bool = typer.Option(False, help="continue after the last completed stage of an interrupted run"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the recipe and print the plan; write nothing"),
):
    """Run a compression recipe and write a Hugging Face-loadable checkpoint."""
    from .orchestrator import apply as run_apply

    if dry_run:
        return _print_plan(recipe)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display covers saving
    model = run_apply(recipe, output=output, resume=resume, overwrite=overwrite, progress=True)
    from .orchestrator import is_main_process

    if not is_main_process():
        return  # one of several processes: the main one writes and reports
    report = model.vlmcompress_report
    out = output or model_output(recipe)
    console.print(f"[green]wrote[/green] {out}: parameters {report['params_before']:,} → {report['params_after']:,} "
                  f"({report['params_ratio']}×)", highlight=False)
    for comp, tokens in report["tokens_per_layer"].items():
        console.print(f"  {comp} tokens per layer: {' → '.join(map(str, tokens))}", highlight=False)
    if "accuracy" in report:
        before, after = report["accuracy"]["before"], report["accuracy"]["after"]
        metric = "recall@1" if "recall@1" in before else next(iter(before))
        console.print(f"  {metric}: {before[metric]:.4f} → {after[metric]:.4f} "
                      f"({(after[metric] - before[metric]) * 100:+.2f} points)", highlight=False)
        trail = [f"{s['method']} {s['details']['accuracy']['after'][metric]:.4f}" for s in report["stages"]
                 if metric in s["details"].get("accuracy", {}).get("after", {})]
        if len(trail) > 1:
            console.print(f"  {metric} after each stage: {' · '.join(trail)}", highlight=False)
    if report.get("accuracy_not_measured"):
        console.print(f"  {report['accuracy_not_measured']}", highlight=False)
    for s in report["stages"]:
        d = s["details"]
        if "loss_first" in d and "samples_per_s" in d:
            console.print(f"  {s['method']}: {d['steps']} steps in {d['seconds']} s ({d['samples_per_s']} samples/s), "
                          f"loss {d['loss_first']} → {d['loss_last']}", highlight=False)
    for line in int8_lines(report):
        console.print(f"  {line}", highlight=False)
    if "speed" in report:
        console.print(f"  {speed_line(report['speed'])}", highlight=False)
    console.print(f"  load it: AutoModel.from_pretrained('{out}', trust_remote_code=True)", highlight=False)


def model_output(recipe_path: Path) -> str:
    from .recipe import load_recipe

    return load_recipe(recipe_path).output


@app.command(epilog="Example:\n\n  vlmcompress validate recipes/quickstart.yaml")
@_friendly
def validate(recipe: Path = typer.Argument(..., help="recipe YAML file")):
    """Check a recipe against a weightless (meta-device) model and print the plan. Never trains or writes."""
    _print_plan(recipe)


@app.command(epilog="Examples:\n\n  vlmcompress inspect tiny-llava\n\n  vlmcompress inspect out/tiny-clip-tome --json")
@_friendly
def inspect(
    model: str = typer.Argument(..., help="a local folder, a built-in name or a Hub id"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
):
    """Show a model's family, components, heads and widths per layer, token schedule and parameters."""
    from .adapters import adapter_for
    from .checkpoint import per_layer_summary
    from .modeling import algorithms  # noqa: F401  (what each algorithm's towers count)
    from .modeling.reduction import counted_tokens
    from .modeling.spec import token_reduction
    from .models import load_model
    from .stages.base import count_params

    m, _ = load_model(model, meta=True)
    adapter = adapter_for(m)
    summary = per_layer_summary(adapter, m)
    reduction = token_reduction(m.config)
    info = {"model": model, "class": type(m).__name__, "family": adapter.family, "parameters": count_params(m),
            "components": {name: sum(p.numel() for p in mod.parameters())
                           for name, mod in adapter.components(m).items()},
            **summary,
            "token_reduction": {t.component: {"algorithm": reduction.algorithm, "r": t.r,
                                              "tokens_per_layer": [t.num_tokens, *t.tokens_per_layer],
                                              # e.g. BLIP + Turbo: the text encoder keeps its text tokens and
                                              # prunes the image tokens its cross-attention reads
                                              "counts": counted_tokens(reduction.algorithm, t)[1]}
                                for t in (reduction.towers if reduction else [])}}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console.print(f"[bold]{model}[/bold]: {info['class']} ({info['family']}), {info['parameters']:,} parameters",
                  highlight=False)
    table = Table("component", "parameters", "layers", "heads per layer", "MLP width per layer", "tokens per layer")
    for comp, params in info["components"].items():
        heads = info["layer_num_heads"].get(comp, [])
        widths = info["layer_intermediate_sizes"].get(comp, [])
        reduced = info["token_reduction"].get(comp, {})
        tokens = " → ".join(map(str, reduced["tokens_per_layer"])) if reduced else "-"
        if reduced.get("counts", "tokens") != "tokens":
            tokens = f"{reduced['counts']}: {tokens}"
        table.add_row(comp, f"{params:,}", str(max(len(heads), len(widths))), " ".join(map(str, heads)),
                      " ".join(map(str, widths)), tokens)
    console.print(table)


@app.command("list-methods")
@_friendly
def list_methods_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List the stage methods a recipe can use, with every choice of each (algorithm, importance, backend)."""
    from .recipe import list_methods  # the recipe schema registers the built-in methods

    entries = []
    for entry in list_methods():
        item = {"method": entry.name, "summary": entry.summary,
                "keys": [k for k in entry.config_cls.model_fields if k != "method"]}
        choices = entry.config_cls.choices()
        if choices is not None:  # e.g. algorithm: tome | turbo | ... (each with keys of its own)
            key, registry = choices
            item["choice_key"] = key
            item["choices"] = {name: _first_line(cls.__doc__) for name, cls in registry.items()}
        entries.append(item)
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    table = Table("method", "description", "keys")
    for item in entries:
        table.add_row(item["method"], item["summary"], ", ".join(item["keys"]))
        for name, summary in item.get("choices", {}).items():
            table.add_row("", f"  {item['choice_key']}: {name}", summary)
    console.print(table)


@app.command()
@_friendly
def env(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Print versions and hardware facts (the CPU's instruction sets included) to paste into a bug report."""
    import torch

    from . import cpu
    from .checkpoint import library_versions

    from .stages.quantize.int8_paths import installed_paths, resolve_int8

    here = resolve_int8(cpu.detect(), installed_paths())
    info = {"python": platform.python_version(), "platform": platform.platform(),
            **library_versions(), "torch threads": torch.get_num_threads(),
            "cuda available": torch.cuda.is_available(), "cpu": cpu.describe(),
            "int8": {"cpu_class": here.cpu_class, "table_path": here.table_path, "options": here.options,
                     "table": here.table_status, "installed_paths": sorted(installed_paths())}}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "cpu":
            for name in ("label", "capability", "quantized_engine", "mkl", "onednn"):
                console.print(f"- cpu {name}: {value.get(name)}", highlight=False)
        elif key == "int8":
            console.print(f"- scheme: int8 here: {value['table_path']} for {value['cpu_class']} ({value['table']}; "
                          "apply's probe may pick another)", highlight=False)
        else:
            console.print(f"- {key}: {value}", highlight=False)


@app.command("eval", epilog="Examples:\n\n  vlmcompress eval shapes-clip\n\n"
                            "  vlmcompress eval out/shapes-clip-tome --size 2000 --json")
@_friendly
def eval_cmd(
    model: str = typer.Argument(..., help="a local folder, a built-in teacher (shapes-clip) or a Hub id"),
    size: int = typer.Option(5000, min=10, help="number of shapes test pairs (folds of 1,000)"),
    data: Optional[str] = typer.Option(None, "--data", help="evaluate on other data, as recipes name it: a local "
                                                           "folder (images + metadata.jsonl, or a save_to_disk "
                                                           "folder) or hf:DATASET_ID[:SPLIT]"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Accuracy on the shapes test split with baselines: recall@1/5/10 both ways and zero-shot for dual encoders,
    exact-match VQA (with chance, majority-answer and no-image baselines) for LLaVA models; or, with --data, the
    metrics `apply` measures on that data (retrieval recall; VQA where it has question / answer columns)."""
    from .adapters import adapter_for
    from .evaluate import evaluate_dual_encoder, evaluate_vqa
    from .models import load_model

    m, processor = load_model(model)
    family = adapter_for(m).family
    if data is not None:
        return _eval_on_data(model, m, processor, family, data, size, as_json)
    if family == "llava":
        return _print_vqa(model, evaluate_vqa(m, processor, size=size), as_json)
    if family not in ("clip", "siglip"):
        from .errors import VlmCompressError

        raise VlmCompressError(f"eval supports dual encoders (clip, siglip) and LLaVA so far; '{model}' is a {family} "
                               "model")
    result = evaluate_dual_encoder(m, processor, size=size)
    if as_json:
        print(json.dumps({"model": model, **result}, indent=2))
        return
    table = Table("metric", "model", "chance", "majority")
    for k in (1, 5, 10):
        for way in ("i2t", "t2i"):
            majority = f"{result['majority_R@1']:.4f}" if k == 1 else ""
            table.add_row(f"{way} R@{k}", f"{result[f'{way}_R@{k}']:.4f}", f"{result[f'chance_R@{k}']:.4f}", majority)
    table.add_row("zero-shot shape", f"{result['zero_shot_shape']:.4f}", f"{result['zero_shot_chance']:.4f}", "")
    console.print(f"[bold]{model}[/bold] on shapes test ({result['folds']} folds × {result['fold_size']})",
                  highlight=False)
    console.print(table)


zoo_app = typer.Typer(help="Built-in teachers trained on the shapes world.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("train", epilog="Example:\n\n  vlmcompress zoo train shapes-clip --output /tmp/shapes-clip")
@_friendly
def zoo_train(
    name: str = typer.Argument(..., help="a built-in teacher: shapes-clip, shapes-llava (or their -small variants)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder (default: the user cache)"),
):
    """Retrain a built-in teacher with its seeded recipe (progress bar; shapes-clip takes about 25 min on 2 cores)."""
    from .errors import VlmCompressError
    from .zoo import ZOO, cache_dir, train_and_save

    if name not in ZOO:
        from .errors import did_you_mean

        raise VlmCompressError(f"unknown teacher '{name}'{did_you_mean(name, ZOO)}; expected one of: {', '.join(ZOO)}")
    folder = output or cache_dir() / name
    if folder.exists() and any(folder.iterdir()):
        raise VlmCompressError(f"'{folder}' already exists and is not empty; choose another --output")
    result = train_and_save(name, folder)
    console.print(f"[green]trained[/green] {name} in {result['seconds']} s → {folder}", highlight=False)


@zoo_app.command("list")
@_friendly
def zoo_list():
    """List the built-in teachers and whether their shipped weights verify."""
    from .zoo import ZOO, ZOO_DIR, verify

    for name in ZOO:
        state = "shipped" if verify(ZOO_DIR / name) else "not shipped (trained into the cache on first use)"
        console.print(f"- {name}: {state}", highlight=False)


@app.command(epilog="Examples:\n\n  vlmcompress bench tiny-clip --batch-sizes 1,8\n\n"
                    "  vlmcompress bench shapes-clip --against out/shapes-clip-compressed --repeats 5   # after the quickstart\n\n"
                    "  vlmcompress bench tiny-llava --threads 2 --json > bench.json")
@_friendly
def bench(
    model: str = typer.Argument(..., help="a local folder (e.g. a `vlmcompress apply` output), a built-in name or "
                                          "a Hub id"),
    against: Optional[str] = typer.Option(None, "--against", help="a second model of the same family, measured in "
                                                                  "the same run; ratios are MODEL ÷ OTHER"),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="comma-separated batch sizes (generators: of the "
                                                                  "prefill; decode runs at batch 1)"),
    repeats: int = typer.Option(5, "--repeats", help="timing rounds per workload and batch size"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's setting)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (layout: vlmcompress/bench.py) not tables"),
):
    """Measure speed and size: GFLOPs, latency, throughput, peak memory, parameters, size on disk, tokens per layer.

    With --against, both are timed in one run, interleaved; speed-ups, reductions and realization are printed.
    """
    from rich import box
    from transformers.utils import logging as hf_logging

    from .bench import benchmark, parse_batch_sizes

    hf_logging.disable_progress_bar()  # our own progress display covers loading
    result = benchmark(model, against, parse_batch_sizes(batch_sizes), repeats, threads, progress=True,
                       device=device)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    machine, what, ratios = result["machine"], result["what"], result["ratios"]
    load = "" if machine["load_average_1m"] is None else f", load average {machine['load_average_1m']}"
    console.print(f"[bold]vlmcompress bench[/bold] on {machine['device_name']} ({machine['device']}, "
                  f"{machine['threads']} threads, {machine['cpu_count']} CPUs{load}), torch {machine['torch']}",
                  highlight=False)
    labels = {name: ("MODEL" if m["role"] == "model" else "OTHER") for name, m in result["models"].items()}
    table = Table("", "model", "parameters", "size on disk", "vision tokens per layer", box=box.SIMPLE_HEAD)
    for name, m in result["models"].items():
        size = m["size_on_disk_bytes"]
        table.add_row(labels[name], f"{name} ({m['family']})", f"{m['parameters']:,}",
                      "-" if size is None else f"{size / 2**20:,.2f} MiB",
                      " → ".join(map(str, m["tokens_per_layer"] or [])))
    console.print(table)
    for name, m in result["models"].items():
        if m.get("runtime"):  # an ONNX export: its own threads, not torch's
            console.print(f"{labels[name]} runs in {m['runtime']} ({m['dtype']})", highlight=False)
    for key, description in what["workloads"].items():
        table = Table("", "batch", "GFLOPs/sample", "ms median", "ms min", "samples/s", "peak MiB",
                      box=box.SIMPLE_HEAD, title=f"[bold]{key}[/bold]: {description}", title_justify="left")
        for name, m in result["models"].items():
            w = m["workloads"][key]
            for bs, t in w["batch_sizes"].items():
                table.add_row(labels[name], bs, f"{w['gflops_per_sample']:.4g}", f"{t['ms_median']:.4g}",
                              f"{t['ms_min']:.4g}", f"{t['samples_per_s']:.4g}",
                              "-" if t["peak_memory_mb"] is None else f"{t['peak_memory_mb']:.1f}")
        console.print(table)
    if ratios:
        fmt = lambda x, unit="×": "-" if x is None else f"{x:.3f}{unit}"  # noqa: E731
        table = Table("workload", "batch", "speed-up (median)", "speed-up (min)", "FLOPs reduction", "realization",
                      box=box.SIMPLE_HEAD, title="[bold]OTHER vs MODEL[/bold] (MODEL ÷ OTHER; realization = speed-up "
                                                 "÷ FLOPs reduction)", title_justify="left")
        for key, w in ratios["workloads"].items():
            for bs, r in w["batch_sizes"].items():
                table.add_row(key, bs, fmt(r["speedup_median"]), fmt(r["speedup_min"]), fmt(w["flops_reduction"]),
                              fmt(r["realization"], ""))
        console.print(table)
        console.print(f"reductions (MODEL ÷ OTHER): parameters {fmt(ratios['params_reduction'])}, size on disk "
                      f"{fmt(ratios['size_reduction'])}", highlight=False)
    console.print(f"timing: {what['timing']}\nmemory: {what['memory']}", style="dim", highlight=False)


from . import cli_publish  # noqa: E402  (its commands, registered here so that `--help` lists them in order)

app.command("report", epilog="Example:\n\n  vlmcompress report out/shapes-clip-compressed --base shapes-clip "
                             "--out report/")(_friendly(cli_publish.report))
app.command("push", epilog="Examples:\n\n  vlmcompress push out/shapes-clip-compressed --repo-id me/clip-small "
                           "--dry-run\n\n  vlmcompress push out/shapes-clip-compressed --repo-id me/clip-small "
                           "--private")(_friendly(cli_publish.push))


def main() -> None:
    quiet_third_party()
    app()


if __name__ == "__main__":
    sys.exit(main())
