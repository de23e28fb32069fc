"""Font glyphs: a many-class retrieval dataset rendered offline from installed fonts.

Metric-learning results such as Hermans et al.'s (2017) batch-hard vs batch-all are measured
on many classes (hundreds of identities), with few classes per batch and retrieval on
classes never seen in training. Fashion-MNIST has ten classes; this dataset gives that
regime without a download, Omniglot-style:

* a **class** is a character (digits, Latin letters incl. Latin-1 and Extended-A, Greek,
  Cyrillic); characters that look the same (Latin ``A``, Greek ``Α``, Cyrillic ``А``) are
  merged, keeping the lowest code point;
* its **images** are that character in every installed typeface that has it, each drawn
  ``renders_per_font`` times with a seeded jitter of size, position and rotation, 32 x 32
  grayscale, white on black like MNIST. Glyphs sit on the font's baseline at a size fixed
  per font (not stretched to their bounding box), so ``o`` stays smaller than ``O``;
* the classes are split once (fixed seed, ``TEST_CLASS_FRACTION``): split ``"test"`` holds
  only classes that never appear in ``"train"``. Use it for Recall@1 of embeddings
  (``convrecipes evaluate`` reports it), not classification accuracy: train labels are
  ``0..T-1``, test labels ``T..N-1``, and both splits list all ``N`` class names.

Fonts: every ``.ttf`` / ``.otf`` under ``data_dir`` if given, else matplotlib's bundled fonts
(DejaVu, STIX: present wherever convrecipes is installed) plus ``/usr/share/fonts``. More
typefaces make a harder, more varied dataset; ``apt-get install fonts-freefont-ttf
fonts-liberation fonts-urw-base35`` adds 40-odd. Symbol and TeX-encoded fonts (no ``A``,
``a`` or ``0`` in their character map) are skipped, as are duplicate faces (same full name).
The rendering is cached under ``~/.cache/convrecipes/font_glyphs`` (safetensors) keyed by the font
files and settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convrecipes.data.loader import ImageTensorDataset
from convrecipes.errors import DataError

IMAGE_SIZE = 32
RENDERS_PER_FONT = 2
MIN_FONTS_PER_CLASS = 8
TEST_CLASS_FRACTION = 0.4
SPLIT_SEED = 0  # fixed, independent of any recipe seed: the test classes never change
# Characters whose canonical renders differ by less than this (median over fonts of the mean
# absolute pixel difference, 0..1 scale) are one class. Measured on the default fonts: Latin /
# Greek / Cyrillic look-alikes (A, Α, А; o, ο, о) have median 0.0; an accent (A vs À, e vs é)
# about 0.009; I vs l 0.015; K vs К 0.037.
DUPLICATE_THRESHOLD = 0.002
SYSTEM_FONT_DIR = Path("/usr/share/fonts")
_SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: antialiased strokes
_REQUIRED = ("A", "a", "0")  # a text font has these; symbol / TeX-encoded fonts do not
# Fonts that map A / a / 0 to something else (TeX encodings, symbols, dingbats, the
# last-resort placeholder font), found by name because their character maps look like text.
_NOT_TEXT = re.compile(r"^(cm[a-z]+10|D050000L|Standard Symbols|Last Resort|DejaVuMathTeX|STIXNonUni|STIXSiz)", re.IGNORECASE)


def candidate_characters() -> list[str]:
    """The characters considered as classes, before coverage and look-alike filtering."""
    ranges = [
        (0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A),  # digits, Latin
        (0xC0, 0xFF),  # Latin-1 letters (the signs × and ÷ removed below)
        (0x100, 0x17F),  # Latin Extended-A
        (0x391, 0x3A9), (0x3B1, 0x3C9),  # Greek
        (0x401, 0x40C), (0x40E, 0x44F), (0x451, 0x45C), (0x45E, 0x45F),  # Cyrillic
    ]
    chars = [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]
    return [c for c in chars if c not in ("\u00d7", "\u00f7", "\u03a2")]


@dataclass(frozen=True)
class Font:
    """A typeface file, its full name and the characters it maps."""

    path: Path
    name: str
    characters: frozenset


def find_fonts(data_dir: str | None = None) -> list[Font]:
    """Text fonts under ``data_dir`` (or the default folders), one per full name, sorted."""
    return list(_find_fonts(data_dir))


@functools.lru_cache(maxsize=4)  # reading ~100 character maps takes seconds; train and test share it
def _find_fonts(data_dir: str | None) -> tuple[Font, ...]:
    from fontTools.ttLib import TTFont

    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
        if not roots[0].is_dir():
            raise DataError(f"font folder {roots[0]} does not exist; point data.data_dir at a folder of .ttf/.otf files")
    else:
        import matplotlib

        roots = [Path(matplotlib.get_data_path()) / "fonts" / "ttf", SYSTEM_FONT_DIR]
    paths = sorted({p for root in roots if root.is_dir() for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")})
    fonts: dict[str, Font] = {}
    for path in paths:
        try:
            tt = TTFont(str(path), lazy=True)
            cmap = tt.getBestCmap() or {}
            name = tt["name"].getDebugName(4) or path.stem
        except Exception:  # an unreadable file is skipped, like fontconfig does
            continue
        chars = frozenset(chr(c) for c in cmap)
        if all(c in chars for c in _REQUIRED) and not _NOT_TEXT.match(name) and name not in fonts:
            fonts[name] = Font(path, name, chars)
    return tuple(sorted(fonts.values(), key=lambda f: f.name))


def render_glyph(font_path: Path, char: str, size: int = IMAGE_SIZE, scale: float = 1.0, dx: float = 0.0,
                 dy: float = 0.0, angle: float = 0.0) -> np.ndarray:
    """One glyph as a ``(size, size)`` uint8 array, white on black, on the font's baseline.

    The em square spans ``0.8 * scale`` of the image; the glyph is centred horizontally on
    its advance, the baseline sits at 75% of the height; ``dx``, ``dy`` shift it by that
    many output pixels and ``angle`` rotates it (degrees, counter-clockwise).
    """
    from PIL import Image, ImageDraw, ImageFont

    big = size * _SUPERSAMPLE
    font = ImageFont.truetype(str(font_path), size=max(1, round(0.8 * scale * big)))
    canvas = Image.new("L", (big, big), 0)
    x = big / 2 + dx * _SUPERSAMPLE
    y = 0.75 * big + dy * _SUPERSAMPLE
    ImageDraw.Draw(canvas).text((x, y), char, fill=255, font=font, anchor="ms")
    if angle:
        canvas = canvas.rotate(angle, resample=Image.BILINEAR, center=(big / 2, big / 2))
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.uint8)


def _cache_key(fonts: Sequence[Font], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in fonts:
        stat = f.path.stat()
        h.update(f"{f.path}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def merge_look_alikes(chars: Sequence[str], fonts: Sequence[Font], threshold: float = DUPLICATE_THRESHOLD,
                      size: int = IMAGE_SIZE) -> list[str]:
    """Drop characters that render like an earlier one in most fonts that have both.

    Two characters are the same class when the median, over the fonts that have both, of
    the mean absolute difference of their canonical (unjittered) renders on a 0..1 scale is
    below ``threshold``. The median, not the mean: a few fonts draw Greek or Cyrillic
    look-alikes differently, while accents differ a little in every font. Returns the kept
    characters in input order.
    """
    n = len(chars)
    diffs = torch.full((n, n, len(fonts)), float("nan"))
    for k, font in enumerate(fonts):
        have = [i for i, c in enumerate(chars) if c in font.characters]
        if len(have) < 2:
            continue
        renders = torch.from_numpy(np.stack([render_glyph(font.path, chars[i], size).ravel() for i in have]))
        x = renders.float() / 255.0
        idx = torch.tensor(have)
        diffs[idx[:, None], idx[None, :], k] = torch.cdist(x, x, p=1) / x.shape[1]
    median = diffs.nanmedian(dim=2).values  # nan where no font has both
    keep: list[int] = []
    for i in range(n):
        if not any(bool(median[i, j] < threshold) for j in keep):
            keep.append(i)
    return [chars[i] for i in keep]


def build_font_glyphs(
    fonts: Sequence[Font],
    characters: Sequence[str] | None = None,
    min_fonts: int = MIN_FONTS_PER_CLASS,
    renders_per_font: int = RENDERS_PER_FONT,
    test_fraction: float = TEST_CLASS_FRACTION,
    size: int = IMAGE_SIZE,
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Render the train and test splits (disjoint classes) from ``fonts``.

    Args:
        fonts: from ``find_fonts``.
        characters: candidate classes (default ``candidate_characters()``).
        min_fonts: keep characters that at least this many fonts have.
        renders_per_font: jittered drawings per (character, font).
        test_fraction: share of the classes held out for the test split.
        size: image side in pixels.

    Raises:
        DataError: fewer than 4 classes survive (too few or too sparse fonts).
    """
    chars = list(characters) if characters is not None else candidate_characters()
    chars = [c for c in chars if sum(c in f.characters for f in fonts) >= min_fonts]
    chars = merge_look_alikes(chars, fonts, size=size)
    if len(chars) < 4:
        raise DataError(
            f"only {len(chars)} characters are in at least {min_fonts} of the {len(fonts)} fonts found; "
            "install more fonts (apt-get install fonts-dejavu fonts-freefont-ttf) or point data.data_dir at a font folder"
        )
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    order = torch.randperm(len(chars), generator=gen).tolist()
    n_test = max(2, round(test_fraction * len(chars)))
    train_chars = sorted((chars[i] for i in order[n_test:]), key=ord)
    test_chars = sorted((chars[i] for i in order[:n_test]), key=ord)
    names = [f"U+{ord(c):04X} {c}" for c in train_chars + test_chars]
    rng = np.random.default_rng(SPLIT_SEED)

    def render_split(split_chars: list[str], first_label: int) -> ImageTensorDataset:
        images, labels = [], []
        for offset, char in enumerate(split_chars):
            for font in fonts:
                if char not in font.characters:
                    continue
                for _ in range(renders_per_font):
                    scale = rng.uniform(0.85, 1.05)
                    dx, dy = rng.uniform(-1.5, 1.5, size=2)
                    angle = rng.uniform(-8.0, 8.0)
                    image = render_glyph(font.path, char, size, scale, dx, dy, angle)
                    if image.any():  # a font may map a character to an empty glyph
                        images.append(image)
                        labels.append(first_label + offset)
        return ImageTensorDataset(torch.from_numpy(np.stack(images)).unsqueeze(1), torch.tensor(labels), names)

    return render_split(train_chars, 0), render_split(test_chars, len(train_chars))


