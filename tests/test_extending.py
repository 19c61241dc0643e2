"""docs/extending.md is true: a token-reduction algorithm added from outside the package, as the page says (two new
files and one registration call), runs through `apply`, reports its tokens per layer, and its checkpoint reloads in
a fresh process with stock transformers (its modeling file copied into the folder) with identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402

# the two files a plug-in author writes (docs/extending.md, "A token-reduction algorithm")
MODELING_FILE = '''
"""drop_last: after every layer, drop the last `r` tokens (a toy algorithm for the extension test)."""

import torch

from .reduction import AttentionInternals, ReductionState, Reducer, register_reducer


def reduce_drop_last(layer, x: torch.Tensor, internals: AttentionInternals, state: ReductionState,
                     r: int) -> torch.Tensor:
    """`[B, N, D]` → `[B, N - r, D]`: the first `N - r` tokens (the class token first) go on."""
    if r <= 0:
        return x
    if state.size is not None:
        state.size = state.size[:, : x.shape[1] - r]
    return x[:, : x.shape[1] - r]


REDUCER = register_reducer(Reducer("drop_last", reduce_drop_last))
'''

CONFIG_FILE = '''
"""The recipe side of drop_last: its config class, registered by one call."""

from pathlib import Path
from typing import Literal

from vlmcompress.stages.token_reduce import register_algorithm
from vlmcompress.stages.token_reduce.layerwise import LayerwiseConfig


@register_algorithm
class DropLastConfig(LayerwiseConfig):
    """Drop the last r tokens after every layer."""

    algorithm: Literal["drop_last"] = "drop_last"
    modeling_file = str(Path(__file__).with_name("modeling_drop_last.py"))
'''

CHILD = """
import sys
sys.modules["vlmcompress"] = None  # stock transformers and the checkpoint's own files only
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

folder, io = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    out = model.get_image_features(pixel_values=load_file(io + "/inputs.safetensors")["pixel_values"])
save_file({"image": out.pooler_output.contiguous()}, io + "/outputs.safetensors")
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "modeling_drop_last.py").write_text(textwrap.dedent(MODELING_FILE))
    (folder / "drop_last.py").write_text(textwrap.dedent(CONFIG_FILE))
    sys.path.insert(0, str(folder))
    try:
        import drop_last  # noqa: F401  (registers the algorithm)
    finally:
        sys.path.remove(str(folder))
    return folder


def test_a_plug_in_algorithm_runs_reports_and_reloads(plugin, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmcompress.stages.token_reduce import ALGORITHMS

    assert "drop_last" in ALGORITHMS
    out = tmp_path / "out"
    model = vlmcompress.apply({"model": "tiny-clip", "output": str(out),
                               "stages": [{"method": "token_reduce", "algorithm": "drop_last", "r": 4}]},
                              progress=False)
    report = json.loads((out / "report.json").read_text())
    # tiny-clip: 65 vision tokens (64 patches + CLS), 2 layers, 4 dropped after each
    assert report["tokens_per_layer"]["vision"] == [65, 61, 57]
    assert (out / "modeling_drop_last.py").is_file()
    assert "from .modeling_drop_last import REDUCER" in (out / "algorithms.py").read_text()

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
        seen = []  # the reducer really ran: the last layer hands on 57 tokens
        hook = model.vision_model.encoder.layers[-1].register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
        model.get_image_features(pixel_values=pixels)
        hook.remove()
    assert seen == [57]
    save_file({"pixel_values": pixels}, str(tmp_path / "inputs.safetensors"))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "outputs.safetensors"))["image"], expected, rtol=0, atol=0)
    # and with vlmcompress in this process, where the plug-in is registered
    reloaded = vlmcompress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(pixel_values=pixels).pooler_output, expected,
                                   rtol=0, atol=0)


def test_a_second_registration_under_a_taken_name_is_refused(plugin):
    from typing import Literal

    from vlmcompress.errors import VlmCompressError
    from vlmcompress.stages.token_reduce import register_algorithm
    from vlmcompress.stages.token_reduce.layerwise import LayerwiseConfig

    class OtherToMe(LayerwiseConfig):
        algorithm: Literal["tome"] = "tome"
        modeling_module = "vlmcompress.modeling.tome"

    with pytest.raises(VlmCompressError, match="'tome' is already registered by ToMeConfig"):
        register_algorithm(OtherToMe)


def test_extending_md_lists_the_files_this_test_wrote():
    text = (Path(__file__).parent.parent / "docs" / "extending.md").read_text()
    for needle in ("register_algorithm", "register_reducer", "modeling_file", "register_backend",
                   "register_importance", "register_method", "REDUCER ="):
        assert needle in text, needle


def test_register_reducer_is_checked_like_register_method():
    from vlmcompress.modeling import algorithms  # noqa: F401
    from vlmcompress.modeling.reduction import REDUCERS, Reducer, register_reducer

    tome = REDUCERS["tome"]
    assert register_reducer(tome) is tome  # the same reducer again (a module reloaded) is fine
    with pytest.raises(ValueError, match="'tome' is already registered by tome.reduce_tome"):
        register_reducer(Reducer("tome", lambda layer, x, internals, state, r: x))
    with pytest.raises(ValueError, match="needs a reduce function or a patch function"):
        register_reducer(Reducer("nothing"))
    with pytest.raises(TypeError, match="takes a Reducer"):
        register_reducer("tome")
    assert REDUCERS["tome"] is tome
