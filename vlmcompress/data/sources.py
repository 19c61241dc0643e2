"""Recipe data sources as `datasets.Dataset`s: the built-in `shapes` world, local folders and Hugging Face datasets.

Every source comes back with an `image` column (PIL images) and a `text` column, renamed from the recipe's
`image_column` / `text_column`; other columns are kept. Local folders are either

- an image folder in the layout of Hugging Face's `imagefolder`: a `metadata.jsonl` with one JSON object per line,
  each with a `file_name` (relative to the folder) and the text column; the images become the `image` column and
  `file_name` is dropped, or
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (the source's `split` picks the split of a
  `DatasetDict`).

`export_image_folder` writes any such dataset as an image folder that `load_source({"path": folder})` reads back
with the same texts and the same pixels. Every problem is one line of `DataError` that names the file, line or
column and says what to change.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import VlmCompressError

METADATA = "metadata.jsonl"
# formats PNG stores losslessly as they are; other modes (CMYK, YCbCr, F, ...) are written as RGB
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


class DataError(VlmCompressError):
    """A data source that cannot be read: a missing folder, a bad metadata line, a missing column or image."""


def load_source(source: Any, image_size: int | None = None):
    """The recipe data `source` (a `DataSource` or a dict of its keys) as a `datasets.Dataset` with `image` (PIL)
    and `text` columns; `image_size` sets the resolution of the built-in world (default 80) and nothing else.

    Raises:
        DataError: the source is invalid, missing or unreadable; the message says what to fix.
    """
    source = _as_source(source)
    if source.builtin is not None:
        dataset, where = _load_builtin(source, image_size), f"builtin {source.builtin}"
    elif source.path is not None:
        dataset, where = _load_folder(source), f"data folder '{source.path}'"
    else:
        dataset, where = _load_hub(source), f"Hugging Face dataset '{source.hf}'"
    return _standard_columns(dataset, source, where)


def export_image_folder(dataset: Any, folder: str | Path) -> Path:
    """Write `dataset` (a `datasets.Dataset` or a list of dicts with an `image` column) as an image folder:
    `images/00000.png`, ... and `metadata.jsonl` with `file_name` and every non-image column. Returns the folder.

    Raises:
        DataError: the folder exists and is not empty, or the dataset has no `image` column.
    """
    from PIL import Image as PILImage

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"cannot export to '{folder}': it exists and is not an empty folder; choose a new folder")
    image_columns = _image_columns(dataset)
    if "image" not in image_columns:
        raise DataError(f"cannot export: the dataset has no 'image' column (columns: {', '.join(_columns(dataset))})")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(dataset):
        image = row["image"]
        if not isinstance(image, PILImage.Image):
            image = PILImage.fromarray(_to_array(image))
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        name = f"images/{i:05d}.png"
        image.save(folder / name, format="PNG")
        meta = {"file_name": name} | {k: v for k, v in row.items() if k not in image_columns}
        try:
            lines.append(json.dumps(meta, ensure_ascii=False, default=_json_default))
        except TypeError as e:
            raise DataError(f"cannot export row {i}: {e}; keep only text, number and list columns") from None
    (folder / METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# the three kinds of source


def _as_source(source: Any):
    from pydantic import ValidationError

    from .schema import DataSource

    if isinstance(source, DataSource):
        return source
    if not isinstance(source, dict):
        raise DataError(f"a data source is a mapping like {{builtin: shapes, split: train, size: 512}}, "
                        f"{{path: DIR}} or {{hf: ID}}; got {type(source).__name__}")
    try:
        return DataSource.model_validate(source)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'source'}: {err['msg']}" for err in e.errors())
        raise DataError(f"invalid data source {source}: {problems}") from None


def _load_builtin(source, image_size: int | None):
    from . import shapes

    if source.split not in shapes.SPLITS:
        raise DataError(f"builtin {source.builtin} has no split '{source.split}'; splits: {', '.join(shapes.SPLITS)}")
    config = shapes.ShapesConfig(image_size=image_size or 80)
    return shapes.to_dataset(source.split, source.size or 1000, seed=0, config=config)


def _load_folder(source):
    folder = Path(source.path).expanduser()
    if not folder.exists():
        raise DataError(f"data folder '{folder}' does not exist; give an image folder with {METADATA} or a folder "
                        "written by datasets' save_to_disk")
    if not folder.is_dir():
        raise DataError(f"data path '{folder}' is a file; give a folder (an image folder with {METADATA} or a "
                        "folder written by datasets' save_to_disk)")
    if (folder / METADATA).is_file():
        return _load_image_folder(folder, source)
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        return _load_saved(folder, source)
    raise DataError(f"folder '{folder}' has no {METADATA} and is not a saved dataset (no dataset_info.json or "
                    f"dataset_dict.json); add a {METADATA} with one line per image like "
                    '{"file_name": "images/00000.png", "text": "a caption"}, or write it with save_to_disk')


def _load_image_folder(folder: Path, source):
    from datasets import Dataset, Features, Image

    metadata = folder / METADATA
    rows: list[tuple[int, dict]] = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if source.size is not None and len(rows) == source.size:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{metadata}:{number}: not valid JSON ({e.msg}); each line must be one JSON object like "
                            '{"file_name": "images/00000.png", "text": "a caption"}') from None
        if not isinstance(row, dict):
            raise DataError(f"{metadata}:{number}: expected a JSON object, got {type(row).__name__}")
        if "file_name" not in row:
            raise DataError(f"{metadata}:{number}: no 'file_name' key (the image's path relative to {folder}); "
                            f"keys: {', '.join(row) or 'none'}")
        if "image" in row:
            raise DataError(f"{metadata}:{number}: a key named 'image' clashes with the image column built from "
                            "file_name; rename that key")
        rows.append((number, row))
    if not rows:
        raise DataError(f"{metadata} lists no images; add one JSON line per image with file_name and the caption")
    columns = list(dict.fromkeys(k for _, row in rows for k in row if k != "file_name"))
    text = source.text_column
    if text not in columns:  # checked before any image is read: the cheap mistakes first
        raise DataError(_missing_column(text, "text_column", ["image", *columns], str(metadata)))
    for number, row in rows:
        if text not in row:
            raise DataError(f"{metadata}:{number}: no '{text}' key (the text column, set by the recipe key "
                            f"text_column); keys: {', '.join(row)}")
    images = [_read_image(folder, row["file_name"], f"{metadata}:{number}") for number, row in rows]
    try:
        plain = Dataset.from_list([{k: row.get(k) for k in columns} for _, row in rows])
    except Exception as e:  # pyarrow cannot put the values of one key into one column
        raise DataError(f"{metadata}: a key holds values of different types in different lines "
                        f"({type(e).__name__}: {_one_line(e)}); give every line the same types") from None
    features = Features({"image": Image(), **plain.features})
    return Dataset.from_list([{"image": image} | {k: row.get(k) for k in columns}
                              for image, (_, row) in zip(images, rows)], features=features)


def _read_image(folder: Path, file_name: Any, where: str) -> dict:
    """`{"path", "bytes"}` of an image file after checking that PIL can read it."""
    from PIL import Image as PILImage

    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: file_name must be a non-empty string, got {file_name!r}")
    path = folder / file_name
    if not path.is_file():
        raise DataError(f"{where}: image file '{file_name}' not found (looked for {path})")
    data = path.read_bytes()
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise DataError(f"{where}: image file '{file_name}' is corrupt or not an image "
                        f"({type(e).__name__}: {_one_line(e)})") from None
    return {"path": str(path), "bytes": data}


def _load_saved(folder: Path, source):
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ... for broken folders
        raise DataError(f"folder '{folder}' looks like a saved dataset but cannot be read "
                        f"({type(e).__name__}: {_one_line(e)}); write it again with save_to_disk") from None
    if isinstance(loaded, DatasetDict):
        if source.split not in loaded:
            raise DataError(f"saved dataset '{folder}' has no split '{source.split}'; splits: {', '.join(loaded)}; "
                            "set `split:` in the data source")
        loaded = loaded[source.split]
    return _first(loaded, source.size)


def _load_hub(source):
    import os

    from datasets import load_dataset

    try:
        dataset = load_dataset(source.hf, split=source.split)
    except Exception as e:  # offline, unknown id, unknown split, gated, ...: all reported the same way
        offline = any(os.environ.get(v, "0").strip().lower() not in ("", "0", "false", "no", "off")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = ("the Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not in the local "
                "cache" if offline else "check the id and the split, and that the Hub can be reached")
        raise DataError(f"cannot load Hugging Face dataset '{source.hf}' (split '{source.split}'): "
                        f"{type(e).__name__}: {_one_line(e)}; {hint}; or save it elsewhere with save_to_disk and "
                        "use {path: FOLDER}") from None
    return _first(dataset, source.size)


# ----------------------------------------------------------------------------------------------------------------
# columns


def _standard_columns(dataset, source, where: str):
    """Rename the configured image / text columns to `image` / `text` after checking they hold images / strings."""
    from datasets import Image, Value

    columns = list(dataset.column_names)
    # a VQA dataset (question / answer columns given) may have no captions: its default text column may be absent
    vqa = source.question_column is not None or source.answer_column is not None
    text_column = None if vqa and source.text_column == "text" and "text" not in columns else source.text_column
    wanted = {"image_column": source.image_column, "text_column": text_column,
              "question_column": source.question_column, "answer_column": source.answer_column}
    for key, name in wanted.items():
        if name is not None and name not in columns:
            raise DataError(_missing_column(name, key, columns, where))
    image_feature = dataset.features[source.image_column]
    if not isinstance(image_feature, Image):
        raise DataError(f"{where}: column '{source.image_column}' holds {_feature_name(image_feature)} values, not "
                        "images; set the recipe key image_column to a column of images "
                        f"(columns: {', '.join(columns)})")
    for key in ("text_column", "question_column", "answer_column"):
        name = wanted[key]
        feature = None if name is None else dataset.features[name]
        if feature is not None and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            what = "one caption" if key == "text_column" else f"one {key.split('_')[0]}"
            raise DataError(f"{where}: column '{name}' holds {_feature_name(feature)} values, not strings; set the "
                            f"recipe key {key} to a column with {what} per row (columns: {', '.join(columns)})")
    renames = ((source.image_column, "image"), (text_column, "text"), (source.question_column, "question"),
               (source.answer_column, "answer"))
    for name, target in ((n, t) for n, t in renames if n is not None):
        if name != target:
            if target in dataset.column_names:  # another column has the standard name: the configured one wins
                dataset = dataset.remove_columns(target)
            dataset = dataset.rename_column(name, target)
    return dataset


def _missing_column(name: str, key: str, available: Iterable[str], where: str) -> str:
    return (f"{where}: no column '{name}' (set by the recipe key {key}); available columns: "
            f"{', '.join(available) or 'none'}")


def _feature_name(feature: Any) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _first(dataset, size: int | None):
    return dataset.select(range(min(size, len(dataset)))) if size is not None else dataset


def _image_columns(dataset: Any) -> set[str]:
    features = getattr(dataset, "features", None)
    if features is not None:
        from datasets import Image

        return {k for k, f in features.items() if isinstance(f, Image)}
    rows = list(dataset[:1]) if isinstance(dataset, list) else []
    return {k for k, v in (rows[0].items() if rows else []) if _is_image(v)}


def _is_image(value: Any) -> bool:
    import numpy as np
    from PIL import Image as PILImage

    return isinstance(value, PILImage.Image) or (isinstance(value, np.ndarray) and value.ndim in (2, 3))


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    return list(dataset[0]) if isinstance(dataset, list) and dataset else []


def _to_array(value: Any):
    import numpy as np

    array = np.asarray(value)
    if array.dtype != np.uint8:
        raise DataError(f"cannot export an image of dtype {array.dtype}; expected uint8 arrays or PIL images")
    return array


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} value to {METADATA}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
