"""CPU facts: parsed from /proc/cpuinfo text, and the choices made from them."""

from __future__ import annotations

from vlmcompress.cpu import CpuFeatures, detect, parse_cpuinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx fma avx2 bmi2 avx512f
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_the_first_processor():
    model, flags = parse_cpuinfo(X86)
    assert model == "AMD EPYC 7B12"
    assert {"avx2", "fma"} <= flags and "avx512f" not in flags  # the first processor's line only
    model, flags = parse_cpuinfo(ARM)
    assert model is None and {"asimd", "asimddp"} <= flags


def test_int8_dot_product_by_flags():
    def cpu(*flags, arch="x86_64"):
        return CpuFeatures(arch, "test", None, tuple(sorted(flags)))

    assert not cpu("avx2", "fma").int8_dot_product  # Zen 2/3, Haswell..Coffee Lake
    assert not cpu("avx2", "avx512f", "avx512bw").int8_dot_product  # Skylake-SP: AVX-512 without VNNI
    assert cpu("avx2", "avx512f", "avx512_vnni").int8_dot_product  # Cascade Lake, Zen 4
    assert cpu("avx2", "avx_vnni").int8_dot_product  # Alder Lake: VNNI in the VEX encoding
    assert cpu("avx512_vnni", "amx_int8").int8_dot_product  # Sapphire Rapids
    assert not cpu("asimd", "asimddp", arch="aarch64").x86


def test_detect_names_this_machine():
    here = detect()
    assert here.capability and here.model and set(here.flags) <= set(here.to_dict()["flags"])
    assert here.to_dict()["label"].startswith(here.capability)


def test_flags_come_from_cpuid_where_torch_can_ask():
    """The kernels (ONNX Runtime, oneDNN) dispatch on cpuid, which can disagree with /proc/cpuinfo (qemu-user shows
    the host's); with torch the flags are cpuid's."""
    import torch

    here = detect()
    found = torch.cpu.get_capabilities()
    if str(found.get("architecture", "")).startswith("x86"):
        assert here.source == "cpuid"
        assert ("avx512_vnni" in here.flags) == bool(found["avx512_vnni"])
        assert ("avx2" in here.flags) == bool(found["avx2"])
    assert detect(with_torch=False).source == "/proc/cpuinfo"
