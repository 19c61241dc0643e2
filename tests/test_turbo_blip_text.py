"""Turbo's cross-attention-guided pruning of image tokens inside BLIP's text encoder (methods.md §5a): the schedule
and the top-k kernel against loop references, the tokens each text layer's cross-attention sees (hooks), save →
fresh-process load, batch = per sample."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vlmcompress
from vlmcompress.adapters import BUILTIN_TINY
from vlmcompress.errors import VlmCompressError
from vlmcompress.modeling.turbo import cross_attention_probs
from vlmcompress.modeling.turbo import cross_attention_keep_counts, received_cross_attention, top_received_index

BLIP = BUILTIN_TINY["tiny-blip"]

# ----------------------------------------------------------------------------------------------------------------
# kernels


def test_keep_counts_follow_the_formula():
    # N0 = 100, step 0.07, floor 0.2: 93, 86, ..., 30 (exactly 30, not 29), then 23, then the floor 20
    assert cross_attention_keep_counts(100, 12) == [93, 86, 79, 72, 65, 58, 51, 44, 37, 30, 23, 20]
    # BLIP ViT-B/16 at 384 px: 577 image tokens; layer 10 keeps floor(0.23 · 577) = 132, layer 11 the floor 115
    counts = cross_attention_keep_counts(577, 12)
    assert counts[0] == math.floor(0.93 * 577) == 536 and counts[-2:] == [132, 115]
    assert cross_attention_keep_counts(65, 4, step=0.3, min_keep=0.25) == [45, 26, 16, 16]
    assert cross_attention_keep_counts(10, 3, step=0.0) == [10, 10, 10]  # identity at zero step
    assert cross_attention_keep_counts(3, 2, step=0.9, min_keep=0.01) == [1, 1]  # never below one token


def keep_reference(probs, query_valid, k):
    """Loop reference for one sample: attention received by each image token (sum over heads and non-padding
    queries), then token 0 plus the k - 1 others that received most (ties: the earlier one), in original order."""
    h, lq, n = probs.shape
    received = [sum(float(probs[a, q, t]) for a in range(h) for q in range(lq) if query_valid[q]) for t in range(n)]
    others = sorted(range(1, n), key=lambda t: (-received[t], t))[:k - 1]
    return [0, *sorted(others)], received


@pytest.mark.parametrize("n,lq,k,seed", [(9, 3, 5, 0), (16, 5, 1, 1), (12, 4, 12, 2), (7, 6, 3, 3)])
def test_top_received_matches_loop_reference(n, lq, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(3, 2, lq, n, generator=gen).softmax(-1)
    valid = torch.rand(3, lq, generator=gen) > 0.3
    valid[:, 0] = True
    received = received_cross_attention(probs, valid)
    index = top_received_index(received, k)
    for b in range(3):
        want, want_received = keep_reference(probs[b], valid[b], k)
        torch.testing.assert_close(received[b], torch.tensor(want_received))
        assert index[b].tolist() == want


def test_class_token_kept_and_order_preserved():
    received = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    index = top_received_index(received, 3)
    assert index.tolist() == [[0, 1, 3], [0, 1, 2]]  # CLS despite receiving nothing; ties go to earlier tokens
    assert top_received_index(received, 3, keep_first=False).tolist() == [[1, 3, 4], [0, 1, 2]]


def test_recomputed_probabilities_equal_the_modules_own():
    model = BLIP.tiny_model()
    attn = model.text_encoder.encoder.layer[0].crossattention.self
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 9, 32, generator=gen)
    with torch.no_grad():
        _, probs = attn(text, encoder_hidden_states=image)
        torch.testing.assert_close(cross_attention_probs(attn, text, image), probs)
        # a masked image token gets no attention
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[:, ..., 4] = False
        assert (cross_attention_probs(attn, text, image, mask)[..., 4] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# the patched text encoder


def tiny_blip(text_layers=2):
    """tiny-blip with `text_layers` text layers and weights drawn ten times wider (std 0.2): with tiny-blip's std 0.02
    the cross-attention is nearly uniform and barely moves the ITM score, so pruning would hardly show."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BLIP.tiny_model().config.to_dict()
    config["text_config"] |= {"num_hidden_layers": text_layers, "initializer_range": 0.2}
    config["initializer_range"] = 0.2
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(BlipConfig.from_dict(config)).eval()


def reduce(tmp_path, components=("vision", "text"), model=None, **knobs):
    out = tmp_path / f"out-{'-'.join(components)}"
    stage = {"method": "token_reduce", "algorithm": "turbo", "r": 3, "components": list(components)} | knobs
    model = vlmcompress.apply({"model": "tiny-blip", "output": str(out), "stages": [stage]}, model, progress=False)
    return model, out


