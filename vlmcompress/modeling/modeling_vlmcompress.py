"""Compressed model classes, loadable with `AutoModel.from_pretrained(folder, trust_remote_code=True)`.

Each class is the stock transformers class of its family plus two steps at construction: replay the pruning record
(smaller per-layer shapes) and patch the token-reducing layers named in `config.token_reduction`. The weights then
load as usual (any `dtype` / `device_map`). This file and its siblings are copied flat into every checkpoint and
import only torch, transformers and each other.
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2ForConditionalGeneration,
    BlipForImageTextRetrieval,
    CLIPModel,
    LlavaForConditionalGeneration,
    SiglipModel,
)

from .algorithms import NAMES as ALGORITHMS  # noqa: F401  (registers the token-reduction algorithms it names)
from .configuration_vlmcompress import (
    VlmcBlip2Config,
    VlmcBlipConfig,
    VlmcCLIPConfig,
    VlmcLlavaConfig,
    VlmcSiglipConfig,
)
from .llava_tokens import (feature_select_strategy, image_token_offsets, kept_image_positions,
                           llava_image_token_counts, placeholder_keep_mask, select_prompt_tokens)
from .quantized import apply_quantization
from .reduction import apply_token_reduction
from .shapes import apply_shape_record, patch_fused_attention
from .spec import CheckpointRecord, token_reduction


def setup_compressed(model: torch.nn.Module) -> None:
    """Replay the pruning record, the token reduction and the quantization stored in `model.config` on a freshly
    built model (quantization last: it wraps the linear layers that pruning resized)."""
    record = CheckpointRecord.read(getattr(model.config, "vlmcompress", None))
    apply_shape_record(model, record.param_shapes, record.module_attrs)
    patch_fused_attention(model, record.param_shapes)
    apply_token_reduction(model, token_reduction(model.config))
    apply_quantization(model, getattr(model.config, "quantization", None))


class VlmcCLIPModel(CLIPModel):
    config_class = VlmcCLIPConfig

    def __init__(self, config):
        super().__init__(config)
        setup_compressed(self)


class VlmcSiglipModel(SiglipModel):
    config_class = VlmcSiglipConfig

    def __init__(self, config):
        super().__init__(config)
        setup_compressed(self)


class VlmcBlipForImageTextRetrieval(BlipForImageTextRetrieval):
    config_class = VlmcBlipConfig

    def __init__(self, config):
        super().__init__(config)
        setup_compressed(self)


class VlmcBlip2ForConditionalGeneration(Blip2ForConditionalGeneration):
    config_class = VlmcBlip2Config

    def __init__(self, config):
        super().__init__(config)
        setup_compressed(self)


class VlmcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose prompts shrink to the reduced number of image tokens.

    Modifications: `forward` and `generate` shorten each run of image placeholders written by the processor to the
    number of tokens the reduced vision tower produces, so prompts built by the saved processor keep working. When
    that number depends on the images (`token_reduction.data_dependent`, PruMerge's adaptive mode), the vision tower
    runs first and the placeholders shrink to the count it returned. With `keep_positions` (VisionZip / PruMerge)
    the vision tower also runs first, and the prompt keeps the placeholders of the kept image tokens, so that they
    and the text after them keep the position ids of the full prompt. With FastV (image tokens dropped inside the
    language model), logits cover the kept positions only and `labels` are gathered to match.
    """

    config_class = VlmcLlavaConfig

    def __init__(self, config):
        super().__init__(config)
        setup_compressed(self)

    def _data_dependent(self) -> bool:
        spec = token_reduction(self.config)
        return spec is not None and spec.data_dependent

    def _keep_positions(self) -> bool:
        spec = token_reduction(self.config)
        return spec is not None and bool(spec.options.get("keep_positions"))

    def _vision_state(self):
        tower = token_reduction(self.config).tower("vision")
        return self.get_submodule(tower.layers_path.rpartition(".")[0])._vlmc_state

    def _strategy(self, kwargs) -> str | None:
        """The feature strategy to run `get_image_features` with ("full" where the reduction hands the class token
        on, as VisionZip does)."""
        given = kwargs.get("vision_feature_select_strategy")
        return feature_select_strategy(self.config) if given is None else given

    def _encode_images(self, pixel_values, kwargs) -> tuple[dict, int | torch.Tensor]:
        """Run the vision tower now: (`mm_encoder_outputs` for the stock forward, image tokens per image: one count,
        or a count per image `[num_images]` when the reduction chose one per image)."""
        strategy = self._strategy(kwargs)
        image = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=strategy, return_dict=True)
        rows = self._vision_state().row_tokens  # tokens of each padded row, CLS included
        if rows is None:
            return {"image": image}, int(image.pooler_output[0].shape[0])
        counts = rows - int(strategy == "default")
        image.pooler_output = [f[:c] for f, c in zip(image.pooler_output, counts.tolist())]
        return {"image": image}, counts

    def _reduced_prompt(self, input_ids, attention_mask, position_ids, labels, keep=None, generating=False):
        """A full prompt (the processor's placeholder runs) edited for the reduced image tokens: each run shortened
        to its image's tokens (with `keep_positions`, the kept tokens take the positions of the patches they stand
        at); rows padded when images keep different counts. Returns (input_ids, attention_mask, position_ids,
        labels)."""
        unchanged = (input_ids, attention_mask, position_ids, labels)
        token = self.config.image_token_id
        full, static_keep = llava_image_token_counts(self.config)
        if input_ids is None:
            return unchanged
        per_row = (input_ids == token).sum(dim=1)
        if bool((per_row % full != 0).any()) or int(per_row.max()) == 0:
            return unchanged  # already shortened (or no image): nothing to do
        keep = static_keep if keep is None else keep
        if self._keep_positions():
            if position_ids is None:  # what the stock model would use for the full prompt
                if generating and attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
                else:
                    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            state = self._vision_state()
            offsets = image_token_offsets(self.config, state.source_index)  # ascending, 0 = CLS
            counts = keep if isinstance(keep, torch.Tensor) else None
            kept, position_ids = kept_image_positions(input_ids, position_ids.expand_as(input_ids), token, full,
                                                      offsets, counts)
        elif isinstance(keep, int) and keep == full:
            return unchanged
        else:
            kept = placeholder_keep_mask(input_ids, token, full, keep)
        pad = getattr(self.config.text_config, "pad_token_id", None)
        return select_prompt_tokens(kept, input_ids, attention_mask, position_ids, labels, pad or 0)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, labels=None,
                **kwargs):
        if pixel_values is not None:
            keep = None
            kwargs["vision_feature_select_strategy"] = self._strategy(kwargs)
            if self._data_dependent() or self._keep_positions():
                kwargs["mm_encoder_outputs"], keep = self._encode_images(pixel_values, kwargs)
                pixel_values = None
            input_ids, attention_mask, position_ids, labels = self._reduced_prompt(
                input_ids, attention_mask, position_ids, labels, keep)
        fastv = getattr(self.model, "_vlmc_fastv", None)
        if fastv is None or labels is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, **kwargs)
        out = super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              position_ids=position_ids, **kwargs)
        if fastv.keep is not None and out.logits.shape[1] == fastv.keep.shape[1]:
            labels = labels.gather(1, fastv.keep)  # the dropped image positions carry no logits
        out.loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return out

    def generate(self, inputs=None, **kwargs):
        """As `LlavaForConditionalGeneration.generate`; the returned sequences start with the prompt as given (full
        placeholder runs), so `out[:, prompt_length:]` is the generated text as with the stock model."""
        prompt = kwargs.pop("input_ids", inputs)
        input_ids = prompt
        if kwargs.get("pixel_values") is not None and prompt is not None:
            keep = None
            if self._data_dependent() or self._keep_positions():
                kwargs["mm_encoder_outputs"], keep = self._encode_images(kwargs.pop("pixel_values"), kwargs)
            mask = kwargs.get("attention_mask")
            input_ids, mask, positions, _ = self._reduced_prompt(prompt, mask, kwargs.get("position_ids"), None, keep,
                                                                 generating=True)
            if mask is not None:
                kwargs["attention_mask"] = mask
            if positions is not None:
                kwargs["position_ids"] = positions
        out = super().generate(input_ids, **kwargs)
        if input_ids is prompt or prompt is None:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        restored = torch.cat([prompt, sequences[:, input_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out


# stock class name → (compressed model class, compressed config class, task Auto class names for `auto_map`)
COMPRESSED_CLASSES = {
    "CLIPModel": (VlmcCLIPModel, VlmcCLIPConfig, ("AutoModel",)),
    "SiglipModel": (VlmcSiglipModel, VlmcSiglipConfig, ("AutoModel",)),
    "BlipForImageTextRetrieval": (VlmcBlipForImageTextRetrieval, VlmcBlipConfig, ("AutoModel",)),
    "Blip2ForConditionalGeneration": (VlmcBlip2ForConditionalGeneration, VlmcBlip2Config,
                                      ("AutoModel", "AutoModelForImageTextToText")),
    "LlavaForConditionalGeneration": (VlmcLlavaForConditionalGeneration, VlmcLlavaConfig,
                                      ("AutoModel", "AutoModelForImageTextToText")),
}


def stock_class_name(model: torch.nn.Module) -> str | None:
    """The key of `COMPRESSED_CLASSES` that `model` is (stock or compressed: the compressed classes subclass the
    stock ones), or None for another architecture."""
    return next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in COMPRESSED_CLASSES), None)
