"""The `shapes` generator (determinism, splits, captions, answers, difficulty) and the recipe data sources
(built-in, image folder, save_to_disk folder, Hugging Face id): round trips, column mapping and every bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vlmcompress.data import DataError, export_image_folder, load_rows, load_source, shapes  # noqa: E402
from vlmcompress.errors import VlmCompressError  # noqa: E402

SMALL = shapes.ShapesConfig(image_size=32)
# the 3×3 grid in reading order, written out here rather than taken from the generator
GRID = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
QUESTION_PATTERNS = {
    "count": re.compile(r"how many objects are there \?"),
    "shape": re.compile(r"what shape is (at|in) the (.+) \?"),
    "position": re.compile(r"where is the (\w+) (\w+) \?"),
    "colour": re.compile(r"what colour is the (\w+) \?"),
    "size": re.compile(r"is the (\w+) small or large \?"),
    "relation": re.compile(r"is the (\w+) (\w+) (left of|above) the (\w+) (\w+) \?"),
}


def objects(row: dict) -> list[dict]:
    return json.loads(row["objects"])


def grid_position(obj: dict) -> tuple[int, int]:
    """(row, column) of an object's cell."""
    return divmod(GRID.index(obj["cell"]), 3)


def pixels(image) -> np.ndarray:
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------------------------
# the shapes generator


def test_examples_are_a_function_of_seed_split_and_index():
    for split in ("train", "validation", "test"):
        for index in (0, 7, 123):
            a = shapes.example(index, split, seed=3, config=SMALL)
            b = shapes.example(index, split, seed=3, config=SMALL)
            assert np.array_equal(a["image"], b["image"])
            assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    seed0 = shapes.generate("train", 20, seed=0, config=SMALL)
    seed1 = shapes.generate("train", 20, seed=1, config=SMALL)
    assert not any(np.array_equal(a["image"], b["image"]) for a, b in zip(seed0, seed1))
    assert sum(a["text"] != b["text"] for a, b in zip(seed0, seed1)) >= 15


def test_train_and_test_never_share_an_example():
    train = shapes.generate("train", 2000, config=SMALL)
    test = shapes.generate("test", 2000, config=SMALL)
    train_hashes = {hashlib.sha256(r["image"].tobytes()).hexdigest() for r in train}
    test_hashes = {hashlib.sha256(r["image"].tobytes()).hexdigest() for r in test}
    assert len(train_hashes) == 2000 and len(test_hashes) == 2000  # no repeats inside a split either
    assert not train_hashes & test_hashes
    # the streams differ example by example, not only as sets
    assert sum(a["text"] == b["text"] for a, b in zip(train[:200], test[:200])) < 20


def test_start_offset_equals_slicing():
    whole = shapes.generate("validation", 35, seed=2, config=SMALL)
    tail = shapes.generate("validation", 10, seed=2, config=SMALL, start=25)
    assert len(tail) == 10
    for a, b in zip(whole[25:], tail):
        assert np.array_equal(a["image"], b["image"])
        assert (a["text"], a["question"], a["answer"], a["objects"]) == (b["text"], b["question"], b["answer"],
                                                                          b["objects"])


def test_captions_list_every_object_in_grid_reading_order():
    for row in shapes.generate("train", 300, config=SMALL):
        objs = objects(row)
        assert 1 <= len(objs) <= 3
        cells = [GRID.index(o["cell"]) for o in objs]
        assert cells == sorted(set(cells))  # distinct cells, in reading order
        phrase = [f"a {o['size']} {o['colour']} {o['shape']} {'in' if o['cell'] == 'center' else 'at'} the {o['cell']}"
                  for o in objs]
        assert row["text"] == " and ".join(phrase)
        for o in objs:
            assert f"{o['size']} {o['colour']} {o['shape']}" in row["text"]


