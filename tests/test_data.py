"""Tests of the dataset layer: named datasets, IDX reading, image folders, splits, P x K batches.

Nothing here downloads. Expected values are computed independently in the tests (numpy,
PIL, bincounts), not taken from earlier runs of our code.
"""

from __future__ import annotations

import gzip
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convrecipes.data.datasets as datasets_mod
import convrecipes.data.image_folder as image_folder_mod
from convrecipes.data import (
    DATASETS,
    ImageTensorDataset,
    InMemoryLoader,
    PKBatchSampler,
    load_dataset,
    stratified_split,
    subset_indices,
)
from convrecipes.data.datasets import convert_channels, resize_images
from convrecipes.errors import DataError, UnknownNameError


@pytest.fixture(autouse=True)
def isolated_locations(tmp_path, monkeypatch):
    """Point every default location at empty temporary folders, so no test sees real data by accident."""
    monkeypatch.delenv(datasets_mod.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets_mod, "DEFAULT_CACHE_DIR", tmp_path / "default-cache")
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")


# -- registry and arguments -------------------------------------------------------------


def test_registered_names_and_bad_arguments():
    assert set(DATASETS.names()) == {"digits", "fashion_mnist", "cifar10", "cifar100", "image_folder", "font_glyphs"}
    with pytest.raises(UnknownNameError, match="valid dataset names: cifar10, cifar100, digits"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="valid splits: train, test"):
        load_dataset("digits", "validation")
    with pytest.raises(DataError, match=r"unknown split 'tset' \(did you mean 'test'\?\)"):
        load_dataset("digits", "tset")
    with pytest.raises(UnknownNameError, match=r"did you mean 'digits'\?"):
        load_dataset("digts", "train")
    with pytest.raises(DataError, match="channels must be 1"):
        load_dataset("digits", "train", channels=2)
    with pytest.raises(DataError, match="image_size must be a positive integer"):
        load_dataset("digits", "train", image_size=0)


# -- digits -----------------------------------------------------------------------------


def _rows(images: torch.Tensor) -> Counter:
    return Counter(img.numpy().tobytes() for img in images)


def test_digits_shapes_values_and_fixed_stratified_split():
    from sklearn.datasets import load_digits

    ref = load_digits()
    expected_images = np.round(ref.images * 255 / 16).astype(np.uint8)[:, None]
    class_sizes = np.bincount(ref.target, minlength=10)

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (1, 8, 8)
        assert ds.labels.dtype == torch.int64
        assert ds.classes == [str(d) for d in range(10)]
    assert len(train) + len(test) == 1797
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # Together the splits hold exactly the converted sklearn images, each once.
    assert _rows(torch.cat([train.images, test.images])) == _rows(torch.from_numpy(expected_images))

    # Stratified: each class gives round(20%) of its images to the test split.
    test_counts = np.bincount(test.labels.numpy(), minlength=10)
    assert test_counts.tolist() == [round(n * 0.2) for n in class_sizes]
    assert (np.bincount(train.labels.numpy(), minlength=10) + test_counts).tolist() == class_sizes.tolist()

    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_image_size_and_channels_on_a_native_dataset():
    ds = load_dataset("digits", "test", image_size=16, channels=3)
    native = load_dataset("digits", "test")
    assert ds.images.shape == (len(native), 3, 16, 16) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 1], ds.images[:, 2])
    # Same images underneath: the resized gray channel equals resizing the native image.
    ref = F.interpolate(native.images.float(), size=(16, 16), mode="bilinear", antialias=True).round().clamp(0, 255)
    assert torch.equal(ds.images[:, :1], ref.to(torch.uint8))


def test_resize_and_luminance_match_pil():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    pil = Image.fromarray(rgb.transpose(1, 2, 0), "RGB")
    gray = convert_channels(torch.from_numpy(rgb)[None], 1)[0, 0].numpy().astype(int)
    assert np.abs(gray - np.asarray(pil.convert("L"), dtype=int)).max() <= 1

    # torch's antialiased bilinear is a port of PIL's: downscaling agrees to rounding.
    small = resize_images(torch.from_numpy(rgb)[None], 14)[0].numpy().astype(int)
    pil_small = np.asarray(pil.resize((14, 14), Image.Resampling.BILINEAR), dtype=int).transpose(2, 0, 1)
    assert np.abs(small - pil_small).max() <= 1


# -- splits ----------------------------------------------------------------------------


