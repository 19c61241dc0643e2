"""What is exported, per family, and whether it can be: the wrapper modules whose forward is one graph, and the
check that refuses token reduction whose token counts depend on the data (a traced graph would be wrong on other
inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import pooled
from ..errors import UnsupportedModelError, VlmCompressError
from ..modeling.llava_tokens import feature_select_strategy
from ..modeling.spec import token_reduction


class OnnxExportError(VlmCompressError):
    """A model (or a part of it) that cannot be exported to a correct ONNX graph."""


# the graphs each family exports and the components each holds (a quantize stage's dry-run plan reads this)
GRAPH_COMPONENTS = {"clip": {"image_encoder": ("vision",), "text_encoder": ("text",), "model": ("vision", "text")},
                    "siglip": {"image_encoder": ("vision",), "text_encoder": ("text",), "model": ("vision", "text")},
                    "llava": {"image_encoder": ("vision", "projector")}}
FAMILIES = tuple(GRAPH_COMPONENTS)


class ImageEncoder(nn.Module):
    """`get_image_features` of a dual encoder: `[B, 3, H, W]` pixels → `[B, D]` image embeddings (not normalised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixel_values))


class TextEncoder(nn.Module):
    """`get_text_features` of a dual encoder: `[B, L]` token ids and mask → `[B, D]` text embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class DualEncoder(nn.Module):
    """The whole dual encoder, as Optimum exports it for zero-shot image classification (optimum-onnx 0.1.0,
    `CLIPOnnxConfig` / `SiglipOnnxConfig` in `optimum/exporters/onnx/model_configs.py`): pixels `[I, 3, H, W]` and
    token ids `[T, L]` (and, for CLIP, their mask) → `logits_per_image [I, T]`, `logits_per_text [T, I]`,
    `text_embeds [T, D]`, `image_embeds [I, D]`, the model's forward (embeddings L2-normalised). `model.onnx` with
    these names is what Optimum's `ORTModelForZeroShotImageClassification` runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds


class LlavaImageEncoder(nn.Module):
    """LLaVA's image path up to the language model: `[B, 3, H, W]` → `[B, T, D_llm]` projected image features
    (vision tower at `config.vision_feature_layer`, CLS dropped with the "default" strategy, projector)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # as LlavaModel.get_image_features, written out: its per-image list of features would fix the batch size
        config = self.model.config
        hidden = self.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        picked = [hidden[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if feature_select_strategy(config) == "default":  # "full" where the reduction hands the class token on
            picked = [h[:, 1:] for h in picked]
        return self.model.model.multi_modal_projector(torch.cat(picked, dim=-1))


@dataclass
class Graph:
    """One exported graph: the torch module that defines it and how it is described in `onnx/config.json`."""

    name: str  # file stem, e.g. "image_encoder"
    module: nn.Module
    example: dict[str, torch.Tensor]  # example inputs, batch 2
    dynamic: dict[str, dict[int, str]]  # input name → {axis: dimension name}
    output: str | dict[str, tuple[str, ...]]  # one output (leading axis "batch"), or each output's leading axes
    components: tuple[str, ...]  # adapter components inside the graph (the first is the graph's own)
    workload: str | None  # the `vlmcompress bench` workload this graph runs (None: exported for other clients)
    description: str
    vision: bool = False  # holds the vision tower (token reduction, tokens per layer)

    @property
    def outputs(self) -> dict[str, tuple[str, ...]]:
        """Output name → the names of its leading dynamic axes, in the module's return order."""
        return {self.output: ("batch",)} if isinstance(self.output, str) else dict(self.output)

    def run(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The module's outputs as a tuple, whatever it returns."""
        out = self.module(**inputs)
        return out if isinstance(out, tuple) else (out,)


def transformers_config(model: nn.Module) -> dict[str, Any]:
    """The config the exported graphs belong to, as stock transformers (and Optimum) read it: the stock
    `model_type` and class in `architectures`, the exported shapes, no `auto_map` (no modeling code lies beside
    the graphs)."""
    from ..modeling.modeling_vlmcompress import stock_class_name

    data = model.config.to_dict()
    for key in ("auto_map", "_name_or_path"):
        data.pop(key, None)
    data["architectures"] = [stock_class_name(model)]
    return data


def graphs_for(model: nn.Module, adapter) -> list[Graph]:
    """The graphs exported for `model` (see the module docstring)."""
    family = adapter.family
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"the onnxruntime backend exports {', '.join(FAMILIES)} models; this one is a {family} model; use "
            "backend: torch (or torchao, quanto) to quantize it")
    pixels = adapter.example_inputs(model, batch_size=2, seed=0)["pixel_values"].float()
    batch = {0: "batch"}
    if family == "llava":
        return [Graph("image_encoder", LlavaImageEncoder(model), {"pixel_values": pixels}, {"pixel_values": batch},
                      "image_features", GRAPH_COMPONENTS["llava"]["image_encoder"], "image",
                      "vision tower (at vision_feature_layer) + multi-modal projector: the image features handed to "
                      "the language model", vision=True)]
    text = model.config.text_config
    length = min(8, text.max_position_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, text.vocab_size, (2, length), generator=g)
    ids[:, -1] = text.eos_token_id if isinstance(text.eos_token_id, int) else ids[:, -1]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so the mask is not constant-folded away
    sequence = {0: "batch", 1: "sequence"}
    owned = GRAPH_COMPONENTS[family]
    # Optimum's whole-model graph: image and text batches are separate axes (3 texts against 2 images here)
    texts = {0: "text_batch", 1: "sequence"}
    whole = {"input_ids": torch.cat([ids, ids[:1]]), "pixel_values": pixels}
    if family == "clip":  # Optimum's SigLIP graph takes no mask (SigLIP pads to a fixed length)
        whole["attention_mask"] = torch.cat([mask, mask[:1]])
    whole_axes = {"input_ids": texts, "pixel_values": {0: "image_batch"}, "attention_mask": texts}
    return [Graph("image_encoder", ImageEncoder(model), {"pixel_values": pixels}, {"pixel_values": batch},
                  "image_embeds", owned["image_encoder"], "image", "get_image_features: vision tower + projection "
                  "(not L2-normalised)", vision=True),
            Graph("text_encoder", TextEncoder(model), {"input_ids": ids, "attention_mask": mask},
                  {"input_ids": sequence, "attention_mask": sequence}, "text_embeds", owned["text_encoder"], "text",
                  "get_text_features: text tower + projection (not L2-normalised)"),
            Graph("model", DualEncoder(model), whole, {k: whole_axes[k] for k in whole},
                  {"logits_per_image": ("image_batch", "text_batch"), "logits_per_text": ("text_batch", "image_batch"),
                   "text_embeds": ("text_batch",), "image_embeds": ("image_batch",)}, owned["model"], None,
                  "the whole model as Optimum's zero-shot-image-classification export (optimum-onnx 0.1.0): "
                  "similarity logits and L2-normalised embeddings", vision=True)]


