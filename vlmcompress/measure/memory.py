"""Peak memory of one call: CUDA's allocator statistics, or on CPU the peak growth of the process RSS sampled from
/proc/self/statm by a background thread."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class PeakRss:
    """Peak resident set size of this process while the block runs, sampled by a thread every `interval` s.

    `growth` is the peak minus the RSS on entry, in bytes (None where /proc/self/statm does not exist).
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.growth: int | None = None

    def _read(self) -> int:
        self._file.seek(0)
        return int(self._file.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._read())

    def __enter__(self):
        try:
            self._file = open("/proc/self/statm", "rb", buffering=0)
        except OSError:
            self._file = None
            return self
        self._start = self._peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._file is None:
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._read())
        self._file.close()
        self.growth = self._peak - self._start
        return False


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages; give them back before measuring
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call of `fn` above what was in use before it, in MiB (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 2)
    _release_free_memory()
    with PeakRss() as rss:
        fn()
    return None if rss.growth is None else round(rss.growth / 2**20, 2)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated during one untimed call minus torch.cuda.memory_allocated before "
                "it (tensors only, weights excluded)")
    if not Path("/proc/self/statm").exists():
        return "unavailable (no /proc/self/statm on this system)"
    return ("peak process RSS during one untimed call minus the RSS just before it, sampled from /proc/self/statm "
            "every 1 ms by a background thread, after gc.collect() and glibc malloc_trim(0) (weights excluded; "
            "allocator caching can make it an underestimate)")