def load_font_glyphs(split: str, data_dir: str | None = None, **_: object) -> ImageTensorDataset:
    """The ``font_glyphs`` dataset (see the module docstring), rendered once and cached.

    The cache is the image-folder loader's: one safetensors file per split, written
    atomically, with older renders of the same split removed.
    """
    from convrecipes.data.datasets import DEFAULT_CACHE_DIR
    from convrecipes.data.image_folder import _read_cache, _write_cache

    fonts = find_fonts(data_dir)
    if not fonts:
        raise DataError("no text fonts found; install some (apt-get install fonts-dejavu) or set data.data_dir")
    settings = {"size": IMAGE_SIZE, "renders": RENDERS_PER_FONT, "min_fonts": MIN_FONTS_PER_CLASS,
                "test_fraction": TEST_CLASS_FRACTION, "seed": SPLIT_SEED, "dup": DUPLICATE_THRESHOLD, "version": 2}
    key = _cache_key(fonts, settings)
    cache = {name: DEFAULT_CACHE_DIR / "font_glyphs" / f"{name}-{key}.safetensors" for name in ("train", "test")}
    cached = _read_cache(cache[split])
    if cached is not None:
        return cached[0]
    splits = dict(zip(("train", "test"), build_font_glyphs(fonts)))
    for name, dataset in splits.items():
        _write_cache(cache[name], dataset, unreadable=[])
    return splits[split]


def describe(dataset_train: ImageTensorDataset, dataset_test: ImageTensorDataset) -> dict:
    """Counts for reports: classes and images per split."""
    n_train = int(dataset_train.labels.unique().numel())
    n_test = int(dataset_test.labels.unique().numel())
    return {"train_classes": n_train, "test_classes": n_test, "train_images": len(dataset_train),
            "test_images": len(dataset_test),
            "images_per_class_mean": round((len(dataset_train) + len(dataset_test)) / max(1, n_train + n_test), 1)}
