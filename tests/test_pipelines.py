"""What clients nobody on this project wrote see (issue 17, point 1): `config.json`'s `auto_map` maps every Auto class
transformers maps for the stock base class, so `transformers.pipeline(..., trust_remote_code=True)` and the task
Auto classes load the compressed class, in a fresh interpreter that cannot import vlmcompress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import vlmcompress
from vlmcompress.zoo import zoo_folder

CHILD = """
import sys
sys.modules["vlmcompress"] = None
import json
import numpy as np
from PIL import Image
from transformers import pipeline

image = Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype("uint8"))
labels = ["a small red circle", "a large blue square", "a small green ring"]
out = {}
for name, folder in zip(("compressed", "stock"), sys.argv[1:3]):
    clf = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    out[name] = {"class": type(clf.model).__name__, "module": type(clf.model).__module__,
                 "result": clf(image, candidate_labels=labels)}
print(json.dumps(out))
"""


def test_zero_shot_pipeline_loads_the_compressed_clip_as_it_loads_the_stock_one(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "shapes-clip-small", "output": str(out),
                       "stages": [{"method": "token_reduce", "r": 2}]}, progress=False)
    autos = json.loads((out / "config.json").read_text())["auto_map"]
    assert autos["AutoModelForZeroShotImageClassification"] == "modeling_vlmcompress.VlmcCLIPModel"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", CHILD, str(out), str(zoo_folder("shapes-clip-small"))],
                         capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["compressed"]["class"] == "VlmcCLIPModel" and got["compressed"]["module"].startswith(
        "transformers_modules.")
    assert got["stock"]["class"] == "CLIPModel"
    for name in ("compressed", "stock"):  # the same answer format: every label once, scores summing to 1
        result = got[name]["result"]
        assert sorted(r["label"] for r in result) == sorted(["a small red circle", "a large blue square",
                                                              "a small green ring"])
        assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_llava_outputs_map_the_image_text_to_text_auto_class(tmp_path):
    out = tmp_path / "out"
    vlmcompress.apply({"model": "tiny-llava", "output": str(out),
                       "stages": [{"method": "token_reduce", "algorithm": "fastv", "layer": 1}]}, progress=False)
    autos = json.loads((out / "config.json").read_text())["auto_map"]
    assert {"AutoModel", "AutoModelForImageTextToText", "AutoModelForMultimodalLM"} <= set(autos)
    code = ("import sys; sys.modules['vlmcompress'] = None\n"
            "from transformers import AutoModelForImageTextToText\n"
            "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "print(type(m).__name__, type(m).__module__.split('.')[0])")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["VlmcLlavaForConditionalGeneration", "transformers_modules"]


CHAT_CHILD = """
import sys
sys.modules["vlmcompress"] = None
import json
import numpy as np
from PIL import Image
from transformers import AutoProcessor, pipeline

folder, question = sys.argv[1], sys.argv[2]
image = Image.fromarray(np.load(sys.argv[3]))
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
out = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False}, return_full_text=False)
print(json.dumps({"prompt": prompt, "answer": out[0]["generated_text"].strip()}))
"""


def test_chat_template_and_image_text_to_text_pipeline_on_a_llava_output(tmp_path):
    """The built-in LLaVA teacher has a chat template that renders exactly its training prompt; every generative
    output carries it and its generation config; chat-style input to the `image-text-to-text` pipeline, in a fresh
    interpreter that cannot import vlmcompress, gives the answer `vlmcompress eval` gets (issue 17, point 3)."""
    import numpy as np

    from vlmcompress.data.shapes import VQA_PROMPT
    from vlmcompress.evaluate import answer_questions, shapes_eval_rows

    out = tmp_path / "out"
    model = vlmcompress.apply({"model": "shapes-llava", "output": str(out),
                               "stages": [{"method": "token_reduce", "algorithm": "fastv", "layer": 1,
                                           "keep_ratio": 0.5}]}, progress=False)
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    row = shapes_eval_rows(model, 3)[2]
    np.save(tmp_path / "image.npy", row["image"])
    from transformers import AutoProcessor

    expected = answer_questions(model, AutoProcessor.from_pretrained(out), [row["image"]], [row["question"]])[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", CHAT_CHILD, str(out), row["question"], str(tmp_path / "image.npy")],
                         capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    got = json.loads(last[last.index("{"):])
    assert got["prompt"] == VQA_PROMPT.format(question=row["question"])
    assert got["answer"] == expected
    assert VQA_PROMPT.format(question="QUESTION") in (out / "README.md").read_text()


STOCK_CHILD = """
import sys
sys.modules["vlmcompress"] = None
import json, torch
from transformers import CLIPModel
folder, reference = sys.argv[1], sys.argv[2]
pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
try:
    model = CLIPModel.from_pretrained(folder).eval()
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"}))
    sys.exit(0)
