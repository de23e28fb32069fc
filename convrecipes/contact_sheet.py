"""A contact sheet: a grid of images, each captioned, in one PNG.

Shared by ``find-label-issues`` (images whose label is probably wrong) and ``evaluate``
(the most confidently wrong test images). The images are the datasets' uint8 tensors, the
pixels as loaded (before normalisation), so they appear as the user's files do: grayscale
drawn gray, RGB as RGB, each pixel a square (nearest-neighbour scaling, so an 8x8 digit
is not smeared into a blur).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch

PathLike = Union[str, os.PathLike]


def draw_contact_sheet(
    images: torch.Tensor,
    captions: Sequence[str],
    path: PathLike,
    title: str,
    columns: int = 5,
    caption_fontsize: float = 7.5,
) -> Path:
    """Write the images in a grid, each with its caption above it, to a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot state), so it is safe on headless
    machines and in threads.

    Args:
        images: ``(N, C, H, W)`` uint8 with ``C`` 1 (drawn gray) or 3 (RGB); ``N >= 1``.
        captions: one caption per image (may contain newlines).
        path: the PNG to write; parent folders are created.
        title: the sheet's title.
        columns: images per row (fewer when there are fewer images).
        caption_fontsize: font size of the captions in points.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} images and "
                         f"{len(captions)} captions")
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    lines = max(caption.count("\n") + 1 for caption in captions)
    tile_w, tile_h = 2.3, 2.2 + 0.25 * lines * caption_fontsize / 7.5
    fig = Figure(figsize=(tile_w * columns, tile_h * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        pixels = image.permute(1, 2, 0).cpu().numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(caption, fontsize=caption_fontsize)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (tile_h * rows + 0.4)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


__all__ = ["draw_contact_sheet"]
