"""The built-in `shapes` world: seeded images of coloured geometric objects with captions and questions.

Every example is a function of `(seed, split, index)` only, so any slice is reproducible and train / validation /
test never share an example (their random streams differ by the split's id). A scene holds 1-3 objects (shape,
colour, size) in distinct cells of a 3×3 grid, drawn on a noisy grey background. Captions list the objects in grid
reading order ("a small red circle at the top left and a large blue ring in the center"); each example also carries
one question with a short answer (colour, shape, count, position, relation or size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (55, 85, 220), "yellow": (230, 205, 50),
           "purple": (145, 65, 185), "orange": (240, 135, 35), "white": (245, 245, 245), "black": (25, 25, 25)}
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three")
SPLITS = {"train": 0, "validation": 1, "test": 2}
QUESTION_TYPES = ("colour", "shape", "count", "position", "relation", "size")
TEMPLATE_WORDS = ("a", "an", "at", "the", "in", "and", "what", "colour", "is", "shape", "how", "many", "objects",
                  "are", "there", "where", "left", "of", "above", "small", "or", "large", "yes", "no", "?")


# the built-in LLaVA teacher's prompt (one definition: its training, `vlmcompress eval`, the chat template below)
VQA_PROMPT = "user: <image> {question} assistant:"
# a chat template that renders exactly VQA_PROMPT for one user turn of an image and a question (and the answer
# turn as training saw it: `assistant: ANSWER </s>`), so that `processor.apply_chat_template` and chat-style input
# to the image-text-to-text pipeline build the prompt the teacher was trained on
VQA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- if message['role'] == 'user' -%}{{ 'user:' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' assistant:' }}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ ' <image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ ' ' + part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{ ' </s>' }}{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' assistant:' }}{%- endif -%}"
)


def vqa_prompts(processor, questions: list[str]) -> list[str]:
    """Prompts for `questions` about one image each: the processor's chat template (one user turn: the image, then
    the question) when it has one, else the built-in teacher's `VQA_PROMPT`."""
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": q}]}],
                                              add_generation_prompt=True, tokenize=False) for q in questions]
    return [VQA_PROMPT.format(question=q) for q in questions]


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 80
    object_count_probs: tuple[float, float, float] = (0.2, 0.4, 0.4)  # 1, 2, 3 objects
    noise: float = 12.0  # std of the background / colour noise in 0..255 units
    colour_jitter: int = 18


def _cell_phrase(cell: str) -> str:
    return f"in the {cell}" if cell == "center" else f"at the {cell}"


def sample_scene(rng: np.random.Generator, config: ShapesConfig) -> list[dict]:
    count = int(rng.choice([1, 2, 3], p=config.object_count_probs))
    cells = sorted(rng.choice(len(CELLS), size=count, replace=False).tolist())
    return [{"shape": SHAPES[int(rng.integers(len(SHAPES)))], "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
             "size": SIZES[int(rng.integers(2))], "cell": CELLS[c]} for c in cells]


