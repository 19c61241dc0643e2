"""The machine a measurement ran on: device, threads, load, versions and the CPU's instruction sets (every speed
figure names them: the same model runs 1.1-3x apart on AVX2 and AVX-512 VNNI)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def machine_info(device: torch.device) -> dict[str, Any]:
    from .. import cpu as cpu_facts
    from ..versions import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = library_versions()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "threads": torch.get_num_threads(),
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1m": None if load is None else round(load, 2),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": versions.get("transformers"), "vlmcompress": versions.get("vlmcompress"),
            "cpu": cpu_facts.describe(), "date": time.strftime("%Y-%m-%d")}
