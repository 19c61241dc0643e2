"""What the CPU can do, as far as int8 kernels care: the instruction-set facts every speed figure and every
CPU-dependent choice (ONNX Runtime's int8 format, later the `int8` scheme's path) is made from.

The flags come from `cpuid` where torch can ask it (`torch.cpu.get_capabilities()`, through the cpuinfo library):
that is what ONNX Runtime, oneDNN and MKL dispatch on. `/proc/cpuinfo` is the fallback without torch, and can
differ: under an emulator (qemu-user reports the emulated CPU to `cpuid` but shows the host's /proc/cpuinfo) or
where a hypervisor hides features from one and not the other. torch is imported only inside the functions that
read it, so the CLI can describe the machine without paying for it where it does not need to.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# the flags that decide which int8 / fp32 kernels a library runs (x86: AVX2, AVX-512, VNNI in either encoding, AMX;
# Arm: NEON and the dot-product extensions)
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                     "amx_bf16", "asimd", "asimddp", "i8mm")
# torch.cpu.get_capabilities() names (x86) → the /proc/cpuinfo names used here
TORCH_NAMES = {"avx2": "avx2", "fma3": "fma", "avx512_f": "avx512f", "avx512_bw": "avx512bw",
               "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
               "amx_int8": "amx_int8", "amx_bf16": "amx_bf16"}


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set facts of one CPU.

    Attributes:
        arch: `platform.machine()` (`x86_64`, `aarch64`, ...).
        model: the CPU's model name (`/proc/cpuinfo`), for people.
        capability: `torch.backends.cpu.get_cpu_capability()` (`AVX2`, `AVX512`, `DEFAULT`, ...), or None when it
            was not asked.
        flags: those of `FLAGS_THAT_MATTER` the CPU has, sorted.
        source: where the flags were read (`cpuid` or `/proc/cpuinfo`).
    """

    arch: str
    model: str
    capability: str | None
    flags: tuple[str, ...]
    source: str = "/proc/cpuinfo"

    @property
    def x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def int8_dot_product(self) -> bool:
        """Whether u8×s8 products accumulate straight into int32 (VNNI, AVX-VNNI, AMX): without it, x86 int8 kernels
        add pairs of products in int16 first (`vpmaddubsw`), which saturates for large activations × weights."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.flags))

    def label(self) -> str:
        """One line naming the CPU for a table row: `AVX512 (avx512_vnni, ...) AMD EPYC`."""
        shown = [f for f in self.flags if f not in ("fma", "asimd")]
        return f"{self.capability or self.arch} ({', '.join(shown) or 'no vector extensions listed'}) {self.model}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "int8_dot_product": self.int8_dot_product,
                "label": self.label()}


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """`(model name, flags)` of the first processor in a `/proc/cpuinfo` text (x86 `flags`, Arm `Features`)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def detect(with_torch: bool = True) -> CpuFeatures:
    """The CPU this process runs on: with torch (the default), its dispatch capability and the x86 flags from
    `cpuid`; without, the flags of /proc/cpuinfo."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    model, flags = parse_cpuinfo(text)
    flags &= set(FLAGS_THAT_MATTER)
    capability, source = None, "/proc/cpuinfo"
    if with_torch:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)  # torch >= 2.10
        found = get_capabilities() if get_capabilities is not None else {}
        if str(found.get("architecture", "")).startswith("x86"):
            flags = {ours for theirs, ours in TORCH_NAMES.items() if found.get(theirs) is True}
            source = "cpuid"
    return CpuFeatures(arch=platform.machine(), model=model or platform.processor() or platform.machine(),
                       capability=capability, flags=tuple(sorted(flags)), source=source)


def torch_cpu_facts() -> dict[str, Any]:
    """torch's int8 engines and the MKL / oneDNN versions it was built with (from `torch.__config__.show()`)."""
    import torch

    shown = torch.__config__.show()
    facts: dict[str, Any] = {"quantized_engine": torch.backends.quantized.engine,
                             "quantized_engines": list(torch.backends.quantized.supported_engines)}
    markers = (("mkl", "Intel(R) oneAPI Math Kernel Library Version"), ("mkl", "Intel(R) Math Kernel Library"),
               ("onednn", "Intel(R) MKL-DNN"), ("onednn", "oneDNN"))
    for key, marker in markers:
        if key in facts:
            continue
        line = next((ln.strip() for ln in shown.splitlines() if marker in ln), None)
        if line:
            facts[key] = line.lstrip("- ")
    return facts


def describe() -> dict[str, Any]:
    """Everything above, for `vlmcompress env --json`, benchmark JSON and checkpoints."""
    cpu = detect()
    return {**cpu.to_dict(), **torch_cpu_facts(),
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
