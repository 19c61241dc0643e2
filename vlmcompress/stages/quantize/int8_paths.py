"""What `scheme: int8` means on the CPU at hand: the int8 paths of the PyTorch model, a table of which one to take per
instruction set, and an optional probe that times them on the model's own layer shapes.

The paths are the eager dynamic-int8 kernels a quantized checkpoint can record: torch's built-in
`quantized.linear_dynamic` with its weights packed for one of torch's quantized engines (`x86`, `fbgemm`,
`onednn`, `qnnpack`), and torchao's int8 dynamic-activation + int8-weight layers (eager, or compiled when the
checkpoint loads). `resolve_int8` is a pure function of (CPU, installed paths, probe result): the table's first
installed path for the CPU's class, unless the probe found another eager path at least `PROBE_MARGIN` faster.

Activations on 7 bits (`reduce_range`) are chosen per (CPU, engine), not by default: without an int8 dot product
(VNNI / AMX) x86 kernels add pairs of u8 × s8 products in int16 (`vpmaddubsw`) and 8-bit activations can saturate;
fbgemm's VNNI kernels are AVX-512 only, oneDNN's also use AVX-VNNI (docs/benchmarks.md "int8 by CPU").

The table's measured rows name the CPU and the date they were measured on; the others are untested defaults.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from ...cpu import CpuFeatures

PROBE_MARGIN = 1.2  # the probe overrides the table only for a path at least 20 % faster (its noise is ~5 %)
PROBE_ROWS = 512  # tokens per probe call: between one image (197) and a batch of 32 (6,304) of a ViT-B/16 tower
PROBE_ENV = "VLMCOMPRESS_INT8_PROBE"  # "0" turns the probe off


@dataclass(frozen=True)
class Int8Path:
    """One int8 path: the backend that records it and the options it records."""

    name: str
    backend: str  # the quantize backend whose checkpoint format it is: torch | torchao
    options: dict[str, Any]
    eager: bool = True  # compiled paths pay tens of seconds per input shape on first use: the probe skips them

    @property
    def engine(self) -> str | None:
        return self.options.get("engine")


PATHS = {p.name: p for p in (
    Int8Path("torch-x86", "torch", {"engine": "x86"}),
    Int8Path("torch-fbgemm", "torch", {"engine": "fbgemm"}),
    Int8Path("torch-onednn", "torch", {"engine": "onednn"}),
    Int8Path("torch-qnnpack", "torch", {"engine": "qnnpack"}),
    Int8Path("torchao", "torchao", {"compile": False}),
    Int8Path("torchao-compiled", "torchao", {"compile": True}, eager=False),
)}


@dataclass(frozen=True)
class TableRow:
    """The preference order of one CPU class, and what was measured to set it.

    Attributes:
        order: path names, best first; the first installed one is taken.
        measured: `None` for an untested default, else where and when the order was measured.
        onnxruntime_speedup: ONNX Runtime's dynamic int8 throughput (batch 32, ViT-B/16 tower) over the first path's,
            measured in the same run; `apply` recommends `backend: onnxruntime` above 1.1.
    """

    order: tuple[str, ...]
    measured: str | None = None
    onnxruntime_speedup: float | None = None


# Measured rows: benchmarks/results/quantize_vit_b16.json (ViT-B/16 tower as loaded back, 2 threads, interleaved).
TABLE: dict[str, TableRow] = {
    # the three torch engines ran level (2.77-2.88x fp32 by median at batch 32): x86, torch's default, stays first;
    # torchao eager 0.9-1.1x; ONNX Runtime 5.47x
    "x86-avx512-vnni": TableRow(
        ("torch-x86", "torch-fbgemm", "torch-onednn", "torchao"),
        measured="2026-12-02, AMD EPYC, AVX512 with avx512_vnni (benchmarks/results/quantize_int8_paths_vit_b16.json)",
        onnxruntime_speedup=1.9),
    "x86-avx2": TableRow(
        ("torch-x86", "torch-fbgemm", "torch-onednn", "torchao"),
        measured="2026-12-01, AMD EPYC, AVX2 without VNNI (issue #19's side-by-side run: torch x86 1.14-1.39x fp32, "
                 "ONNX Runtime 1.42-2.06x at batch 32)",
        onnxruntime_speedup=1.3),
    "x86-amx": TableRow(("torch-onednn", "torch-x86", "torch-fbgemm", "torchao")),  # oneDNN has AMX int8 kernels
    "x86-avx-vnni": TableRow(("torch-onednn", "torch-x86", "torch-fbgemm", "torchao")),
    "x86-avx512": TableRow(("torch-x86", "torch-fbgemm", "torch-onednn", "torchao")),
    "x86": TableRow(("torch-x86", "torch-fbgemm", "torch-onednn", "torchao")),
    "arm": TableRow(("torch-qnnpack", "torch-onednn", "torchao")),
    "other": TableRow(("torch-qnnpack", "torch-onednn", "torch-x86", "torch-fbgemm", "torchao")),
}


def cpu_class(cpu: CpuFeatures) -> str:
    """The table row of a CPU: `x86-amx`, `x86-avx512-vnni`, `x86-avx-vnni`, `x86-avx512`, `x86-avx2`, `x86`, `arm`
    or `other`."""
    flags = set(cpu.flags)
    if cpu.x86:
        for name, needs in (("x86-amx", "amx_int8"), ("x86-avx512-vnni", "avx512_vnni"), ("x86-avx-vnni", "avx_vnni"),
                            ("x86-avx512", "avx512bw"), ("x86-avx2", "avx2")):
            if needs in flags:
                return name
        return "x86"
    if cpu.arch.lower() in ("aarch64", "arm64"):
        return "arm"
    return "other"


def needs_reduce_range(cpu: CpuFeatures, path: Int8Path) -> bool:
    """Whether the path must quantize activations to 7 bits on this CPU to stay clear of int16 saturation."""
    if path.backend != "torch" or not cpu.x86 or path.engine == "qnnpack":
        return False
    flags = set(cpu.flags)
    if path.engine == "onednn":
        return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
    return not flags & {"avx512_vnni", "amx_int8"}  # fbgemm (and x86, which runs fbgemm here) has AVX-512 VNNI only


def installed_paths() -> frozenset[str]:
    """The int8 paths this Python environment can run: torch's quantized engines, torchao when importable."""
    import torch

    found = {f"torch-{e}" for e in torch.backends.quantized.supported_engines if f"torch-{e}" in PATHS}
    if importlib.util.find_spec("torchao") is not None:
        found |= {"torchao", "torchao-compiled"}
    return frozenset(found)


