"""FLOPs of a call (`FlopCounterMode`, with the CPU flash-attention and quantized matmul kernels counted) and the
tokens every vision layer sees during a call (forward hooks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import ModelAdapter, get_submodule


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten._scaled_dot_product_flash_attention_for_cpu`: q·kᵀ and attention·v, as the CUDA kernels."""
    b, heads, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * heads * s_q * s_k * d_qk + 2 * b * heads * s_q * s_k * d_v


def _quantized_matmul_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a quantized matmul `[..., K] @ [K, N]` (int8 / int4 kernels the flop counter does not know)."""
    return 2 * math.prod(input_shape) * out_shape[-1]


def _flop_mapping() -> dict:
    ops = {getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None): _sdpa_cpu_flops}
    # the kernels behind vlmcompress's quantized linear layers (torch dynamic int8, torchao int8 / int4, quanto)
    for namespace, name in (("quantized", "linear_dynamic"), ("aten", "_int_mm"),
                            ("aten", "_weight_int4pack_mm_for_cpu"), ("quanto", "qbytes_mm")):
        try:
            ops[getattr(getattr(torch.ops, namespace), name)] = _quantized_matmul_flops
        except (AttributeError, RuntimeError):
            continue  # that backend's operators are not registered in this process
    ops.pop(None, None)
    return ops


def count_gflops(fn: Callable[[], Any], model: nn.Module | None = None) -> float:
    """GFLOPs (2 × multiply-adds) of one call of `fn`. With `model`, its parameters stop requiring gradients for the
    count: the counter's module tracker hooks autograd on tensors that require them, which fails inside
    `inference_mode` on a parameter used as an input (BLIP-2's `query_tokens`)."""
    trained = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    for p in trained:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
            fn()
    finally:
        for p in trained:
            p.requires_grad_(True)
    return counter.get_total_flops() / 1e9


def tokens_per_layer(model: nn.Module, adapter: ModelAdapter, fn: Callable[[], Any]) -> list[int]:
    """Tokens entering the first vision layer, then after each layer, seen by hooks during one call of `fn`."""
    layers = get_submodule(model, adapter.vision_tower(model).layers_path)
    seen: list[int] = []

    def before(module, args, kwargs):
        if not seen:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(hidden.shape[1])

    def after(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        seen.append(hidden.shape[1])

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return seen[: len(layers) + 1]