def test_images_show_the_objects_in_their_cells():
    """The centre of the cell of a large, filled object has the object's colour (rings are hollow)."""
    config = shapes.ShapesConfig()
    cell = config.image_size / 3
    checked = 0
    for row in shapes.generate("test", 200, config=config):
        for o in objects(row):
            if o["size"] != "large" or o["shape"] == "ring":
                continue
            r, c = grid_position(o)
            y, x = int((r + 0.5) * cell), int((c + 0.5) * cell)
            patch = row["image"][y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(float)
            assert np.abs(np.median(patch, axis=0) - shapes.COLOURS[o["colour"]]).max() < 40, (row["text"], o)
            checked += 1
    assert checked > 100


def described(objs: list[dict], colour: str, shape: str) -> list[dict]:
    return [o for o in objs if o["colour"] == colour and o["shape"] == shape]


def test_answers_are_correct_for_every_question_type():
    seen = Counter()
    for row in shapes.generate("test", 300, config=SMALL):
        objs, answer, kind = objects(row), row["answer"], row["qtype"]
        match = QUESTION_PATTERNS[kind].fullmatch(row["question"])
        assert match, (kind, row["question"])
        seen[kind] += 1
        if kind == "count":
            assert answer == ["zero", "one", "two", "three"][len(objs)]
        elif kind == "shape":
            preposition, cell = match.groups()
            assert preposition == ("in" if cell == "center" else "at")
            assert answer == next(o["shape"] for o in objs if o["cell"] == cell)
        elif kind == "position":
            candidates = described(objs, *match.groups())
            assert candidates and answer in [o["cell"] for o in candidates]
        elif kind in ("colour", "size"):
            (shape,) = match.groups()
            same_shape = [o for o in objs if o["shape"] == shape]
            assert len(same_shape) == 1  # asked about a shape that occurs once
            assert answer == same_shape[0][kind]
        else:
            ca, sa, relation, cb, sb = match.groups()
            possible = set()
            for a in described(objs, ca, sa):
                for b in described(objs, cb, sb):
                    if a is b:
                        continue
                    (ra, col_a), (rb, col_b) = grid_position(a), grid_position(b)
                    if relation == "left of" and col_a != col_b:
                        possible.add("yes" if col_a < col_b else "no")
                    if relation == "above" and col_a == col_b:  # "above" is asked about objects in one column
                        possible.add("yes" if ra < rb else "no")
            assert answer in possible, (row["question"], objs)
    assert set(seen) == set(shapes.QUESTION_TYPES)


def test_position_and_relation_questions_describe_a_unique_object():
    ambiguous = []
    for row in shapes.generate("test", 1000, config=SMALL):
        match = QUESTION_PATTERNS[row["qtype"]].fullmatch(row["question"])
        if row["qtype"] == "position":
            descriptions = [match.groups()]
        elif row["qtype"] == "relation":
            descriptions = [match.group(1, 2), match.group(4, 5)]
        else:
            continue
        if any(len(described(objects(row), c, s)) != 1 for c, s in descriptions):
            ambiguous.append(row["question"])
    assert not ambiguous, ambiguous[:5]


def test_every_word_is_in_the_vocabulary_and_all_question_types_occur():
    vocabulary = shapes.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    words = Counter()
    for row in shapes.generate("train", 500, config=SMALL):
        for field in ("text", "question", "answer"):
            words.update(row[field].split())
    assert set(words) <= set(vocabulary), set(words) - set(vocabulary)
    assert {"circle", "ring", "purple", "bottom", "three", "?", "yes"} <= set(words)


def test_questions_and_captions_do_not_depend_on_the_image_size():
    for index in range(20):
        a, b = shapes.example(index, "test", config=SMALL), shapes.example(index, "test")
        assert (a["text"], a["question"], a["answer"]) == (b["text"], b["question"], b["answer"])


def test_image_size_is_configurable():
    for size in (24, 32, 80):
        row = shapes.example(5, "train", config=shapes.ShapesConfig(image_size=size))
        assert row["image"].shape == (size, size, 3) and row["image"].dtype == np.uint8
    assert load_source({"builtin": "shapes", "size": 3}, image_size=24)[0]["image"].size == (24, 24)
    assert load_source({"builtin": "shapes", "size": 3})[0]["image"].size == (80, 80)  # the default


def test_difficulty_majority_answer_and_caption_uniqueness():
    rows = shapes.generate("test", 1000)
    answers = Counter(r["answer"] for r in rows)
    majority = answers.most_common(1)[0][1] / len(rows)
    assert majority < 0.25  # always giving the most frequent answer: 0.08 at seed 0
    by_type: dict[str, Counter] = {}
    for r in rows:
        by_type.setdefault(r["qtype"], Counter())[r["answer"]] += 1
    per_type = sum(c.most_common(1)[0][1] for c in by_type.values()) / len(rows)
    assert per_type < 0.35  # the most frequent answer of each question type (knows the type): 0.325 at seed 0
    assert len({r["text"] for r in rows}) / len(rows) > 0.9


# ----------------------------------------------------------------------------------------------------------------
# data sources


@pytest.fixture(scope="module")
def builtin():
    return load_source({"builtin": "shapes", "split": "test", "size": 12}, image_size=32)


def assert_same_rows(a, b):
    assert list(a.column_names) == list(b.column_names)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(pixels(x["image"]), pixels(y["image"]))
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}


