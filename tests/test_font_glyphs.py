"""The font_glyphs dataset: look-alike merging, disjoint class split, determinism.

Uses only matplotlib's bundled fonts (DejaVu, STIX), present wherever convrecipes installs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from convrecipes.data import DATASETS
from convrecipes.data.font_glyphs import (
    build_font_glyphs,
    describe,
    find_fonts,
    merge_look_alikes,
    render_glyph,
)
from convrecipes.errors import DataError

MPL_FONTS = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf")


@pytest.fixture(scope="module")
def fonts():
    found = find_fonts(MPL_FONTS)
    names = [f.name for f in found]
    assert "DejaVu Sans" in names and "STIXGeneral-Regular" in names
    # TeX-encoded and symbol fonts map A/a/0 to other shapes: they must not count as text fonts
    assert not any(n.startswith(("cm", "STIXNonUni", "STIXSiz", "Last Resort")) for n in names)
    return found


def test_registered_under_its_name():
    assert "font_glyphs" in DATASETS.names()


def test_glyphs_sit_on_the_baseline_at_a_fixed_size(fonts):
    sans = next(f for f in fonts if f.name == "DejaVu Sans")
    small, big = render_glyph(sans.path, "o"), render_glyph(sans.path, "O")
    assert small.shape == (32, 32) and small.dtype == np.uint8
    # not stretched to the bounding box: the lower-case o covers clearly less ink and fewer rows
    assert small.sum() < 0.8 * big.sum()
    rows_small, rows_big = np.nonzero(small.sum(1))[0], np.nonzero(big.sum(1))[0]
    assert rows_small.min() > rows_big.min() + 2  # shorter: starts lower
    assert abs(int(rows_small.max()) - int(rows_big.max())) <= 1  # same baseline


def test_look_alikes_are_merged_but_accents_and_case_are_not(fonts):
    chars = ["A", "\u0391", "\u0410", "o", "O", "\u03bf", "e", "\u00e9", "K"]
    kept = merge_look_alikes(chars, fonts)
    # Greek Alpha, Cyrillic A and Greek omicron draw like Latin A and o in most fonts
    assert kept == ["A", "o", "O", "e", "\u00e9", "K"]


def test_splits_hold_disjoint_classes_and_are_deterministic(fonts):
    chars = list("ABCDEFGHJKMNPRSTUVWXYZ")
    train, test = build_font_glyphs(fonts, chars, min_fonts=4, renders_per_font=1, test_fraction=0.25)
    again_train, again_test = build_font_glyphs(fonts, chars, min_fonts=4, renders_per_font=1, test_fraction=0.25)
    assert torch.equal(train.images, again_train.images) and torch.equal(test.images, again_test.images)
    n_train, n_test = train.labels.unique().numel(), test.labels.unique().numel()
    assert n_train + n_test == len(chars) and n_test == round(0.25 * len(chars))
    assert set(train.labels.tolist()) == set(range(n_train))
    assert set(test.labels.tolist()) == set(range(n_train, n_train + n_test))
    assert train.classes == test.classes and len(train.classes) == len(chars)
    # one image per font that has the character
    a_fonts = sum("A" in f.characters for f in fonts)
    label_of_a = train.classes.index("U+0041 A")
    split = train if label_of_a < n_train else test
    assert int((split.labels == label_of_a).sum()) == a_fonts
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == torch.uint8
    counts = describe(train, test)
    assert (counts["train_classes"], counts["test_classes"]) == (n_train, n_test)
    assert (counts["train_images"], counts["test_images"]) == (len(train), len(test))


def test_too_few_fonts_is_a_clear_error(fonts):
    with pytest.raises(DataError, match="install more fonts"):
        build_font_glyphs(fonts[:2], list("ABCDEF"), min_fonts=8)
    with pytest.raises(DataError, match="does not exist"):
        find_fonts("/nonexistent/fonts")
