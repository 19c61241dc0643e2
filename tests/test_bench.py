"""`vlmcompress bench`: what it measures on tiny built-ins and compressed checkpoints, its JSON and its errors.

Speed-ups are never asserted to be > 1 (too noisy on shared CI machines); the ratios are checked against the
reported numbers they are computed from, and the measured facts (tokens, FLOPs, parameters, bytes) exactly.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY, VisionTower
from vlmcompress.bench import (DECODE_STEPS, benchmark, count_gflops, parse_batch_sizes, peak_memory_mb, prompt_ids,
                               tokens_per_layer)
from vlmcompress.cli import app
from vlmcompress.errors import ModelLoadError, UnsupportedModelError, VlmCompressError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
FAST = dict(batch_sizes=(1, 2), repeats=2, threads=1, progress=False)  # 1 thread: no oversubscription on busy CI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tiny-clip compressed two ways: ToMe r=8 only, and 50 % structured pruning only."""
    root = tmp_path_factory.mktemp("bench")
    stages = {"tome": [{"method": "token_reduce", "r": 8}], "pruned": [{"method": "structured_prune", "ratio": 0.5}]}
    for name, st in stages.items():
        vlmcompress.apply({"model": "tiny-clip", "output": str(root / name), "stages": st}, progress=False)
    return root


@pytest.fixture(scope="module")
def clip_vs_tome(folders):
    threads_before = torch.get_num_threads()
    result = benchmark("tiny-clip", against=str(folders / "tome"), **FAST)
    assert torch.get_num_threads() == threads_before  # --threads is restored afterwards
    return result


def test_tokens_flops_and_params_of_tome_against_base(clip_vs_tome, folders):
    base, tome = clip_vs_tome["models"]["tiny-clip"], clip_vs_tome["models"][str(folders / "tome")]
    assert (base["role"], tome["role"]) == ("model", "against")
    assert base["family"] == tome["family"] == "clip"
    # [tokens entering layer 0, after layer 0, after layer 1]
    assert base["tokens_per_layer"] == [65, 65, 65]
    assert tome["tokens_per_layer"] == [65, 57, 49]
    assert tome["parameters"] == base["parameters"] == sum(p.numel() for p in BUILTIN_TINY["tiny-clip"].tiny_model()
                                                           .parameters())  # ToMe adds no parameters
    assert base["size_on_disk_bytes"] is None  # a built-in has no folder
    assert tome["size_on_disk_bytes"] == (folders / "tome" / "model.safetensors").stat().st_size
    assert set(base["workloads"]) == {"image", "text"}
    assert tome["workloads"]["image"]["gflops_per_sample"] < base["workloads"]["image"]["gflops_per_sample"]
    assert tome["workloads"]["text"]["gflops_per_sample"] == base["workloads"]["text"]["gflops_per_sample"]


def test_ratios_follow_from_the_reported_numbers(clip_vs_tome, folders):
    models, ratios = clip_vs_tome["models"], clip_vs_tome["ratios"]
    base, tome = models["tiny-clip"], models[str(folders / "tome")]
    assert (ratios["model"], ratios["against"]) == ("tiny-clip", str(folders / "tome"))
    assert ratios["params_reduction"] == 1.0
    assert ratios["size_reduction"] is None  # the built-in has no size on disk
    for key in ("image", "text"):
        w = ratios["workloads"][key]
        flops = base["workloads"][key]["gflops_per_sample"] / tome["workloads"][key]["gflops_per_sample"]
        assert w["flops_reduction"] == pytest.approx(flops, rel=1e-3)
        assert set(w["batch_sizes"]) == {"1", "2"}
        for bs, r in w["batch_sizes"].items():
            tb, tt = base["workloads"][key]["batch_sizes"][bs], tome["workloads"][key]["batch_sizes"][bs]
            assert r["speedup_median"] == pytest.approx(tb["ms_median"] / tt["ms_median"], rel=1e-3)
            assert r["speedup_min"] == pytest.approx(tb["ms_min"] / tt["ms_min"], rel=1e-3)
            assert r["realization"] == pytest.approx(r["speedup_median"] / w["flops_reduction"], rel=1e-3)
    assert clip_vs_tome["ratios"]["workloads"]["image"]["flops_reduction"] > 1
    assert clip_vs_tome["ratios"]["workloads"]["text"]["flops_reduction"] == 1.0