@dataclass
class Int8Decision:
    """What `scheme: int8` resolved to, recorded in the checkpoint (`quantization.resolved`) and the report."""

    path: str
    backend: str
    scheme: str
    options: dict[str, Any]
    cpu_class: str
    cpu: str  # the CPU's label (`CpuFeatures.label`)
    table_path: str  # what the table alone chose
    table_status: str  # "measured <where>" or "untested default"
    source: str  # "table" or "probe"
    probe_ms: dict[str, float] | None = None
    probe_factor: float | None = None  # table path's time / chosen path's time, when the probe ran
    onnxruntime_speedup: float | None = None
    why: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8"] = self.scheme  # the key older checkpoints recorded the resolved scheme under
        return {k: v for k, v in d.items() if v is not None and v != {}}


def candidates(cpu: CpuFeatures, installed: frozenset[str], backend: str = "auto") -> list[str]:
    """The table's order for this CPU, restricted to installed paths of `backend` (`auto`: any)."""
    row = TABLE[cpu_class(cpu)]
    order = list(row.order) + [p for p in PATHS if p not in row.order]
    return [p for p in order if p in installed and backend in ("auto", PATHS[p].backend)]


def probe_candidates(cpu: CpuFeatures, installed: frozenset[str], backend: str = "auto") -> list[str]:
    """The eager paths the probe times: every installed one, except qnnpack on x86 (its reference kernels run at
    about 0.5x fp32 there)."""
    return [p for p in candidates(cpu, installed, backend)
            if PATHS[p].eager and not (cpu.x86 and PATHS[p].engine == "qnnpack")]


def resolve_int8(cpu: CpuFeatures, installed: frozenset[str], probe_ms: dict[str, float] | None = None,
                 backend: str = "auto") -> Int8Decision:
    """The int8 path for this CPU: the table's first installed path, or the probe's fastest eager path when it is at
    least `PROBE_MARGIN` faster than that one. Pure: the same inputs give the same decision.

    Args:
        cpu: the CPU (`vlmcompress.cpu.detect()`).
        installed: the installed paths (`installed_paths()`).
        probe_ms: `{path: milliseconds}` from `probe`, or None when it did not run.
        backend: `auto`, or the backend the recipe named (its paths only: an explicit backend is never changed).
    """
    klass = cpu_class(cpu)
    row = TABLE[klass]
    order = candidates(cpu, installed, backend)
    if not order:
        from ...errors import VlmCompressError

        raise VlmCompressError(f"scheme: int8 found no int8 path for backend {backend} in this environment "
                               f"(installed: {', '.join(sorted(installed)) or 'none'})")
    table_path = order[0]
    status = f"measured {row.measured}" if row.measured else "untested default"
    chosen, source, factor = table_path, "table", None
    timed = {p: ms for p, ms in (probe_ms or {}).items() if p in order and PATHS[p].eager}
    if timed and table_path in timed:
        fastest = min(timed, key=lambda p: (timed[p], order.index(p)))
        factor = round(timed[table_path] / timed[fastest], 3)
        if fastest != table_path and factor >= PROBE_MARGIN:
            chosen, source = fastest, "probe"
    path = PATHS[chosen]
    options = dict(path.options)
    if path.backend == "torch":
        options["reduce_range"] = needs_reduce_range(cpu, path)
    if source == "probe":
        why = (f"the probe timed {chosen} {factor:.2f}x faster than the table's {table_path} on this model's layer "
               f"shapes")
    else:
        why = f"the table's first installed path for {klass} ({status})"
    ort = row.onnxruntime_speedup if path.eager else None  # measured against the eager torch paths
    return Int8Decision(path=chosen, backend=path.backend, scheme="int8_dynamic", options=options, cpu_class=klass,
                        cpu=cpu.label(), table_path=table_path, table_status=status, source=source,
                        probe_ms=dict(sorted(timed.items())) or None, probe_factor=factor if timed else None,
                        onnxruntime_speedup=ort, why=why)