def caption(scene: list[dict]) -> str:
    parts = [f"a {o['size']} {o['colour']} {o['shape']} {_cell_phrase(o['cell'])}" for o in scene]
    return " and ".join(parts)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape centred at the origin; `dy`, `dx` are pixel offsets `[H, W]`."""
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= radius ** 2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= radius * 1.15
    if shape == "triangle":  # apex up: inside the band and under both slanted edges
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.62)
    if shape == "cross":
        bar = radius * 0.35
        return ((np.abs(dy) <= bar) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= bar) & (np.abs(dy) <= radius))
    if shape == "ring":
        d2 = dy ** 2 + dx ** 2
        return (d2 <= radius ** 2) & (d2 >= (radius * 0.55) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: list[dict], rng: np.random.Generator, config: ShapesConfig) -> np.ndarray:
    """`[S, S, 3]` uint8 image of `scene`."""
    s = config.image_size
    image = 128.0 + rng.normal(0.0, config.noise, size=(s, s, 3))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cell = s / 3
    for obj in scene:
        row, col = divmod(CELLS.index(obj["cell"]), 3)
        radius = cell * (0.24 if obj["size"] == "small" else 0.42)
        jitter = max(0.0, cell * 0.5 - radius - 1)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        mask = _shape_mask(obj["shape"], yy - cy, xx - cx, radius)
        colour = np.array(COLOURS[obj["colour"]], dtype=np.float64)
        colour = colour + rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        image[mask] = colour + rng.normal(0.0, config.noise / 3, size=(int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _describe(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def question(scene: list[dict], rng: np.random.Generator) -> tuple[str, str, str]:
    """One (question, answer, type) about `scene`, asked so that the answer is unambiguous.

    An object is only named by "colour shape" when no other object in the scene has the same colour and shape, and
    by its shape alone when its shape is unique, so every question points at exactly one object.
    """
    shapes = [o["shape"] for o in scene]
    descriptions = [_describe(o) for o in scene]
    unique_shape = [o for o in scene if shapes.count(o["shape"]) == 1]
    nameable = [o for o, d in zip(scene, descriptions) if descriptions.count(d) == 1]
    kinds = (["count", "shape"] + (["position"] if nameable else []) + (["colour", "size"] if unique_shape else [])
             + (["relation"] if len(nameable) > 1 else []))
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "count":
        return "how many objects are there ?", COUNT_WORDS[len(scene)], kind
    if kind == "shape":
        o = scene[int(rng.integers(len(scene)))]
        return f"what shape is {_cell_phrase(o['cell'])} ?", o["shape"], kind
    if kind == "position":
        o = nameable[int(rng.integers(len(nameable)))]
        return f"where is the {_describe(o)} ?", o["cell"], kind
    if kind == "colour":
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        return f"what colour is the {o['shape']} ?", o["colour"], kind
    if kind == "size":
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        return f"is the {o['shape']} small or large ?", o["size"], kind
    a, b = (nameable[i] for i in rng.choice(len(nameable), size=2, replace=False))
    (ra, ca), (rb, cb) = divmod(CELLS.index(a["cell"]), 3), divmod(CELLS.index(b["cell"]), 3)
    if ca != cb:
        return f"is the {_describe(a)} left of the {_describe(b)} ?", "yes" if ca < cb else "no", kind
    return f"is the {_describe(a)} above the {_describe(b)} ?", "yes" if ra < rb else "no", kind


def example(index: int, split: str = "train", seed: int = 0, config: ShapesConfig = ShapesConfig()) -> dict:
    """Example `index` of `split`: `{"image": uint8 [S, S, 3], "text", "question", "answer", "qtype", "objects"}`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = sample_scene(rng, config)
    image = render(scene, rng, config)
    # Its own stream, so that the question does not depend on how many draws rendering took (image size, noise).
    q, a, kind = question(scene, np.random.default_rng([seed, SPLITS[split], index, 1]))
    return {"image": image, "text": caption(scene), "question": q, "answer": a, "qtype": kind,
            "objects": json.dumps(scene)}


def generate(split: str = "train", size: int = 1000, seed: int = 0, config: ShapesConfig = ShapesConfig(),
             start: int = 0) -> list[dict]:
    return [example(i, split, seed, config) for i in range(start, start + size)]


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can contain, in a fixed order (for word-level tokenizers)."""
    words: list[str] = []
    for group in (TEMPLATE_WORDS, SHAPES, tuple(COLOURS), SIZES, COUNT_WORDS,
                  tuple(w for c in CELLS for w in c.split())):
        for w in group:
            if w not in words:
                words.append(w)
    return words


def to_dataset(split: str = "train", size: int = 1000, seed: int = 0, config: ShapesConfig = ShapesConfig()):
    """The split as a `datasets.Dataset` with an `image` (PIL) column and text columns."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rows = generate(split, size, seed, config)
    features = Features({"image": Image(), "text": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "qtype": Value("string"), "objects": Value("string")})
    return Dataset.from_list([r | {"image": PILImage.fromarray(r["image"])} for r in rows], features=features)
