"""Multi-class hinge loss (Weston & Watkins 1999; the form taught in CS231n)."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.losses.base import LossOutput, single_part
from convrecipes.losses.registry import LOSSES, at_least_fp32, check_ignore_index, kept_class_indices, mean_over_kept
from convrecipes.models.output import ModelOutput, logits_of


def multi_class_hinge_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    squared: bool = False,
    ignore_index: int | None = -100,
) -> torch.Tensor:
    """Weston–Watkins hinge, averaged over the batch (over the samples not ignored).

    ``L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + margin)`` (each term squared when
    ``squared``). This is ``C`` times ``torch.nn.MultiMarginLoss(p=1 or 2, margin=margin)``,
    which divides by the number of classes. Crammer–Singer (max over j) is a different loss.

    Args:
        logits: scores ``(B, C)``.
        target: class indices ``(B,)``.
        margin: Delta, the required gap between the true score and every other score.
        squared: square each hinge term (the L2-SVM form).
        ignore_index: samples with this target index cost nothing and the mean is over the
            others (all ignored: a zero on the graph); None ignores nothing.
    """
    target, keep = kept_class_indices(
        target, logits.shape[0], "MultiClassHingeLoss", check_ignore_index(ignore_index)
    )
    logits = at_least_fp32(logits)
    true_score = logits.gather(1, target[:, None])
    # relu (not clamp) so the gradient at the kink is 0, as in torch's own losses
    terms = F.relu(logits - true_score + margin)
    if squared:
        terms = terms * terms
    wrong_class = torch.ones_like(terms, dtype=torch.bool).scatter_(1, target[:, None], False)
    per_sample = torch.where(wrong_class, terms, torch.zeros_like(terms)).sum(dim=1)
    return mean_over_kept(per_sample, keep)


@LOSSES.register("hinge")
class MultiClassHingeLoss(nn.Module):
    """Multi-class SVM loss of Weston & Watkins (CS231n): sum of hinges over the wrong classes.

    With all scores equal each sample costs ``(C - 1) * margin``. Refuses soft targets
    (mixup/cutmix): a hinge on a mixture of classes has no meaning.

    Returns a ``LossOutput`` (a 0-dim tensor) whose one part is named ``hinge``.

    Args:
        margin: Delta, default 1.0.
        squared: use the squared hinge ``max(0, .)^2``.
        ignore_index: samples with this target index contribute nothing and the mean is over
            the others (torch's default -100); None ignores nothing.
    """

    needs_embeddings: bool = False
    lr: float | None = None

    def __init__(self, margin: float = 1.0, squared: bool = False, ignore_index: int | None = -100) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.squared = bool(squared)
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        loss = multi_class_hinge_loss(logits_of(output), target, self.margin, self.squared, self.ignore_index)
        return single_part(loss, "hinge")

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, ignore_index={self.ignore_index}"