def probe_enabled(world_size: int = 1) -> bool:
    """The probe runs unless `VLMCOMPRESS_INT8_PROBE=0`, and only in single-process runs (every process of a
    multi-process run must take the same decision, so they all take the table's)."""
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "false", "no", "off") and world_size == 1


def probe(shapes: dict[tuple[int, int], int], paths: list[str], cpu: CpuFeatures, rounds: int = 3,
          rows: int = PROBE_ROWS) -> dict[str, float]:
    """Time each eager path on the model's linear layers: `{path: milliseconds}` for one forward of every layer.

    Args:
        shapes: `{(in_features, out_features): number of layers}` of the layers to quantize.
        paths: the eager paths to time (`probe_candidates`).
        rounds: interleaved rounds (the order rotates each round); the minimum of each path is kept.
        rows: tokens per call (`[rows, in_features]` inputs).
    """
    import torch

    from ...modeling.quantized import DynamicInt8Linear, quantize_int8_per_channel

    generator = torch.Generator().manual_seed(0)
    kernels: dict[str, list[tuple[Any, Any, int]]] = {}
    for name in paths:
        path = PATHS[name]
        built = []
        for (fan_in, fan_out), count in sorted(shapes.items()):
            weight = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
            x = torch.randn(rows, fan_in, generator=generator)
            if path.backend == "torch":
                qdata, scale = quantize_int8_per_channel(weight)
                kernel = DynamicInt8Linear(qdata, scale, torch.zeros(fan_out), needs_reduce_range(cpu, path),
                                           engine=path.engine)
            else:
                kernel = _torchao_linear(weight)
            built.append((kernel, x, count))
        kernels[name] = built

    def run(name: str) -> float:
        """One timed call per shape, weighted by how many layers have that shape."""
        total = 0.0
        with torch.no_grad():
            for kernel, x, count in kernels[name]:
                start = time.perf_counter()
                kernel(x)
                total += (time.perf_counter() - start) * count
        return total * 1e3

    for name in paths:  # warm-up (first calls allocate and pack)
        run(name)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        for name in paths[r % len(paths):] + paths[: r % len(paths)]:
            times[name].append(run(name))
    return {name: round(min(ts), 3) for name, ts in times.items()}


def _torchao_linear(weight):
    import torch
    from torch import nn

    from ...modeling.quantized import torchao_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import quantize_

        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
        quantize_(linear, torchao_config("int8_dynamic", {}))
    return linear


def load_note(quantization: dict[str, Any], cpu: CpuFeatures, installed: frozenset[str]) -> str | None:
    """One line for a quantized checkpoint loaded on this CPU, or None: when its 8-bit activations can saturate here,
    or when it was quantized on another class of CPU for which the table picks another path than it would here.
    The checkpoint always runs its recorded path (that is what reloads exactly)."""
    for entry in quantization.get("schemes", {}).values():
        options = entry.get("options", {})
        engine = options.get("engine")
        if entry.get("backend") == "torch" and engine in ("x86", "fbgemm", "onednn") and \
                options.get("reduce_range") is False and needs_reduce_range(cpu, PATHS[f"torch-{engine}"]):
            return (f"this checkpoint's int8 layers use 8-bit activations with torch's {engine} engine, chosen for a "
                    f"CPU with an int8 dot product (VNNI / AMX); this CPU ({cpu.label()}) has none, so int8 sums can "
                    f"saturate and outputs drift: quantize again on this machine (or with reduce_range: true)")
    resolved = quantization.get("resolved") or {}
    if "path" not in resolved or resolved.get("cpu_class") == cpu_class(cpu):
        return None
    requested = (quantization.get("requested") or {}).get("backend", "auto")
    here = resolve_int8(cpu, installed, None, requested if requested in ("torch", "torchao") else "auto")
    if here.path == resolved["path"]:
        return None
    return (f"this checkpoint runs int8 path {resolved['path']}, chosen on a {resolved['cpu_class']} CPU; on this "
            f"CPU ({cpu_class(cpu)}) vlmcompress would pick {here.path} ({here.table_status}): quantize again here "
            f"for the faster path")
