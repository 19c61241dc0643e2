"""Per-layer data: tokens kept per layer per tower, and attention heads / MLP neurons kept per layer after pruning.

Tokens: report.json's `tokens_per_layer` (`{component: [tokens entering layer 0, after layer 0, ...]}`, what the
checkpoint's `token_reduction` block declares); for input-dependent methods also the counts seen when the model ran
on the eval images (`trace.py`), as min / median / max per layer.

Pruning: the kept sizes are the checkpoint record's `layer_num_heads` / `layer_intermediate_sizes` (`config.json`
→ `vlmcompress`, written from the pruned model's shapes: `checkpoint.per_layer_summary`); the sizes before are those
of the base model (`base`, when the output was compressed from it) or else of the output's own architecture
unpruned (its config without the pruning record, built on the meta device: shapes only, no weights).
"""

from __future__ import annotations

import statistics
from typing import Any

KINDS = {"layer_num_heads": "attention heads", "layer_intermediate_sizes": "MLP neurons"}


def spread(per_image: list[list[int]]) -> dict[str, list[float]] | None:
    """`{"min", "median", "max"}` per layer over images (`[images][layers + 1]`); None without images. Images
    whose lists differ in length (a tower that ran a different depth) are compared over the common layers."""
    if not per_image:
        return None
    depth = min(len(c) for c in per_image)
    columns = [[c[i] for c in per_image] for i in range(depth)]
    return {"min": [min(c) for c in columns], "median": [float(statistics.median(c)) for c in columns],
            "max": [max(c) for c in columns]}


def tokens_data(points: list[dict[str, Any]], measured: dict[str, dict[str, list[list[int]]]],
                dependent: dict[str, bool]) -> dict[str, Any]:
    """What `tokens_per_layer.json` holds: `{"towers": {component: [one entry per reduced output]}}`, each entry
    `{"label", "name", "declared": [...], "per_image": [[...]] or None, "min", "median", "max" (None without
    measurements), "input_dependent"}`; `measured` is `{name: {component: [per image counts]}}`."""
    towers: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        for component, declared in (p.get("tokens_per_layer") or {}).items():
            per_image = (measured.get(p["name"]) or {}).get(component) or None
            band = spread(per_image or [])
            towers.setdefault(component, []).append({
                "label": p["label"], "name": p["name"], "declared": list(declared), "per_image": per_image,
                "min": band and band["min"], "median": band and band["median"], "max": band and band["max"],
                "input_dependent": bool(dependent.get(p["name"]))})
    return {"what": "tokens entering the first layer, then after each layer; min / median / max over the eval "
                    "images where the model ran on them", "towers": towers}


def kept_fraction(kept: dict[str, list[int]], before: dict[str, list[int]]) -> dict[str, list[float | None]]:
    """`{component: [kept / before per layer]}` (None where a layer has no size before)."""
    return {c: [round(k / b, 4) if b else None for k, b in zip(sizes, before.get(c, []))]
            for c, sizes in kept.items()}


def pruning_entry(label: str, name: str, kept: dict[str, dict[str, list[int]]],
                  before: dict[str, dict[str, list[int]]], compared_with: str) -> dict[str, Any]:
    """One output's entry of `pruning_per_layer.json`: kept and before sizes per kind, component and layer."""
    return {"label": label, "name": name, "compared_with": compared_with, "kept": kept, "before": before,
            "kept_fraction": {kind: kept_fraction(kept.get(kind, {}), before.get(kind, {})) for kind in KINDS},
            "pruned": any(k != before.get(kind, {}).get(c) for kind in KINDS for c, k in kept.get(kind, {}).items())}


def record_sizes(config: dict[str, Any]) -> dict[str, dict[str, list[int]]] | None:
    """The kept sizes the checkpoint record of a `config.json` holds, or None when it holds none."""
    record = config.get("vlmcompress") or {}
    sizes = {kind: record.get(kind) for kind in KINDS}
    return sizes if all(isinstance(v, dict) and v for v in sizes.values()) else None


def model_sizes(model) -> dict[str, dict[str, list[int]]]:
    """Heads and MLP widths per component and layer of a (meta or real) model, from its shapes."""
    from ..adapters import adapter_for
    from ..checkpoint import per_layer_summary

    return per_layer_summary(adapter_for(model), model)


def base_sizes(name: str) -> dict[str, dict[str, list[int]]]:
    """The sizes of a base model (built-in name, folder or Hub id), built on the meta device (no weights)."""
    from ..models import load_model

    model, _ = load_model(str(name), meta=True)
    return model_sizes(model)


def unpruned_sizes(folder) -> dict[str, dict[str, list[int]]]:
    """The sizes of an output's architecture before pruning: its config as the stock class, on the meta device
    (the config keeps the original widths; the compressed class replays the pruning record on top of them)."""
    import json

    import torch

    from ..checkpoint import compressed_classes, register_classes
    from ..modeling.modeling_vlmcompress import COMPRESSED_CLASSES

    model_cls, config_cls, _ = compressed_classes(json.loads((folder / "config.json").read_text()))
    # the compressed classes subclass the stock ones, whose names key COMPRESSED_CLASSES
    stock_cls = next(c for c in model_cls.__mro__ if c.__name__ in COMPRESSED_CLASSES)
    register_classes()
    config = config_cls.from_pretrained(folder)
    with torch.device("meta"):
        model = stock_cls._from_config(config)
    return model_sizes(model)


def output_sizes(output) -> dict[str, dict[str, list[int]]]:
    """The kept sizes of an output: its checkpoint record, else its model's shapes (meta device)."""
    sizes = record_sizes(output.config)
    if sizes is not None:
        return sizes
    from ..checkpoint import load

    return model_sizes(load(output.folder, meta=True))
