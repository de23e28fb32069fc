"""A user's own images, one subfolder per class, decoded once into a uint8 cache.

Layouts accepted under ``data_dir``:

- ``train/<class>/...`` plus ``test/<class>/...`` (or ``val/<class>/...``): the folders
  are the splits;
- ``<class>/...`` only: a fixed-seed stratified 80/20 holdout makes the splits, so the
  test images never change between runs or recipes.

Images are decoded with PIL, converted to ``L`` or ``RGB``, resized to a square and
stored as safetensors in ``~/.cache/convrecipes/image_folder/`` (class names in its JSON
metadata; named by the folder's absolute path), so later runs skip decoding. The cache
lives outside the data folder: a hidden folder inside it would become a class for other
tools (torchvision's ``ImageFolder``). The cache key covers every file's relative path,
size and mtime plus the image size and channels: adding, removing or editing an image
re-decodes. Unreadable files are skipped and reported once per run in one line, never
fatal; a class folder with no readable image is refused with its path (it would be a
class without data, and could report 100% test accuracy on nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from convrecipes.data.loader import ImageTensorDataset
from convrecipes.data.splits import stratified_split
from convrecipes.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # fixed, independent of any recipe seed: the test split must never move
PROGRESS_BAR_MIN_FILES = 1000
_CACHE_FORMAT = "1"


def decode_image(path: str | Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one image file to ``(channels, image_size, image_size)`` uint8.

    EXIF orientation is applied first (phone photos are stored rotated), then the image is
    converted to ``L`` (channels 1) or ``RGB`` and resized bilinearly to a square.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("L" if channels == 1 else "RGB")
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _class_dirs(folder: Path) -> list[str]:
    """Non-hidden subfolders of ``folder`` (hidden ones hold caches, VCS data, ...)."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _list_files(root: Path, split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path relative to root, label)`` of every image file under the class folders, sorted."""
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        # followlinks: datasets are often assembled from symlinked folders.
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fname in filenames:
                # Hidden files include macOS "._x.jpg" resource forks, which are not images.
                if not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((Path(dirpath, fname).relative_to(root).as_posix(), label))
    return sorted(files)


