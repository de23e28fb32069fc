"""Named datasets for recipes, each loaded whole into one uint8 tensor.

``load_dataset(name, split, ...)`` looks the name up in ``DATASETS``. A builder is called
with keyword arguments ``split``, ``data_dir``, ``download``, ``image_size`` and
``channels`` and returns an ``ImageTensorDataset``; ``load_dataset`` then brings its
images to the requested size and channel count (a no-op when they already match), so a
new builder gets resizing for free.

Nothing downloads unless ``download=True``: tests and the machines without internet
rely on that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from convrecipes.data.font_glyphs import load_font_glyphs
from convrecipes.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from convrecipes.data.image_folder import load_image_folder
from convrecipes.data.loader import ImageTensorDataset
from convrecipes.data.splits import stratified_split
from convrecipes.errors import DataError
from convrecipes.registry import Registry, did_you_mean

DatasetBuilder = Callable[..., ImageTensorDataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")

SPLITS = ("train", "test")
DATA_DIR_ENV = "CONVRECIPES_DATA_DIR"
# Module constants rather than literals so tests (and unusual installs) can repoint them.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "convrecipes"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_SPLIT_SEED = 0  # fixed, independent of any recipe seed: the digits test set never changes
DIGITS_TEST_FRACTION = 0.2
_RESIZE_CHUNK = 4096  # images per interpolate call, to bound the float copy's memory


def load_dataset(
    name: str,
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    unlabeled_folder: str | None = None,
) -> ImageTensorDataset:
    """Load split ``split`` of the registered dataset ``name``.

    Args:
        name: a name in ``DATASETS`` (``digits``, ``fashion_mnist``, ``cifar10``,
            ``cifar100``, ``image_folder``, ``font_glyphs``).
        split: ``"train"`` or ``"test"``.
        data_dir: where the data is (required for ``image_folder``).
        download: allow torchvision to download a missing dataset (needs internet).
        image_size: resize to ``image_size x image_size`` if given (``image_folder``
            defaults to 64; the others keep their native size).
        channels: 1 or 3, converting grayscale <-> RGB if given.
        unlabeled_folder: ``image_folder`` only: the subfolder holding unlabeled images,
            which is then not a class (load it with ``image_folder.load_unlabeled_folder``).

    Returns:
        Images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64 and class names.

    Raises:
        UnknownNameError: ``name`` is not registered.
        DataError: a bad split, size or channel count, or data that is missing or damaged.
    """
    builder = DATASETS.get(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}{did_you_mean(str(split), SPLITS)} for dataset {name!r}; "
                        f"valid splits: {', '.join(SPLITS)}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}; e.g. data.image_size=32")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; e.g. data.channels=3")
    extra = {"unlabeled_folder": unlabeled_folder} if unlabeled_folder is not None else {}
    dataset = builder(split=split, data_dir=data_dir, download=download, image_size=image_size, channels=channels,
                      **extra)
    if channels is not None:
        dataset.images = convert_channels(dataset.images, channels)
    if image_size is not None:
        dataset.images = resize_images(dataset.images, image_size)
    return dataset


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``(N, C, H, W)`` images to ``size x size`` (bilinear, antialiased).

    Returns the input unchanged when it already has that size.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 ``(N, C, H, W)`` images between 1 and 3 channels.

    Gray becomes RGB by repetition; RGB becomes gray by ITU-R 601 luminance
    (0.299 R + 0.587 G + 0.114 B), the formula PIL's ``convert("L")`` uses.
    """
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels; only 1 <-> 3 is supported")


# -- digits -----------------------------------------------------------------------


@DATASETS.register("digits")
def load_digits(split: str, **_: object) -> ImageTensorDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), a fixed 80/20 split.

    The 0..16 intensities become 0..255 as ``round(x * 255 / 16)``. The split is stratified
    with the fixed seed ``DIGITS_SPLIT_SEED``, whatever the recipe's seed.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    dataset = ImageTensorDataset(images, labels, [str(d) for d in range(10)])
    return dataset.subset(train_idx if split == "train" else test_idx)