def _make_labels(sizes: list[int], seed: int = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_stratified_split_counts_and_determinism():
    sizes = [10, 5, 2, 1, 7, 40]
    labels = _make_labels(sizes)
    keep, hold = stratified_split(labels, 0.3, seed=3)
    assert keep.dtype == torch.int64
    assert sorted(torch.cat([keep, hold]).tolist()) == list(range(len(labels)))
    hold_counts = torch.bincount(labels[hold], minlength=len(sizes)).tolist()
    keep_counts = torch.bincount(labels[keep], minlength=len(sizes)).tolist()
    # 10*0.3=3, 5*0.3=1.5->2, 2*0.3=0.6->1 (and one kept), 1 -> 0 (kept), 7*0.3=2.1->2, 40*0.3=12
    assert hold_counts == [3, 2, 1, 0, 2, 12]
    assert keep_counts == [7, 3, 1, 1, 5, 28]
    k2, h2 = stratified_split(labels, 0.3, seed=3)
    assert torch.equal(keep, k2) and torch.equal(hold, h2)
    _, h3 = stratified_split(labels, 0.3, seed=4)
    assert not torch.equal(hold, h3)
    # A class of two with a tiny fraction still leaves one sample on each side.
    _, tiny = stratified_split(torch.tensor([0, 0, 1, 1, 1, 1]), 0.01, seed=0)
    assert torch.bincount(torch.tensor([0, 0, 1, 1, 1, 1])[tiny]).tolist() == [1, 1]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="holdout_fraction"):
            stratified_split(labels, bad, seed=0)


def test_subset_indices_counts_and_errors():
    sizes = [10, 5, 2, 1, 7, 40]
    labels = _make_labels(sizes)
    idx = subset_indices(labels, fraction=0.25, seed=1)
    assert torch.bincount(labels[idx], minlength=6).tolist() == [2, 1, 1, 1, 2, 10]  # at least one per class
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, subset_indices(labels, fraction=0.25, seed=1))
    assert sorted(subset_indices(labels, fraction=1.0).tolist()) == list(range(len(labels)))

    per = subset_indices(labels, per_class=1, seed=0)
    assert torch.bincount(labels[per], minlength=6).tolist() == [1] * 6
    big = labels[(labels == 0) | (labels == 5)]
    per4 = subset_indices(big, per_class=4, seed=0)
    assert torch.bincount(big[per4], minlength=6).tolist() == [4, 0, 0, 0, 0, 4]

    with pytest.raises(DataError, match=r"class 3 has only 1 samples"):
        subset_indices(labels, per_class=2)
    for kwargs in ({"fraction": 0.0}, {"fraction": 1.5}, {"per_class": 0}, {}, {"fraction": 0.5, "per_class": 2}):
        with pytest.raises(ValueError):
            subset_indices(labels, **kwargs)


# -- Fashion-MNIST from IDX files -------------------------------------------------------


