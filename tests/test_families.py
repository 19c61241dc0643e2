"""End-to-end checks of prune (50%) + ToMe (r=8) checkpoints for every built-in family.

The in-memory model returned by `apply` is the reference; the folder it wrote must rebuild the same model with stock
transformers (`trust_remote_code=True`, in a process where vlmcompress cannot be imported) and with `vlmcompress.load`.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmcompress
from conftest import FAMILIES
from helpers import layer_tokens

ATOL = 1e-5
TOME_R = 8

# How each family's main outputs are computed, written without vlmcompress (mirrors `adapter.main_outputs`).
CHILD_MAIN_OUTPUTS = {
    "tiny-clip": """
        o = model(**inputs)
        result = {"image_embeds": o.image_embeds, "text_embeds": o.text_embeds}
    """,
    "tiny-siglip": """
        o = model(**inputs)
        result = {"image_embeds": o.image_embeds, "text_embeds": o.text_embeds}
    """,
    "tiny-blip": """
        result = {"itm_score": model(**inputs, use_itm_head=True).itm_score,
                  "cosine": model(**inputs, use_itm_head=False).itm_score}
    """,
    "tiny-blip2": """
        result = {"logits": model(**inputs).logits}
    """,
    "tiny-llava": """
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        result = {"logits": logits[:, -1], "greedy_tokens": tokens[:, -4:]}
    """,
}

CHILD_TEMPLATE = """
import sys
sys.modules["vlmcompress"] = None
try:
    import vlmcompress
except ImportError:
    pass
else:
    raise SystemExit("vlmcompress must not be importable in the child")
try:
    import vlmcompress.modeling.reduction
except ImportError:
    pass
else:
    raise SystemExit("vlmcompress.modeling must not be importable in the child")

import json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

out, io_dir, layers_path = sys.argv[1], sys.argv[2], sys.argv[3]
inputs = load_file(io_dir + "/inputs.safetensors")
model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()

layer_tokens = []
hooks = [layer.register_forward_hook(
            lambda mod, args, output: layer_tokens.append((output[0] if isinstance(output, tuple) else output).shape[1]))
         for layer in model.get_submodule(layers_path)]
with torch.no_grad():
    model(**inputs)
for h in hooks:
    h.remove()

with torch.no_grad():
{snippet}
save_file({{k: v.contiguous() for k, v in result.items()}}, io_dir + "/child_outputs.safetensors")

bf16 = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
info = {{
    "class_module": type(model).__module__,
    "class_name": type(model).__name__,
    "vlmcompress_modules": sorted(k for k, v in sys.modules.items() if k.split(".")[0] == "vlmcompress" and v),
    "tokens_per_layer": layer_tokens,
    "bf16_param_dtypes": sorted({{str(p.dtype) for p in bf16.parameters()}}),
}}
with open(io_dir + "/child_info.json", "w") as f:
    json.dump(info, f)
