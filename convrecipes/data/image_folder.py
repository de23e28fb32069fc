"""A user's own images, one subfolder per class, decoded once into a uint8 cache.

Layouts accepted under ``data_dir``:

- ``train/<class>/...`` plus ``test/<class>/...`` (or ``val/<class>/...``): the folders
  are the splits;
- ``<class>/...`` only: a fixed-seed stratified 80/20 holdout makes the splits, so the
  test images never change between runs or recipes.

For semi-supervised training an *unlabeled* folder can sit next to the class folders;
name it with ``unlabeled_folder`` (``data.unlabeled_folder``) and it is no longer a class::

    data_dir/                         data_dir/
        cat/...                           train/cat/..., train/dog/...
        dog/...                           test/cat/...,  test/dog/...
        unlabeled/...                     unlabeled/...

``load_image_folder(..., unlabeled_folder="unlabeled")`` skips that folder when listing
classes (at the root, and inside ``train/`` and ``test/``/``val/`` in the split layout);
``load_unlabeled_folder`` decodes every image under ``data_dir/unlabeled/`` (subfolders
included; in the split layout it is the one next to ``train/`` and ``test/``) with labels
-1. Without ``unlabeled_folder`` a folder named ``unlabeled`` is a class like any other.

Images are decoded with PIL, converted to ``L`` or ``RGB``, resized to a square and
stored as safetensors in ``~/.cache/convrecipes/image_folder/`` (class names in its JSON
metadata; named by the folder's absolute path), so later runs skip decoding. The cache
lives outside the data folder: a hidden folder inside it would become a class for other
tools (torchvision's ``ImageFolder``). The cache key covers every file's relative path,
size and mtime plus the image size and channels: adding, removing or editing an image
re-decodes. The unlabeled folder has its own cache entry, keyed the same way (its files,
the image size and channels). Unreadable files are skipped and reported once per run in
one line, never fatal; a class folder with no readable image is refused with its path (it
would be a class without data, and could report 100% test accuracy on nothing), and so is
an unlabeled folder without one.
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
_CACHE_FORMAT = "2"  # 2: the cache also names each image's file


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


def _class_dirs(folder: Path, exclude: str | None = None) -> list[str]:
    """Non-hidden subfolders of ``folder`` (hidden ones hold caches, VCS data, ...), less ``exclude``."""
    if not folder.is_dir():
        return []
    return sorted(
        e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name != exclude
    )


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(train dir, test dir)`` in the split layout (``test/``, else ``val/``), else None."""
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if (root / "train").is_dir() and test_dir.is_dir():
        return root / "train", test_dir
    return None


def _walk_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively (hidden files and folders skipped)."""
    found = []
    # followlinks: datasets are often assembled from symlinked folders.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            # Hidden files include macOS "._x.jpg" resource forks, which are not images.
            if not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, fname))
    return found


def _list_files(root: Path, split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path relative to root, label)`` of every image file under the class folders, sorted."""
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        files.extend((path.relative_to(root).as_posix(), label) for path in _walk_images(class_dir))
    return sorted(files)


_SPLIT_FOLDERS = ("train", "test", "val")