def test_builtin_source_has_image_and_text_columns(builtin):
    assert builtin.column_names[:2] == ["image", "text"]
    assert {"question", "answer", "qtype", "objects"} <= set(builtin.column_names)
    assert len(builtin) == 12 and isinstance(builtin[0]["image"], Image.Image)
    expected = shapes.example(0, "test", config=SMALL)
    assert builtin[0]["text"] == expected["text"]
    assert np.array_equal(pixels(builtin[0]["image"]), expected["image"])
    assert len(load_source({"builtin": "shapes"}, image_size=8)) == 1000  # size defaults to 1000


def test_export_image_folder_round_trip(builtin, tmp_path):
    folder = export_image_folder(builtin, tmp_path / "folder")
    assert folder == tmp_path / "folder"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:05d}.png" for i in range(12)]
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 12 and first["file_name"] == "images/00000.png" and "image" not in first
    assert first["text"] == builtin[0]["text"] and first["objects"] == builtin[0]["objects"]
    back = load_source({"path": str(folder)})
    assert_same_rows(builtin, back)
    assert_same_rows(builtin.select(range(5)), load_source({"path": str(folder), "size": 5}))
    with pytest.raises(DataError, match="not an empty folder"):
        export_image_folder(builtin, folder)


def test_export_accepts_generator_rows(tmp_path):
    rows = shapes.generate("train", 4, config=SMALL)
    back = load_source({"path": str(export_image_folder(rows, tmp_path / "rows"))})
    assert back["text"] == [r["text"] for r in rows]
    assert all(np.array_equal(pixels(b["image"]), r["image"]) for b, r in zip(back, rows))


def test_save_to_disk_dataset_and_dataset_dict(builtin, tmp_path):
    from datasets import DatasetDict

    builtin.save_to_disk(str(tmp_path / "saved"))
    assert_same_rows(builtin, load_source({"path": str(tmp_path / "saved")}))
    assert len(load_source({"path": str(tmp_path / "saved"), "size": 4})) == 4
    train = load_source({"builtin": "shapes", "split": "train", "size": 5}, image_size=32)
    DatasetDict({"train": train, "test": builtin}).save_to_disk(str(tmp_path / "dict"))
    assert_same_rows(builtin, load_source({"path": str(tmp_path / "dict"), "split": "test"}))
    assert_same_rows(train, load_source({"path": str(tmp_path / "dict")}))  # split defaults to train
    with pytest.raises(DataError) as e:
        load_source({"path": str(tmp_path / "dict"), "split": "validation"})
    assert "no split 'validation'" in str(e.value) and "splits: train, test" in str(e.value)


