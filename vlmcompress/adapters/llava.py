"""LLaVA (`LlavaForConditionalGeneration`): CLIP vision tower → MLP projector → Llama-style decoder."""

from __future__ import annotations

import torch

from .base import (
    AttentionUnit,
    LayerStack,
    MlpUnit,
    ModelAdapter,
    TrainOutputs,
    VisionTower,
    _layers_units,
    _patch_tokens,
    _pixel_values,
    _seeded_init,
    get_submodule,
)

LLM_LAYERS = "model.language_model.layers"
VISION_LAYERS = "model.vision_tower.encoder.layers"
TINY_WORDS = ("what", "is", "the", "colour", "shape", "of", "object", "red", "green", "blue", "circle", "square",
              "triangle", "left", "right", "top", "bottom", "how", "many", "a", "an", "and", "?", "user:",
              "assistant:")


class LlavaAdapter(ModelAdapter):
    family = "llava"
    stock_classes = ("LlavaForConditionalGeneration",)
    builtin_name = "tiny-llava"
    component_paths = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                       "llm": "model.language_model"}
    variable_vision_tokens = False  # each image fills a fixed number of <image> slots in the prompt

    def attention_units(self, model):
        units, _ = _layers_units(model, "vision", VISION_LAYERS, "self_attn", None, "separate")
        text = model.config.text_config
        for i, layer in enumerate(get_submodule(model, LLM_LAYERS)):
            a = layer.self_attn
            units.append(AttentionUnit(name=f"{LLM_LAYERS}.{i}.self_attn", component="llm", layer=i, module=a,
                                       head_dim=a.head_dim, num_heads=text.num_attention_heads,
                                       num_kv_heads=text.num_key_value_heads, q="q_proj", k="k_proj", v="v_proj",
                                       out="o_proj"))
        return units

    def mlp_units(self, model):
        _, units = _layers_units(model, "vision", VISION_LAYERS, "self_attn", "mlp", "separate")
        for i, layer in enumerate(get_submodule(model, LLM_LAYERS)):
            units.append(MlpUnit(name=f"{LLM_LAYERS}.{i}.mlp", component="llm", layer=i, module=layer.mlp,
                                 up=("gate_proj", "up_proj"), down="down_proj", width_attrs=("intermediate_size",)))
        return units

    def vision_tower(self, model):
        return VisionTower(VISION_LAYERS, _patch_tokens(model.config.vision_config) + 1, True)

    def tiny_model(self, seed=0):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        from .clip import TINY_VISION

        _seeded_init(seed)
        config = LlavaConfig(
            vision_config=dict(model_type="clip_vision_model") | TINY_VISION,
            text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
            image_token_index=4, projector_hidden_act="gelu", vision_feature_layer=-2,
            vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        return model

    def layer_stacks(self, model):
        return {"vision": LayerStack("vision", VISION_LAYERS, "vision_config"),
                "llm": LayerStack("llm", LLM_LAYERS, "text_config")}

    def tiny_processor(self):
        """A word-level tokenizer + CLIP image processor wired into a `LlavaProcessor` for the tiny model."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4}
        for word in TINY_WORDS:
            vocab[word] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                            extra_special_tokens={"image_token": "<image>"})
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)

    def example_inputs(self, model, batch_size=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        config = model.config
        n_image = _patch_tokens(config.vision_config)  # "default" strategy drops CLS
        prompt = torch.randint(5, 30, (batch_size, 6), generator=g)
        image_tokens = torch.full((batch_size, n_image), config.image_token_index)
        input_ids = torch.cat([prompt[:, :2], image_tokens, prompt[:, 2:]], dim=1)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": _pixel_values(config.vision_config, batch_size, g)}

    def task_loss(self, model, processor, rows):
        """Next-token loss on the answers of `user: <image> QUESTION assistant: ANSWER </s>` prompts."""
        return model(**self.collate(processor, rows)).loss

    def collate(self, processor, rows):
        """`user: <image> QUESTION assistant: ANSWER </s>` prompts (left-padded), labels on the answer tokens."""
        from ..data.shapes import vqa_prompts

        questions = [r.get("question", "what is in the image ?") for r in rows]
        answers = [r.get("answer", r["text"]) for r in rows]
        texts = [f"{prompt} {a} </s>" for prompt, a in zip(vqa_prompts(processor, questions), answers)]
        batch = processor(text=texts, images=[r["image"] for r in rows], padding=True, return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        for i, answer in enumerate(answers):
            n = len(processor.tokenizer(f"{answer} </s>", add_special_tokens=False)["input_ids"])
            labels[i, -n:] = batch["input_ids"][i, -n:]  # left padding: the answer ends every row
        return dict(batch) | {"labels": labels}

    def train_outputs(self, model, batch):
        """Answer-token LM loss; the logits are those predicting answer tokens `[tokens, vocab]`."""
        if "labels" not in batch:  # a batch of tensors: the last two positions are the answer
            labels = torch.full_like(batch["input_ids"], -100)
            labels[:, -2:] = batch["input_ids"][:, -2:]
            batch = batch | {"labels": labels}
        out = model(**batch)
        labels = batch["labels"]
        logits = out.logits
        if logits.shape[1] != labels.shape[1]:  # shortened prompts (token reduction, FastV): labels were aligned
            labels = labels[:, -logits.shape[1]:]
        predicting = labels[:, 1:] != -100
        return TrainOutputs(out.loss, {"tokens": logits[:, :-1][predicting]})

    def main_outputs(self, model, inputs):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return {"logits": logits[:, -1], "greedy_tokens": tokens[:, -4:]}
