"""How well embeddings separate classes: Recall@1, spread ratios, and a 2-D plot.

For comparing metric and margin losses (center, triplet, A-Softmax) beyond accuracy. All
functions take ``embeddings (N, D)`` and integer ``labels (N,)`` as tensors or arrays and
work on the CPU or wherever the tensors are; pairwise distances are computed in row chunks
so ``N = 10000`` needs ``chunk_size * N`` floats, not ``N^2``, on the centred embeddings (the
same distances, without float32's loss of precision when all embeddings share a large offset).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def _as_inputs(embeddings: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(embeddings).detach()
    y = torch.as_tensor(labels).detach()
    if x.dim() != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError("labels must be integer class indices")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x, y.to(device=x.device, dtype=torch.long)


def _class_means(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct labels present and the mean embedding of each."""
    classes, index = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)
    counts = torch.bincount(index, minlength=len(classes)).to(x.dtype)
    return classes, sums / counts[:, None]


def recall_at_1(embeddings: ArrayLike, labels: ArrayLike, chunk_size: int = 1024) -> float:
    """Fraction of samples whose nearest other sample (Euclidean) has the same label.

    Each sample is a query against all others (itself excluded). Queries whose class has no
    other sample cannot be right or wrong and are left out. Ties go to the lower index.

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` integer labels.
        chunk_size: query rows per distance block (memory ``chunk_size * N``).

    Raises:
        ValueError: fewer than two samples, or no class with at least two samples.
    """
    x, y = _as_inputs(embeddings, labels)
    n = x.shape[0]
    if n < 2:
        raise ValueError("recall_at_1 needs at least two samples")
    _, index, counts = torch.unique(y, return_inverse=True, return_counts=True)
    has_match = counts[index] > 1
    if not bool(has_match.any()):
        raise ValueError("recall_at_1 needs at least one class with two or more samples")
    # Centre first: distances (and so the ranking) do not change, but with a large shared
    # offset the |x|^2 and q.x terms below would be ~|offset|^2 and float32 would lose the
    # small differences that decide the nearest neighbour.
    x = x - x.mean(dim=0, keepdim=True)
    sq_norms = (x * x).sum(dim=1)
    hits = 0
    for start in range(0, n, max(1, int(chunk_size))):
        stop = min(n, start + max(1, int(chunk_size)))
        # Ranking only needs |q|^2 + |x|^2 - 2 q.x up to the per-row constant |q|^2.
        scores = sq_norms[None, :] - 2.0 * x[start:stop] @ x.T
        rows = torch.arange(stop - start, device=x.device)
        scores[rows, rows + start] = torch.inf
        nearest = scores.argmin(dim=1)
        correct = (y[nearest] == y[start:stop]) & has_match[start:stop]
        hits += int(correct.sum())
    return hits / int(has_match.sum())


def spread_ratio(embeddings: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Within-class spread relative to between-class separation, Euclidean.

    ``within`` is the mean distance of the samples to their class center (class mean),
    ``between`` the mean distance over all pairs of distinct class centers, and
    ``ratio = within / between`` (smaller is better separated).

    Returns:
        ``{"ratio", "within", "between"}``.

    Raises:
        ValueError: fewer than two classes.
    """
    x, y = _as_inputs(embeddings, labels)
    x = x.double() if x.device.type == "cpu" else x
    classes, centers = _class_means(x, y)
    if len(classes) < 2:
        raise ValueError("spread_ratio needs at least two classes")
    index = torch.searchsorted(classes, y)
    within = (x - centers[index]).norm(dim=1).mean()
    pair_i, pair_j = torch.triu_indices(len(classes), len(classes), offset=1, device=x.device)
    between = (centers[pair_i] - centers[pair_j]).norm(dim=1).mean()
    return {"ratio": float(within / between), "within": float(within), "between": float(between)}


def angular_spread(embeddings: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Largest within-class angle versus smallest angle between classes, in degrees.

    A class's center direction is the normalised mean of its unit-normalised embeddings (the
    mean direction). ``max_within_deg`` is the largest angle between a sample and its class's
    center direction, ``min_between_deg`` the smallest angle between two classes' center
    directions, ``ratio = max_within_deg / min_between_deg``. A-Softmax aims for a small
    ratio (below 1: every sample closer in angle to its center than any two centers are).

    Returns:
        ``{"ratio", "max_within_deg", "min_between_deg"}``.

    Raises:
        ValueError: fewer than two classes.
    """
    x, y = _as_inputs(embeddings, labels)
    x = x.double() if x.device.type == "cpu" else x  # acos near 1 needs the precision
    u = torch.nn.functional.normalize(x, dim=1)
    classes, mean_dirs = _class_means(u, y)
    if len(classes) < 2:
        raise ValueError("angular_spread needs at least two classes")
    dirs = torch.nn.functional.normalize(mean_dirs, dim=1)
    index = torch.searchsorted(classes, y)
    within = torch.rad2deg(torch.acos((u * dirs[index]).sum(dim=1).clamp(-1.0, 1.0))).max()
    pair_i, pair_j = torch.triu_indices(len(classes), len(classes), offset=1, device=x.device)
    cos_between = (dirs[pair_i] * dirs[pair_j]).sum(dim=1).clamp(-1.0, 1.0)
    between = torch.rad2deg(torch.acos(cos_between)).min()
    ratio = float(within / between) if float(between) > 0 else math.inf
    return {"ratio": ratio, "max_within_deg": float(within), "min_between_deg": float(between)}


def plot_embeddings_2d(
    embeddings: ArrayLike,
    labels: ArrayLike,
    path: Union[str, Path],
    class_names: Sequence[str] | None = None,
) -> Path:
    """Scatter-plot embeddings coloured by class into a PNG (matplotlib's Agg canvas).

    2-D embeddings are drawn as they are (as in the center-loss and SphereFace papers'
    figures); higher dimensions are projected on their first two principal components.
    Does not touch pyplot's global state, so it is safe on headless machines and in threads.

    Args:
        embeddings: ``(N, D)``, D >= 2.
        labels: ``(N,)`` integer labels.
        path: the PNG to write; parent folders are created.
        class_names: names indexed by label, for the legend.

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, y = _as_inputs(embeddings, labels)
    x, y = x.double().cpu(), y.cpu()
    if x.shape[1] < 2:
        raise ValueError(f"plot_embeddings_2d needs at least 2 dimensions, got {x.shape[1]}")
    if x.shape[1] > 2:
        centered = x - x.mean(dim=0)
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        points, axes = (centered @ v[:2].T).numpy(), ("PC 1", "PC 2")
    else:
        points, axes = x.numpy(), ("dim 1", "dim 2")
    labels_np = y.numpy()

    fig = Figure(figsize=(6, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    classes = np.unique(labels_np)
    if len(classes) <= 20:
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        colors = [cmap(i) for i in range(len(classes))]
    else:
        cmap = matplotlib.colormaps["viridis"]
        colors = [cmap(i / (len(classes) - 1)) for i in range(len(classes))]
    for c, color in zip(classes, colors):
        mask = labels_np == c
        name = class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(int(c))
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, label=name, color=color)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_aspect("equal", adjustable="datalim")
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize="small", loc="best")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