def test_custom_column_names(builtin, tmp_path):
    renamed = builtin.rename_columns({"image": "picture", "text": "caption"})
    renamed.save_to_disk(str(tmp_path / "saved"))
    loaded = load_source({"path": str(tmp_path / "saved"), "image_column": "picture", "text_column": "caption"})
    assert {"image", "text", "question"} <= set(loaded.column_names)
    assert not {"picture", "caption"} & set(loaded.column_names)
    assert loaded["text"] == builtin["text"]
    assert np.array_equal(pixels(loaded[3]["image"]), pixels(builtin[3]["image"]))
    # choosing another text column: the chosen one becomes `text`, the old `text` column is dropped
    questions = load_source({"path": str(tmp_path / "saved"), "image_column": "picture", "text_column": "question"})
    assert questions["text"] == builtin["question"]
    # an image folder whose captions are under another key
    folder = export_image_folder(builtin.rename_column("text", "caption"), tmp_path / "folder")
    assert load_source({"path": str(folder), "text_column": "caption"})["text"] == builtin["text"]


def test_vqa_columns_of_a_dataset_without_captions(builtin, tmp_path):
    """A VQA dataset (VQAv2-style `query` / `label` columns, no captions): question_column / answer_column become
    `question` / `answer`, which LLaVA's exact-match accuracy reads; a missing or non-string one is one line."""
    vqa = builtin.remove_columns(["text", "question", "answer"]).add_column("query", builtin["question"])
    vqa = vqa.add_column("label", builtin["answer"]).add_column("score", list(range(len(builtin))))
    vqa.save_to_disk(str(tmp_path / "vqa"))
    loaded = load_source({"path": str(tmp_path / "vqa"), "question_column": "query", "answer_column": "label"})
    assert loaded["question"] == builtin["question"] and loaded["answer"] == builtin["answer"]
    assert "text" not in loaded.column_names and not {"query", "label"} & set(loaded.column_names)
    message = data_error({"path": str(tmp_path / "vqa"), "question_column": "prompt", "answer_column": "label"})
    assert "no column 'prompt'" in message and "question_column" in message and "query" in message
    message = data_error({"path": str(tmp_path / "vqa"), "question_column": "query", "answer_column": "score"})
    assert "'score' holds int64 values, not strings" in message and "answer_column" in message
    # a caption dataset still needs its text column
    assert "no column 'text'" in data_error({"path": str(tmp_path / "vqa")})


def test_load_rows_for_a_folder_gives_rgb_images_and_honours_size(builtin, tmp_path):
    from vlmcompress.recipe import DataSource

    folder = export_image_folder(builtin.select(range(6)), tmp_path / "folder")
    rows = load_rows(DataSource(path=str(folder)), model=None)
    assert [r["text"] for r in rows] == builtin["text"][:6]
    assert rows[0]["image"].mode == "RGB"
    assert len(load_rows(DataSource(path=str(folder), size=2), model=None)) == 2
    assert len(load_rows(DataSource(path=str(folder), size=2), model=None, size=5)) == 5  # the override wins


# ---- bad input: one clear line each


def data_error(source: dict) -> str:
    with pytest.raises(DataError) as e:
        load_source(source)
    message = str(e.value)
    assert "\n" not in message
    assert isinstance(e.value, VlmCompressError)
    return message


