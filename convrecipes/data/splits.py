"""Stratified holdout splits and small stratified subsets.

Randomness comes from ``numpy.random.RandomState``: its stream is frozen by NumPy's
compatibility policy (NEP 19), so a split drawn with a seed stays the same across NumPy
and PyTorch upgrades, and a fixed test set never silently changes.
"""

from __future__ import annotations

import numpy as np
import torch

from convrecipes.errors import DataError


def _class_members(labels: torch.Tensor) -> list[tuple[int, np.ndarray]]:
    """``(class, indices)`` for every class present, classes ascending, indices ascending."""
    labels_np = torch.as_tensor(labels).detach().cpu().long().numpy()
    if labels_np.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels_np.shape)}")
    order = np.argsort(labels_np, kind="stable")
    classes, starts = np.unique(labels_np[order], return_index=True)
    groups = np.split(order, starts[1:])
    return [(int(c), g) for c, g in zip(classes, groups)]


def _to_index_tensor(parts: list[np.ndarray]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.long)
    # Ascending order keeps the dataset's own order, so a subset reads like the original.
    return torch.from_numpy(np.sort(np.concatenate(parts)).astype(np.int64))


def stratified_split(labels: torch.Tensor, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into a kept part and a holdout part with the same class proportions.

    Each class gives ``round(n_c * holdout_fraction)`` samples to the holdout, but a class
    with at least two samples always keeps at least one on each side; a class with one
    sample stays on the kept side.

    Args:
        labels: ``(N,)`` class indices.
        holdout_fraction: share of each class to hold out, in ``(0, 1)``.
        seed: the split depends on this seed only (not on any global RNG).

    Returns:
        ``(keep_indices, holdout_indices)``, each ascending int64.

    Raises:
        ValueError: ``holdout_fraction`` is outside ``(0, 1)``.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}; e.g. use 0.2 for an 80/20 split")
    rng = np.random.RandomState(seed)
    keep, hold = [], []
    for _, members in _class_members(labels):
        n = len(members)
        members = members[rng.permutation(n)]
        n_hold = 0 if n < 2 else min(max(int(round(n * holdout_fraction)), 1), n - 1)
        hold.append(members[:n_hold])
        keep.append(members[n_hold:])
    return _to_index_tensor(keep), _to_index_tensor(hold)


def subset_indices(
    labels: torch.Tensor,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A stratified subset, for the quick small-data runs done before a full training.

    Give exactly one of ``fraction`` (each class keeps ``round(n_c * fraction)`` samples,
    at least one) or ``per_class`` (each class keeps exactly that many).

    Args:
        labels: ``(N,)`` class indices.
        fraction: share of each class to keep, in ``(0, 1]``.
        per_class: samples to keep from every class, >= 1.
        seed: the subset depends on this seed only.

    Returns:
        Ascending int64 indices into ``labels``.

    Raises:
        ValueError: neither or both of ``fraction``/``per_class``, or a value out of range.
        DataError: a class has fewer samples than ``per_class``.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction or per_class (e.g. fraction=0.1 or per_class=100)")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}; e.g. 0.1 keeps a tenth of each class")
    if per_class is not None and (isinstance(per_class, bool) or int(per_class) != per_class or per_class < 1):
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    groups = _class_members(labels)
    if per_class is not None:
        smallest = min(groups, key=lambda g: len(g[1]), default=None)
        if smallest is not None and len(smallest[1]) < per_class:
            raise DataError(
                f"per_class={per_class} but class {smallest[0]} has only {len(smallest[1])} samples; "
                f"use per_class <= {len(smallest[1])} or a fraction instead"
            )
    rng = np.random.RandomState(seed)
    chosen = []
    for _, members in groups:
        n = len(members)
        take = int(per_class) if per_class is not None else max(1, int(round(n * fraction)))  # type: ignore[operator]
        chosen.append(members[rng.permutation(n)[:take]])
    return _to_index_tensor(chosen)