def _write_idx_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True,
                    image_magic: int = 2051, label_magic: int = 2049) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    img_bytes = struct.pack(">IIII", image_magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    lbl_bytes = struct.pack(">II", label_magic, len(labels)) + labels.astype(np.uint8).tobytes()
    for name, blob in ((f"{prefix}-images-idx3-ubyte", img_bytes), (f"{prefix}-labels-idx1-ubyte", lbl_bytes)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def _synthetic_fashion(folder: Path, gz: bool = True, **magic) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    data = {}
    for prefix, split, n in (("train", "train", 12), ("t10k", "test", 7)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx_pair(folder, prefix, images, labels, gz=gz, **magic)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_exactly(tmp_path, gz):
    data = _synthetic_fashion(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("fashion_mnist", split, data_dir=str(tmp_path / "fm"))
        images, labels = data[split]
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), images)
        assert ds.labels.tolist() == labels.tolist()
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_fashion_mnist_found_through_env_var_subfolder(tmp_path, monkeypatch):
    data = _synthetic_fashion(tmp_path / "env" / "FashionMNIST" / "raw")
    monkeypatch.setenv(datasets_mod.DATA_DIR_ENV, str(tmp_path / "env"))
    ds = load_dataset("fashion_mnist", "test", image_size=14, channels=3)
    assert ds.images.shape == (7, 3, 14, 14)
    expected = F.interpolate(torch.from_numpy(data["test"][0])[:, None].float(), size=(14, 14), mode="bilinear",
                             antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(ds.images[:, 2:], expected)


def test_fashion_mnist_wrong_magic_and_truncation(tmp_path):
    _synthetic_fashion(tmp_path / "bad", label_magic=2051)
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        load_dataset("fashion_mnist", "train", data_dir=str(tmp_path / "bad"))

    _synthetic_fashion(tmp_path / "short", gz=False)
    path = tmp_path / "short" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion_mnist", "test", data_dir=str(tmp_path / "short"))


def test_fashion_mnist_missing_names_searched_paths_and_fixes(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(datasets_mod.DATA_DIR_ENV, str(empty))
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", "train")  # an explicit data_dir is never searched past (tests/test_hardening.py)
    message = str(info.value)
    for path in (empty, empty / "fashion-mnist", empty / "FashionMNIST" / "raw", tmp_path / "no-debian"):
        assert str(path) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.data_dir=" in message and "data.download=true" in message


@pytest.mark.skipif(
    not (datasets_mod.DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.setattr(datasets_mod, "DEBIAN_FASHION_MNIST_DIR", Path("/usr/share/datasets/fashion-mnist"))
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_cifar_missing_without_download_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        load_dataset("cifar10", "test", data_dir=str(tmp_path))


# -- image folders ----------------------------------------------------------------------


def _solid_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (7, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _colors(ds: ImageTensorDataset) -> list[tuple[str, tuple[int, ...]]]:
    """(class name, the solid color) of every image, checking each image is one flat color."""
    out = []
    for img, label in zip(ds.images, ds.labels):
        flat = img.reshape(img.shape[0], -1)
        assert torch.equal(flat, flat[:, :1].expand_as(flat))
        out.append((ds.classes[label], tuple(flat[:, 0].tolist())))
    return out


@pytest.fixture()
def folder(tmp_path):
    """cats/ and dogs/ with 5 solid-color PNGs each, one corrupt PNG and a non-image file."""
    root = tmp_path / "pets"
    colors = {}
    for c, name in enumerate(["cats", "dogs"]):
        for i in range(5):
            color = (40 * i + c, 200 - 30 * i, 17 * c + 3 * i)
            _solid_png(root / name / f"{i}.png", color)
            colors[color] = name
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG not really an image")
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")
    return root, colors


def test_image_folder_loads_good_files_and_reports_bad_ones_once(folder, capsys, recwarn):
    root, colors = folder
    train = load_dataset("image_folder", "train", data_dir=str(root), image_size=4)
    test = load_dataset("image_folder", "test", data_dir=str(root), image_size=4)  # from the cache
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and str(root / "cats" / "broken.png") in err  # one line per run
    assert not [w for w in recwarn if "unreadable" in str(w.message)], "no Python warning"
    assert train.classes == ["cats", "dogs"] and test.classes == ["cats", "dogs"]
    assert train.images.shape == (8, 3, 4, 4) and test.images.shape == (2, 3, 4, 4)
    assert torch.bincount(test.labels).tolist() == [1, 1]  # round(5 * 0.2) from each class
    found = _colors(train) + _colors(test)
    assert sorted(found) == sorted((name, color) for color, name in colors.items())


def test_image_folder_grayscale_matches_pil_luminance(folder):
    root, colors = folder
    train = load_dataset("image_folder", "train", data_dir=str(root), image_size=3, channels=1)
    test = load_dataset("image_folder", "test", data_dir=str(root), image_size=3, channels=1)
    assert train.images.shape[1:] == (1, 3, 3)
    found = sorted(_colors(train) + _colors(test))
    # PIL's convert("L") is ITU-R 601 luminance, computed here from the written colors.
    expected = sorted((n, round(0.299 * r + 0.587 * g + 0.114 * b)) for (r, g, b), n in colors.items())
    assert [n for n, _ in found] == [n for n, _ in expected]
    assert all(abs(v - e) <= 1 for (_, (v,)), (_, e) in zip(found, expected))


def test_image_folder_second_load_uses_cache_and_changes_invalidate(folder, monkeypatch):
    root, _ = folder
    calls = []
    real_decode = image_folder_mod.decode_image

    def counting_decode(*args, **kwargs):
        calls.append(args[0])
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(image_folder_mod, "decode_image", counting_decode)
    first = load_dataset("image_folder", "train", data_dir=str(root), image_size=4)
    assert len(calls) == 11  # 10 good + 1 corrupt, decoded once
    cache_dir = datasets_mod.DEFAULT_CACHE_DIR / "image_folder"
    assert len(list(cache_dir.glob("*.safetensors"))) == 1

    calls.clear()
    second = load_dataset("image_folder", "train", data_dir=str(root), image_size=4)
    assert calls == []
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == ["cats", "dogs"]

    # An added file re-decodes and replaces the stale cache.
    _solid_png(root / "dogs" / "new.png", (1, 2, 3))
    third = load_dataset("image_folder", "train", data_dir=str(root), image_size=4)
    assert len(calls) == 12
    assert len(third) + len(load_dataset("image_folder", "test", data_dir=str(root), image_size=4)) == 11
    assert len(list(cache_dir.glob("*.safetensors"))) == 1


def test_image_folder_cache_stays_outside_the_data_folder(folder):
    from torchvision.datasets import ImageFolder

    root, _ = folder
    load_dataset("image_folder", "train", data_dir=str(root), image_size=4)
    assert sorted(p.name for p in root.iterdir()) == ["cats", "dogs"]
    assert ImageFolder(str(root)).classes == ["cats", "dogs"]  # torchvision reads the same folder unharmed


@pytest.mark.parametrize("bad", ["empty", "unreadable"])
def test_a_class_folder_without_a_readable_image_is_refused_with_its_path(folder, bad):
    root, _ = folder
    (root / "birds").mkdir()
    if bad == "unreadable":
        (root / "birds" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(root / "birds")) + " has no readable image"):
        load_dataset("image_folder", "train", data_dir=str(root), image_size=4)


def test_image_folder_split_folders_share_class_names(tmp_path):
    root = tmp_path / "split"
    for name, color in (("a", (10, 10, 10)), ("b", (20, 20, 20))):
        for i in range(2):
            _solid_png(root / "train" / name / f"{i}.png", color)
    for name, color in (("a", (10, 10, 10)), ("c", (30, 30, 30))):
        _solid_png(root / "val" / name / "x.jpg", color)
    train = load_dataset("image_folder", "train", data_dir=str(root), image_size=2)
    test = load_dataset("image_folder", "test", data_dir=str(root), image_size=2)
    assert train.classes == test.classes == ["a", "b", "c"]
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1]
    assert sorted(test.labels.tolist()) == [0, 2]


def test_image_folder_user_errors(tmp_path):
    with pytest.raises(DataError, match="data.data_dir"):
        load_dataset("image_folder", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("image_folder", "train", data_dir=str(tmp_path / "nope"))
    _solid_png(tmp_path / "one" / "only" / "x.png", (1, 1, 1))
    with pytest.raises(DataError, match="at least two"):
        load_dataset("image_folder", "train", data_dir=str(tmp_path / "one"))
    for name in ("a", "b"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        (tmp_path / "junk" / name / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 2 image files"):
        load_dataset("image_folder", "train", data_dir=str(tmp_path / "junk"))


# -- P x K batches ----------------------------------------------------------------------


def _check_pk_batch(batch: torch.Tensor, labels: torch.Tensor, p: int, k: int) -> None:
    assert batch.dtype == torch.int64 and batch.shape == (p * k,)
    groups = labels[batch].view(p, k)
    assert (groups == groups[:, :1]).all(), "each K-group must be one class"
    assert len(set(groups[:, 0].tolist())) == p, "the P classes must be distinct"
    sizes = torch.bincount(labels)
    for g in batch.view(p, k):
        if sizes[labels[g[0]]] >= k:
            assert len(set(g.tolist())) == k, "no repeats in a class with at least K images"


def test_pk_batch_sampler_structure_and_determinism():
    labels = _make_labels([20, 15, 10, 8, 3, 2])
    rng_state = torch.get_rng_state()
    sampler = PKBatchSampler(labels, p=4, k=4, seed=5)
    assert sampler.global_batch_size == 16
    batches = sampler.epoch_batches(0)
    assert len(batches) == len(labels) // 16
    for batch in batches + sampler.epoch_batches(1):
        _check_pk_batch(batch, labels, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(batches, PKBatchSampler(labels, 4, 4, seed=5).epoch_batches(0)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, sampler.epoch_batches(1)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, PKBatchSampler(labels, 4, 4, seed=6).epoch_batches(0)))
    assert torch.equal(torch.get_rng_state(), rng_state), "must not touch the global RNG"

    # Small classes (3 and 2 images < K=4) still fill their groups, by sampling with replacement.
    many = PKBatchSampler(labels, p=6, k=4, batches_per_epoch=5).epoch_batches(0)
    assert len(many) == 5
    for batch in many:
        _check_pk_batch(batch, labels, 6, 4)

    with pytest.raises(ValueError, match="only 6 classes"):
        PKBatchSampler(labels, p=7, k=2)


def test_pk_batches_through_in_memory_loader_give_each_rank_whole_groups():
    labels = _make_labels([9, 9, 9, 9, 9, 9])
    dataset = ImageTensorDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels, list("abcdef"))
    sampler = PKBatchSampler(labels, p=4, k=3, seed=1)
    loaders = [
        InMemoryLoader(dataset, batch_size=sampler.global_batch_size, num_replicas=2, rank=r, batch_sampler=sampler)
        for r in range(2)
    ]
    for loader in loaders:
        loader.set_epoch(2)
    assert len(loaders[0]) == len(sampler) == 54 // 12
    steps = list(zip(*loaders))
    assert len(steps) == len(sampler)
    for ((_, y0), (_, y1)), batch in zip(steps, sampler.epoch_batches(2)):
        for y in (y0, y1):
            groups = y.view(2, 3)  # two whole K-groups per rank
            assert (groups == groups[:, :1]).all()
        assert torch.equal(torch.cat([y0, y1]), labels[batch])
        assert len(set(torch.cat([y0, y1]).tolist())) == 4