# -- Fashion-MNIST ------------------------------------------------------------------

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_SUBDIRS = (".", "fashion-mnist", "FashionMNIST/raw")


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_candidates(data_dir: str | None) -> list[Path]:
    """Folders searched for the four IDX files, in order."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get(DATA_DIR_ENV):
        roots.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    candidates = [(root / sub) if sub != "." else root for root in roots for sub in _FASHION_SUBDIRS]
    candidates.append(DEBIAN_FASHION_MNIST_DIR)
    # Where download=True puts it when no data_dir is given, so a later run finds it offline.
    candidates.append(DEFAULT_CACHE_DIR / "FashionMNIST" / "raw")
    return list(dict.fromkeys(candidates))


def _find_fashion_mnist(candidates: list[Path]) -> Path | None:
    stems = [s for pair in _FASHION_FILES.values() for s in pair]
    for folder in candidates:
        if all(_find_file(folder, stem) is not None for stem in stems):
            return folder
    return None


def _read_fashion_split(folder: Path, split: str) -> ImageTensorDataset:
    from torchvision.datasets import FashionMNIST

    images_stem, labels_stem = _FASHION_FILES[split]
    images_path, labels_path = _find_file(folder, images_stem), _find_file(folder, labels_stem)
    assert images_path is not None and labels_path is not None
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    fix = (
        "re-install the dataset (apt-get install --reinstall dataset-fashion-mnist) "
        "or point data.data_dir at intact files"
    )
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of shape {images.shape[1:]}, expected 28x28; {fix}")
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; {fix}"
        )
    classes = list(FashionMNIST.classes)
    if labels.size and int(labels.max()) >= len(classes):
        raise DataError(
            f"{labels_path} has label {int(labels.max())}, but Fashion-MNIST has {len(classes)} classes; {fix}"
        )
    return ImageTensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long(), classes)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(
    split: str, data_dir: str | None = None, download: bool = False, **_: object
) -> ImageTensorDataset:
    """Fashion-MNIST (28x28 grayscale, 10 classes; 60000 train, 10000 test) from IDX files.

    Searched in order: ``data_dir`` and then ``$CONVRECIPES_DATA_DIR`` (the files directly,
    or in ``fashion-mnist/`` or ``FashionMNIST/raw/`` inside), Debian's
    ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), and
    ``~/.cache/convrecipes/FashionMNIST/raw``. The files are read directly (gzip or plain)
    because Debian's recompressed ``.gz`` files fail torchvision's checksums.
    """
    if data_dir and not download:
        # the data the user named is the data used: no silent fallback to another copy
        named = Path(data_dir).expanduser()
        folder = _find_fashion_mnist([(named / sub) if sub != "." else named for sub in _FASHION_SUBDIRS])
        if folder is None:
            raise DataError(
                f"data.data_dir={data_dir} does not hold the four Fashion-MNIST IDX files (train-images-idx3-ubyte, "
                f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz, "
                f"directly or in fashion-mnist/ or FashionMNIST/raw/); fix the path, or unset data.data_dir to use "
                f"${DATA_DIR_ENV} or {DEBIAN_FASHION_MNIST_DIR}"
            )
        _report_source(folder)
        return _read_fashion_split(folder, split)
    candidates = _fashion_candidates(data_dir)
    folder = _find_fashion_mnist(candidates)
    if folder is None and download:
        root = Path(data_dir).expanduser() if data_dir else DEFAULT_CACHE_DIR
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as e:
            raise DataError(
                f"downloading Fashion-MNIST into {root} failed ({type(e).__name__}: {e}); check the internet "
                f"connection, or install it offline with `apt-get install dataset-fashion-mnist`"
            ) from None
        folder = _find_fashion_mnist([root / "FashionMNIST" / "raw"])
    if folder is None:
        searched = "\n  ".join(str(c) for c in candidates)
        raise DataError(
            "Fashion-MNIST not found: no folder below holds all four IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
            f"each plain or .gz). Searched:\n  {searched}\n"
            "Fix one of: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); put the files in a folder and "
            f"pass data.data_dir=<folder> (or set {DATA_DIR_ENV}); "
            "or set data.download=true on a machine with internet."
        )
    _report_source(folder)
    return _read_fashion_split(folder, split)


_reported_sources: set[Path] = set()


def _report_source(folder: Path) -> None:
    """Say once per process which files a run reads (main process only under DDP)."""
    if folder in _reported_sources or os.environ.get("RANK", "0") not in ("0", ""):
        return
    _reported_sources.add(folder)
    print(f"fashion_mnist: reading the IDX files in {folder}")


# -- CIFAR ----------------------------------------------------------------------------


def _load_cifar(dataset_cls: type, label: str, split: str, data_dir: str | None, download: bool) -> ImageTensorDataset:
    if data_dir:
        root = Path(data_dir).expanduser()
    elif os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV]).expanduser()
    else:
        root = DEFAULT_CACHE_DIR
    try:
        # torchvision checks the batches' md5 against the official ones before reading them
        # (they are pickles; the checksum is what makes loading them acceptable here).
        ds = dataset_cls(str(root), train=split == "train", download=download)
    except RuntimeError as e:
        if download:
            raise DataError(
                f"{label} could not be downloaded into {root} ({e}); check the internet connection"
            ) from None
        raise DataError(
            f"{label} not found (or damaged) in {root / _cifar_folder(dataset_cls)}; fix: set data.download=true on a "
            f"machine with internet, or put the extracted {_cifar_folder(dataset_cls)}/ folder in a directory and pass "
            f"data.data_dir=<directory> (or set {DATA_DIR_ENV})"
        ) from None
    except Exception as e:  # network errors surface as URLError, OSError, ...
        raise DataError(
            f"{label} could not be downloaded into {root} ({type(e).__name__}: {e}); check the internet connection, "
            f"or copy the extracted {_cifar_folder(dataset_cls)}/ folder there and pass data.data_dir=<directory>"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes))


def _cifar_folder(dataset_cls: type) -> str:
    """The folder torchvision extracts a CIFAR archive into (``cifar-10-batches-py``, ...)."""
    return str(getattr(dataset_cls, "base_folder", dataset_cls.__name__))


@DATASETS.register("cifar10")
def load_cifar10(split: str, data_dir: str | None = None, download: bool = False, **_: object) -> ImageTensorDataset:
    """CIFAR-10 (32x32 RGB, 10 classes) through torchvision, under ``data_dir`` or the cache."""
    from torchvision.datasets import CIFAR10

    return _load_cifar(CIFAR10, "CIFAR-10", split, data_dir, download)


@DATASETS.register("cifar100")
def load_cifar100(split: str, data_dir: str | None = None, download: bool = False, **_: object) -> ImageTensorDataset:
    """CIFAR-100 (32x32 RGB, 100 fine classes) through torchvision, under ``data_dir`` or the cache."""
    from torchvision.datasets import CIFAR100

    return _load_cifar(CIFAR100, "CIFAR-100", split, data_dir, download)


# -- image folders --------------------------------------------------------------------


@DATASETS.register("image_folder")
def load_image_folder_dataset(
    split: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    unlabeled_folder: str | None = None,
    **_: object,
) -> ImageTensorDataset:
    """Your own images, one subfolder per class (see ``convrecipes.data.image_folder``).

    Decoded once at ``image_size`` (default 64) and ``channels`` (default 3) into a
    safetensors cache in ``~/.cache/convrecipes/image_folder/`` (outside ``data_dir``).
    """
    if not data_dir:
        raise DataError(
            "dataset image_folder needs a folder: set data.data_dir=<folder> holding one subfolder per class "
            "(or train/ and test/ folders that each hold one subfolder per class)"
        )
    return load_image_folder(
        data_dir,
        split,
        image_size=image_size if image_size is not None else 64,
        channels=channels if channels is not None else 3,
        cache_dir=DEFAULT_CACHE_DIR,
        unlabeled_folder=unlabeled_folder,
    )


# -- font glyphs (many classes, unseen test classes; see convrecipes.data.font_glyphs) ----

DATASETS.register("font_glyphs")(load_font_glyphs)

# Datasets whose test split holds only classes absent from training: test accuracy is
# undefined there (no trained output for those classes); retrieval metrics are what to read.
UNSEEN_TEST_CLASSES = frozenset({"font_glyphs"})


def has_unseen_test_classes(name: str) -> bool:
    """Whether dataset ``name``'s test classes are disjoint from its training classes."""
    return name in UNSEEN_TEST_CLASSES
