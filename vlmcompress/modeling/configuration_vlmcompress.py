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


class _StockModelTypeOnDisk:
    """A compressed config is its own `model_type` in memory (vlmcompress registers it with AutoConfig) and the
    stock family's `model_type` in `config.json` (format 3): clients that read only the config to find a stock
    class (AutoTokenizer, AutoProcessor, a pipeline's processor, AutoConfig without remote code) then resolve it
    locally and never ask to run code; `auto_map` still sends `trust_remote_code=True` loads to this class."""

    stock_model_type = ""

    def to_dict(self):
        output = super().to_dict()
        output["model_type"] = self.stock_model_type
        return output

    @classmethod
    def _own_model_type(cls, config_dict: dict) -> dict:
        if config_dict.get("model_type") == cls.stock_model_type:  # format 3 on disk; formats 1-2 wrote our own
            return {**config_dict, "model_type": cls.model_type}
        return config_dict

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `to_dict()` output fed back (copy.deepcopy of a model's config, `from_dict(config.to_dict())`) carries the
        # stock type; without this the instance would shadow the class's `model_type` with it
        return super().from_dict(cls._own_model_type(config_dict), **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # every read of a config.json (from_pretrained through get_config_dict, from_json_file) comes through here
        return cls._own_model_type(super()._dict_from_json_file(json_file))


class VlmcCLIPConfig(_StockModelTypeOnDisk, CLIPConfig):
    model_type = "vlmcompress_clip"
    stock_model_type = CLIPConfig.model_type


class VlmcSiglipConfig(_StockModelTypeOnDisk, SiglipConfig):
    model_type = "vlmcompress_siglip"
    stock_model_type = SiglipConfig.model_type


class VlmcBlipConfig(_StockModelTypeOnDisk, BlipConfig):
    model_type = "vlmcompress_blip"
    stock_model_type = BlipConfig.model_type


class VlmcBlip2Config(_StockModelTypeOnDisk, Blip2Config):
    model_type = "vlmcompress_blip2"
    stock_model_type = Blip2Config.model_type


class VlmcLlavaConfig(_StockModelTypeOnDisk, LlavaConfig):
    model_type = "vlmcompress_llava"
    stock_model_type = LlavaConfig.model_type
