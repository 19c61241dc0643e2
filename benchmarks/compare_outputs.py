"""Do two versions of vlmcompress produce the same outputs? Compare output folders, or write them first.

    python benchmarks/compare_outputs.py --write OLD        # every recipe in recipes/ on its family's tiny model
    ... (change the code) ...
    python benchmarks/compare_outputs.py --write NEW
    python benchmarks/compare_outputs.py OLD NEW             # one line per recipe; exit 1 on any difference

Compared per folder: every tensor of every `*.safetensors` bitwise (names, dtypes, shapes, bytes); `config.json`
without the library versions; from `report.json` the parameters, GFLOPs and tokens per layer of every stage and of
the result (speed fields are left out: they are measurements); the ONNX graphs' `onnx/config.json` without versions
and timings, and every `onnx/*.onnx` initializer bitwise. A recipe is run with `model:` replaced by the tiny model of
its family (shapes-clip → shapes-clip-small, shapes-llava → shapes-llava-small; tiny-* as they are), `data.eval`
shrunk to 64 pairs and no guards, so the whole set takes a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# tried in order: the small built-in teachers (tiny, with a processor, which calibrating quantizers need), then
# the random-init tiny models (more layers: FastV needs two decoder layers after K)
TINY = {"shapes-clip": ["shapes-clip-small", "tiny-clip"], "shapes-llava": ["shapes-llava-small", "tiny-llava"]}
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
VOLATILE = ("seconds", "ms", "samples_per_s", "throughput", "latency", "speed", "load_average", "date", "versions",
            "peak_memory", "memory")


def write_outputs(target: Path) -> None:
    """Run every shipped recipe on its family's tiny model into `target/<recipe>`."""
    import yaml

    import vlmcompress
    from vlmcompress.errors import VlmCompressError

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        recipe["output"] = str(target / path.stem)
        recipe.pop("guards", None)
        if recipe.get("data", {}).get("eval"):
            recipe["data"]["eval"]["size"] = 64
        reasons = []
        for model in TINY.get(recipe["model"], [recipe["model"]]):
            try:
                vlmcompress.apply({**recipe, "model": model}, overwrite=True, progress=False)
            except VlmCompressError as e:
                reasons.append(f"{model}: {str(e).splitlines()[0]}")
                continue
            print(f"wrote {target / path.stem} ({model})", flush=True)
            break
        else:
            print(f"skipped {path.stem}: {'; '.join(reasons)}", flush=True)


def _strip(value: Any) -> Any:
    """`value` without the keys that are measurements or environment facts."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def tensors_digest(folder: Path) -> dict[str, str]:
    """`{file:tensor: sha256 of dtype, shape and bytes}` of every safetensors file under `folder`."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                data = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                out[f"{file.relative_to(folder)}:{name}"] = hashlib.sha256(
                    f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()
    return out


def onnx_digest(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted((folder / "onnx").glob("*.onnx")) if (folder / "onnx").is_dir() else []:
        import onnx

        for init in onnx.load(str(file)).graph.initializer:
            out[f"{file.name}:{init.name}"] = hashlib.sha256(init.SerializeToString()).hexdigest()
    return out


def report_facts(folder: Path) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    keep = ("params", "gflops", "tokens_per_layer", "matched", "r", "clamped", "options", "algorithm", "schemes",
            "quantized", "graphs", "param_shapes")

    def facts(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: facts(v) for k, v in value.items()
                    if not any(w in k for w in VOLATILE) and (isinstance(v, (dict, list)) or any(w in k for w in keep))}
        if isinstance(value, list):
            return [facts(v) for v in value]
        return value

    return facts(report)


def describe(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    onnx_config = folder / "onnx" / "config.json"
    return {"tensors": tensors_digest(folder), "config": _strip(config), "report": report_facts(folder),
            "onnx_config": _strip(json.loads(onnx_config.read_text())) if onnx_config.is_file() else None,
            "onnx": onnx_digest(folder)}


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in old or key not in new:
                out.append(f"{where}.{key}: only in {'new' if key not in old else 'old'}")
            else:
                out += differences(old[key], new[key], f"{where}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {str(old)[:80]} → {str(new)[:80]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="OLD NEW: two folders of outputs (or two outputs)")
    parser.add_argument("--write", type=Path, help="run every recipe on its tiny model into this folder")
    args = parser.parse_args()
    if args.write:
        write_outputs(args.write)
        return 0
    if len(args.folders) != 2:
        parser.error("give OLD and NEW folders (or --write FOLDER)")
    old, new = args.folders
    pairs = [(old, new)] if (old / "config.json").is_file() else \
        [(d, new / d.name) for d in sorted(old.iterdir()) if (d / "config.json").is_file()]
    failed = 0
    for a, b in pairs:
        if not (b / "config.json").is_file():
            print(f"{a.name}: missing in {new}")
            failed += 1
            continue
        found = differences(describe(a), describe(b))
        tensors = len(tensors_digest(a))
        print(f"{a.name}: {'identical' if not found else 'DIFFERENT'} ({tensors} tensors compared)")
        for line in found[:20]:
            print(f"    {line}")
        failed += bool(found)
    print(f"{len(pairs) - failed} identical, {failed} different")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
