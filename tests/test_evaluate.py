"""Retrieval metrics against a slow reference, the shipped `shapes-clip-small` teacher's accuracy, and the zoo's
integrity check / retraining fallback."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmcompress import zoo  # noqa: E402
from vlmcompress.errors import ModelLoadError, VlmCompressError  # noqa: E402
from vlmcompress.evaluate import evaluate_dual_encoder, recall_at_k, shapes_eval_rows  # noqa: E402

SHIPPED = zoo.ZOO_DIR / "shapes-clip-small"  # the real folder; tests only ever read it


# ----------------------------------------------------------------------------------------------------------------
# recall@K


def slow_recall(image_emb, text_emb, captions, fold_size, k):
    """Recall@k both ways by brute force: rank the fold by dot product, hit if a top-k caption string matches."""
    image_rows, text_rows = image_emb.tolist(), text_emb.tolist()
    folds = len(captions) // fold_size
    i2t_total = t2i_total = 0.0
    for f in range(folds):
        idx = list(range(f * fold_size, (f + 1) * fold_size))
        i2t_hits = t2i_hits = 0
        for q in idx:
            by_text = sorted(idx, key=lambda j: -sum(a * b for a, b in zip(image_rows[q], text_rows[j])))
            i2t_hits += any(captions[j] == captions[q] for j in by_text[:k])
            by_image = sorted(idx, key=lambda j: -sum(a * b for a, b in zip(text_rows[q], image_rows[j])))
            t2i_hits += any(captions[j] == captions[q] for j in by_image[:k])
        i2t_total += i2t_hits / fold_size
        t2i_total += t2i_hits / fold_size
    return i2t_total / folds, t2i_total / folds


def test_recall_matches_a_brute_force_loop_with_duplicate_captions():
    gen = torch.Generator().manual_seed(0)
    n, fold_size = 60, 20
    captions = [f"caption {int(c)}" for c in torch.randint(0, 12, (n,), generator=gen)]  # many duplicates
    assert len(set(captions)) < n
    text = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen, dtype=torch.float64), dim=-1)
    # images near their own text so that the recalls are neither 0 nor 1
    image = torch.nn.functional.normalize(text + 0.9 * torch.randn(n, 8, generator=gen, dtype=torch.float64), dim=-1)
    result = recall_at_k(image, text, captions, fold_size=fold_size)
    assert result["folds"] == 3 and result["fold_size"] == 20
    values = []
    for k in (1, 5, 10):
        i2t, t2i = slow_recall(image, text, captions, fold_size, k)
        assert result[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-4)
        assert result[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-4)
        values += [i2t, t2i]
    assert any(0.05 < v < 0.95 for v in values)  # the case is not trivial
    assert any(result[f"i2t_R@{k}"] != result[f"t2i_R@{k}"] for k in (1, 5, 10))  # the directions differ here


def test_perfect_embeddings_give_recall_one():
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    result = recall_at_k(emb, emb.clone(), [f"caption {i}" for i in range(40)], fold_size=20)
    for k in (1, 5, 10):
        assert result[f"i2t_R@{k}"] == 1.0 and result[f"t2i_R@{k}"] == 1.0
    # negative control: one-hot embeddings, texts shifted by one inside each fold → no image finds its own text
    onehot = torch.eye(40)
    shifted = torch.cat([onehot[1:20], onehot[:1], onehot[21:40], onehot[20:21]])
    wrong = recall_at_k(onehot, shifted, [f"caption {i}" for i in range(40)], fold_size=20, ks=(1,))
    assert wrong["i2t_R@1"] == 0.0 and wrong["t2i_R@1"] == 0.0


def test_a_different_index_with_the_same_caption_counts_as_a_hit():
    basis = torch.eye(3)
    text = basis.clone()
    image = basis[[1, 0, 2]]  # image 0 retrieves text 1 first, image 1 retrieves text 0
    duplicated = recall_at_k(image, text, ["red circle", "red circle", "blue ring"], ks=(1,))
    assert duplicated["i2t_R@1"] == 1.0 and duplicated["t2i_R@1"] == 1.0
    unique = recall_at_k(image, text, ["red circle", "green circle", "blue ring"], ks=(1,))
    assert unique["i2t_R@1"] == pytest.approx(1 / 3, abs=1e-4) and unique["t2i_R@1"] == pytest.approx(1 / 3, abs=1e-4)


def exact_chance(captions, k):
    """Mean over queries of P(a relevant item in the top k) over every ordering of the fold."""
    n = len(captions)
    total = 0.0
    for q in range(n):
        orders = list(itertools.permutations(range(n)))
        total += sum(any(captions[j] == captions[q] for j in order[:k]) for order in orders) / len(orders)
    return total / n


def test_chance_baseline_is_exact_and_matches_random_rankings():
    captions = ["a", "a", "a", "b", "b", "c"]
    emb = torch.eye(6)
    result = recall_at_k(emb, emb, captions, ks=(1, 2, 3))
    for k in (1, 2, 3):
        assert result[f"chance_R@{k}"] == pytest.approx(exact_chance(captions, k), abs=1e-4)
    assert result["chance_R@1"] == pytest.approx((3 * 3 + 2 * 2 + 1) / 36, abs=1e-4)
    # random embeddings: mean recall over many draws approaches the chance number
    gen = torch.Generator().manual_seed(2)
    draws = [recall_at_k(torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), captions, ks=(1, 2))
             for _ in range(400)]
    for k in (1, 2):
        mean = sum(d[f"i2t_R@{k}"] + d[f"t2i_R@{k}"] for d in draws) / (2 * len(draws))
        assert mean == pytest.approx(result[f"chance_R@{k}"], abs=0.04)


def test_majority_baseline():
    captions = ["a", "a", "a", "b", "x", "y", "z", "w"]  # fold 1: 3 of 4 share a caption; fold 2: all unique
    emb = torch.eye(8)
    result = recall_at_k(emb, emb, captions, fold_size=4, ks=(1,))
    assert result["majority_R@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert recall_at_k(emb, emb, captions, ks=(1,))["majority_R@1"] == pytest.approx(3 / 8)  # one fold of 8


def test_rows_beyond_whole_folds_are_left_out_and_counted():
    emb = torch.eye(10)
    result = recall_at_k(emb, emb, [f"c{i}" for i in range(10)], fold_size=4, ks=(1,))
    assert (result["folds"], result["fold_size"], result["pairs_left_out"]) == (2, 4, 2)


# ----------------------------------------------------------------------------------------------------------------
# the shipped teacher


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads are ~8x slower for these small models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(one_thread):
    from vlmcompress.models import load_model

    model, processor = load_model("shapes-clip-small")
    rows = shapes_eval_rows(model, 1000)
    return model, processor, rows


def test_shipped_teacher_retrieves_well_above_chance(teacher):
    model, processor, rows = teacher
    assert model.config.vision_config.image_size == 32 and rows[0]["image"].shape == (32, 32, 3)
    result = evaluate_dual_encoder(model, processor, rows)
    assert result["folds"] == 1 and result["fold_size"] == 1000
    assert result["chance_R@1"] < 0.01
    assert result["i2t_R@1"] > 0.1 and result["t2i_R@1"] > 0.1
    assert result["i2t_R@10"] > 0.5 and result["t2i_R@10"] > 0.5
    assert result["zero_shot_n"] > 100
    assert result["zero_shot_shape"] > result["zero_shot_chance"] + 0.05


def test_random_weights_of_the_same_config_score_at_chance(teacher):
    model, processor, rows = teacher
    torch.manual_seed(1234)
    random_model = type(model)(model.config).eval()
    result = evaluate_dual_encoder(random_model, processor, rows)
    assert result["i2t_R@1"] < 0.05 and result["t2i_R@1"] < 0.05


def test_evaluation_needs_a_processor(teacher):
    model, _, rows = teacher
    with pytest.raises(VlmCompressError, match="no saved processor"):
        evaluate_dual_encoder(model, None, rows[:10])


# ----------------------------------------------------------------------------------------------------------------
# the zoo


def corrupt_copy(destination):
    shutil.copytree(SHIPPED, destination)
    weights = destination / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return destination


def test_verify_detects_one_changed_byte_and_a_missing_file(tmp_path):
    assert zoo.verify(SHIPPED)
    good = tmp_path / "good"
    shutil.copytree(SHIPPED, good)
    assert zoo.verify(good)
    assert not zoo.verify(corrupt_copy(tmp_path / "corrupt"))
    (good / "tokenizer.json").unlink()
    assert not zoo.verify(good)
    assert not zoo.verify(tmp_path / "nowhere")
    assert zoo.verify(SHIPPED)  # the shipped folder was not touched


def test_corrupt_shipped_weights_are_retrained_into_the_cache(tmp_path, monkeypatch):
    corrupt_copy(tmp_path / "zoo" / "shapes-clip-small")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setenv("VLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    calls = []

    def retrain(name, folder):
        calls.append((name, folder))
        shutil.copytree(SHIPPED, folder)

    assert not zoo.verify(tmp_path / "zoo" / "shapes-clip-small")
    folder = zoo.zoo_folder("shapes-clip-small", retrain=retrain)
    assert [name for name, _ in calls] == ["shapes-clip-small"]  # trained into a temporary folder, then renamed
    assert folder == tmp_path / "cache" / "shapes-clip-small" and zoo.verify(folder)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".shapes-clip-small.lock", "shapes-clip-small"]
    # the verified cache is used from now on, without retraining
    assert zoo.zoo_folder("shapes-clip-small", retrain=retrain) == folder and len(calls) == 1


def test_a_retrain_that_does_not_match_its_manifest_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setenv("VLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="did not produce files matching"):
        zoo.zoo_folder("shapes-clip-small", retrain=lambda name, folder: corrupt_copy(folder))


def test_intact_shipped_weights_are_used_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    calls = []
    assert zoo.zoo_folder("shapes-clip-small", retrain=lambda *a: calls.append(a)) == SHIPPED
    assert calls == [] and not (tmp_path / "cache").exists()


def test_unknown_teacher_lists_the_names():
    with pytest.raises(ModelLoadError) as e:
        zoo.zoo_folder("shapes-clip-tiny", retrain=lambda *a: pytest.fail("must not retrain"))
    message = str(e.value)
    assert "'shapes-clip-tiny'" in message
    assert all(name in message for name in zoo.ZOO) and len(zoo.ZOO) >= 4



CONCURRENT_FIRST_USE = """
import shutil, sys, time
from pathlib import Path
from vlmcompress import zoo
zoo.ZOO_DIR = Path(sys.argv[1])
def retrain(name, folder):
    with open(sys.argv[3], "a") as log:
        log.write("trained\\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one trains
    shutil.copytree(sys.argv[2], folder)
print(zoo.zoo_folder("shapes-clip-small", retrain=retrain))
"""


def test_two_processes_on_an_empty_cache_train_once_and_both_get_the_teacher(tmp_path):
    import os
    import subprocess
    import sys

    corrupt_copy(tmp_path / "zoo" / "shapes-clip-small")
    log = tmp_path / "log.txt"
    env = dict(os.environ, VLMCOMPRESS_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-c", CONCURRENT_FIRST_USE, str(tmp_path / "zoo"), str(SHIPPED), str(log)]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert log.read_text() == "trained\n"  # the second waited for the first, then found the verified entry
    assert {o.strip().splitlines()[-1] for o, _ in outs} == {str(tmp_path / "cache" / "shapes-clip-small")}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".shapes-clip-small.lock", "shapes-clip-small"]
    assert zoo.verify(tmp_path / "cache" / "shapes-clip-small")
