"""The memorisation curve: what a model predicts for the training images whose label was flipped.

With injected label noise the true labels are known. Early in training a network predicts
the *true* class of most flipped examples (it learns the clean pattern first); later it
memorises the noisy labels one by one (Arpit et al. 2017, "A Closer Look at Memorization in
Deep Networks"). A method that resists label noise keeps ``flipped_pred_true`` high and
``flipped_pred_noisy`` low. ``MemorisationCurve`` logs both, in percent of a fixed sample of
the flipped training examples, on every validated epoch (``trainer.eval_every_epochs``), for
any trainer; recipes with ``data.label_noise`` add it, and ``curves.png`` plots it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from convrecipes.data.loader import ImageTensorDataset, InMemoryLoader
from convrecipes.trainers.callbacks import Callback

if TYPE_CHECKING:
    from convrecipes.trainers.base import Trainer

#: flipped examples scored per epoch at most (a fixed seeded sample): +-0.7 points at 50%
DEFAULT_SAMPLE = 5000


def flipped_subset(train: ImageTensorDataset, max_images: Optional[int] = DEFAULT_SAMPLE,
                   seed: int = 0) -> Optional[ImageTensorDataset]:
    """The training images whose label differs from their true one (at most ``max_images``,
    a seeded sample), with ``labels = true * K + noisy`` so one evaluation pass returns both;
    None when nothing was flipped or the true labels are unknown."""
    if train.clean_labels is None:
        return None
    flipped = (train.labels != train.clean_labels).nonzero().squeeze(1)
    if flipped.numel() == 0:
        return None
    if max_images is not None and flipped.numel() > max_images:
        g = torch.Generator().manual_seed(int(seed))
        flipped = flipped[torch.randperm(flipped.numel(), generator=g)[:max_images]].sort().values
    k = train.num_classes
    codes = train.clean_labels[flipped] * k + train.labels[flipped]
    return ImageTensorDataset(train.images[flipped].clone(), codes, list(train.classes))


class MemorisationCurve(Callback):
    """Adds ``flipped_pred_noisy`` and ``flipped_pred_true`` (percent of the flipped training
    examples predicted as their noisy / their true label) to the epoch's metrics.

    Args:
        loader: an evaluation loader over ``flipped_subset(train)`` (labels encode both).
        num_classes: K, to decode the labels.
    """

    def __init__(self, loader: InMemoryLoader, num_classes: int) -> None:
        self.loader = loader
        self.num_classes = int(num_classes)

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        if not trainer.validated:
            return
        logits, codes, _ = trainer.predict(self.loader)
        metrics.update(memorisation_rates(logits.argmax(1), codes, self.num_classes))


def memorisation_rates(predicted: torch.Tensor, codes: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Percent of examples predicted as their noisy and as their true label, from
    ``codes = true * K + noisy``."""
    true, noisy = codes // num_classes, codes % num_classes
    n = max(int(codes.numel()), 1)
    return {"flipped_pred_noisy": 100.0 * float((predicted == noisy).sum()) / n,
            "flipped_pred_true": 100.0 * float((predicted == true).sum()) / n}
