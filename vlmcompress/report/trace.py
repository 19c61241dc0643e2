"""Running a reduced model on a few images of the built-in `shapes` world, one image at a time, and reading what
its token reduction did: which input tokens every output token holds (`modeling.reduction.token_sources`, traced),
and the tokens every reduced layer handed on (forward hooks), per image.

One image per forward on purpose: per-image counts are exact (PruMerge's adaptive count pads a batch's rows to the
longest), and the source map of each image is its own.

FastV drops image tokens inside the language model, and its `token_sources` is over prompt positions (`[L', L]`:
which prompt position each kept token stands at). The report turns that into a map over image tokens: the rows of
kept positions that hold an image placeholder, the columns the image placeholders of the prompt in order (found in
the `input_ids` the LLaVA model received, captured by a pre-hook on the tower's `inputs_path`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np

# algorithms whose kept / merged tokens, or counts, depend on the image (spread shown over the eval images)
INPUT_DEPENDENT = ("crossget", "fastv")


def input_dependent(spec) -> bool:
    """Whether a `TokenReductionSpec`'s tokens depend on the image: PruMerge adaptive (`data_dependent`), CrossGET
    and FastV."""
    return spec is not None and (bool(spec.data_dependent) or spec.algorithm in INPUT_DEPENDENT
                                 or (spec.algorithm == "prumerge" and spec.options.get("mode") == "adaptive"))


def shapes_rows(model, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` rows of the shapes test split at the model's image size (`image` uint8 `[S, S, 3]`, `text`,
    `question`, `answer`)."""
    from ..data import load_rows
    from ..data.schema import DataSource

    return load_rows(DataSource(builtin="shapes", split="test"), model, seed, count) if count > 0 else []


def model_inputs(model, processor, family: str, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(`"full"` or `"vision"`, keyword inputs) for one image: LLaVA runs its whole forward on the question's
    prompt (FastV works inside the language model); every other family runs its vision tower on the pixels."""
    if family == "llava":
        from ..evaluate import vqa_prompts

        batch = dict(processor(text=vqa_prompts(processor, [row["question"]]), images=[row["image"]],
                               return_tensors="pt"))
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        return "full", batch
    if processor is None:
        pixels = unprocessed_pixels(row["image"])
    else:
        image_processor = getattr(processor, "image_processor", processor)
        pixels = image_processor(images=[row["image"]], return_tensors="pt")["pixel_values"]
    return "vision", {"pixel_values": pixels.to(device=model.device, dtype=model.dtype)}


def unprocessed_pixels(image: np.ndarray):
    """`[1, 3, S, S]` pixels of a uint8 `[S, S, 3]` image scaled to [-1, 1], for a model saved without a processor
    (the built-in tiny models): its own normalisation is unknown, but the picture of what its token reduction did
    needs only some forward on the image (the shapes rows are generated at the model's image size)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1)[None] / 127.5) - 1.0


@contextmanager
def layer_counts(model, layers_path: str):
    """Yields a list that fills, during the forwards inside, with the tokens entering the first layer at
    `layers_path` and then after each layer (`[layers + 1]` per forward)."""
    layers = model.get_submodule(layers_path)
    seen: list[int] = []

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(int(hidden.shape[1]))

    def after(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        seen.append(int(hidden.shape[1]))

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_input_ids(module):
    """Yields a dict whose `"input_ids"` is set to what `module` received in the forward inside."""
    got: dict[str, Any] = {}

    def hook(mod, args, kwargs):
        got["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()


def image_token_sources(sources: np.ndarray, input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """FastV's map over prompt positions → a map over the prompt's image tokens.

    Args:
        sources: `[L', L]` bool, one-hot rows: the prompt position each kept token stands at (`L` may be shorter
            than the prompt when the last positions were dropped).
        input_ids: `[L]` the prompt the language model received.
    Returns:
        `[K, I]` bool: one row per kept image token, columns the `I` image placeholders in prompt order.
    """
    image_positions = np.flatnonzero(input_ids == image_token_id)
    rank = {int(p): i for i, p in enumerate(image_positions)}
    rows = []
    for row in sources:
        held = [rank[int(p)] for p in np.flatnonzero(row) if int(p) in rank]
        if held:
            one = np.zeros(len(image_positions), dtype=bool)
            one[held] = True
            rows.append(one)
    return np.stack(rows) if rows else np.zeros((0, len(image_positions)), dtype=bool)


def trace_images(model, processor, adapter, spec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image: `{"sources": {component: [N', N0] bool array}, "counts": {component: [tokens per layer]}}` of a
    model whose checkpoint holds the token-reduction block `spec` (a `TokenReductionSpec`)."""
    import torch

    from ..modeling.reduction import token_sources

    towers = [t for t in spec.towers if t.kind is None]
    token_sources(model, trace=True)  # merging algorithms track full source maps only when asked
    traced = []
    try:
        for row in rows:
            how, inputs = model_inputs(model, processor, adapter.family, row)
            with _hooks(model, towers) as (counts, ids), torch.inference_mode():
                if how == "full":
                    model(**inputs)
                else:
                    vision = model.get_submodule(adapter.component_paths["vision"])
                    vision(**inputs)
            sources = {c: s[0].detach().cpu().numpy().astype(bool) for c, s in token_sources(model).items()}
            per_layer = {c: list(v) for c, v in counts.items() if v}
            for tower in towers:
                if tower.component == "llm" and tower.image_token_id is not None and "input_ids" in ids:
                    prompt = ids["input_ids"][0].cpu().numpy()
                    if "llm" in sources:
                        sources["llm"] = image_token_sources(sources["llm"], prompt, tower.image_token_id)
                    state = getattr(model.get_submodule(tower.inputs_path), "_vlmc_fastv", None)
                    if state is not None and state.image_tokens:
                        per_layer["llm"] = [int((prompt == tower.image_token_id).sum()), *state.image_tokens]
            traced.append({"sources": sources, "counts": per_layer})
    finally:
        token_sources(model, trace=False)
    return traced


@contextmanager
def _hooks(model, towers):
    """Token counts per layer of every encoder tower (`{component: list}`) and the prompt FastV's language model
    received (`{"input_ids": ...}`), during the forward inside."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        counts: dict[str, list[int]] = {}
        ids: dict[str, Any] = {}
        for tower in towers:
            if tower.component == "llm" and tower.inputs_path:
                ids = stack.enter_context(captured_input_ids(model.get_submodule(tower.inputs_path)))
            else:
                counts[tower.component] = stack.enter_context(layer_counts(model, tower.layers_path))
        yield counts, ids
