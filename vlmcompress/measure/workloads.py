"""What `vlmcompress bench` times, per family (`WORKLOADS`), and what an ONNX export holds (`EXPORT_WORKLOADS`):
each workload builds a zero-argument call on a model at a batch size (inputs made once, outside the timing)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import ModelAdapter
from ..errors import UnsupportedModelError

TEXT_TOKENS = 32  # text length of the text / ITM workloads and of the generators' prompt
DECODE_STEPS = 16



@dataclass
class Workload:
    """One timed call. `build(model, adapter, batch_size, device)` returns a zero-argument function that runs it."""

    key: str
    description: str
    build: Callable[[nn.Module, ModelAdapter, int, torch.device], Callable[[], Any]]
    batched: bool = True  # False: batch 1 only (decode)
    vision: bool = False  # runs the vision tower; the first such workload gives the tokens per layer


def _pixels(model, adapter, batch_size, device) -> torch.Tensor:
    pixels = adapter.example_inputs(model, batch_size=batch_size, seed=0)["pixel_values"]
    return pixels.to(device=device, dtype=model.dtype)


def _text_ids(model, batch_size: int, length: int, device, low: int = 4) -> torch.Tensor:
    """`[batch_size, length]` random token ids in `[low, vocab)`, BOS first and EOS last where the config has them."""
    text = model.config.text_config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(low, text.vocab_size, (batch_size, length), generator=g)
    if getattr(text, "bos_token_id", None) is not None:
        ids[:, 0] = text.bos_token_id
    if getattr(text, "eos_token_id", None) is not None and isinstance(text.eos_token_id, int):
        ids[:, -1] = text.eos_token_id
    return ids.to(device)


def _text_length(model) -> int:
    return min(TEXT_TOKENS, getattr(model.config.text_config, "max_position_embeddings", TEXT_TOKENS))


def _inference(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return fn()

    return run


def _image_features(model, adapter, batch_size, device):
    pixels = _pixels(model, adapter, batch_size, device)
    return _inference(lambda: model.get_image_features(pixel_values=pixels))


def _text_features(model, adapter, batch_size, device):
    ids = _text_ids(model, batch_size, _text_length(model), device)
    kwargs = {"input_ids": ids}
    if "attention_mask" in adapter.example_inputs(model, batch_size=1):  # SigLIP is used without a mask
        kwargs["attention_mask"] = torch.ones_like(ids)
    return _inference(lambda: model.get_text_features(**kwargs))


def _llava_image(model, adapter, batch_size, device):
    pixels = _pixels(model, adapter, batch_size, device)
    return _inference(lambda: model.get_image_features(pixel_values=pixels))


def _blip_image(model, adapter, batch_size, device):
    pixels = _pixels(model, adapter, batch_size, device)
    return _inference(lambda: model.vision_model(pixel_values=pixels))


def _blip_itm(model, adapter, batch_size, device):
    pixels = _pixels(model, adapter, batch_size, device)
    ids = _text_ids(model, batch_size, _text_length(model), device)
    mask = torch.ones_like(ids)
    return _inference(lambda: model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=True))


def _stock_forward_params(model, adapter) -> set[str]:
    for cls in type(model).__mro__:
        if cls.__name__ in adapter.stock_classes:
            return set(inspect.signature(cls.forward).parameters)
    return set(inspect.signature(model.forward).parameters)


def prompt_ids(model: nn.Module, family: str, batch_size: int, device="cpu") -> torch.Tensor:
    """A generator's processor-style prompt: one image's placeholders plus `TEXT_TOKENS` text tokens (BOS included).

    LLaVA: `[BOS, placeholder × (image_size / patch_size)² (+1 with the "full" feature strategy), 31 text]`;
    BLIP-2: `[placeholder × num_query_tokens, BOS, 31 text]`. Text ids never equal the placeholder id.
    """
    config = model.config
    text = _text_ids(model, batch_size, TEXT_TOKENS, device, low=5)
    if family == "llava":
        from ..modeling.llava_tokens import image_tokens_per_image

        n_image, image_id = image_tokens_per_image(config), config.image_token_id
    else:
        n_image, image_id = config.num_query_tokens, config.image_token_index
    text[text == image_id] = 5 if image_id != 5 else 6
    text[:, 0] = config.text_config.bos_token_id
    text[:, -1] = text[:, -2]  # a prompt does not end with EOS
    image = torch.full((batch_size, n_image), image_id, dtype=text.dtype, device=text.device)
    if family == "llava":
        return torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    return torch.cat([image, text], dim=1)


def _prefill(model, adapter, batch_size, device):
    """A function running the prefill and returning its output (logits of the last position, KV cache)."""
    family = adapter.family
    ids = prompt_ids(model, family, batch_size, device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True,
              "pixel_values": _pixels(model, adapter, batch_size, device)}
    lm_params = (_stock_forward_params(model, adapter) if family == "llava"
                 else set(inspect.signature(model.language_model.forward).parameters))
    if "logits_to_keep" in lm_params:
        kwargs["logits_to_keep"] = 1  # as `generate` does: logits of the last position only
    return _inference(lambda: model(**kwargs))


def _cache_of(output) -> Any:
    cache = getattr(output, "past_key_values", None)
    if cache is None and getattr(output, "language_model_outputs", None) is not None:  # BLIP-2
        cache = output.language_model_outputs.past_key_values
    if cache is None:
        raise UnsupportedModelError(f"{type(output).__name__} holds no KV cache; cannot time decoding")
    return cache


def _decode(model, adapter, batch_size, device):
    """Prefill once (untimed); the returned function crops the cache back to the prompt and decodes
    `DECODE_STEPS` greedy tokens, one forward each."""
    out = _prefill(model, adapter, batch_size, device)()
    cache = _cache_of(out)
    prompt_len = cache.get_seq_length()
    first = out.logits[:, -1:].argmax(-1)
    masks = [torch.ones(batch_size, prompt_len + i + 1, dtype=torch.long, device=first.device)
             for i in range(DECODE_STEPS)]
    step = model.language_model if adapter.family == "blip2" else model  # BLIP-2: the OPT decoder with its head

    def run():
        extra = cache.get_seq_length() - prompt_len
        if extra:
            cache.crop(-extra)  # a negative count removes that many positions (all transformers 5 releases)
        token = first
        for mask in masks:
            logits = step(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
        return token

    return _inference(run)


def _dual_encoder(family: str) -> list[Workload]:
    return [Workload("image", "get_image_features(pixel_values): vision tower + projection", _image_features,
                     vision=True),
            Workload("text", f"get_text_features(input_ids{', attention_mask' if family == 'clip' else ''}): "
                             f"text tower + projection, {TEXT_TOKENS} tokens", _text_features)]


def _generator(family: str) -> list[Workload]:
    if family == "llava":
        placeholders = "(image_size / patch_size)² placeholders config.image_token_id"
    else:
        placeholders = "num_query_tokens placeholders config.image_token_index"
    return [Workload("prefill", f"forward over one image + {TEXT_TOKENS}-token prompt ({placeholders}, then "
                                f"{TEXT_TOKENS} text tokens incl. BOS), KV cache on, logits of the last position; "
                                "ms per batch of prompts", _prefill, vision=True),
            Workload("decode", f"{DECODE_STEPS} greedy decode steps on the KV cache of that prefill (one forward "
                               "per token, argmax fed back, timed directly, not via generate), batch 1; ms per "
                               f"{DECODE_STEPS} tokens", _decode, batched=False)]


WORKLOADS: dict[str, list[Workload]] = {
    "clip": _dual_encoder("clip"),
    "siglip": _dual_encoder("siglip"),
    "blip": [Workload("image", "vision_model(pixel_values): image encoding for retrieval", _blip_image, vision=True),
             Workload("itm", "model(input_ids, attention_mask, pixel_values, use_itm_head=True): image-text "
                             f"matching forward (vision tower + text encoder with cross-attention), "
                             f"{TEXT_TOKENS} tokens", _blip_itm)],
    "blip2": _generator("blip2"),
    "llava": _generator("llava"),
}


EXPORT_WORKLOADS: dict[str, list[Workload]] = {
    "clip": WORKLOADS["clip"],
    "siglip": WORKLOADS["siglip"],
    "llava": [Workload("image", "get_image_features(pixel_values): vision tower + projector, the image features "
                                "handed to the language model", _llava_image, vision=True)],
}


def is_export(model: Any) -> bool:
    """Whether `model` is an ONNX Runtime export (`OnnxModel`) rather than a PyTorch model."""
    return bool(getattr(model, "vlmc_onnx", False))
