"""The `quantize` stage: every backend × scheme, saved, reloaded in a fresh process, compared.

The in-memory model returned by `apply` is the reference. One child process (vlmcompress not importable) loads every
output folder with `AutoModel.from_pretrained(..., trust_remote_code=True)`; a second one loads them with
`vlmcompress.load`. Both must reproduce the in-memory outputs within 1e-5, hold integer weights (no float tensor of a
quantized layer's full weight shape), and keep ignored / unselected layers as fp32 `nn.Linear`. Against the fp32
model, outputs must stay close: max |Δ| ≤ 10% of max |output| for int8 and ≤ 35% for int4 (tiny random models have
no outliers to protect, so these loose bounds only catch a broken kernel, not a slightly worse one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import vlmcompress
from vlmcompress.adapters import adapter_for
from vlmcompress.cli import app
from vlmcompress.errors import BackendNotInstalledError, ModelLoadError, RecipeError, StageOrderError, VlmCompressError
from vlmcompress.modeling.quantized import QuantizedLinear
from vlmcompress.models import load_model

ATOL = 1e-5
BOUND = {"int8": 0.10, "int4": 0.35}
TRAIN = {"train": {"builtin": "shapes", "split": "train", "size": 32}}
PRUNE_TOME = [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 8}]


def q(**kw) -> dict:
    return {"method": "quantize", **kw}


# name → (model, stages before quantize, quantize stage, bits for the fp32 bound, needs data.train)
CASES: dict[str, tuple[str, list, dict, str, bool]] = {
    "torch-int8": ("tiny-clip", [], q(), "int8", False),
    "torchao-int8_dynamic": ("tiny-clip", [], q(backend="torchao", scheme="int8_dynamic", compile=False), "int8",
                             False),
    "torchao-int8_weight_only": ("tiny-clip", [], q(backend="torchao", scheme="int8_weight_only"), "int8", False),
    "torchao-int4_weight_only": ("tiny-clip", [], q(backend="torchao", scheme="int4_weight_only", group_size=32),
                                 "int4", False),
    "quanto-int8_weight_only": ("tiny-clip", [], q(backend="quanto", scheme="int8"), "int8", False),
    "quanto-int4_weight_only": ("tiny-clip", [], q(backend="quanto", scheme="int4_weight_only"), "int4", False),
    "inc-rtn-int8": ("tiny-clip", [], q(backend="neural_compressor", scheme="int8"), "int8", False),
    "inc-rtn-int4": ("tiny-clip", [], q(backend="neural_compressor", scheme="int4_weight_only"), "int4", False),
    "inc-gptq-int4": ("shapes-clip-small", [], q(backend="neural_compressor", scheme="int4_weight_only",
                                                 algorithm="gptq", calibration_batches=1, calibration_batch_size=8),
                      "int4", True),
    # on top of pruning and ToMe, with components / overrides / ignore
    "llava-prune-tome-torch": ("tiny-llava", PRUNE_TOME,
                               q(overrides={"projector": "none"}, ignore=["re:.*layers\\.0\\.mlp\\.down_proj"]),
                               "int8", False),
    "blip-prune-tome-torchao": ("tiny-blip", PRUNE_TOME, q(backend="torchao", scheme="int8_weight_only"), "int8",
                                False),
    "siglip-vision-only-torch": ("tiny-siglip", [], q(components=["vision"]), "int8", False),
    "torch-onednn-int8_dynamic": ("tiny-clip", [], q(backend="torch", scheme="int8_dynamic", engine="onednn"), "int8",
                                  False),
    "blip2-quanto-mixed": ("tiny-blip2", [], q(backend="quanto", scheme="int8_weight_only",
                                              overrides={"llm": "int4_weight_only"}), "int4", False),
}


# calibrated schemes on a trained model (seconds each): run with `-m slow`
SLOW_CASES: dict[str, tuple[str, list, dict, str, bool]] = {
    "quanto-int8_static": ("shapes-clip-small", [], q(backend="quanto", scheme="int8_static", calibration_batches=2),
                           "int8", True),
    "inc-gptq-int8": ("shapes-clip-small", [], q(backend="neural_compressor", scheme="int8_weight_only",
                                                 algorithm="gptq", calibration_batches=2), "int8", True),
}


@dataclass
class Quantized:
    name: str
    out: Path
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]  # in-memory quantized model
    fp32: dict[str, torch.Tensor]  # the same recipe without the quantize stage


def _main_outputs(model, inputs):
    with torch.no_grad():
        return {k: v for k, v in adapter_for(model).main_outputs(model, inputs).items()}


def build(cases: dict[str, tuple], tmp_path_factory) -> dict[str, Quantized]:
    built = {}
    for name, (model_name, before, stage, _, data) in cases.items():
        root = tmp_path_factory.mktemp(name)
        recipe = {"model": model_name, "output": str(root / "out"), "stages": [*before, stage]}
        if data:
            recipe["data"] = TRAIN
        model = vlmcompress.apply(recipe, progress=False)
        inputs = adapter_for(model).example_inputs(model, batch_size=2, seed=0)
        reference = vlmcompress.apply(recipe | {"stages": before}, progress=False, save=False) if before else \
            load_model(model_name, "float32", False)[0]
        built[name] = Quantized(name, root / "out", model, inputs, _main_outputs(model, inputs),
                                _main_outputs(reference, inputs))
    return built


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Quantized]:
    return build(CASES, tmp_path_factory)


@pytest.fixture(scope="module")
def quantized_slow(tmp_path_factory) -> dict[str, Quantized]:
    return build(SLOW_CASES, tmp_path_factory)


CHILD = """
import json, sys
from pathlib import Path
sys.modules["vlmcompress"] = None  # first pass: the checkpoint alone must be enough
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