def test_each_text_layer_sees_the_scheduled_top_tokens(tmp_path):
    model, out = reduce(tmp_path, model=tiny_blip(5), r=0, text_step=0.3, text_min_keep=0.25)
    block = json.loads((out / "config.json").read_text())["token_reduction"]
    assert block["options"]["text_step"] == 0.3 and block["options"]["text_min_keep"] == 0.25
    text = [t for t in block["towers"] if t["component"] == "text"][0]
    # 65 image tokens (r = 0 on the vision tower); k = 45, 26, 16 (floor 0.25 · 65), 16; the last layer prunes nothing
    assert text["num_tokens"] == 65 and text["tokens_per_layer"] == [45, 26, 16, 16, 16]
    seen = []  # (image tokens, attention probabilities) at each layer's cross-attention

    def hook(module, args, kwargs, output):
        seen.append((kwargs["encoder_hidden_states"], output[1]))

    layers = model.text_encoder.encoder.layer
    handles = [layer.crossattention.self.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    inputs = BLIP.example_inputs(model, batch_size=2, seed=0)
    inputs["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        model(**inputs, use_itm_head=True)
    for h in handles:
        h.remove()
    assert [s.shape[1] for s, _ in seen] == [text["num_tokens"], *text["tokens_per_layer"][:-1]]
    # every layer's image tokens are the previous layer's, cut to the ones that layer's queries attended to most
    valid = inputs["attention_mask"].bool()
    for (before, probs), (after, _) in zip(seen, seen[1:]):
        for b in range(2):
            kept, _ = keep_reference(probs[b], valid[b], after.shape[1])
            torch.testing.assert_close(after[b], before[b, kept], rtol=0, atol=0)
    # the cosine path has no cross-attention: nothing is pruned, nothing is measured
    seen.clear()
    with torch.no_grad():
        model(**inputs, use_itm_head=False)
    assert seen == []


def test_blip_turbo_text_reloads_in_a_fresh_process(tmp_path):
    from safetensors.torch import save_file
    from test_families import CHILD_MAIN_OUTPUTS
    from test_turbo_crossget import CHILD

    model, out = reduce(tmp_path, model=tiny_blip())
    vision_only, _ = reduce(tmp_path, components=("vision",), model=tiny_blip())
    inputs = BLIP.example_inputs(model, batch_size=2, seed=0)
    with torch.no_grad():
        expected = BLIP.main_outputs(model, inputs)
        reference = BLIP.main_outputs(vision_only, inputs)
    assert model.text_encoder.encoder._vlmc_cross_state.tokens == [54, 54]  # 59 image tokens after the vision tower
    # pruning inside the text encoder changes the ITM scores and leaves the cosine path alone
    assert (expected["itm_score"] - reference["itm_score"]).abs().max() > 1e-2
    torch.testing.assert_close(expected["cosine"], reference["cosine"], rtol=0, atol=0)

    io = tmp_path / "io"
    io.mkdir()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(io / "inputs.safetensors"))
    snippet = textwrap.indent(textwrap.dedent(CHILD_MAIN_OUTPUTS["tiny-blip"]).strip(), "    ")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(snippet=snippet), str(out), str(io)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((io / "out.json").read_text())
    loaded = vlmcompress.load(out)
    with torch.no_grad():
        again = BLIP.main_outputs(loaded, inputs)
    assert loaded.text_encoder.encoder._vlmc_cross_state.tokens == [54, 54]
    for k, v in expected.items():
        torch.testing.assert_close(torch.tensor(got[k], dtype=v.dtype), v, rtol=0, atol=1e-5)
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5)


def test_batch_equals_per_sample_with_padding(tmp_path):
    model, _ = reduce(tmp_path, model=tiny_blip(4))
    inputs = BLIP.example_inputs(model, batch_size=3, seed=1)
    lengths = [8, 5, 3]
    inputs["attention_mask"] = (torch.arange(8) < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = model(**inputs, use_itm_head=True).itm_score
        single = torch.cat([model(input_ids=inputs["input_ids"][i:i + 1, :n], attention_mask=torch.ones(1, n).long(),
                                  pixel_values=inputs["pixel_values"][i:i + 1], use_itm_head=True).itm_score
                            for i, n in enumerate(lengths)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_turbo_text_only_on_blip(tmp_path):
    with pytest.raises(VlmCompressError, match="turbo reduces only vision tokens on a clip model") as err:
        vlmcompress.apply({"model": "tiny-clip", "output": str(tmp_path / "x"),
                           "stages": [{"method": "token_reduce", "algorithm": "turbo",
                                       "components": ["vision", "text"]}]}, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(VlmCompressError, match="text_step does not apply to algorithm: tome"):
        vlmcompress.apply({"model": "tiny-blip", "output": str(tmp_path / "y"),
                           "stages": [{"method": "token_reduce", "text_step": 0.1}]}, progress=False)
    with pytest.raises(VlmCompressError, match="text_min_keep"):
        vlmcompress.apply({"model": "tiny-blip", "output": str(tmp_path / "z"),
                           "stages": [{"method": "token_reduce", "algorithm": "turbo", "text_min_keep": 0.0}]},
                          progress=False)