def test_timings_are_positive_and_consistent(clip_vs_tome):
    for model in clip_vs_tome["models"].values():
        for w in model["workloads"].values():
            for bs, t in w["batch_sizes"].items():
                assert len(t["ms_all"]) == 2  # one measurement per round
                assert 0 < t["ms_min"] <= t["ms_median"] <= max(t["ms_all"])
                assert t["ms_min"] == min(t["ms_all"])
                assert t["calls_per_measurement"] >= 1
                assert t["samples_per_s"] == pytest.approx(int(bs) * 1e3 / t["ms_median"], rel=1e-3)
                assert t["peak_memory_mb"] is None or t["peak_memory_mb"] >= 0
    machine, what = clip_vs_tome["machine"], clip_vs_tome["what"]
    assert machine["threads"] == 1 and machine["device"] == "cpu"
    # every timing names its instruction set: the same model runs 1.1-3x apart on AVX2 and AVX-512 VNNI
    assert machine["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and "flags" in machine["cpu"]
    assert "get_image_features" in what["workloads"]["image"] and "get_text_features" in what["workloads"]["text"]
    assert "/proc/self/statm" in what["memory"] or "unavailable" in what["memory"]


def test_pruned_has_fewer_params_and_a_smaller_file(folders):
    result = benchmark(str(folders / "tome"), against=str(folders / "pruned"), batch_sizes=(1,), repeats=2,
                       threads=1, progress=False)
    tome, pruned = result["models"][str(folders / "tome")], result["models"][str(folders / "pruned")]
    assert pruned["parameters"] < tome["parameters"]
    assert result["ratios"]["params_reduction"] == pytest.approx(tome["parameters"] / pruned["parameters"], rel=1e-4)
    assert pruned["size_on_disk_bytes"] == (folders / "pruned" / "model.safetensors").stat().st_size
    assert pruned["size_on_disk_bytes"] < tome["size_on_disk_bytes"]
    assert result["ratios"]["size_reduction"] == pytest.approx(
        tome["size_on_disk_bytes"] / pruned["size_on_disk_bytes"], rel=1e-4)
    assert pruned["tokens_per_layer"] == [65, 65, 65]  # pruning keeps every token
    for key in ("image", "text"):  # narrower layers: fewer FLOPs in both towers
        assert result["ratios"]["workloads"][key]["flops_reduction"] > 1


def test_generator_reports_prefill_and_decode(tmp_path):
    out = tmp_path / "llava-tome"
    vlmcompress.apply({"model": "tiny-llava", "output": str(out), "stages": [{"method": "token_reduce", "r": 8}]},
                      progress=False)
    result = benchmark("tiny-llava", against=str(out), **FAST)
    base, tome = result["models"]["tiny-llava"], result["models"][str(out)]
    assert base["tokens_per_layer"] == [65, 65, 65] and tome["tokens_per_layer"] == [65, 57, 49]
    for model in (base, tome):
        assert set(model["workloads"]) == {"prefill", "decode"}
        assert set(model["workloads"]["prefill"]["batch_sizes"]) == {"1", "2"}
        assert set(model["workloads"]["decode"]["batch_sizes"]) == {"1"}  # batch sizes apply to the prefill only
        decode = model["workloads"]["decode"]["batch_sizes"]["1"]
        assert decode["ms_median"] > 0
        assert decode["ms_per_token"] == pytest.approx(decode["ms_median"] / DECODE_STEPS, rel=1e-3)
        assert decode["tokens_per_s"] == pytest.approx(DECODE_STEPS * 1e3 / decode["ms_median"], rel=1e-3)
    # fewer image tokens reach the LLM: a cheaper prefill and a shorter KV cache to attend over while decoding
    for key in ("prefill", "decode"):
        assert tome["workloads"][key]["gflops_per_sample"] < base["workloads"][key]["gflops_per_sample"]
    assert "16 greedy decode steps" in result["what"]["workloads"]["decode"]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-blip2"])
def test_prompt_has_the_processor_placeholders(name):
    model = BUILTIN_TINY[name].tiny_model()
    ids = prompt_ids(model, BUILTIN_TINY[name].family, batch_size=2)
    config = model.config
    if name == "tiny-llava":
        vision = config.vision_config
        placeholders, token = (vision.image_size // vision.patch_size) ** 2, config.image_token_id
    else:
        placeholders, token = config.num_query_tokens, config.image_token_index
    assert ids.shape == (2, placeholders + 32)
    assert ((ids == token).sum(dim=1) == placeholders).all()
    assert ((ids == config.text_config.bos_token_id).sum(dim=1) >= 1).all()


def test_timed_decode_is_greedy_decoding_with_the_cache():
    from vlmcompress.measure.workloads import WORKLOADS, _pixels

    adapter = BUILTIN_TINY["tiny-llava"]
    model = adapter.tiny_model().requires_grad_(False)
    decode = next(w for w in WORKLOADS["llava"] if w.key == "decode").build(model, adapter, 1, torch.device("cpu"))
    ids = prompt_ids(model, "llava", 1)
    with torch.inference_mode():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=_pixels(model, adapter, 1, "cpu"), max_new_tokens=DECODE_STEPS + 1,
                                do_sample=False, eos_token_id=[])
    # the prefill gives the first token; the timed run feeds back 16 more, and a second run starts over
    assert decode().item() == tokens[0, -1].item()
    assert decode().item() == tokens[0, -1].item()


def test_flop_count_includes_cpu_attention():
    q = torch.randn(2, 4, 10, 8)
    k = v = torch.randn(2, 4, 12, 8)
    gflops = count_gflops(lambda: F.scaled_dot_product_attention(q, k, v))
    # q·kᵀ and attention·v, 2 FLOPs per multiply-add (the stock counter reports 0 for the CPU kernel)
    assert gflops * 1e9 == pytest.approx(2 * (2 * 2 * 4 * 10 * 12 * 8), rel=1e-9)


def test_tokens_per_layer_reads_tuple_and_tensor_outputs():
    class Halve(nn.Module):
        def __init__(self, as_tuple):
            super().__init__()
            self.as_tuple = as_tuple

        def forward(self, hidden_states):
            out = hidden_states[:, : hidden_states.shape[1] // 2]
            return (out, None) if self.as_tuple else out

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Halve(True), Halve(False), Halve(True)])

    class Adapter:
        def vision_tower(self, model):
            return VisionTower("layers", 40, True)

    tower = Tower()

    def run():
        x = torch.zeros(1, 40, 3)
        for layer in tower.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x

    assert tokens_per_layer(tower, Adapter(), run) == [40, 20, 10, 5]
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in tower.layers)  # hooks removed


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS sampling needs /proc/self/statm")
def test_peak_memory_sees_a_temporary_allocation():
    def allocate():
        x = torch.ones(16 * 2**20)  # 64 MiB, written, so resident
        time.sleep(0.02)
        return float(x[-1])

    assert peak_memory_mb(allocate, torch.device("cpu")) >= 48
    assert peak_memory_mb(lambda: None, torch.device("cpu")) < 16


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,32") == [1, 32]
    assert parse_batch_sizes(" 8 ") == [8]
    assert parse_batch_sizes((1, 1, 2)) == [1, 2]
    assert parse_batch_sizes(4) == [4]
    for bad in ("0", "1,-2", "1.5", "a", "", "1,,2", True, (0,), [1.0]):
        with pytest.raises(VlmCompressError):
            parse_batch_sizes(bad)


