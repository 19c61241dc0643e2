"""The adapter interface: everything vlmcompress needs to know about one model family's module layout.

Adapters are the only code that knows module paths. Stages ask them for components (`vision`, `text`, `qformer`,
`projector`, `llm`), for the attention and MLP units that pruning may shrink, and for where the vision tower's
encoder layers live (token reduction); the paths they return are written into the checkpoint's config, so the
shipped modeling code needs no family knowledge of its own beyond the attention layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class AttentionUnit:
    """One multi-head attention module whose heads pruning may remove.

    Projection names are dotted paths relative to `module`. Output channels of `q` (and of `k`/`v`, which have
    `num_kv_heads` heads under grouped-query attention) and input channels of `out` are grouped by head; a fused
    `qkv` projection holds `[3, heads, head_dim]` output channels.
    """

    name: str
    component: str
    layer: int
    module: nn.Module
    head_dim: int
    num_heads: int
    num_kv_heads: int
    out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    head_attrs: tuple[str, ...] = ()  # attributes that hold the number of (query) heads
    kv_head_attrs: tuple[str, ...] = ()  # attributes that hold the number of key/value heads
    width_attrs: tuple[str, ...] = ()  # attributes that hold heads * head_dim


@dataclass
class MlpUnit:
    """One feed-forward block: `up` projections' output channels and `down`'s input channels are its neurons."""

    name: str
    component: str
    layer: int
    module: nn.Module
    up: tuple[str, ...]
    down: str
    width_attrs: tuple[str, ...] = ()


@dataclass
class TrainOutputs:
    """A family's task loss, its logits by name (`[N, classes]` rows that logit distillation compares) and, for
    dual encoders, the projected embeddings by name (`[N, D]`, before normalisation) that embedding distillation
    compares."""

    loss: torch.Tensor
    logits: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


def pooled(features) -> torch.Tensor:
    """`get_image_features` / `get_text_features` as a tensor `[B, D]`: transformers 5 returns an output object
    whose `pooler_output` holds it, earlier versions the tensor itself."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def same_text_mask(texts: list[str]) -> torch.Tensor:
    """`[B, B]` bool: True where two rows of a batch have the same caption (they are not each other's negatives)."""
    return torch.tensor([[a == b for b in texts] for a in texts])


