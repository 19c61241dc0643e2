"""The quantize stage's `onnxruntime` backend: ONNX export of the encoders (with ToMe), ONNX Runtime dynamic int8,
and `eval` / `bench` on the exported folder.

Bounds: an fp32 graph reproduces torch to atol 1e-4; an int8 graph stays within cosine 0.98 of torch per output row
on the tiny random-init models (whose activations are small, so relative int8 noise is large) and loses at most one
point of recall@1 on the trained shapes-clip-small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress.adapters import BUILTIN_TINY  # noqa: E402
from vlmcompress.bench import benchmark  # noqa: E402
from vlmcompress.cli import app  # noqa: E402
from vlmcompress.errors import ModelLoadError, VlmCompressError  # noqa: E402
from vlmcompress.evaluate import evaluate_dual_encoder, shapes_eval_rows  # noqa: E402
from vlmcompress.integrations import onnx as vx  # noqa: E402
from vlmcompress.models import load_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
ATOL = 1e-4
INT8_MIN_COSINE = 0.98
TOME = [{"method": "token_reduce", "r": 8}]


def _reduced(name: str, stages=TOME) -> torch.nn.Module:
    return vlmcompress.apply({"model": name, "output": "unused", "stages": stages}, save=False, progress=False)


@pytest.fixture(scope="module")
def clip_tome(tmp_path_factory):
    """tiny-clip with ToMe r=8 exported (int8, fp32 graphs kept) without going through a recipe."""
    model = _reduced("tiny-clip")
    folder = tmp_path_factory.mktemp("clip") / "onnx"
    return model, vx.export(model, BUILTIN_TINY["tiny-clip"], folder, keep_fp32=True)


@pytest.fixture(scope="module")
def llava_tome(tmp_path_factory):
    name = "tiny-llava"
    model = _reduced(name)
    folder = tmp_path_factory.mktemp("llava") / "onnx"
    return model, vx.export(model, BUILTIN_TINY[name], folder, keep_fp32=True,
                            processor=BUILTIN_TINY[name].tiny_processor())


@pytest.fixture(scope="module")
def shapes_out(tmp_path_factory):
    """shapes-clip-small through `apply` with `quantize: {backend: onnxruntime}` (int8, no token reduction)."""
    out = tmp_path_factory.mktemp("shapes") / "out"
    model = vlmcompress.apply({"model": "shapes-clip-small", "output": str(out),
                               "stages": [{"method": "quantize", "backend": "onnxruntime", "scheme": "int8"}]},
                              progress=False)
    return out, model


def _inputs(graph: vx.Graph, batch: int, seed: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs for `graph` at another batch size (and text length) than the export's."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, example in graph.example.items():
        if example.dtype.is_floating_point:
            inputs[name] = torch.randn(batch, *example.shape[1:], generator=g)
    if "input_ids" in graph.example:
        ids = torch.randint(4, 90, (batch, length), generator=g)
        ids[:, 0], ids[:, -1] = 1, 3  # BOS, EOS of the tiny text config
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # one padded row
        inputs |= {"input_ids": ids, "attention_mask": mask} if "attention_mask" in graph.example else {"input_ids": ids}
    return inputs


def _run(path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(vx.session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def _run_all(path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(o) for o in vx.session(path).run(None, {k: v.numpy() for k, v in inputs.items()})]


def _check_graphs(model, result, adapter):
    """Every graph, every output: the fp32 file matches torch at batch 1 and 3 (export used 2; text lengths 5 and
    11 against 8); the int8 file is close and holds int8 weights."""
    for graph in vx.graphs_for(model, adapter):
        entry = result.config["graphs"][graph.name]
        for batch, length in ((1, 5), (3, 11)):
            inputs = _inputs(graph, batch, seed=batch, length=length)
            with torch.no_grad():
                refs = graph.run(**inputs)
            fp32s = _run_all(result.folder / f"{graph.name}.fp32.onnx", inputs)
            int8s = _run_all(result.folder / entry["file"], inputs)
            assert len(fp32s) == len(int8s) == len(refs) == len(entry["outputs"])
            for name, ref, fp32, int8 in zip(entry["outputs"], refs, fp32s, int8s):
                assert fp32.shape == ref.shape and fp32.shape[0] == batch
                torch.testing.assert_close(fp32, ref, atol=ATOL * max(1.0, ref.abs().max().item()), rtol=0)
                assert int8.shape == ref.shape
                cosine = torch.nn.functional.cosine_similarity(int8.reshape(batch, -1), ref.reshape(batch, -1),
                                                               dim=-1)
                if not name.startswith("logits"):  # (a row of logits over 1-3 texts has no direction worth
                    # comparing; they are products of the embeddings checked here)
                    assert cosine.min() > INT8_MIN_COSINE, (graph.name, name, cosine)
                assert (int8 - ref).abs().max() > 0  # it really is a different (quantized) computation
        _check_int8_file(result.folder / entry["file"], result.folder / f"{graph.name}.fp32.onnx", entry)


def _check_int8_file(int8_path, fp32_path, entry):
    """The int8 graph stores int8 weights for exactly the quantized linear layers and computes with integer ops."""
    model = onnx.load(str(int8_path))
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "MatMulIntegerToFloat"}
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(weights) == len(entry["quantized_modules"]) > 0  # one int8 weight matrix per quantized nn.Linear
    assert vx.initializer_types(int8_path)["int8"] == entry["initializers"]["int8"]
    # their float32 weights are gone (per-channel scales are all that is left of them)
    int8_elements = sum(w.dims[0] * w.dims[1] for w in weights)
    floats_removed = vx.initializer_types(fp32_path)["float32"] - vx.initializer_types(int8_path)["float32"]
    assert 0.9 * int8_elements <= floats_removed <= int8_elements
    assert int8_path.stat().st_size < fp32_path.stat().st_size


def test_clip_with_tome_image_and_text_graphs(clip_tome):
    model, result = clip_tome
    assert set(result.config["graphs"]) == {"image_encoder", "text_encoder", "model"}
    _check_graphs(model, result, BUILTIN_TINY["tiny-clip"])
    image = result.config["graphs"]["image_encoder"]
    assert image["tokens_per_layer"] == [65, 57, 49]  # ToMe r=8 in both layers, exported as such
    assert image["inputs"]["pixel_values"]["shape"] == ["batch", 3, 32, 32]
    assert result.config["graphs"]["text_encoder"]["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    # every nn.Linear of the vision tower is quantized in the image graph; the projection (a Gemm on [B, D]) is not
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert set(image["quantized_modules"]) == {n for n in linears if n.startswith("vision_model.")}


def test_llava_vision_tower_and_projector_with_tome(llava_tome):
    model, result = llava_tome
    assert set(result.config["graphs"]) == {"image_encoder"}
    _check_graphs(model, result, BUILTIN_TINY["tiny-llava"])
    entry = result.config["graphs"]["image_encoder"]
    # vision_feature_layer -2: the features after layer 1 of 2 (57 tokens), CLS dropped → 56 image tokens
    assert entry["tokens_per_layer"] == [65, 57, 49]
    assert entry["outputs"]["image_features"]["shape"] == ["batch", 56, model.config.text_config.hidden_size]
    assert {m.split(".")[1] for m in entry["quantized_modules"]} == {"vision_tower", "multi_modal_projector"}
    # the graph computes what the language model receives from the stock path
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stock = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
    torch.testing.assert_close(_run(result.folder / "image_encoder.fp32.onnx", {"pixel_values": pixels}), stock,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("stages", [TOME, pytest.param([], marks=pytest.mark.slow)], ids=["tome", "plain"])
def test_siglip_image_graph(tmp_path, stages):
    """SigLIP (no CLS token, attention-pooling head), with ToMe merging every patch and without."""
    adapter = BUILTIN_TINY["tiny-siglip"]
    model = _reduced("tiny-siglip", stages) if stages else adapter.tiny_model()
    graph = next(g for g in vx.graphs_for(model, adapter) if g.name == "image_encoder")
    vx.export_graph(graph, tmp_path / "image.onnx")
    for batch in (1, 3):
        inputs = _inputs(graph, batch, seed=batch)
        with torch.no_grad():
            ref = graph.module(**inputs)
        torch.testing.assert_close(_run(tmp_path / "image.onnx", inputs), ref, atol=ATOL, rtol=0)
    assert vx.check_exportable(model, adapter) == ([64, 56, 48] if stages else [64, 64, 64])


def test_ignore_and_overrides_keep_layers_fp32(clip_tome, tmp_path):
    model, result = clip_tome
    adapter = BUILTIN_TINY["tiny-clip"]
    graph = next(g for g in vx.graphs_for(model, adapter) if g.name == "image_encoder")
    fp32 = result.folder / "image_encoder.fp32.onnx"
    nodes = vx.linear_nodes(fp32)
    assert len(nodes) == len(result.config["graphs"]["image_encoder"]["quantized_modules"])
    kept = vx._quantized_modules(graph, nodes, "int8_dynamic", None, {}, ["re:.*mlp\\.fc2",
                                                                          "vision_model.encoder.layers.0"], adapter)
    assert kept and not any(m.endswith("mlp.fc2") or m.startswith("vision_model.encoder.layers.0.")
                            for m in kept.values())
    vx.quantize_graph(fp32, tmp_path / "partial.onnx", sorted(kept))
    int8 = [i for i in onnx.load(str(tmp_path / "partial.onnx")).graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == len(kept) < len(nodes)
    # a component switched off keeps its graph in fp32
    assert vx._graph_scheme(graph, "int8_dynamic", ["text"], {}) == "fp32"
    assert vx._graph_scheme(graph, "int8_dynamic", None, {"vision": "none"}) == "fp32"
    assert vx._graph_scheme(graph, "int8_dynamic", None, {"text": "none"}) == "int8_dynamic"


def test_plan_from_shapes_only():
    from vlmcompress.stages.quantize import QuantizeConfig

    adapter = BUILTIN_TINY["tiny-clip"]
    with torch.device("meta"):
        model = adapter.tiny_model()
    config = QuantizeConfig.parse({"method": "quantize", "backend": "onnxruntime", "overrides": {"text": "none"},
                                   "ignore": ["re:.*mlp\\.fc2"]})
    plan = config.plan(model, adapter)
    assert plan["graphs"] == {"image_encoder": "int8_dynamic (vision)", "text_encoder": "fp32 (text)",
                              "model": "int8_dynamic (vision+text)"}
    assert plan["int8 linear layers"] == {"vision": 2 * 6 - 2}  # q, k, v, out, fc1, fc2 per layer, minus the fc2s
    llava = QuantizeConfig.parse({"method": "quantize", "backend": "onnxruntime"}).plan(
        BUILTIN_TINY["tiny-llava"].tiny_model(), BUILTIN_TINY["tiny-llava"])
    assert llava["int8 linear layers"] == {"vision": 12, "projector": 2} and "llm" in llava["not exported"]


def test_stage_writes_fp32_checkpoint_and_onnx_folder(shapes_out):
    out, model = shapes_out
    raw = json.loads((out / "onnx" / "config.json").read_text())
    assert raw["model_type"] == "clip" and raw["architectures"] == ["CLIPModel"]  # a transformers config ...
    spec = vx.read_spec(raw)  # ... with the description of the graphs inside
    assert spec[vx.MARKER] == vx.FORMAT_VERSION and spec["family"] == "clip" and spec["scheme"] == "int8_dynamic"
    for name in ("image_encoder.onnx", "text_encoder.onnx", "model.onnx", "tokenizer.json", "processor_config.json"):
        assert (out / "onnx" / name).is_file(), name
    assert vx.is_onnx_folder(out / "onnx") and not vx.is_onnx_folder(out)
    # the PyTorch checkpoint is untouched fp32 and reloads as usual
    teacher, _ = load_model("shapes-clip-small")
    loaded = vlmcompress.load(out)
    inputs = BUILTIN_TINY["tiny-clip"].example_inputs(teacher, batch_size=2)
    with torch.no_grad():
        for a, b in zip(teacher(**inputs)[:4], loaded(**inputs)[:4]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    card = (out / "README.md").read_text()
    assert "## ONNX Runtime" in card and "`onnx/image_encoder.onnx` | int8_dynamic" in card
    report = json.loads((out / "report.json").read_text())
    details = report["stages"][0]["details"]
    assert details["backend"] == "onnxruntime" and details["resolved_scheme"] == "int8_dynamic"
    assert report["stages"][0]["matched"] == sorted(set(spec["graphs"]["image_encoder"]["quantized_modules"] +
                                                        spec["graphs"]["text_encoder"]["quantized_modules"]))


def test_eval_on_exported_folder_matches_torch(shapes_out):
    out, _ = shapes_out
    torch_model, processor = load_model(str(out))
    onnx_model, onnx_processor = load_model(str(out / "onnx"))
    assert isinstance(onnx_model, vx.OnnxModel) and onnx_processor is not None
    ref = evaluate_dual_encoder(torch_model, processor, shapes_eval_rows(torch_model, 1000))
    assert ref["i2t_R@1"] > 5 * ref["chance_R@1"]  # a trained model: the comparison is not between two chance levels
    result = runner.invoke(app, ["eval", str(out / "onnx"), "--size", "1000", "--json"])  # the same 1,000 rows
    assert result.exit_code == 0, result.output
    got = json.loads(result.output[result.output.index("{"):])
    assert got["folds"] == ref["folds"] == 1
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"):
        assert abs(got[key] - ref[key]) <= 0.01, (key, got[key], ref[key])
    # zero-shot is scored on the ~200 single-object images only: 0.04 is 8 of them
    assert got["zero_shot_n"] == ref["zero_shot_n"] and abs(got["zero_shot_shape"] - ref["zero_shot_shape"]) <= 0.04


def test_bench_onnx_against_torch(shapes_out):
    out, _ = shapes_out
    result = benchmark(str(out), against=str(out / "onnx"), batch_sizes=(1, 2), repeats=1, threads=1,
                       progress=False)
    torch_side, onnx_side = result["models"][str(out)], result["models"][str(out / "onnx")]
    assert set(onnx_side["workloads"]) == set(torch_side["workloads"]) == {"image", "text"}
    assert "intra_op_num_threads=1" in onnx_side["runtime"] and "onnxruntime" in result["what"]
    # the graphs it runs: the two encoders, not Optimum's whole-model graph (which repeats them)
    assert onnx_side["size_on_disk_bytes"] == sum(f.stat().st_size for f in (out / "onnx").glob("*_encoder.onnx"))
    assert onnx_side["size_on_disk_bytes"] < torch_side["size_on_disk_bytes"]  # int8 weights
    for key in ("image", "text"):
        assert onnx_side["workloads"][key]["gflops_per_sample"] == pytest.approx(
            torch_side["workloads"][key]["gflops_per_sample"], rel=1e-3)
        t = onnx_side["workloads"][key]["batch_sizes"]["2"]
        assert t["ms_median"] > 0 and result["ratios"]["workloads"][key]["batch_sizes"]["2"]["speedup_median"] == \
            pytest.approx(torch_side["workloads"][key]["batch_sizes"]["2"]["ms_median"] / t["ms_median"], rel=1e-3)


def test_bench_cli_states_the_onnxruntime_threads(shapes_out):
    out, _ = shapes_out
    result = runner.invoke(app, ["bench", str(out), "--against", str(out / "onnx"), "--batch-sizes", "1",
                                 "--repeats", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "OTHER runs in onnxruntime" in result.output and "intra_op_num_threads=1" in result.output


def test_bench_and_eval_of_llava_export(llava_tome):
    _, result = llava_tome
    out = benchmark("tiny-llava", against=str(result.folder), batch_sizes=(2,), repeats=1, threads=1,
                    progress=False)
    assert set(out["what"]["workloads"]) == {"image"}  # the part the export holds, timed on both
    assert out["models"][str(result.folder)]["tokens_per_layer"] == [65, 57, 49]
    assert out["models"]["tiny-llava"]["tokens_per_layer"] == [65, 65, 65]
    cli = runner.invoke(app, ["eval", str(result.folder), "--size", "10"])
    assert cli.exit_code == 1 and "holds only the image encoder" in cli.output


def test_onnx_folder_is_not_a_recipe_model(shapes_out, tmp_path):
    out, _ = shapes_out
    with pytest.raises(ModelLoadError, match="ONNX export, which cannot be compressed further"):
        vlmcompress.apply({"model": str(out / "onnx"), "output": str(tmp_path / "x"), "stages": TOME},
                          progress=False)
    with pytest.raises(ModelLoadError, match="holds ONNX graphs"):
        load_model(str(out / "onnx"), meta=True)


# ----------------------------------------------------------------------------------------------------------------
# refusing what cannot be exported correctly


def test_unknown_or_data_dependent_token_reduction_is_refused():
    adapter = BUILTIN_TINY["tiny-clip"]
    model = _reduced("tiny-clip")
    spec = model.config.token_reduction
    assert vx.check_exportable(model, adapter) == [65, 57, 49]
    model.config.token_reduction = spec | {"algorithm": "threshold_drop"}  # not declared fixed-schedule
    with pytest.raises(vx.OnnxExportError, match="chooses how many tokens to keep from the data"):
        vx.check_exportable(model, adapter)
    model.config.token_reduction = spec | {"towers": [spec["towers"][0] | {"data_dependent": True}]}
    with pytest.raises(vx.OnnxExportError, match="fixed-schedule token reduction only"):
        vx.check_exportable(model, adapter)
    model.config.token_reduction = spec | {"towers": [spec["towers"][0] | {"component": "text"}]}
    with pytest.raises(vx.OnnxExportError, match="depends on the text length"):
        vx.check_exportable(model, adapter)


def test_token_counts_that_depend_on_the_image_are_refused(tmp_path):
    """A layer that keeps the tokens whose first channel is positive: the count varies with the image, which a
    traced graph would freeze. The measured counts expose it whatever the algorithm claims."""
    adapter = BUILTIN_TINY["tiny-clip"]
    model = adapter.tiny_model()
    layer = model.vision_model.encoder.layers[0]
    stock_forward = layer.forward

    def dropping_forward(hidden_states, *args, **kwargs):
        out = stock_forward(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        keep = out[0, :, 0] > 0
        keep[0] = True  # CLS
        return out[:, keep]

    layer.forward = dropping_forward
    with pytest.raises(vx.OnnxExportError, match="token counts depend on the input"):
        vx.check_exportable(model, adapter)
    with pytest.raises(vx.OnnxExportError, match="token counts depend on the input"):
        vx.export(model, adapter, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()  # nothing written


def test_unsupported_family_and_llava_llm_are_clear_errors(tmp_path):
    with pytest.raises(VlmCompressError, match="exports clip, siglip, llava models"):
        vx.graphs_for(BUILTIN_TINY["tiny-blip"].tiny_model(), BUILTIN_TINY["tiny-blip"])
    recipe = {"model": "tiny-llava", "output": str(tmp_path / "out"),
              "stages": [{"method": "quantize", "backend": "onnxruntime", "components": ["vision", "llm"]}]}
    with pytest.raises(VlmCompressError, match="vision tower and projector only"):
        vlmcompress.apply(recipe, progress=False)
    with pytest.raises(VlmCompressError, match="scheme"):
        vlmcompress.apply({**recipe, "stages": [{"method": "quantize", "backend": "onnxruntime",
                                                 "scheme": "int4_weight_only"}]}, progress=False)


def test_algorithms_declared_by_the_modeling_code():
    """PruMerge (adaptive) declares data-dependent token counts and is refused; FastV reduces tokens inside LLaVA's
    language model, outside the exported image encoder, which stays exportable."""
    adapter = BUILTIN_TINY["tiny-llava"]
    prumerge = _reduced("tiny-llava", [{"method": "token_reduce", "algorithm": "prumerge"}])
    with pytest.raises(vx.OnnxExportError, match="prumerge"):
        vx.check_exportable(prumerge, adapter)
    fastv = _reduced("tiny-llava", [{"method": "token_reduce", "algorithm": "fastv", "layer": 1}])
    assert vx.check_exportable(fastv, adapter) == [65, 65, 65]


def test_export_failure_names_the_cause(tmp_path):
    class ReadsAValue(torch.nn.Module):
        def forward(self, pixel_values):
            if pixel_values.mean() > 0:  # a Python branch on the data
                return pixel_values.mean(dim=(2, 3))
            return pixel_values.amax(dim=(2, 3))

    graph = vx.Graph("image_encoder", ReadsAValue(), {"pixel_values": torch.randn(2, 3, 8, 8)},
                     {"pixel_values": {0: "batch"}}, "image_embeds", ("vision",), "image", "test")
    with pytest.raises(vx.OnnxExportError, match="turns a tensor value into a Python number") as info:
        vx.export_graph(graph, tmp_path / "x.onnx")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.slow
def test_turbo_exports_like_tome(tmp_path):
    adapter = BUILTIN_TINY["tiny-clip"]
    model = _reduced("tiny-clip", [{"method": "token_reduce", "algorithm": "turbo", "r": 8}])
    result = vx.export(model, adapter, tmp_path / "onnx", keep_fp32=True)
    _check_graphs(model, result, adapter)
    assert result.config["graphs"]["image_encoder"]["tokens_per_layer"] == [65, 57, 49]


def test_crossget_exports_with_static_token_counts(tmp_path):
    """CrossGET's kernel keeps its shapes static (protected count from the caller, survivors by sort), so its graphs
    export and match torch, cross token included."""
    adapter = BUILTIN_TINY["tiny-clip"]
    model = _reduced("tiny-clip", [{"method": "token_reduce", "algorithm": "crossget", "r": 4}])
    result = vx.export(model, adapter, tmp_path / "onnx", keep_fp32=True)
    _check_graphs(model, result, adapter)
    assert result.config["graphs"]["image_encoder"]["tokens_per_layer"] == [65, 61, 57]


def test_visionzip_exports_and_its_fp32_graph_matches_torch(tmp_path):
    """VisionZip builds its contextual groups from shapes only, so the LLaVA image graph exports; the fp32 graph
    equals torch at other batch sizes. (Its int8 graph is not held to the cosine bound: int8 noise can change which
    patches the CLS attention ranks dominant, a discrete choice.)"""
    adapter = BUILTIN_TINY["tiny-llava"]
    model = _reduced("tiny-llava", [{"method": "token_reduce", "algorithm": "visionzip", "keep_ratio": 0.5}])
    result = vx.export(model, adapter, tmp_path / "onnx", keep_fp32=True)
    (graph,) = vx.graphs_for(model, adapter)
    entry = result.config["graphs"][graph.name]
    assert entry["tokens_per_layer"] == [65, 32, 32]  # CLS + 26 dominant patches + 5 contextual
    for batch in (1, 3):
        inputs = _inputs(graph, batch, seed=batch)
        with torch.no_grad():
            ref = graph.module(**inputs)
        fp32 = _run(result.folder / f"{graph.name}.fp32.onnx", inputs)
        assert fp32.shape == ref.shape and fp32.shape[0] == batch
        torch.testing.assert_close(fp32, ref, atol=ATOL, rtol=0)
    _check_int8_file(result.folder / entry["file"], result.folder / f"{graph.name}.fp32.onnx", entry)


@pytest.mark.slow
def test_resume_after_the_export_keeps_the_onnx_folder(tmp_path, monkeypatch):
    """A crash while writing the output folder, after the quantize stage's checkpoint: --resume rebuilds the output
    from that stage checkpoint, onnx/ included, without exporting again."""
    from vlmcompress import orchestrator

    out = tmp_path / "out"
    recipe = {"model": "tiny-clip", "output": str(out),
              "stages": [{"method": "token_reduce", "r": 8},
                         {"method": "quantize", "backend": "onnxruntime", "scheme": "fp32"}]}
    real_save = orchestrator.save_checkpoint

    def crash_on_final_save(model, folder, **kwargs):
        if kwargs.get("report") is not None:  # the output folder (stage checkpoints carry no report)
            raise KeyboardInterrupt
        return real_save(model, folder, **kwargs)

    monkeypatch.setattr(orchestrator, "save_checkpoint", crash_on_final_save)
    with pytest.raises(KeyboardInterrupt):
        vlmcompress.apply(recipe, progress=False)
    stage = orchestrator.work_dir_for(out) / "stage-02"
    exported = (stage / "onnx" / "image_encoder.onnx").read_bytes()
    assert not out.exists()
    monkeypatch.setattr(orchestrator, "save_checkpoint", real_save)
    monkeypatch.setattr(vx, "export", lambda *a, **k: pytest.fail("resume must not export again"))
    vlmcompress.apply(recipe, resume=True, progress=False)
    assert (out / "onnx" / "image_encoder.onnx").read_bytes() == exported
    assert not orchestrator.work_dir_for(out).exists()
    assert vx.load_onnx(out / "onnx").spec["graphs"]["image_encoder"]["tokens_per_layer"] == [65, 57, 49]


def test_a_folder_without_the_whole_model_graph_loads_and_a_missing_encoder_is_named(shapes_out, tmp_path):
    import shutil

    out, _ = shapes_out
    folder = tmp_path / "onnx"
    shutil.copytree(out / "onnx", folder)
    full = vx.load_onnx(out / "onnx", threads=1)
    (folder / "model.onnx").unlink()  # Optimum's graph repeats the encoders; vlmcompress never runs it
    trimmed = vx.load_onnx(folder, threads=1)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # shapes-clip-small's size
    assert torch.equal(trimmed.get_image_features(pixel_values=pixels), full.get_image_features(pixel_values=pixels))
    (folder / "text_encoder.onnx").unlink()
    with pytest.raises(ModelLoadError, match="lacks text_encoder.onnx; the export is incomplete"):
        vx.load_onnx(folder)


# ----------------------------------------------------------------------------------------------------------------
# the int8 layout is chosen by the CPU's features

def _cpu(*flags, arch="x86_64"):
    from vlmcompress.cpu import CpuFeatures

    return CpuFeatures(arch, "test CPU", "AVX2" if "avx512f" not in flags else "AVX512", tuple(sorted(flags)))


AVX2_ONLY = _cpu("avx2", "fma")
AVX512_VNNI = _cpu("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")


def test_int8_format_by_cpu_features():
    # u8 x s8 pairs summed in int16 (vpmaddubsw): 2 * 255 * 127 = 64770 overflows int16 (32767), 2 * 255 * 64 = 32640
    # does not; so 7-bit weights wherever there is no int8 dot product
    assert 2 * 255 * 127 > 2**15 - 1 >= 2 * 255 * 64
    assert vx.int8_format(AVX2_ONLY).reduce_range
    assert vx.int8_format(_cpu("avx2", "avx512f", "avx512bw")).reduce_range  # AVX-512 without VNNI saturates too
    assert not vx.int8_format(AVX512_VNNI).reduce_range
    assert not vx.int8_format(_cpu("avx2", "avx_vnni")).reduce_range
    assert not vx.int8_format(_cpu("asimd", "asimddp", arch="aarch64")).reduce_range  # sdot / udot: int32
    # the recipe's choice wins either way
    assert not vx.int8_format(AVX2_ONLY, reduce_range=False).reduce_range
    assert vx.int8_format(AVX512_VNNI, reduce_range=True).reduce_range


@pytest.mark.parametrize("cpu,bits", [(AVX2_ONLY, 7), (AVX512_VNNI, 8)], ids=["avx2", "avx512-vnni"])
def test_export_records_the_layout_and_the_cpu_it_was_chosen_for(tmp_path, cpu, bits):
    model = _reduced("tiny-clip")
    result = vx.export(model, BUILTIN_TINY["tiny-clip"], tmp_path / "onnx", cpu=cpu)
    layout = result.config["int8_format"]
    assert layout["reduce_range"] is (bits == 7) and layout["chosen_for"]["capability"] == cpu.capability
    assert vx.read_spec(json.loads((tmp_path / "onnx" / "config.json").read_text()))["int8_format"] == layout
    # the int8 weights span 7 or 8 bits (per-channel symmetric: every row reaches its largest magnitude)
    graph = onnx.load(str(tmp_path / "onnx" / "image_encoder.onnx")).graph
    largest = max(int(abs(onnx.numpy_helper.to_array(i).astype(int)).max()) for i in graph.initializer
                  if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2)
    assert largest == (64 if bits == 7 else 127)


def test_loading_a_vnni_export_on_a_cpu_without_vnni_warns():
    vnni_spec = {"int8_format": {**vx.int8_format(AVX512_VNNI).to_dict(), "chosen_for": AVX512_VNNI.to_dict()}}
    line = vx.saturation_warning(vnni_spec, cpu=AVX2_ONLY)
    assert "VNNI" in line and "reduce_range: true" in line and "\n" not in line
    assert vx.saturation_warning(vnni_spec, cpu=AVX512_VNNI) is None
    portable = {"int8_format": {**vx.int8_format(AVX2_ONLY).to_dict(), "chosen_for": AVX2_ONLY.to_dict()}}
    assert vx.saturation_warning(portable, cpu=AVX2_ONLY) is None
    assert vx.saturation_warning({"int8_format": None}, cpu=AVX2_ONLY) is None  # fp32 export


@pytest.mark.skipif(not __import__("shutil").which("qemu-x86_64"), reason="needs qemu-user (apt-get install qemu-user)")
def test_int8_on_an_emulated_avx2_cpu(tmp_path):
    """ONNX Runtime under `qemu-x86_64 -cpu EPYC-Milan` (AVX2, no VNNI: its cpuid drives ORT's kernel choice): the
    layout chosen for that CPU agrees with torch as well as on the host and gives the host's outputs exactly (the
    integer arithmetic is exact on both); the full 8-bit layout saturates there."""
    import subprocess
    import sys

    import numpy as np

    model = _reduced("tiny-llava")
    adapter = BUILTIN_TINY["tiny-llava"]
    graph = next(g for g in vx.graphs_for(model, adapter) if g.name == "image_encoder")
    for name, cpu in (("avx2", AVX2_ONLY), ("vnni", AVX512_VNNI)):
        vx.export(model, adapter, tmp_path / name, cpu=cpu)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    np.savez(tmp_path / "feeds.npz", pixel_values=pixels.numpy())
    jobs = [{"graph": f"{n}/image_encoder.onnx", "feeds": "feeds.npz", "out": f"{n}.npy"} for n in ("avx2", "vnni")]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    replay = str(Path(__file__).parent.parent / "benchmarks" / "ort_replay.py")
    for tag, prefix in (("host", []), ("milan", ["qemu-x86_64", "-cpu", "EPYC-Milan"])):
        subprocess.run([*prefix, sys.executable, replay, str(tmp_path), tag], check=True, stderr=subprocess.DEVNULL)
    with torch.no_grad():
        ref = graph.module(pixel_values=pixels)

    def cosine(tag, name):
        out = torch.from_numpy(np.load(tmp_path / tag / f"{name}.npy"))
        return torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1).min().item()

    assert cosine("milan", "avx2") > INT8_MIN_COSINE
    assert np.array_equal(np.load(tmp_path / "milan" / "avx2.npy"), np.load(tmp_path / "host" / "avx2.npy"))
    assert cosine("milan", "vnni") < cosine("milan", "avx2")  # what the choice avoids: saturated int16 sums