def _cache_key(root: Path, files: list[tuple[str, int]], classes: list[str], image_size: int, channels: int) -> str:
    entries = []
    for rel, label in files:
        try:
            st = os.stat(root / rel)
            entries.append([rel, label, st.st_size, st.st_mtime_ns])
        except OSError:  # a broken link: keyed as such, and reported when decoding fails
            entries.append([rel, label, -1, -1])
    payload = json.dumps(
        {"format": _CACHE_FORMAT, "image_size": image_size, "channels": channels, "classes": classes, "files": entries},
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _cache_path(root: Path, stem: str, key: str, cache_dir: Path) -> Path:
    """The cache file of a folder's split (outside the folder)."""
    # shared by all folders, so the name also carries the folder's identity
    folder_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "image_folder" / f"{folder_id}-{stem}-{key}.safetensors"


def _remove_stale(path: Path) -> None:
    """Delete older caches of the same split, size and channels (their files have changed)."""
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.safetensors"):
        if old != path and old.name.rsplit("-", 1)[0] == stem:
            try:
                old.unlink()
            except OSError:
                pass


def _read_cache(path: Path) -> tuple[ImageTensorDataset, list[str]] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        dataset = ImageTensorDataset(images, labels, json.loads(meta["classes"]))
        return dataset, json.loads(meta.get("unreadable", "[]"))
    except Exception as e:  # a damaged cache only costs a re-decode
        logger.warning("ignoring unreadable image cache %s (%s); decoding again", path, e)
        return None


def _write_cache(path: Path, dataset: ImageTensorDataset, unreadable: list[str]) -> bool:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": _CACHE_FORMAT,
            "classes": json.dumps(dataset.classes),
            "unreadable": json.dumps(unreadable),
        }
        save_file({"images": dataset.images.contiguous(), "labels": dataset.labels}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # the writer makes it owner-only; others sharing the data folder read it too
        # Atomic: several processes (one per GPU) may decode at once; none sees a half file.
        os.replace(tmp, path)
    except Exception as e:  # a cache we cannot write only costs decoding again next run
        logger.info("cannot write image cache %s (%s)", path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    _remove_stale(path)
    return True


_reported: set[str] = set()


def _report_unreadable(root: Path, unreadable: list[str]) -> None:
    """One line per folder and run (the full list goes to the log at debug level)."""
    if not unreadable or str(root) in _reported:
        return
    _reported.add(str(root))
    logger.debug("unreadable image files under %s:\n%s", root, "\n".join(unreadable))
    more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
    print(f"image_folder: skipped {len(unreadable)} unreadable image file(s) under {root}: {unreadable[0]}{more}; "
          f"delete or replace them", file=sys.stderr)


def _check_classes(dataset: ImageTensorDataset, files: list[tuple[str, int]], split_dir: Path,
                   classes: list[str]) -> None:
    """Refuse a class folder that exists but gives no readable image."""
    have = torch.bincount(dataset.labels, minlength=len(classes)).tolist()
    listed = [0] * len(classes)
    for _, label in files:
        listed[label] += 1
    for label, name in enumerate(classes):
        folder = split_dir / name
        if have[label] == 0 and folder.is_dir():
            why = f"its {listed[label]} image file(s) are all unreadable" if listed[label] else "it holds no image files"
            raise DataError(f"class folder {folder} has no readable image ({why}, extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add images to it or remove the folder")


def _decode_all(
    root: Path, files: list[tuple[str, int]], classes: list[str], image_size: int, channels: int
) -> tuple[ImageTensorDataset, list[str]]:
    from tqdm import tqdm

    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    labels: list[int] = []
    unreadable: list[str] = []
    progress = tqdm(files, desc=f"decoding {root}", unit="img", disable=len(files) <= PROGRESS_BAR_MIN_FILES)
    for rel, label in progress:
        path = root / rel
        try:
            images[len(labels)] = decode_image(path, image_size, channels)
        except Exception as e:  # any bad file is skipped and reported, never fatal
            unreadable.append(f"{path} ({type(e).__name__}: {e})")
            continue
        labels.append(label)
    if not labels:
        raise DataError(
            f"none of the {len(files)} image files under {root} could be read (e.g. {unreadable[0]}); "
            f"check that they are images PIL can open"
        )
    dataset = ImageTensorDataset(
        torch.from_numpy(images[: len(labels)].copy()), torch.tensor(labels, dtype=torch.long), list(classes)
    )
    return dataset, unreadable


def _load_decoded(
    root: Path, split_dir: Path, classes: list[str], image_size: int, channels: int, cache_dir: Path
) -> ImageTensorDataset:
    files = _list_files(root, split_dir, classes)
    if not files:
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {split_dir}; "
            f"put each class's images in {split_dir}/<class name>/"
        )
    key = _cache_key(root, files, classes, image_size, channels)
    split_name = "all" if split_dir == root else split_dir.name
    stem = f"image_folder-{split_name}-{image_size}px-{channels}ch"
    path = _cache_path(root, stem, key, cache_dir)
    cached = _read_cache(path)
    if cached is not None:
        logger.info("image folder %s: using cache %s", split_dir, path)
        dataset, unreadable = cached
    else:
        dataset, unreadable = _decode_all(root, files, classes, image_size, channels)
        if not _write_cache(path, dataset, unreadable):
            logger.warning("could not write the image cache %s; images will be decoded again next run", path)
    _report_unreadable(root, unreadable)
    _check_classes(dataset, files, split_dir, classes)
    return dataset


def load_image_folder(
    data_dir: str | Path,
    split: str,
    image_size: int = 64,
    channels: int = 3,
    cache_dir: str | Path | None = None,
) -> ImageTensorDataset:
    """Load split ``split`` of a class-per-folder image dataset.

    Args:
        data_dir: the folder (see the module docstring for the layouts).
        split: ``"train"`` or ``"test"`` (``test/`` or else ``val/`` in the split layout).
        image_size: side of the square the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: where the decoded cache goes (default ``~/.cache/convrecipes``; never
            inside ``data_dir``).

    Returns:
        The split as one uint8 tensor; class names are the folder names, sorted.

    Raises:
        DataError: the folder is missing, has fewer than two classes, a class folder
            without a readable image, or no readable image.
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; valid splits: train, test")
    root = Path(data_dir).expanduser()
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "convrecipes"
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; set data.data_dir to a folder holding one subfolder per class "
            f"(or train/ and test/ folders that each hold one subfolder per class)"
        )
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if (root / "train").is_dir() and test_dir.is_dir():
        classes = sorted(set(_class_dirs(root / "train")) | set(_class_dirs(test_dir)))
        split_dir = root / "train" if split == "train" else test_dir
        where = f"{root / 'train'} and {test_dir}"
    else:
        classes = _class_dirs(root)
        split_dir = root
        where = str(root)
    if len(classes) < 2:
        raise DataError(
            f"found {len(classes)} class folder(s) ({', '.join(classes) or 'none'}) in {where}; a classifier needs "
            f"at least two: put each class's images in its own subfolder, "
            f"e.g. {where.split(' and ')[0]}/cat/, .../dog/ "
            f"(for your own splits use train/ and test/ folders that each hold the class folders)"
        )
    dataset = _load_decoded(root, split_dir, classes, image_size, channels, cache)
    if split_dir is not root:
        return dataset
    keep, hold = stratified_split(dataset.labels, HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
    return dataset.subset(keep if split == "train" else hold)
