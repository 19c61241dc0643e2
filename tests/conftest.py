"""Shared fixtures: every built-in family compressed once per session (prune 50% + ToMe r=8)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
# scheme: int8 takes the table's path for this CPU, not a timing probe's (tests/test_int8_choice.py turns it on)
os.environ["VLMCOMPRESS_INT8_PROBE"] = "0"

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("tiny-clip", "tiny-siglip", "tiny-blip", "tiny-blip2", "tiny-llava")
PRUNE_AND_TOME = [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 8}]


@dataclass
class Compressed:
    name: str
    adapter: Any
    out: Path
    model: torch.nn.Module  # the in-memory model returned by `apply`
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]  # adapter.main_outputs of the in-memory model


@pytest.fixture(scope="session")
def compressed(tmp_path_factory):
    """`compressed(name)` → a `Compressed`, built on first use and shared by the session (do not mutate)."""
    import vlmcompress
    from vlmcompress.adapters import BUILTIN_TINY

    cache: dict[str, Compressed] = {}

    def get(name: str) -> Compressed:
        if name not in cache:
            out = tmp_path_factory.mktemp(name.replace("-", "_")) / "out"
            model = vlmcompress.apply({"model": name, "output": str(out), "stages": PRUNE_AND_TOME}, progress=False)
            adapter = BUILTIN_TINY[name]
            inputs = adapter.example_inputs(model, batch_size=2, seed=0)
            with torch.no_grad():
                outputs = adapter.main_outputs(model, inputs)
            cache[name] = Compressed(name, adapter, out, model, inputs, outputs)
        return cache[name]

    return get
