"""Versions of the libraries that decide what a checkpoint holds (recorded in checkpoints, reports, benchmarks)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("vlmcompress", "torch", "transformers", "torch-pruning", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
