"""`onnx/` laid out as Optimum's ONNX Runtime models expect (issue 17, point 10): `config.json` is the transformers
config of the exported model, the processor files lie beside it, and CLIP / SigLIP get `model.onnx` with the file,
input and output names of Optimum's zero-shot-image-classification export (optimum-onnx 0.1.0, `CLIPOnnxConfig` /
`SiglipOnnxConfig`). optimum-onnx itself cannot be installed beside transformers 5, so a fresh interpreter that
cannot import vlmcompress does what `ORTModelForZeroShotImageClassification` does: AutoConfig + AutoProcessor on the
folder, one onnxruntime session on `model.onnx`, feeds and outputs by those names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import vlmcompress  # noqa: E402
from vlmcompress.adapters import BUILTIN_TINY  # noqa: E402
from vlmcompress.integrations import onnx as vx  # noqa: E402

OPTIMUM_OUTPUTS = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]

CHILD = """
import sys
sys.modules["vlmcompress"] = None
import json
import numpy as np
import onnxruntime as ort
from PIL import Image
from transformers import AutoConfig, AutoProcessor

folder = sys.argv[1]
config, processor = AutoConfig.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
images = [Image.fromarray((rng.random((80, 80, 3)) * 255).astype("uint8")) for _ in range(2)]
labels = ["a small red circle", "a large blue square at the top left", "a small green ring"]
inputs = processor(text=labels, images=images, padding=True, return_tensors="np")
feeds = {i.name: inputs[i.name].astype(np.int64 if i.name != "pixel_values" else np.float32)
         for i in session.get_inputs()}
outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
print(json.dumps({"config": type(config).__name__, "model_type": config.model_type,
                  "processor": type(processor).__name__, "inputs": sorted(feeds),
                  "outputs": [o.name for o in session.get_outputs()],
                  "logits_per_image": outputs["logits_per_image"].tolist(),
                  "pixel_values": inputs["pixel_values"].tolist(), "input_ids": inputs["input_ids"].tolist(),
                  "attention_mask": inputs["attention_mask"].tolist(),
                  "ran_folder_code": any(n.startswith("transformers_modules") for n in sys.modules)}))
"""


def test_onnx_folder_reads_as_optimum_reads_it_and_matches_torch(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "shapes-clip-small", "output": str(out),
                       "stages": [{"method": "token_reduce", "r": 2},
                                  {"method": "quantize", "backend": "onnxruntime", "scheme": "fp32"}]},
                      progress=False)
    onnx_dir = out / "onnx"
    raw = json.loads((onnx_dir / "config.json").read_text())
    assert raw["model_type"] == "clip" and raw["architectures"] == ["CLIPModel"] and "auto_map" not in raw
    assert raw["token_reduction"]["algorithm"] == "tome"  # the config is the exported (reduced) model's
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(onnx_dir)], capture_output=True, text=True, env=env,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert (got["config"], got["model_type"], got["processor"]) == ("CLIPConfig", "clip", "CLIPProcessor")
    assert got["inputs"] == ["attention_mask", "input_ids", "pixel_values"] and got["outputs"] == OPTIMUM_OUTPUTS
    assert got["ran_folder_code"] is False
    # the graph computes what the compressed PyTorch model computes on the same processor outputs
    model = vlmcompress.load(out)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(got["input_ids"]), attention_mask=torch.tensor(got["attention_mask"]),
                     pixel_values=torch.tensor(got["pixel_values"])).logits_per_image
    logits = torch.tensor(got["logits_per_image"])
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, want, atol=1e-3 * want.abs().max().item(), rtol=0)


def test_siglip_whole_model_graph_takes_no_mask_as_optimum_s():
    adapter = BUILTIN_TINY["tiny-siglip"]
    model = adapter.tiny_model().eval()
    whole = next(g for g in vx.graphs_for(model, adapter) if g.name == "model")
    assert list(whole.example) == ["input_ids", "pixel_values"] and list(whole.outputs) == OPTIMUM_OUTPUTS
    assert whole.dynamic == {"input_ids": {0: "text_batch", 1: "sequence"}, "pixel_values": {0: "image_batch"}}
    refs = whole.run(**whole.example)  # 3 texts against 2 images: the two batch axes really are separate
    assert refs[0].shape == (2, 3) and refs[1].shape == (3, 2)
