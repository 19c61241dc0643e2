"""`scheme: int8` per CPU (issue 19): the table, the probe's override, 7-bit activations only where needed, the
decision recorded in the checkpoint and the resume hash, reused on `--resume`, and every path reloading exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vlmcompress
from vlmcompress.cpu import CpuFeatures, detect
from vlmcompress.errors import VlmCompressError
from vlmcompress.stages.quantize import int8_paths as ip


def cpu(*flags, arch="x86_64"):
    return CpuFeatures(arch, "test CPU", "AVX2", tuple(sorted(flags)))


AVX2 = cpu("avx2", "fma")  # Zen 2/3, Haswell..Coffee Lake
AVX512 = cpu("avx2", "avx512f", "avx512bw")  # Skylake-SP: AVX-512 without VNNI
VNNI = cpu("avx2", "avx512f", "avx512bw", "avx512_vnni")  # Cascade Lake, Zen 4
AVX_VNNI = cpu("avx2", "avx_vnni")  # Alder Lake
AMX = cpu("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8")  # Sapphire Rapids
ARM = cpu("asimd", "asimddp", arch="aarch64")
ALL = frozenset(ip.PATHS)
TORCH_ONLY = frozenset(p for p in ip.PATHS if p.startswith("torch-"))


def test_cpu_classes():
    assert [ip.cpu_class(c) for c in (AVX2, AVX512, VNNI, AVX_VNNI, AMX, ARM, cpu(arch="riscv64"), cpu("sse2"))] == \
        ["x86-avx2", "x86-avx512", "x86-avx512-vnni", "x86-avx-vnni", "x86-amx", "arm", "other", "x86"]
    assert set(ip.TABLE) == {"x86-avx2", "x86-avx512", "x86-avx512-vnni", "x86-avx-vnni", "x86-amx", "x86", "arm",
                             "other"}
    assert all(set(row.order) <= set(ip.PATHS) for row in ip.TABLE.values())


def test_seven_bit_activations_only_where_8_bits_can_saturate():
    x86, fbgemm, onednn, qnnpack = (ip.PATHS[f"torch-{e}"] for e in ("x86", "fbgemm", "onednn", "qnnpack"))
    for path in (x86, fbgemm, onednn):  # vpmaddubsw sums pairs in int16 without VNNI
        assert ip.needs_reduce_range(AVX2, path) and ip.needs_reduce_range(AVX512, path)
    for path in (x86, fbgemm, onednn):
        assert not ip.needs_reduce_range(VNNI, path) and not ip.needs_reduce_range(AMX, path)
    # AVX-VNNI (VEX encoding): oneDNN uses it, fbgemm's VNNI kernels are AVX-512 only
    assert not ip.needs_reduce_range(AVX_VNNI, onednn) and ip.needs_reduce_range(AVX_VNNI, fbgemm)
    assert not ip.needs_reduce_range(ARM, qnnpack) and not ip.needs_reduce_range(AVX2, qnnpack)
    assert not ip.needs_reduce_range(AVX2, ip.PATHS["torchao"])


def test_table_decision_is_deterministic_and_follows_the_table():
    for c in (AVX2, AVX512, VNNI, AVX_VNNI, AMX, ARM):
        first, again = ip.resolve_int8(c, ALL), ip.resolve_int8(c, ALL)
        assert first.to_dict() == again.to_dict()
        row = ip.TABLE[ip.cpu_class(c)]
        assert first.path == row.order[0] and first.source == "table" and first.table_path == first.path
        assert first.table_status == ("untested default" if row.measured is None else f"measured {row.measured}")
    avx2 = ip.resolve_int8(AVX2, ALL)
    assert avx2.options == {"engine": "x86", "reduce_range": True} and avx2.backend == "torch"
    vnni = ip.resolve_int8(VNNI, ALL)
    assert vnni.options["reduce_range"] is False


def test_missing_paths_fall_back_in_table_order_and_none_is_an_error():
    order = ip.TABLE["x86-avx512-vnni"].order
    assert ip.resolve_int8(VNNI, ALL - {order[0]}).path == order[1]
    assert ip.resolve_int8(VNNI, frozenset({"torchao", "torchao-compiled"})).backend == "torchao"
    with pytest.raises(VlmCompressError, match="no int8 path for backend torch"):
        ip.resolve_int8(VNNI, frozenset({"torchao"}), backend="torch")


def test_probe_overrides_the_table_only_by_the_margin():
    table = ip.resolve_int8(VNNI, ALL).path
    other = next(p for p in ip.probe_candidates(VNNI, ALL) if p != table)
    close = {table: 10.0, other: 10.0 / 1.19}  # 19 % faster: within the margin, the table stands
    assert ip.resolve_int8(VNNI, ALL, close).path == table
    d = ip.resolve_int8(VNNI, ALL, close)
    assert d.source == "table" and d.probe_factor == pytest.approx(1.19, abs=1e-3) and d.probe_ms == close
    far = {table: 10.0, other: 10.0 / 1.25}
    d = ip.resolve_int8(VNNI, ALL, far)
    assert (d.path, d.source, d.probe_factor) == (other, "probe", 1.25)
    assert ip.resolve_int8(VNNI, ALL, far).to_dict() == d.to_dict()  # deterministic for a given probe result
    # an explicit backend is never changed, whatever the probe found
    assert ip.resolve_int8(VNNI, ALL, {table: 10.0, "torchao": 1.0}, backend="torch").backend == "torch"
    # compiled paths and qnnpack on x86 are not probed
    assert "torchao-compiled" not in ip.probe_candidates(VNNI, ALL)
    assert "torch-qnnpack" not in ip.probe_candidates(VNNI, ALL)


def test_probe_times_every_candidate_on_the_given_shapes():
    paths = ip.probe_candidates(ip.CpuFeatures("x86_64", "t", None, ()), TORCH_ONLY & ip.installed_paths())
    timed = ip.probe({(32, 64): 2, (64, 32): 1}, paths, VNNI, rounds=2, rows=16)
    assert set(timed) == set(paths) and all(ms > 0 for ms in timed.values())


def test_load_note_for_saturating_activations_and_for_another_cpu_class():
    spec = {"schemes": {"vision": {"backend": "torch", "options": {"engine": "x86", "reduce_range": False}}},
            "resolved": {"path": "torch-x86", "cpu_class": "x86-avx512-vnni"}, "requested": {"backend": "auto"}}
    assert "saturate" in ip.load_note(spec, AVX2, ALL)
    assert ip.load_note(spec, VNNI, ALL) is None  # the class it was chosen for
    spec["schemes"]["vision"]["options"]["reduce_range"] = True
    spec["resolved"] = {"path": "torch-onednn", "cpu_class": "x86-amx"}  # e.g. quantized on a Sapphire Rapids
    note = ip.load_note(spec, VNNI, ALL)
    assert ip.TABLE["x86-avx512-vnni"].order[0] != "torch-onednn"
    assert note and ip.TABLE["x86-avx512-vnni"].order[0] in note and "x86-amx" in note and "\n" not in note
    assert ip.load_note(spec, AMX, ALL) is None
    spec["resolved"]["path"] = ip.TABLE["x86-avx512-vnni"].order[0]
    assert ip.load_note(spec, VNNI, ALL) is None  # another class, but the same path would be chosen here


# ---------------------------------------------------------------------------------------------------------------
# end to end


def _recipe(tmp_path, **quantize):
    return {"model": "shapes-clip-small", "output": str(tmp_path / "out"),
            "stages": [{"method": "token_reduce", "r": 2}, {"method": "quantize", **quantize}]}


def test_apply_records_the_decision_and_a_fresh_process_reloads_it_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv(ip.PROBE_ENV, "0")
    model = vlmcompress.apply(_recipe(tmp_path), progress=False)
    details = model.vlmcompress_report["stages"][-1]["details"]
    here = ip.resolve_int8(detect(), ip.installed_paths())
    assert details["resolved"]["path"] == here.path and details["resolved"]["source"] == "table"
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert config["requested"] == {"backend": "auto", "scheme": "int8"}
    assert config["resolved"]["cpu_class"] == ip.cpu_class(detect())
    assert all(s["backend"] == here.backend and s["options"].get("engine") == here.options.get("engine")
               for s in config["schemes"].values())
    _reloads_exactly(model, tmp_path / "out")
    # with the probe on, every eager candidate is timed on the model's layer shapes and recorded
    monkeypatch.setenv(ip.PROBE_ENV, "1")
    model = vlmcompress.apply(_recipe(tmp_path), progress=False, overwrite=True)
    resolved = model.vlmcompress_report["stages"][-1]["details"]["resolved"]
    candidates = ip.probe_candidates(detect(), ip.installed_paths())
    if len(candidates) > 1:
        assert set(resolved["probe_ms"]) == set(candidates) and resolved["probe_factor"] >= 1.0
        assert resolved["path"] == ip.resolve_int8(detect(), ip.installed_paths(), resolved["probe_ms"]).path


def _reloads_exactly(model, folder):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels)
    expected = getattr(expected, "pooler_output", expected)
    torch.save(pixels, folder.parent / "pixels.pt")
    code = ("import sys, torch, vlmcompress\n"
            f"m = vlmcompress.load({str(folder)!r})\n"
            f"x = torch.load({str(folder.parent / 'pixels.pt')!r})\n"
            "with torch.no_grad():\n    y = m.get_image_features(pixel_values=x)\n"
            f"torch.save(getattr(y, 'pooler_output', y), {str(folder.parent / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(folder.parent / "y.pt"), expected)


@pytest.mark.parametrize("path", ["torch-x86", "torch-fbgemm", "torch-onednn", "torchao"])
def test_every_path_reloads_exactly_in_a_fresh_process(tmp_path, path):
    if path not in ip.installed_paths():
        pytest.skip(f"{path} is not installed here")
    chosen = ip.PATHS[path]
    stage = {"backend": chosen.backend, "scheme": "int8_dynamic", **chosen.options}
    model = vlmcompress.apply(_recipe(tmp_path, **stage), progress=False)
    schemes = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["schemes"]
    if chosen.backend == "torch":
        reduce = ip.needs_reduce_range(detect(), chosen)
        assert all(s["options"] == {"engine": chosen.engine, "reduce_range": reduce} for s in schemes.values())
    _reloads_exactly(model, tmp_path / "out")


def test_explicit_backend_and_knobs_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(ip.PROBE_ENV, "1")
    timed = {"torch-x86": 9.0, "torch-fbgemm": 9.0, "torch-onednn": 9.0, "torchao": 1.0}
    monkeypatch.setattr(ip, "probe", lambda shapes, paths, cpu, **kw: {p: timed[p] for p in paths})
    model = vlmcompress.apply(_recipe(tmp_path, backend="torch", reduce_range=True), progress=False)
    details = model.vlmcompress_report["stages"][-1]["details"]
    assert details["backend"] == "torch" and details["resolved"]["backend"] == "torch"
    schemes = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["schemes"]
    assert all(s["options"]["reduce_range"] is True for s in schemes.values())
    # auto takes the probe's far faster torchao
    model = vlmcompress.apply(_recipe(tmp_path), progress=False, overwrite=True)
    resolved = model.vlmcompress_report["stages"][-1]["details"]["resolved"]
    assert (resolved["path"], resolved["source"]) == ("torchao", "probe")


def test_resume_reuses_the_recorded_decision(tmp_path, monkeypatch):
    """A run that dies inside quantize (after deciding, before the stage is saved) resumes with the decision it
    took, though the probe would now decide otherwise; a fresh run decides again."""
    from vlmcompress.stages.quantize import torch_dynamic

    here = detect()
    paths = [p for p in ip.probe_candidates(here, ip.installed_paths()) if p.startswith("torch-")]
    if len(paths) < 2:
        pytest.skip("one eager torch int8 engine installed: nothing to choose")
    first, second = paths[-1], paths[0]

    def fastest(winner):
        return lambda shapes, candidates, cpu, **kw: {p: (1.0 if p == winner else 10.0) for p in candidates}

    def crash(*args, **kwargs):
        raise RuntimeError("killed inside quantize")

    recipe = _recipe(tmp_path)
    monkeypatch.setenv(ip.PROBE_ENV, "1")
    monkeypatch.setattr(ip, "probe", fastest(first))
    with monkeypatch.context() as m:
        m.setattr(torch_dynamic, "finish", crash)
        with pytest.raises(RuntimeError, match="killed"):
            vlmcompress.apply(recipe, progress=False)
    work = tmp_path / "out.vlmcompress-work"
    assert json.loads((work / "decisions.json").read_text())["stage-02/int8"]["path"] == first
    assert (work / "stage-01").is_dir() and not (work / "stage-02").exists()
    monkeypatch.setattr(ip, "probe", fastest(second))
    model = vlmcompress.apply(recipe, progress=False, resume=True)
    assert model.vlmcompress_report["stages"][-1]["details"]["resolved"]["path"] == first
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert config["resolved"]["path"] == first and config["resolved"]["source"] == "probe"
    model = vlmcompress.apply(recipe, progress=False, overwrite=True)
    assert model.vlmcompress_report["stages"][-1]["details"]["resolved"]["path"] == second


def test_decisions_enter_the_resume_hash():
    from vlmcompress.recipe import load_recipe

    r = load_recipe({"model": "shapes-clip-small", "output": "/tmp/x", "stages": [{"method": "token_reduce", "r": 2},
                                                                                  {"method": "quantize"}]})
    a, b = {"stage-02/int8": {"path": "torch-x86"}}, {"stage-02/int8": {"path": "torch-onednn"}}
    assert r.prefix_hash(2, a) != r.prefix_hash(2, b) != r.prefix_hash(2)
    assert r.prefix_hash(1, a) == r.prefix_hash(1, b) == r.prefix_hash(1)  # a later stage's decision: not stage 1's


def test_env_json_names_the_cpu_and_the_int8_path():
    from typer.testing import CliRunner

    from vlmcompress.cli import app

    result = CliRunner().invoke(app, ["env", "--json"])
    info = json.loads(result.output)
    assert info["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu"]["quantized_engines"] == list(torch.backends.quantized.supported_engines)
    here = ip.resolve_int8(detect(), ip.installed_paths())
    assert info["int8"]["table_path"] == here.path and info["int8"]["cpu_class"] == ip.cpu_class(detect())


def test_apply_prints_the_path_and_the_onnxruntime_advice(tmp_path):
    from typer.testing import CliRunner

    from vlmcompress.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: shapes-clip-small\noutput: {tmp_path / 'out'}\nstages:\n  - method: quantize\n")
    result = CliRunner().invoke(app, ["apply", str(recipe)])
    assert result.exit_code == 0, result.output
    here = ip.resolve_int8(detect(), ip.installed_paths())
    assert f"int8: {here.path} (" in result.output
    advice = [line for line in result.output.splitlines() if "ONNX Runtime's int8 ran" in line]
    speedup = ip.TABLE[here.cpu_class].onnxruntime_speedup
    assert len(advice) == (1 if speedup and speedup > 1.1 else 0)
    if advice:
        assert "backend: onnxruntime" in advice[0] and f"{speedup:.2f}x" in advice[0]