def main_outputs(model, inputs):
    kind = type(model).__name__
    with torch.no_grad():
        if "CLIP" in kind or "Siglip" in kind:
            o = model(**inputs)
            return {"image_embeds": o.image_embeds, "text_embeds": o.text_embeds}
        if "Blip2" in kind:
            return {"logits": model(**inputs).logits}
        if "Blip" in kind:
            return {"itm_score": model(**inputs, use_itm_head=True).itm_score,
                    "cosine": model(**inputs, use_itm_head=False).itm_score}
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return {"logits": logits[:, -1], "greedy_tokens": tokens[:, -4:]}

def describe(model):
    layers = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "QuantizedLinear":
            full = module.in_features * module.out_features
            tensors = {n: (str(t.dtype), t.numel()) for n, t in module.named_buffers(recurse=False)}
            impl = module._modules.get("impl")
            if hasattr(impl, "unpacked"):  # a kernel that packed (and owns) the integer weights
                tensors |= {"packed " + k: (str(t.dtype), t.numel()) for k, t in impl.unpacked().items()}
            dequantized = [n for n, t in [*module.named_parameters(), *module.named_buffers()]
                           if t.is_floating_point() and type(t) is torch.Tensor and t.numel() >= full]
            layers[name] = {"kind": "quantized", "tensors": tensors, "float_full_weight": dequantized}
        elif type(module) is torch.nn.Linear:
            layers[name] = {"kind": "linear", "dtype": str(module.weight.dtype)}
    return layers

info = {}
folders = [Path(f) for f in sys.argv[1:]]
for mode in ("remote", "vlmcompress"):
    if mode == "vlmcompress":
        del sys.modules["vlmcompress"]
        import vlmcompress
        load = vlmcompress.load
    else:
        load = lambda folder: AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    for folder in folders:
        model = load(folder)
        inputs = load_file(str(folder.parent / "inputs.safetensors"))
        save_file({k: v.contiguous() for k, v in main_outputs(model, inputs).items()},
                  str(folder.parent / f"outputs-{mode}.safetensors"))
        info.setdefault(mode, {})[str(folder)] = {
            "class_module": type(model).__module__, "layers": describe(model),
            "vlmcompress": sorted(k for k, v in sys.modules.items() if k.startswith("vlmcompress") and v)}
with open(str(folders[-1]) + ".info.json", "w") as f:
    json.dump(info, f)
