"""LLaVA prompts built by the saved processor keep working after token reduction (placeholder runs shrink)."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlmcompress
from vlmcompress.modeling.modeling_vlmcompress import llava_image_token_counts
from vlmcompress.modeling.llava_tokens import shrink_placeholder_runs

PROMPT = "user: <image> what shape ? assistant:"
LONG_PROMPT = "user: <image> what is the colour of the red object ? assistant:"
NEW_TOKENS = 5


def image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava(compressed):
    from transformers import AutoProcessor

    fam = compressed("tiny-llava")
    processor = AutoProcessor.from_pretrained(fam.out)
    return fam, processor, vlmcompress.load(fam.out)


def greedy_by_forward(model, enc, steps):
    """Greedy decoding with plain forward calls (no cache) on the full prompt: the reference for `generate`.

    Returns the new tokens `[B, steps]` and the next-token logits of every step `[steps, B, vocab]`.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    all_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"]).logits[:, -1]
            all_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, -steps:], torch.stack(all_logits)


def generate_with_scores(model, enc):
    out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_image_token_counts(llava):
    _, _, model = llava
    full, reduced = llava_image_token_counts(model.config)
    # 8x8 patches; the "default" strategy drops CLS; vision_feature_layer=-2 of 2 layers is the first layer's output,
    # which holds 65 - 8 = 57 tokens after ToMe, i.e. 56 without CLS
    assert (full, reduced) == (64, 56)


def test_single_prompt_forward_and_generate(llava):
    fam, processor, model = llava
    enc = processor(text=PROMPT, images=image(0), return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape[0] == 1
    assert int((ids == model.config.image_token_id).sum()) == 64

    full, reduced = llava_image_token_counts(model.config)
    with torch.no_grad():
        logits = model(**enc).logits
        memory_logits = fam.model(**enc).logits
    assert logits.shape == (1, ids.shape[1] - full + reduced, model.config.text_config.vocab_size)
    assert (logits - memory_logits).abs().max().item() <= 1e-5

    out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    memory_out = fam.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, memory_out)
    # generate (shrunk prompt + KV cache) must follow the same logits as uncached forward calls
    sequences, step_logits = generate_with_scores(model, enc)
    ref_tokens, ref_logits = greedy_by_forward(model, enc, NEW_TOKENS)
    assert torch.equal(sequences, out)
    assert torch.equal(out[:, -NEW_TOKENS:], ref_tokens)
    assert (step_logits - ref_logits).abs().max().item() <= 1e-5


def test_batch_left_padding_generate(llava):
    fam, processor, model = llava
    assert processor.tokenizer.padding_side == "left"
    prompts, images = [PROMPT, LONG_PROMPT], [image(1), image(2)]
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    n_short = int(mask[0].sum())
    assert n_short < mask.shape[1] and int(mask[1].sum()) == mask.shape[1]
    assert mask[0, : mask.shape[1] - n_short].sum() == 0  # padding on the left
    assert ((batch["input_ids"] == model.config.image_token_id).sum(dim=1) == 64).all()

    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape[0] == 2
    sequences, step_logits = generate_with_scores(model, batch)
    ref_tokens, ref_logits = greedy_by_forward(model, batch, NEW_TOKENS)
    assert torch.equal(sequences, out)
    assert torch.equal(out[:, -NEW_TOKENS:], ref_tokens)
    assert (step_logits - ref_logits).abs().max().item() <= 1e-5
    assert torch.equal(out, fam.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False))
    with torch.no_grad():
        batch_last = model(**batch).logits[:, -1]
    for row, (prompt, img) in enumerate(zip(prompts, images)):
        single = processor(text=prompt, images=img, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])
        with torch.no_grad():
            single_last = model(**single).logits[0, -1]
        assert (batch_last[row] - single_last).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# shrink_placeholder_runs on hand-made tensors (placeholder id 9, 3 placeholders per image, keep 2)

P = 9


def test_shrink_two_images_in_a_row_with_padding_and_labels():
    input_ids = torch.tensor([
        [0, 0, 5, P, P, P, P, P, P, 6],  # left padding, then two images back to back
        [5, P, P, P, 7, P, P, P, 6, 8],  # two images separated by text
    ])
    attention_mask = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    labels = torch.tensor([
        [-100, -100, 50, -100, -100, -100, -100, -100, -100, 60],
        [51, -100, -100, -100, 71, -100, -100, -100, 61, 81],
    ])
    position_ids = torch.arange(10).repeat(2, 1)
    features = torch.arange(40).view(2, 10, 2)  # aligned tensor with a trailing dimension

    ids, mask, lab, pos, none, feat = shrink_placeholder_runs(input_ids, P, 3, 2, attention_mask, labels,
                                                              position_ids, None, features)
    assert ids.tolist() == [
        [0, 0, 5, P, P, P, P, 6],
        [5, P, P, 7, P, P, 6, 8],
    ]
    assert mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    assert lab.tolist() == [
        [-100, -100, 50, -100, -100, -100, -100, 60],
        [51, -100, -100, 71, -100, -100, 61, 81],
    ]
    assert pos.tolist() == [
        [0, 1, 2, 3, 4, 6, 7, 9],
        [0, 1, 2, 4, 5, 6, 8, 9],
    ]
    assert none is None
    assert feat.tolist() == [
        [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [12, 13], [14, 15], [18, 19]],
        [[20, 21], [22, 23], [24, 25], [28, 29], [30, 31], [32, 33], [36, 37], [38, 39]],
    ]


def test_shrink_keep_one_and_unchanged_text():
    input_ids = torch.tensor([[1, P, P, P, P, 2]])  # full=4, keep=1: one image
    (ids,) = shrink_placeholder_runs(input_ids, P, 4, 1)
    assert ids.tolist() == [[1, P, 2]]
    text_only = torch.tensor([[1, 2, 3]])
    (same,) = shrink_placeholder_runs(text_only, P, 4, 1)
    assert same.tolist() == [[1, 2, 3]]


def test_shrink_rejects_rows_with_different_image_counts():
    input_ids = torch.tensor([
        [5, P, P, P, 6, 7],  # one image
        [P, P, P, P, P, P],  # two images
    ])
    with pytest.raises(ValueError, match="same number of images"):
        shrink_placeholder_runs(input_ids, P, 3, 2)


def test_generate_returns_the_prompt_as_given(tmp_path):
    """Sequences start with the caller's prompt (full placeholder runs), so slicing off the prompt works as usual."""
    import vlmcompress
    from vlmcompress.adapters import BUILTIN_TINY

    adapter = BUILTIN_TINY["tiny-llava"]
    recipe = {"model": "tiny-llava", "output": "unused", "stages": [{"method": "token_reduce", "r": 8}]}
    model = vlmcompress.apply(recipe, save=False, progress=False)
    inputs = adapter.example_inputs(model, batch_size=2)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    dict_out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(dict_out.sequences, out)