"""


@pytest.fixture(params=FAMILIES)
def fam(request, compressed):
    return compressed(request.param)


def assert_same_outputs(expected, got, what):
    assert set(got) == set(expected), what
    for key, exp in expected.items():
        g = got[key]
        assert g.shape == exp.shape, f"{what}: {key} shape {tuple(g.shape)} != {tuple(exp.shape)}"
        if key == "greedy_tokens":
            assert torch.equal(g, exp), f"{what}: greedy tokens {g.tolist()} != {exp.tolist()}"
        else:
            diff = (g.float() - exp.float()).abs().max().item()
            assert diff <= ATOL, f"{what}: {key} differs by {diff}"


def expected_tokens(fam):
    """Tokens after each vision layer, derived from the tiny config (not from vlmcompress): N - r, clamped to half."""
    vc = fam.model.config.vision_config
    cls = 0 if fam.name == "tiny-siglip" else 1
    n = (vc.image_size // vc.patch_size) ** 2 + cls
    n0, tokens = n, []
    for _ in range(vc.num_hidden_layers):
        n -= min(TOME_R, (n - cls) // 2)
        tokens.append(n)
    return n0, tokens


def projections(adapter, model):
    """`[(kind, unit name, projection path, weight shape)]` of every attention / MLP projection, in adapter order."""
    out = []
    for u in adapter.attention_units(model):
        for p in (u.q, u.k, u.v, u.qkv, u.out):
            if p:
                out.append(("attn", u.name, p, tuple(u.module.get_submodule(p).weight.shape)))
    for u in adapter.mlp_units(model):
        for p in (*u.up, u.down):
            out.append(("mlp", u.name, p, tuple(u.module.get_submodule(p).weight.shape)))
    return out


def test_remote_code_load_without_vlmcompress(fam, tmp_path):
    io_dir = tmp_path / "io"
    io_dir.mkdir()
    save_file({k: v.contiguous() for k, v in fam.inputs.items()}, str(io_dir / "inputs.safetensors"))
    snippet = textwrap.indent(textwrap.dedent(CHILD_MAIN_OUTPUTS[fam.name]).strip(), "    ")
    code = CHILD_TEMPLATE.format(snippet=snippet)
    layers_path = fam.adapter.vision_tower(fam.model).layers_path
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", code, str(fam.out), str(io_dir), layers_path], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    info = json.loads((io_dir / "child_info.json").read_text())
    assert info["vlmcompress_modules"] == []
    assert info["class_module"].startswith("transformers_modules."), info["class_module"]
    assert info["class_name"] == type(fam.model).__name__
    _, tokens = expected_tokens(fam)
    assert info["tokens_per_layer"] == tokens
    assert info["bf16_param_dtypes"] == ["torch.bfloat16"]

    child = load_file(str(io_dir / "child_outputs.safetensors"))
    assert_same_outputs(fam.outputs, child, f"{fam.name} remote-code load")


def test_outputs_differ_from_base_and_fewer_params(fam):
    base = fam.adapter.tiny_model(0)
    with torch.no_grad():
        base_out = fam.adapter.main_outputs(base, fam.inputs)
    float_keys = [k for k, v in base_out.items() if v.is_floating_point()]
    assert float_keys
    for key in float_keys:
        assert base_out[key].shape == fam.outputs[key].shape
        diff = (base_out[key] - fam.outputs[key]).abs().max().item()
        assert diff > 1e-3, f"{key} unchanged by compression (max diff {diff})"

    n_base = sum(p.numel() for p in base.parameters())
    n_comp = sum(p.numel() for p in fam.model.parameters())
    assert n_comp < n_base
    report = fam.model.vlmcompress_report
    assert report["params_before"] == n_base
    assert report["params_after"] == n_comp


def test_vlmcompress_load_same_outputs(fam):
    loaded = vlmcompress.load(fam.out)
    assert type(loaded).__name__ == type(fam.model).__name__
    assert not loaded.training
    with torch.no_grad():
        got = fam.adapter.main_outputs(loaded, fam.inputs)
    assert_same_outputs(fam.outputs, got, f"{fam.name} vlmcompress.load")


def test_tokens_per_layer_match_schedule(fam):
    n0, tokens = expected_tokens(fam)
    assert tokens == ([56, 48] if fam.name == "tiny-siglip" else [57, 49])

    loaded = vlmcompress.load(fam.out)
    tower = loaded.config.token_reduction["towers"][0]
    assert tower["component"] == "vision"
    assert tower["num_tokens"] == n0
    assert tower["tokens_per_layer"] == tokens
    assert fam.model.vlmcompress_report["tokens_per_layer"] == {"vision": [n0, *tokens]}

    layers_path = fam.adapter.vision_tower(loaded).layers_path
    assert tower["layers_path"] == layers_path
    for model in (loaded, fam.model):
        assert layer_tokens(model, layers_path, lambda: model(**fam.inputs)) == tokens


def test_per_layer_shapes(fam):
    loaded = vlmcompress.load(fam.out)
    loaded_shapes = {n: tuple(p.shape) for n, p in loaded.named_parameters()}
    memory_shapes = {n: tuple(p.shape) for n, p in fam.model.named_parameters()}
    assert loaded_shapes == memory_shapes

    base = fam.adapter.tiny_model(0)
    base_proj = projections(fam.adapter, base)
    loaded_proj = projections(fam.adapter, loaded)
    assert loaded_proj == projections(fam.adapter, fam.model)
    assert [p[:3] for p in loaded_proj] == [p[:3] for p in base_proj]
    smaller = {"attn": 0, "mlp": 0}
    for (kind, name, path, shape), (*_, base_shape) in zip(loaded_proj, base_proj):
        assert all(a <= b for a, b in zip(shape, base_shape)), f"{name}.{path} grew: {shape} vs {base_shape}"
        smaller[kind] += shape != base_shape
    assert smaller["attn"] > 0 and smaller["mlp"] > 0, smaller


def test_hidden_states_and_bf16(fam):
    n0, tokens = expected_tokens(fam)
    vision_path = fam.adapter.component_paths["vision"]
    pixel_values = fam.inputs["pixel_values"]

    loaded = vlmcompress.load(fam.out)
    with torch.no_grad():
        out = loaded.get_submodule(vision_path)(pixel_values=pixel_values, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [n0, *tokens]
    assert out.last_hidden_state.shape[1] == tokens[-1]

    bf16 = vlmcompress.load(fam.out, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out16 = bf16.get_submodule(vision_path)(pixel_values=pixel_values.bfloat16(), output_hidden_states=True)
    assert [h.shape[1] for h in out16.hidden_states] == [n0, *tokens]
    assert all(h.dtype == torch.bfloat16 for h in out16.hidden_states)
    assert torch.isfinite(out16.last_hidden_state.float()).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_compressed_outputs_depend_on_the_image(name, compressed):
    """Without this, output comparisons say nothing about the (token-reduced) vision tower."""
    fam = compressed(name)
    other = dict(fam.inputs, pixel_values=torch.randn(fam.inputs["pixel_values"].shape,
                                                       generator=torch.Generator().manual_seed(123)))
    with torch.no_grad():
        changed = fam.adapter.main_outputs(fam.model, other)
    diffs = {k: (changed[k].float() - v.float()).abs().max().item() for k, v in fam.outputs.items()
             if v.is_floating_point()}
    assert max(diffs.values()) > 1e-4, diffs