def _check_unlabeled_name(root: Path, folder: str) -> None:
    """Refuse an ``unlabeled_folder`` that is not one plain folder name, or is a split folder."""
    separators = [sep for sep in ("/", os.sep, os.altsep) if sep]
    if not isinstance(folder, str) or folder in ("", ".", "..") or any(sep in folder for sep in separators):
        raise DataError(
            f"data.unlabeled_folder must be the name of one folder inside {root} (e.g. unlabeled), got {folder!r}"
        )
    if folder in _SPLIT_FOLDERS and _split_dirs(root) is not None:
        raise DataError(
            f"data.unlabeled_folder={folder!r} names a split folder of {root} (train/ and test/ or val/ hold the "
            f"labeled class folders); put the unlabeled images in another folder next to them, e.g. "
            f"{root / 'unlabeled'}, and set data.unlabeled_folder to its name"
        )


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
        dataset = ImageTensorDataset(images, labels, json.loads(meta["classes"]), files=json.loads(meta["files"]))
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
            "files": json.dumps(dataset.files or []),
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
    from convrecipes.progress import progress_bar

    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    labels: list[int] = []
    readable: list[str] = []
    unreadable: list[str] = []
    progress = progress_bar(files, desc=f"decoding {root}", unit="img", every=PROGRESS_BAR_MIN_FILES,
                            disable=len(files) <= PROGRESS_BAR_MIN_FILES)
    for rel, label in progress:
        path = root / rel
        try:
            images[len(labels)] = decode_image(path, image_size, channels)
        except Exception as e:  # any bad file is skipped and reported, never fatal
            unreadable.append(f"{path} ({type(e).__name__}: {e})")
            continue
        labels.append(label)
        readable.append(rel)
    if not labels:
        raise DataError(
            f"none of the {len(files)} image files under {root} could be read (e.g. {unreadable[0]}); "
            f"check that they are images PIL can open"
        )
    dataset = ImageTensorDataset(
        torch.from_numpy(images[: len(labels)].copy()), torch.tensor(labels, dtype=torch.long), list(classes),
        files=readable,
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


def _default_cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "convrecipes"


def load_image_folder(
    data_dir: str | Path,
    split: str,
    image_size: int = 64,
    channels: int = 3,
    cache_dir: str | Path | None = None,
    unlabeled_folder: str | None = None,
) -> ImageTensorDataset:
    """Load split ``split`` of a class-per-folder image dataset.

    Args:
        data_dir: the folder (see the module docstring for the layouts).
        split: ``"train"`` or ``"test"`` (``test/`` or else ``val/`` in the split layout).
        image_size: side of the square the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: where the decoded cache goes (default ``~/.cache/convrecipes``; never
            inside ``data_dir``).
        unlabeled_folder: name of the folder holding unlabeled images (for
            ``load_unlabeled_folder``); a subfolder with this name is not a class, at the
            root of ``data_dir`` or inside ``train/`` and ``test/``/``val/`` in the split
            layout. None (default): every subfolder is a class.

    Returns:
        The split as one uint8 tensor; class names are the folder names, sorted.

    Raises:
        DataError: the folder is missing, has fewer than two classes, a class folder
            without a readable image, or no readable image; ``unlabeled_folder`` is not
            one folder name, or names a split folder of the split layout.
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; valid splits: train, test")
    root = Path(data_dir).expanduser()
    cache = _default_cache(cache_dir)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; set data.data_dir to a folder holding one subfolder per class "
            f"(or train/ and test/ folders that each hold one subfolder per class)"
        )
    if unlabeled_folder is not None:
        _check_unlabeled_name(root, unlabeled_folder)
    splits = _split_dirs(root)
    if splits is not None:
        train_dir, test_dir = splits
        classes = sorted(set(_class_dirs(train_dir, unlabeled_folder)) | set(_class_dirs(test_dir, unlabeled_folder)))
        split_dir = train_dir if split == "train" else test_dir
        where = f"{train_dir} and {test_dir}"
    else:
        classes = _class_dirs(root, unlabeled_folder)
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


def load_unlabeled_folder(
    root: str | Path,
    folder: str,
    image_size: int,
    channels: int,
    cache_dir: str | Path | None,
    classes: list[str],
) -> ImageTensorDataset:
    """Load the unlabeled images of an image folder dataset, for semi-supervised training.

    Every image file under ``root/folder`` (subfolders included, the same extensions as
    the class folders, in sorted path order) is decoded exactly like the labeled images
    (``decode_image`` at the same size and channels) and cached in its own entry, keyed on
    its files, the image size and channels. In the split layout the folder sits at the root,
    next to ``train/`` and ``test/`` (not inside ``train/``). Pass the same name as
    ``unlabeled_folder`` to ``load_image_folder`` so it is not taken for a class.

    Args:
        root: the image folder dataset (``data.data_dir``).
        folder: name of the unlabeled folder inside ``root`` (``data.unlabeled_folder``).
        image_size: side of the square the images are resized to (as for the labeled split).
        channels: 1 (grayscale) or 3 (RGB) (as for the labeled split).
        cache_dir: where the decoded cache goes (None: ``~/.cache/convrecipes``).
        classes: the labeled class names, carried as the dataset's ``classes``.

    Returns:
        The unlabeled images as one uint8 tensor, every label -1 (int64), ``classes`` as given.

    Raises:
        DataError: ``root/folder`` is missing, holds no readable image, is also a class
            (in ``classes``), or ``folder`` is not one folder name or names a split folder.
    """
    root = Path(root).expanduser()
    _check_unlabeled_name(root, folder)
    unlabeled_dir = root / folder
    if not unlabeled_dir.is_dir():
        splits = _split_dirs(root)
        moved = ""
        if splits is not None and (splits[0] / folder).is_dir():
            moved = (f" ({splits[0] / folder} exists, but in the train/test layout the unlabeled folder goes next to "
                     f"train/ and test/: move it to {unlabeled_dir})")
        raise DataError(
            f"unlabeled image folder {unlabeled_dir} does not exist{moved}; create it and put the unlabeled images "
            f"in it, or unset data.unlabeled_folder"
        )
    if folder in classes:
        raise DataError(
            f"unlabeled folder {unlabeled_dir} is also the class {folder!r}; load the labeled splits with "
            f"unlabeled_folder={folder!r} so it is not taken for a class"
        )
    files = sorted((path.relative_to(unlabeled_dir).as_posix(), -1) for path in _walk_images(unlabeled_dir))
    if not files:
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the unlabeled folder {unlabeled_dir}; put the "
            f"unlabeled images in it (subfolders are searched too), or unset data.unlabeled_folder"
        )
    # Keyed without the classes: they are not stored in the images, only carried along.
    key = _cache_key(unlabeled_dir, files, [], image_size, channels)
    stem = f"image_folder-unlabeled-{image_size}px-{channels}ch"
    path = _cache_path(unlabeled_dir, stem, key, _default_cache(cache_dir))
    cached = _read_cache(path)
    if cached is not None:
        logger.info("unlabeled image folder %s: using cache %s", unlabeled_dir, path)
        dataset, unreadable = cached
    else:
        dataset, unreadable = _decode_all(unlabeled_dir, files, [], image_size, channels)
        if not _write_cache(path, dataset, unreadable):
            logger.warning("could not write the image cache %s; images will be decoded again next run", path)
    _report_unreadable(unlabeled_dir, unreadable)
    labels = torch.full((len(dataset),), -1, dtype=torch.long)
    return ImageTensorDataset(dataset.images, labels, list(classes))