ref = CLIPModel.from_pretrained(reference).eval()
with torch.no_grad():
    got, want = model.get_image_features(pixel_values=pixels), ref.get_image_features(pixel_values=pixels)
got = got.pooler_output if hasattr(got, "pooler_output") else got
want = want.pooler_output if hasattr(want, "pooler_output") else want
print(json.dumps({"max_diff_to_unreduced": float((got - want).abs().max())}))
"""


def test_what_the_stock_class_gives_for_each_kind_of_output(tmp_path):
    """Without remote code, the stock class (issue 17, point 4): a token-reduced output loads as the *unreduced* model
    (outputs equal the source model's: the reduction is not applied), a pruned one fails with transformers' error
    about the changed shapes; the model card says both."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    source = zoo_folder("shapes-clip-small")
    results = {}
    for name, stages in (("reduced", [{"method": "token_reduce", "r": 2}]),
                         ("pruned", [{"method": "structured_prune", "ratio": 0.5}])):
        out = tmp_path / name
        vlmcompress.apply({"model": "shapes-clip-small", "output": str(out), "stages": stages}, progress=False)
        assert "gives the *unreduced* model" in (out / "README.md").read_text()
        run = subprocess.run([sys.executable, "-c", STOCK_CHILD, str(out), str(source)], capture_output=True,
                             text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["reduced"]["max_diff_to_unreduced"] < 1e-5
    assert "ignore_mismatched_sizes" in results["pruned"].get("error", ""), results["pruned"]


PROCESSOR_CHILD = """
import sys
sys.modules["vlmcompress"] = None
import json
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer
folder = sys.argv[1]
processor, tokenizer, config = (AutoProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                AutoConfig.from_pretrained(folder))
plain = AutoModel.from_pretrained(folder)  # no remote code: the stock class
print(json.dumps({"processor": type(processor).__name__, "tokenizer": type(tokenizer).__name__,
                  "config": type(config).__name__, "model": type(plain).__name__,
                  "ran_folder_code": any(name.startswith("transformers_modules") for name in sys.modules),
                  "ids": tokenizer("a small red circle")["input_ids"]}))
"""


def test_processor_tokenizer_and_config_load_without_remote_code_and_ask_nothing(tmp_path):
    """Issue 17, point 2: `config.json` carries the stock `model_type` (format 3), so AutoProcessor / AutoTokenizer /
    AutoConfig resolve the stock classes without the remote-code question, in a fresh interpreter whose stdin would
    answer it with nothing; the compressed class still loads with `trust_remote_code=True` (tests above)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    cases = {"shapes-clip-small": ("CLIPProcessor", "CLIPConfig", "CLIPModel"),
             "shapes-llava-small": ("LlavaProcessor", "LlavaConfig", "LlavaModel")}
    for model, (processor_cls, config_cls, plain_cls) in cases.items():
        out = tmp_path / model
        vlmcompress.apply({"model": model, "output": str(out),
                           "stages": [{"method": "token_reduce", "r": 2}]}, progress=False)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == config_cls.removesuffix("Config").lower()
        assert config["architectures"][0].startswith("Vlmc") and config["vlmcompress"]["format_version"] == 3
        run = subprocess.run([sys.executable, "-c", PROCESSOR_CHILD, str(out)], capture_output=True, text=True,
                             env=env, timeout=300, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "custom code" not in run.stdout + run.stderr
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert (got["processor"], got["config"], got["model"]) == (processor_cls, config_cls, plain_cls)
        assert got["ran_folder_code"] is False
        assert got["ids"] == vlmcompress.models.load_model(str(out))[1].tokenizer("a small red circle")["input_ids"]
        assert type(vlmcompress.load(out)).__name__ == config["architectures"][0]
