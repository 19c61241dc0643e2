"""Configs of compressed checkpoints: the stock config of each family plus what compression changed.

Extra keys (all plain JSON, typed and versioned by `spec.py`):
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

# Not used here: importing the algorithm index ties these config classes to the algorithms a checkpoint ships.
# transformers maps a remote config class to the first model class loaded for it, and it caches remote modules by
# the hash of a file and of the files it imports; without this import, a checkpoint with a plug-in algorithm loaded
# after a built-in one in the same process would get the built-in one's model class.
from .algorithms import NAMES as ALGORITHMS  # noqa: F401
from .spec import FORMAT_VERSION  # noqa: F401  (the checkpoint format this code writes; see spec.py)


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
