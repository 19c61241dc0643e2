"""Checkpoints written in format 1 (by 98808e1, `tests/fixtures/v1/make_fixtures.py`) keep loading with their old
outputs: with `vlmcompress.load` (today's modeling code, reading the old config) and with stock transformers in a
fresh process that cannot import vlmcompress (the folder's own modeling files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmcompress  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "v1"))
from fixture_io import run  # noqa: E402
from make_fixtures import FIXTURES  # noqa: E402

ROOT = Path(__file__).parent / "fixtures" / "v1"
NAMES = sorted(FIXTURES)

CHILD = """
import sys
sys.modules["vlmcompress"] = None
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from fixture_io import run

for name, family, out in zip(sys.argv[3::3], sys.argv[4::3], sys.argv[5::3]):
    folder = sys.argv[2] + "/" + name
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    io = load_file(folder + "/io.safetensors")
    inputs = {k[3:]: v for k, v in io.items() if k.startswith("in.")}
    save_file({k: v.contiguous() for k, v in run(model, family, inputs).items()}, out)
"""


def _recorded_on(name: str) -> str:
    from safetensors import safe_open

    with safe_open(str(ROOT / name / "io.safetensors"), "pt") as f:
        return f.metadata()["cpu_capability"]


def _compare(got: torch.Tensor, expected: torch.Tensor, name: str, key: str) -> None:
    """Within float noise of the recorded outputs: float sums run in another order on another CPU, even one with the
    same capability (the fixtures were recorded on an AMD EPYC with AVX-512; an Intel Xeon with AVX-512 and AMX
    differs in the last bits). Under torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
    ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 host) the largest difference over all fixtures was 2.2e-7 of the largest
    output; the bound is 1e-5 of it, far below what a changed computation gives (a changed kernel moves outputs by
    1e-2 and more)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()),
                               msg=f"{name}: {key} (recorded on {_recorded_on(name)})")


def _io(name: str) -> tuple[dict, dict]:
    io = load_file(str(ROOT / name / "io.safetensors"))
    return ({k[3:]: v for k, v in io.items() if k.startswith("in.")},
            {k[4:]: v for k, v in io.items() if k.startswith("out.")})


def _family(name: str) -> str:
    return json.loads((ROOT / name / "report.json").read_text())["family"]


def test_every_fixture_is_format_1_and_small():
    assert set(NAMES) == {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    for name in NAMES:
        config = json.loads((ROOT / name / "config.json").read_text())
        assert config["vlmcompress"]["format_version"] == 1, name
        assert sum(f.stat().st_size for f in (ROOT / name).rglob("*") if f.is_file()) < 1_000_000, name


@pytest.mark.parametrize("name", NAMES)
def test_v1_fixture_loads_with_vlmcompress_and_gives_its_outputs(name):
    inputs, expected = _io(name)
    model = vlmcompress.load(ROOT / name)
    got = run(model, _family(name), inputs)
    assert got.keys() == expected.keys()
    for key in expected:
        _compare(got[key], expected[key], name, key)


def test_v1_onnx_fixture_runs_its_graphs(capsys):
    """A format-1 ONNX export (full 8-bit int8 weights, no layout record) gives its recorded outputs on a CPU with
    int8 dot products; on one without, ONNX Runtime's int16 sums saturate on it, and loading says so."""
    from vlmcompress.cpu import detect
    from vlmcompress.integrations.onnx import load_onnx

    folder = ROOT / "quantize-onnxruntime"
    io = load_file(str(folder / "io.safetensors"))
    inputs = {k[3:]: v for k, v in io.items() if k.startswith("in.")}
    got = run(load_onnx(folder / "onnx"), "clip", inputs)
    cpu = detect(with_torch=False)
    if cpu.x86 and not cpu.int8_dot_product:
        assert "no VNNI" in capsys.readouterr().err
        assert all(v.shape == io[f"onnx.{k}"].shape and v.isfinite().all() for k, v in got.items())
        return
    assert "VNNI" not in capsys.readouterr().err
    for key, value in got.items():
        torch.testing.assert_close(value, io[f"onnx.{key}"], rtol=0, atol=0)


def test_v1_fixtures_load_with_stock_transformers_in_a_fresh_process(tmp_path):
    args = []
    for name in NAMES:
        args += [name, _family(name), str(tmp_path / f"{name}.safetensors")]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ROOT), *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in NAMES:
        _, expected = _io(name)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        for key in expected:
            _compare(got[key], expected[key], name, key)