def fixed_schedule(algorithm: str | None) -> bool:
    """Whether a token-reduction algorithm keeps a fixed number of tokens per layer (so it can be exported).

    The algorithm's reducer decides (`data_dependent`, in the modeling code's registry); a checkpoint's block or
    tower may also say `"data_dependent": true` (see `check_exportable`). Unknown algorithms are not exportable.
    """
    from ..modeling import algorithms  # noqa: F401  (registers the built-in reducers)
    from ..modeling.reduction import REDUCERS

    reducer = REDUCERS.get(algorithm)
    return reducer is not None and not reducer.data_dependent


def _tokens_seen(model: nn.Module, adapter, run) -> list[int]:
    """Tokens entering the first vision layer, then after each layer, during one call of `run`."""
    from ..measure.flops import tokens_per_layer

    return tokens_per_layer(model, adapter, run)


def check_exportable(model: nn.Module, adapter) -> list[int]:
    """Refuse token reduction whose token counts depend on the data; returns the vision tokens per layer (or None).

    Three checks: the algorithm must be declared fixed-schedule (`fixed_schedule`; a tower may also say
    `"data_dependent": true`); only the vision tower may be reduced (the text graphs have a dynamic length); and the
    tokens per layer measured on two different images (and the recorded schedule, where there is one) must agree.
    """
    spec = token_reduction(model.config)
    for tower in spec.towers if spec else []:
        algorithm = spec.algorithm
        component = tower.component
        if component not in ("vision", "text"):
            continue  # inside LLaVA's language model (FastV): not part of any exported graph
        if not fixed_schedule(algorithm) or tower.data_dependent or spec.data_dependent:
            raise OnnxExportError(
                f"token reduction '{algorithm}' on the {component} tower chooses how many tokens to keep from the "
                "data, so an ONNX graph traced on one input would be wrong for others; ONNX export supports "
                "fixed-schedule token reduction only; export the model before that stage, or quantize with "
                "backend: torch")
        if component != "vision":
            raise OnnxExportError(
                f"token reduction on the {component} tower depends on the text length, which the exported text "
                "graph leaves open (dynamic sequence axis); ONNX export supports token reduction in the vision "
                "tower only; reduce components: [vision], or quantize with backend: torch")
    config = model.config.vision_config
    seen = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size, generator=g) * seed
        with torch.no_grad():
            seen.append(_tokens_seen(model, adapter, lambda: _vision_forward(model, adapter, pixels)))
    vision = None if spec is None else spec.tower("vision")
    recorded = None if vision is None else [vision.num_tokens, *vision.tokens_per_layer]
    if seen[0] != seen[1] or (recorded is not None and seen[0] != recorded):
        raise OnnxExportError(
            f"the vision tower's token counts depend on the input (tokens per layer {seen[0]} on one image, {seen[1]} "
            f"on another{'' if recorded is None else f', schedule {recorded}'}), so an ONNX graph traced on one "
            "input would be wrong for others; ONNX export needs a fixed token schedule")
    return seen[0]


def _vision_forward(model: nn.Module, adapter, pixels: torch.Tensor):
    module = LlavaImageEncoder(model) if adapter.family == "llava" else ImageEncoder(model)
    return module(pixels)
