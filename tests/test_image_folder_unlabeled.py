"""The unlabeled folder of an image folder dataset (semi-supervised training).

Fixtures are a few tiny solid-color PNGs written with PIL; expected pixels come from
``decode_image`` on the same files, expected counts from the files written.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convrecipes.data.image_folder as image_folder_mod
from convrecipes.data.image_folder import decode_image, load_image_folder, load_unlabeled_folder
from convrecipes.errors import DataError


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (5, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture()
def flat(tmp_path):
    """cats/ and dogs/ (3 PNGs each) next to unlabeled/ (2 PNGs, 1 in a nested subfolder)."""
    root = tmp_path / "pets"
    for c, name in enumerate(["cats", "dogs"]):
        for i in range(3):
            _png(root / name / f"{i}.png", (50 * i + c, 10 + c, 30))
    _png(root / "unlabeled" / "b.png", (200, 100, 0))
    _png(root / "unlabeled" / "nested" / "deeper" / "a.png", (0, 100, 200), size=(4, 6))
    (root / "unlabeled" / "readme.txt").write_text("not an image")
    (root / "unlabeled" / "._b.png").write_bytes(b"macOS resource fork")
    return root


def test_the_named_unlabeled_folder_is_not_a_class_and_is_one_without_the_name(flat, tmp_path):
    cache = tmp_path / "cache"
    named = load_image_folder(flat, "train", image_size=2, cache_dir=cache, unlabeled_folder="unlabeled")
    named_test = load_image_folder(flat, "test", image_size=2, cache_dir=cache, unlabeled_folder="unlabeled")
    assert named.classes == named_test.classes == ["cats", "dogs"]
    assert len(named) + len(named_test) == 6
    named_cache = {p.name for p in (cache / "image_folder").glob("*.safetensors")}
    plain = load_image_folder(flat, "train", image_size=2, cache_dir=cache)
    plain_test = load_image_folder(flat, "test", image_size=2, cache_dir=cache)
    assert plain.classes == ["cats", "dogs", "unlabeled"]
    assert len(plain) + len(plain_test) == 8
    # the class list is in the cache key: the plain load did not reuse the named load's entry
    plain_cache = {p.name for p in (cache / "image_folder").glob("*.safetensors")}
    assert len(named_cache) == len(plain_cache) == 1 and named_cache != plain_cache


def test_split_layout_skips_the_named_folder_inside_train(tmp_path):
    root = tmp_path / "split"
    for name in ("a", "b"):
        _png(root / "train" / name / "x.png", (10, 20, 30))
        _png(root / "test" / name / "y.png", (30, 20, 10))
    _png(root / "train" / "unlabeled" / "z.png", (1, 2, 3))
    _png(root / "unlabeled" / "u.png", (4, 5, 6))
    cache = tmp_path / "cache"
    train = load_image_folder(root, "train", image_size=2, cache_dir=cache, unlabeled_folder="unlabeled")
    assert train.classes == ["a", "b"] and len(train) == 2
    assert load_image_folder(root, "train", image_size=2, cache_dir=cache).classes == ["a", "b", "unlabeled"]
    # in the split layout the unlabeled folder is the one at the root, next to train/ and test/
    unlabeled = load_unlabeled_folder(root, "unlabeled", 2, 3, cache, train.classes)
    assert len(unlabeled) == 1
    assert torch.equal(unlabeled.images[0], torch.from_numpy(decode_image(root / "unlabeled" / "u.png", 2, 3).copy()))


@pytest.mark.parametrize("channels", [1, 3])
def test_unlabeled_images_count_shape_labels_classes_and_pixels(flat, tmp_path, channels):
    classes = load_image_folder(flat, "train", image_size=3, channels=channels, cache_dir=tmp_path / "cache",
                                unlabeled_folder="unlabeled").classes
    ds = load_unlabeled_folder(flat, "unlabeled", 3, channels, tmp_path / "cache", classes)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (2, channels, 3, 3)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [-1, -1]
    assert ds.classes == ["cats", "dogs"]
    # sorted path order: "b.png" < "nested/deeper/a.png"; the nested file is found
    for img, rel in zip(ds.images, ["b.png", "nested/deeper/a.png"]):
        expected = decode_image(flat / "unlabeled" / rel, 3, channels)
        assert np.array_equal(img.numpy(), expected)


def test_missing_and_empty_unlabeled_folders_are_refused_with_the_path(flat, tmp_path):
    cache = tmp_path / "cache"
    missing = flat / "extra"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*create it.*unset data.unlabeled_folder"):
        load_unlabeled_folder(flat, "extra", 2, 3, cache, ["cats", "dogs"])
    empty = flat / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=re.escape(str(empty))):
        load_unlabeled_folder(flat, "empty", 2, 3, cache, ["cats", "dogs"])
    junk = flat / "junk"
    junk.mkdir()
    (junk / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 image files under " + re.escape(str(junk))):
        load_unlabeled_folder(flat, "junk", 2, 3, cache, ["cats", "dogs"])


def test_unlabeled_folder_in_train_of_the_split_layout_says_where_it_goes(tmp_path):
    root = tmp_path / "split"
    for name in ("a", "b"):
        _png(root / "train" / name / "x.png", (10, 20, 30))
        _png(root / "test" / name / "y.png", (30, 20, 10))
    _png(root / "train" / "unlabeled" / "z.png", (1, 2, 3))
    with pytest.raises(DataError, match="move it to " + re.escape(str(root / "unlabeled"))):
        load_unlabeled_folder(root, "unlabeled", 2, 3, tmp_path / "cache", ["a", "b"])
    with pytest.raises(DataError, match="split folder"):
        load_image_folder(root, "train", image_size=2, cache_dir=tmp_path / "cache", unlabeled_folder="test")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_unlabeled_folder_must_be_one_folder_name(flat, tmp_path, name):
    with pytest.raises(DataError, match="data.unlabeled_folder must be the name of one folder"):
        load_unlabeled_folder(flat, name, 2, 3, tmp_path / "cache", ["cats", "dogs"])
    with pytest.raises(DataError, match="data.unlabeled_folder must be the name of one folder"):
        load_image_folder(flat, "train", image_size=2, cache_dir=tmp_path / "cache", unlabeled_folder=name)


def test_an_unlabeled_folder_that_is_also_a_class_is_refused(flat, tmp_path):
    classes = load_image_folder(flat, "train", image_size=2, cache_dir=tmp_path / "cache").classes
    with pytest.raises(DataError, match="also the class 'unlabeled'"):
        load_unlabeled_folder(flat, "unlabeled", 2, 3, tmp_path / "cache", classes)


def test_unreadable_unlabeled_files_are_skipped_and_reported_once(flat, tmp_path, capsys):
    (flat / "unlabeled" / "broken.png").write_bytes(b"\x89PNG not really")
    first = load_unlabeled_folder(flat, "unlabeled", 2, 3, tmp_path / "cache", ["cats", "dogs"])
    second = load_unlabeled_folder(flat, "unlabeled", 2, 3, tmp_path / "cache", ["cats", "dogs"])
    assert len(first) == len(second) == 2
    err = capsys.readouterr().err
    assert err.count("image_folder: skipped") == 1 and str(flat / "unlabeled" / "broken.png") in err


def test_second_load_reads_the_cache_and_a_change_re_decodes(flat, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_unlabeled_folder(flat, "unlabeled", 2, 3, cache, ["cats", "dogs"])

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(image_folder_mod, "decode_image", refuse)
    # other classes are only carried along: the same cache entry serves them
    second = load_unlabeled_folder(flat, "unlabeled", 2, 3, cache, ["x", "y", "z"])
    assert torch.equal(first.images, second.images) and second.labels.tolist() == [-1, -1]
    assert second.classes == ["x", "y", "z"]
    assert len(list((cache / "image_folder").glob("*.safetensors"))) == 1

    monkeypatch.undo()
    _png(flat / "unlabeled" / "c.png", (9, 9, 9))
    third = load_unlabeled_folder(flat, "unlabeled", 2, 3, cache, ["cats", "dogs"])
    assert len(third) == 3
    assert len(list((cache / "image_folder").glob("*.safetensors"))) == 1  # the stale entry is replaced
    # another size is its own entry
    assert load_unlabeled_folder(flat, "unlabeled", 4, 3, cache, ["cats", "dogs"]).images.shape == (3, 3, 4, 4)
    assert len(list((cache / "image_folder").glob("*.safetensors"))) == 2