"""


def reload_all(quantized: dict[str, Quantized], tmp_path_factory) -> dict[str, dict[str, Any]]:
    """`{mode: {case: info}}` for mode `remote` (AutoModel, trust_remote_code, vlmcompress not importable) and
    `vlmcompress` (vlmcompress.load), both in one fresh process."""
    for case in quantized.values():
        save_file({k: v.contiguous() for k, v in case.inputs.items()}, str(case.out.parent / "inputs.safetensors"))
    folders = [str(c.out) for c in quantized.values()]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path_factory.mktemp("hf_modules")), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", CHILD, *folders], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(Path(folders[-1] + ".info.json").read_text())
    return {mode: {name: info[mode][str(c.out)] for name, c in quantized.items()} for mode in info}


@pytest.fixture(scope="module")
def reloaded(quantized, tmp_path_factory):
    return reload_all(quantized, tmp_path_factory)


@pytest.fixture(scope="module")
def reloaded_slow(quantized_slow, tmp_path_factory):
    return reload_all(quantized_slow, tmp_path_factory)


def config_of(case: Quantized) -> dict:
    return json.loads((case.out / "config.json").read_text())


def check_reload(case: Quantized, info: dict[str, Any], mode: str) -> None:
    got = load_file(str(case.out.parent / f"outputs-{mode}.safetensors"))
    assert set(got) == set(case.outputs)
    for key, expected in case.outputs.items():
        if key == "greedy_tokens":
            assert torch.equal(got[key], expected), (got[key], expected)
        else:
            diff = (got[key] - expected).abs().max().item()
            assert diff <= ATOL, f"{case.name} {mode}: {key} differs from the in-memory model by {diff}"
    if mode == "remote":
        assert info["vlmcompress"] == [] and info["class_module"].startswith("transformers_modules.")
    spec = config_of(case)["quantization"]
    layers = info["layers"]
    assert set(spec["modules"]) == {n for n, v in layers.items() if v["kind"] == "quantized"}
    for layer_name in spec["modules"]:
        layer = layers[layer_name]
        assert layer["float_full_weight"] == [], f"{layer_name} holds a dequantized float weight"
        # the biggest tensor is the integer data (int8, two int4 per uint8, or INC's int32 packing)
        biggest = max(layer["tensors"].values(), key=lambda t: t[1])
        assert "int" in biggest[0], layer["tensors"]


def check_close_to_fp32(case: Quantized, bits: str) -> None:
    changed = []
    for key, exp in case.fp32.items():
        if key == "greedy_tokens":
            continue
        diff = (case.outputs[key] - exp).abs().max().item()
        scale = exp.abs().max().item()
        assert diff <= BOUND[bits] * scale, f"{key}: max |Δ| {diff:.4f} > {BOUND[bits]} × {scale:.4f}"
        changed.append(diff > 0)
    assert any(changed), "quantization changed nothing"


@pytest.mark.parametrize("mode", ["remote", "vlmcompress"])
@pytest.mark.parametrize("name", list(CASES))
def test_reload_same_outputs_integer_weights(quantized, reloaded, name, mode):
    check_reload(quantized[name], reloaded[mode][name], mode)


@pytest.mark.parametrize("name", list(CASES))
def test_close_to_fp32(quantized, name):
    check_close_to_fp32(quantized[name], CASES[name][3])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_calibrated_schemes(quantized_slow, reloaded_slow, name):
    for mode in ("remote", "vlmcompress"):
        check_reload(quantized_slow[name], reloaded_slow[mode][name], mode)
    check_close_to_fp32(quantized_slow[name], SLOW_CASES[name][3])


def test_every_backend_scheme_is_covered():
    from vlmcompress.stages.quantize import backend_schemes

    every = CASES | SLOW_CASES
    covered = {(every[n][2].get("backend", "auto"), every[n][2].get("scheme", "int8")) for n in every}
    from vlmcompress.stages.quantize import resolve_scheme

    covered = {(b, resolve_scheme(b, s)) for b, s in covered}
    for backend, schemes in backend_schemes().items():
        if backend == "onnxruntime":
            continue  # exported graphs, tested in test_onnx.py
        for scheme in schemes:
            assert (backend, scheme) in covered, (backend, scheme)


def test_int8_resolution_recorded(quantized):
    spec = config_of(quantized["torch-int8"])["quantization"]
    assert spec["requested"] == {"backend": "auto", "scheme": "int8"}
    assert spec["resolved"]["int8"] == "int8_dynamic" and spec["resolved"]["path"] in ("torch-x86", "torch-onednn",
                                                                                       "torch-fbgemm", "torchao")
    assert {s["scheme"] for s in spec["schemes"].values()} == {"int8_dynamic"}
    assert "faster" in spec["schemes"]["vision"]["cpu_speed"]
    report = json.loads((quantized["torch-int8"].out / "report.json").read_text())
    assert report["stages"][-1]["details"]["resolved"]["int8"] == "int8_dynamic"
    card = (quantized["torch-int8"].out / "README.md").read_text()
    assert "int8_dynamic" in card and "faster on CPU" in card


def test_components_overrides_ignore(quantized, reloaded):
    llava = reloaded["remote"]["llava-prune-tome-torch"]["layers"]
    assert llava["model.multi_modal_projector.linear_1"] == {"kind": "linear", "dtype": "torch.float32"}
    assert llava["model.language_model.layers.0.mlp.down_proj"]["kind"] == "linear"
    assert llava["model.language_model.layers.1.mlp.down_proj"]["kind"] == "quantized"
    assert llava["model.vision_tower.encoder.layers.0.mlp.fc1"]["kind"] == "quantized"
    assert llava["lm_head"]["kind"] == "linear"  # outside every component

    case = quantized["siglip-vision-only-torch"]
    assert torch.equal(case.outputs["text_embeds"], case.fp32["text_embeds"])  # the text tower is untouched
    assert not torch.equal(case.outputs["image_embeds"], case.fp32["image_embeds"])
    siglip = reloaded["vlmcompress"]["siglip-vision-only-torch"]["layers"]
    assert all(v["kind"] == "linear" for k, v in siglip.items() if k.startswith("text_model."))
    assert any(v["kind"] == "quantized" for k, v in siglip.items() if k.startswith("vision_model."))
    # nn.MultiheadAttention reads its out_proj weight directly: it stays a plain layer
    assert not any(k.startswith("vision_model.head.attention") for k in
                   config_of(quantized["siglip-vision-only-torch"])["quantization"]["modules"])

    blip2 = config_of(quantized["blip2-quanto-mixed"])["quantization"]
    assert blip2["schemes"]["llm"]["scheme"] == "int4_weight_only"
    assert blip2["schemes"]["vision"]["scheme"] == "int8_weight_only"
    assert {e["scheme"] for n, e in blip2["modules"].items() if n.startswith("language_model.")} == {"llm"}


def test_pruned_and_token_reduced_stay_so(quantized):
    for name in ("llava-prune-tome-torch", "blip-prune-tome-torchao"):
        case = quantized[name]
        cfg = config_of(case)
        assert cfg["token_reduction"]["towers"][0]["r"][0] > 0
        assert cfg["vlmcompress"]["param_shapes"]
        loaded = vlmcompress.load(case.out)
        # a pruned layer is quantized at its pruned width
        for layer_name, shape in cfg["vlmcompress"]["param_shapes"].items():
            module_name = layer_name.rpartition(".")[0]
            if layer_name.endswith(".weight") and module_name in cfg["quantization"]["modules"]:
                layer = loaded.get_submodule(module_name)
                assert isinstance(layer, QuantizedLinear)
                assert [layer.out_features, layer.in_features] == shape


def test_quantize_must_be_last(tmp_path):
    recipe = {"model": "tiny-clip", "output": str(tmp_path / "out"),
              "stages": [q(), {"method": "token_reduce", "r": 4}]}
    with pytest.raises(StageOrderError, match=r"stages\[0\] \(quantize\) must be the last stage"):
        vlmcompress.apply(recipe, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage,fragment", [
    (q(backend="torch", scheme="int4_weight_only"), "backend torch has no scheme 'int4_weight_only'"),
    (q(backend="quanto", overrides={"text": "int8_dynamic"}), "overrides.text: backend quanto has no scheme"),
    (q(algorithm="gptq"), "algorithm: gptq needs backend: neural_compressor"),
    (q(backend="quanto", scheme="int4_weight_only", group_size=32), "group_size: 32 has no effect with backend: quanto"),
    (q(backend="auto", scheme="int8_weight_only"), "backend auto has no scheme 'int8_weight_only'"),
    (q(engine="onednn"), "engine: onednn needs backend: torch"),
])
def test_bad_scheme_is_a_recipe_error(tmp_path, stage, fragment):
    with pytest.raises(RecipeError, match=fragment):
        vlmcompress.load_recipe({"model": "tiny-clip", "output": str(tmp_path / "o"), "stages": [stage]})


def test_component_and_selector_errors(tmp_path):
    base = {"model": "tiny-clip", "output": str(tmp_path / "out")}
    with pytest.raises(VlmCompressError, match="component.*'llm'.*expected some of: vision, text"):
        vlmcompress.apply(base | {"stages": [q(components=["llm"])]}, progress=False)
    with pytest.raises(VlmCompressError, match="matches no module"):
        vlmcompress.apply(base | {"stages": [q(ignore=["vision_model.nope"])]}, progress=False)
    with pytest.raises(VlmCompressError, match="matched no linear layer"):
        vlmcompress.apply(base | {"stages": [q(overrides={"vision": "none", "text": "none"})]}, progress=False)


@pytest.mark.parametrize("backend,extra,package", [
    ("torchao", "torchao", "torchao"), ("quanto", "quanto", "optimum-quanto"),
    ("neural_compressor", "neural_compressor", "neural-compressor-pt")])
def test_missing_backend_is_one_line(tmp_path, monkeypatch, backend, extra, package):
    blocked = {"torchao": ["torchao"], "quanto": ["optimum.quanto"],
               "neural_compressor": ["neural_compressor", "neural_compressor.torch",
                                     "neural_compressor.torch.quantization"]}[backend]
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-clip\noutput: {tmp_path / 'out'}\nstages:\n  - method: quantize\n"
                      f"    backend: {backend}\n    scheme: int8_weight_only\n")
    with pytest.raises(BackendNotInstalledError) as err:
        vlmcompress.apply(str(recipe), progress=False)
    assert str(err.value) == (f"this step needs the Python package '{package}', which is not installed; "
                              f"run: pip install 'vlmcompress[{extra}]'")
    result = CliRunner().invoke(app, ["apply", str(recipe)])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert f"pip install 'vlmcompress[{extra}]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_loading_without_backend_says_what_to_install(quantized, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ModelLoadError, match=r"pip install 'vlmcompress\[torchao\]'"):
        vlmcompress.load(quantized["torchao-int8_weight_only"].out)
    from vlmcompress.checkpoint import register_classes
    from vlmcompress.modeling.modeling_vlmcompress import VlmcCLIPModel

    register_classes()
    with pytest.raises(ImportError, match=r"pip install 'vlmcompress\[torchao\]'"):
        VlmcCLIPModel.from_pretrained(quantized["torchao-int8_weight_only"].out)


def test_quantized_stage_checkpoint_resumes(tmp_path, monkeypatch):
    """A crash after the quantize stage leaves its stage checkpoint; it reloads, and resuming from it writes the
    same model as an uninterrupted run."""
    from vlmcompress import orchestrator
    from vlmcompress.orchestrator import work_dir_for

    stages = [{"method": "token_reduce", "r": 4}, q(backend="torchao", scheme="int8_weight_only")]
    reference = vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "ref"), "stages": stages},
                                  progress=False)
    out = tmp_path / "out"
    recipe = {"model": "tiny-clip", "output": str(out), "stages": stages}

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the output")

    with monkeypatch.context() as m:
        m.setattr(orchestrator, "model_card", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            vlmcompress.apply(recipe, progress=False)
    stage_dir = work_dir_for(out) / "stage-02"
    assert stage_dir.is_dir() and not out.exists()
    inputs = adapter_for(reference).example_inputs(reference, batch_size=2, seed=0)
    expected = _main_outputs(reference, inputs)
    for model in (vlmcompress.load(stage_dir), vlmcompress.apply(recipe, progress=False, resume=True)):
        got = _main_outputs(model, inputs)
        for key in expected:
            assert (got[key] - expected[key]).abs().max().item() <= ATOL
    assert isinstance(vlmcompress.load(out).vision_model.encoder.layers[0].mlp.fc1, QuantizedLinear)


@pytest.mark.slow
def test_torchao_compile_recorded_and_applied(tmp_path):
    """`compile: true` is written into the checkpoint and applied at load; outputs still match the in-memory model."""
    recipe = {"model": "tiny-clip", "output": str(tmp_path / "out"),
              "stages": [q(backend="torchao", scheme="int8")]}  # int8 → int8_dynamic, compiled by default
    model = vlmcompress.apply(recipe, progress=False)
    inputs = adapter_for(model).example_inputs(model, batch_size=2, seed=0)
    expected = _main_outputs(model, inputs)
    spec = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert spec["compile"] == ["vision_model", "text_model"]
    loaded = vlmcompress.load(tmp_path / "out")
    assert getattr(loaded.vision_model, "_vlmc_compiled", False)
    got = _main_outputs(loaded, inputs)
    for key in expected:
        assert (got[key] - expected[key]).abs().max().item() <= ATOL


