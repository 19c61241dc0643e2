"""Configs of compressed checkpoints: the stock config of each family plus what compression changed.

Extra keys (all plain JSON):
    `vlmcompress`: `format_version`, `base_model`, `param_shapes` / `module_attrs` (the pruning record replayed by
        `shapes.apply_shape_record`), `layer_num_heads` / `layer_intermediate_sizes` (per component, for people),
        `versions` (libraries that produced the checkpoint).
    `token_reduction`: `algorithm` and per tower the encoder-layer path, per-layer `r`, protected CLS, proportional
        attention and the expected tokens after every layer.
    `quantization`: the quantized linear layers (backend, scheme and options per component; per layer its shape and
        the names, shapes and dtypes of its integer data / scales / zero points) replayed by `quantized.py`. It is
        not `quantization_config`, which transformers would hand to its own quantizers.
"""

from __future__ import annotations

from transformers import Blip2Config, BlipConfig, CLIPConfig, LlavaConfig, SiglipConfig

FORMAT_VERSION = 1


class VlmcCLIPConfig(CLIPConfig):
    model_type = "vlmcompress_clip"


class VlmcSiglipConfig(SiglipConfig):
    model_type = "vlmcompress_siglip"


class VlmcBlipConfig(BlipConfig):
    model_type = "vlmcompress_blip"


class VlmcBlip2Config(Blip2Config):
    model_type = "vlmcompress_blip2"


class VlmcLlavaConfig(LlavaConfig):
    model_type = "vlmcompress_llava"