def test_api_errors(folders):
    with pytest.raises(ModelLoadError, match="did you mean 'tiny-clip'"):
        benchmark("tiny-clop", progress=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        benchmark(str(folders / "missing"), progress=False)
    with pytest.raises(UnsupportedModelError, match="same family"):
        benchmark("tiny-clip", against="tiny-blip", progress=False)
    with pytest.raises(VlmCompressError, match="repeats"):
        benchmark("tiny-clip", repeats=0, progress=False)
    with pytest.raises(VlmCompressError, match="threads"):
        benchmark("tiny-clip", threads=0, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_json_parses():
    result = runner.invoke(app, ["bench", "tiny-siglip", "--batch-sizes", "1", "--repeats", "2", "--threads", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"machine", "what", "models", "ratios"}
    assert data["ratios"] is None
    model = data["models"]["tiny-siglip"]
    assert model["tokens_per_layer"] == [64, 64, 64]  # SigLIP has no CLS token
    assert set(model["workloads"]["image"]["batch_sizes"]) == {"1"}
    assert "attention_mask" not in data["what"]["workloads"]["text"]


def test_cli_table_shows_models_and_ratios(folders):
    result = runner.invoke(app, ["bench", "tiny-clip", "--against", str(folders / "tome"), "--batch-sizes", "1",
                                 "--repeats", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "65 → 57 → 49" in result.stdout and "65 → 65 → 65" in result.stdout
    assert "realization" in result.stdout and "speed-up" in result.stdout
    assert "memory:" in result.stdout


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in result.output, result.output


@pytest.mark.parametrize("args, fragment", [
    (["tiny-clop"], "did you mean 'tiny-clip'"),
    (["./no/such/folder"], "does not exist"),
    (["tiny-clip", "--batch-sizes", "0"], "at least 1"),
    (["tiny-clip", "--batch-sizes", "1,x"], "positive integers"),
    (["tiny-clip", "--repeats", "0"], "repeats"),
    (["tiny-clip", "--against", "tiny-blip"], "same family"),
])
def test_cli_bad_input_is_one_error_line(args, fragment):
    assert_one_line_error(runner.invoke(app, ["bench", *args]), fragment)


def test_apply_compares_speed_interleaved_and_says_when_the_machine_is_too_busy(tmp_path, monkeypatch):
    """The report's speed line (issue 17, point 6): the uncompressed model re-loaded and timed interleaved with the
    compressed one in 5 rounds; the ratio of medians with the range of the per-round ratios, or no ratio at all when
    one model's rounds spread more than 1.5×."""
    import vlmcompress
    from vlmcompress import bench
    from vlmcompress.cli import speed_line

    model = vlmcompress.apply({"model": "shapes-clip-small", "output": str(tmp_path / "out"),
                               "data": {"eval": {"builtin": "shapes", "split": "test", "size": 50}},
                               "stages": [{"method": "token_reduce", "r": 8}]}, progress=False)
    speed = model.vlmcompress_report["speed"]
    compared = speed["interleaved"]
    assert compared["rounds"] == 5 and len(compared["ms_before"]) == len(compared["ms_after"]) == 5
    ratios = [b / a for b, a in zip(compared["ms_before"], compared["ms_after"])]
    assert compared["speedup_range"] == [round(min(ratios), 3), round(max(ratios), 3)]
    spread = max(max(t) / min(t) for t in (compared["ms_before"], compared["ms_after"]))
    assert compared["busy"] == (round(spread, 2) > bench.BUSY_SPREAD) or abs(spread - bench.BUSY_SPREAD) < 0.01
    line = speed_line(speed)
    if compared["busy"]:
        assert "machine too busy to measure speed" in line and "×" in line and "faster" not in line
    else:
        assert f"{speed['speedup']}× faster (median of 5 interleaved rounds" in line
    busy = speed | {"interleaved": compared | {"busy": True, "spread": 2.1}}
    assert speed_line(busy).endswith(f"machine too busy to measure speed (spread ×2.1); GFLOPs "
                                     f"{speed['flops_reduction']}× fewer")
    calm = speed | {"speedup": 1.5, "interleaved": compared | {"busy": False, "speedup_range": [1.4, 1.6]}}
    assert "1.5× faster (median of 5 interleaved rounds, 1.4–1.6×)" in speed_line(calm)