def same_ids_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, B]` bool: rows with identical token ids (a batch built from tensors, without texts)."""
    return (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)


@dataclass(frozen=True)
class LayerStack:
    """A component's stack of layers: where the `nn.ModuleList` is, and which config holds its length
    (`config_path`: dotted attributes from the model config, "" for the config itself)."""

    component: str
    layers_path: str
    config_path: str
    count_attr: str = "num_hidden_layers"


@dataclass
class VisionTower:
    """Where an encoder's layers are, and what its token sequence looks like (vision, or text with `text` set)."""

    layers_path: str  # dotted path of the nn.ModuleList of encoder layers
    num_tokens: int  # tokens entering the first layer (patches + CLS if any; the longest text for text towers)
    class_token: bool  # index 0 is a CLS token that must never be merged away
    hook_path: str | None = None  # the module whose forward starts a pass of the tower (default: the encoder)
    # text towers: {"causal": bool, "eot": "eos" | "argmax" | "last", "eos_token_id": int}
    text: dict | None = None


def get_submodule(root: nn.Module, dotted: str) -> Any:
    """`root.a.b.c` for `dotted = "a.b.c"` (attributes, not only modules)."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class ModelAdapter:
    """Base class: one subclass per model family, registered in `vlmcompress.adapters`."""

    family: ClassVar[str]
    stock_classes: ClassVar[tuple[str, ...]]  # transformers class names this adapter handles
    builtin_name: ClassVar[str]  # the tiny random-init model, e.g. "tiny-clip"
    component_paths: ClassVar[dict[str, str]]
    # True where `train_outputs` fills `embeddings` (a shared image-text embedding space: distill's embedding term)
    shared_embeddings: ClassVar[bool] = False
    # True where the vision tower's output may have any number of tokens (pooled, or read by cross-attention), so
    # training may drop patches (train.patch_dropout); LLaVA's projector fills a fixed number of image-token slots
    variable_vision_tokens: ClassVar[bool] = True

    def components(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: get_submodule(model, path) for name, path in self.component_paths.items()}

    def attention_units(self, model: nn.Module) -> list[AttentionUnit]:
        raise NotImplementedError

    def mlp_units(self, model: nn.Module) -> list[MlpUnit]:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> VisionTower:
        raise NotImplementedError

    def text_tower(self, model: nn.Module) -> VisionTower | None:
        """The text encoder as a tower that order-preserving token reduction can run on; None when unsupported."""
        return None

    def cross_attention_tower(self, model: nn.Module) -> VisionTower | None:
        """The text-encoder layers whose cross-attention reads the image tokens (`num_tokens`: image tokens with
        CLS, `hook_path`: the encoder module), where Turbo prunes those tokens; None when the family has none."""
        return None

    def layer_stacks(self, model: nn.Module) -> dict[str, LayerStack]:
        """The layer stacks whose depth a student may shrink (`distill`), by component."""
        return {}

    def tiny_model(self, seed: int = 0) -> nn.Module:
        """A seeded random-init model of this family, small enough for unit tests."""
        raise NotImplementedError

    def tiny_processor(self) -> Any:
        """A processor for the tiny model, or None."""
        return None

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs that exercise every component (for tracing, tests and verification)."""
        raise NotImplementedError

    def collate(self, processor: Any, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The model's inputs for training on data rows (`image`, `text`, `question` / `answer`), with what the
        loss needs beside them (`same_text`: `[B, B]` bool, rows whose captions are equal; `labels`)."""
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"no training inputs for the {self.family} family yet")

    def train_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TrainOutputs:
        """The family's task loss on a `collate` batch and the logits that logit distillation compares."""
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"no training loss for the {self.family} family yet")

    def task_loss(self, model: nn.Module, processor: Any, rows: list[dict]) -> torch.Tensor:
        """The family's training loss on data rows (`image`, `text`, ...), used for gradient-based importance."""
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"no task loss for the {self.family} family yet; use importance: magnitude")

    def main_outputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs a user of this family relies on (embeddings, ITM scores or logits), for comparisons."""
        raise NotImplementedError


def _pixel_values(config, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    size = config.image_size
    return torch.randn(batch_size, config.num_channels, size, size, generator=generator)


def _seeded_init(seed: int):
    torch.manual_seed(seed)


def _patch_tokens(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _layers_units(
    model: nn.Module, component: str, layers_path: str, attn: str, mlp: str | None, kind: str
) -> tuple[list[AttentionUnit], list[MlpUnit]]:
    """Units of the common `layer.self_attn` + `layer.mlp` (fc1/fc2) layout used by CLIP, SigLIP, BLIP and BLIP-2."""
    atts, mlps = [], []
    for i, layer in enumerate(get_submodule(model, layers_path)):
        a = get_submodule(layer, attn)
        heads = a.num_heads
        common = dict(name=f"{layers_path}.{i}.{attn}", component=component, layer=i, module=a, head_dim=a.head_dim,
                      num_heads=heads, num_kv_heads=heads, head_attrs=("num_heads",))
        if kind == "fused":
            atts.append(AttentionUnit(**common, qkv="qkv", out="projection"))
        else:
            atts.append(AttentionUnit(**common, q="q_proj", k="k_proj", v="v_proj", out="out_proj"))
        if mlp is not None:
            m = get_submodule(layer, mlp)
            mlps.append(MlpUnit(name=f"{layers_path}.{i}.{mlp}", component=component, layer=i, module=m,
                                up=("fc1",), down="fc2"))
    return atts, mlps


def _bert_attention(name: str, component: str, layer: int, module: nn.Module, self_path: str) -> AttentionUnit:
    """A BERT-style attention block (`<self_path>.query/key/value` + `output.dense`), as in BLIP text / Q-Former."""
    inner = get_submodule(module, self_path)
    heads = inner.num_attention_heads
    p = self_path + "."
    return AttentionUnit(name=name, component=component, layer=layer, module=module,
                         head_dim=inner.attention_head_size, num_heads=heads, num_kv_heads=heads,
                         q=p + "query", k=p + "key", v=p + "value", out="output.dense",
                         head_attrs=(p + "num_attention_heads",), width_attrs=(p + "all_head_size",))