def write_folder(folder, lines: list[str], images: dict[str, bytes] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (images or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def png_bytes(colour=(200, 30, 30)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_missing_folder(tmp_path):
    message = data_error({"path": str(tmp_path / "nowhere")})
    assert "nowhere" in message and "does not exist" in message


def test_folder_without_metadata_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.png").write_bytes(png_bytes())
    message = data_error({"path": str(tmp_path / "plain")})
    assert "no metadata.jsonl" in message and "save_to_disk" in message


def test_metadata_line_that_is_not_json(tmp_path):
    folder = write_folder(tmp_path / "f", ['{"file_name": "a.png", "text": "one"}', "",
                                           '{"file_name": "b.png", "text": "two"', '{"file_name": "c.png"}'],
                          {"a.png": png_bytes(), "b.png": png_bytes()})
    message = data_error({"path": str(folder)})
    assert "metadata.jsonl:3" in message and "not valid JSON" in message


def test_metadata_line_without_file_name_or_text(tmp_path):
    message = data_error({"path": str(write_folder(tmp_path / "a", ['{"text": "one"}']))})
    assert "metadata.jsonl:1" in message and "'file_name'" in message
    folder = write_folder(tmp_path / "b", ['{"file_name": "a.png", "text": "one"}', '{"file_name": "b.png"}'],
                          {"a.png": png_bytes(), "b.png": png_bytes()})
    message = data_error({"path": str(folder)})
    assert "metadata.jsonl:2" in message and "'text'" in message and "text_column" in message


def test_missing_columns_name_the_column_the_key_and_the_available_ones(builtin, tmp_path):
    folder = write_folder(tmp_path / "f", ['{"file_name": "a.png", "text": "one", "label": 3}'],
                          {"a.png": png_bytes()})
    message = data_error({"path": str(folder), "text_column": "caption"})
    assert "'caption'" in message and "text_column" in message and "available columns: image, text, label" in message
    message = data_error({"path": str(folder), "image_column": "photo"})
    assert "'photo'" in message and "image_column" in message and "available columns: image, text, label" in message
    builtin.save_to_disk(str(tmp_path / "saved"))
    message = data_error({"path": str(tmp_path / "saved"), "image_column": "img"})
    assert "'img'" in message and "image_column" in message
    assert "available columns: image, text, question, answer, qtype, objects" in message
    message = data_error({"path": str(tmp_path / "saved"), "text_column": "caption"})
    assert "'caption'" in message and "text_column" in message


def test_columns_of_the_wrong_kind(tmp_path):
    folder = write_folder(tmp_path / "f", ['{"file_name": "a.png", "text": "one", "label": 3}'],
                          {"a.png": png_bytes()})
    message = data_error({"path": str(folder), "text_column": "label"})
    assert "'label'" in message and "not strings" in message and "text_column" in message
    message = data_error({"path": str(folder), "image_column": "text"})
    assert "'text'" in message and "not images" in message and "image_column" in message


def test_missing_image_file(tmp_path):
    folder = write_folder(tmp_path / "f", ['{"file_name": "images/a.png", "text": "one"}',
                                           '{"file_name": "images/missing.png", "text": "two"}'],
                          {"images/a.png": png_bytes()})
    message = data_error({"path": str(folder)})
    assert "images/missing.png" in message and "not found" in message and "metadata.jsonl:2" in message
    # only the first `size` rows are read
    assert len(load_source({"path": str(folder), "size": 1})) == 1


def test_corrupt_image_files(tmp_path):
    good = png_bytes()
    for name, data in (("garbage.png", b"this is not a png"), ("truncated.png", good[: len(good) // 2]),
                       ("cut_end.png", good[:-6])):
        folder = write_folder(tmp_path / name, ['{"file_name": "ok.png", "text": "one"}',
                                                f'{{"file_name": "{name}", "text": "two"}}'],
                              {"ok.png": good, name: data})
        message = data_error({"path": str(folder)})
        assert name in message and "corrupt" in message


def test_invalid_source_mapping():
    message = data_error({"builtin": "shapes", "path": "somewhere"})
    assert "exactly one of builtin / path / hf" in message
    message = data_error({"builtin": "shapes", "split": "dev"})
    assert "'dev'" in message and "train, validation, test" in message


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = data_error({"hf": "nonexistent/x", "split": "train"})
    assert "'nonexistent/x'" in message and "HF_HUB_OFFLINE" in message and "save_to_disk" in message
