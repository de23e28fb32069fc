"""Cross-entropy, plain and label-smoothed (Szegedy et al. 2016), for class indices or soft targets."""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.losses.base import LossOutput, single_part
from convrecipes.losses.registry import (
    LOSSES,
    at_least_fp32,
    check_ignore_index,
    kept_class_indices,
    mean_over_kept,
)
from convrecipes.models.output import ModelOutput, logits_of


def label_smoothing_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 0.1,
    class_weights: torch.Tensor | None = None,
    ignore_index: int | None = -100,
) -> torch.Tensor:
    """Cross-entropy against the smoothed target ``q' = (1 - eps) * q + eps / K``.

    ``q`` is the one-hot of class indices ``(B,)`` or given soft targets ``(B, K)`` (mixup/cutmix),
    and ``eps / K`` goes to all K classes, the true one included (not ``eps / (K - 1)`` over the
    wrong ones). For indices this equals ``F.cross_entropy(logits, y, weight=w, label_smoothing=eps)``.

    With class weights ``w`` each sample costs ``-sum_k w_k q'_k log p_k`` and the batch is
    normalised by ``sum_i sum_k w_k q_ik`` (the sum of the true classes' weights for indices,
    as torch does). For soft targets torch divides by the batch size instead; we keep the
    weight normaliser so that a one-hot soft target gives exactly the loss of its index.

    Samples whose class index is ``ignore_index`` cost nothing and leave the normaliser
    (torch's ``ignore_index``); with every sample ignored the loss is a zero on the graph
    where torch gives NaN. Soft targets have no index and are never ignored.

    Args:
        logits: ``(B, K)``.
        target: int class indices ``(B,)`` or float probabilities ``(B, K)``.
        eps: smoothing mass in [0, 1).
        class_weights: optional ``(K,)`` per-class weights.
        ignore_index: a target index whose samples are left out (torch's default -100), or
            None to ignore nothing.
    """
    batch, num_classes = logits.shape
    ignore_index = check_ignore_index(ignore_index)
    keep = None
    logits = at_least_fp32(logits)  # softmax in fp32 also under bf16/fp16 autocast
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        q = target.to(logits.dtype)
    else:
        indices, keep = kept_class_indices(target, batch, "cross-entropy", ignore_index)
        q = F.one_hot(indices, num_classes).to(logits.dtype)
        if keep is not None:
            q = q * keep[:, None].to(q.dtype)  # an ignored sample has no target mass at all
    if class_weights is not None and class_weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights has {class_weights.numel()} entries for {num_classes} classes; give one weight per class"
        )
    smoothed = (1.0 - eps) * q + eps / num_classes if eps else q
    log_p = F.log_softmax(logits, dim=1)
    if class_weights is None:
        return mean_over_kept(-(smoothed * log_p).sum(dim=1), keep)
    w = class_weights.to(log_p)
    per_sample = -(w * smoothed * log_p).sum(dim=1)
    if keep is not None:
        per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    # q is zero on ignored rows, so they leave the normaliser too; clamp: all ignored -> 0
    return per_sample.sum() / (q * w).sum().clamp(min=torch.finfo(log_p.dtype).tiny)


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy for class indices or soft targets (mixup/cutmix).

    Returns a ``LossOutput`` (a 0-dim tensor) whose one part is named ``cross_entropy``
    (``label_smoothing_ce`` for the smoothed loss).

    Args:
        class_weights: optional per-class weights (see ``label_smoothing_cross_entropy``).
        ignore_index: samples with this target index contribute nothing and the mean is over
            the others (torch's default -100); None ignores nothing.
    """

    needs_embeddings: bool = False
    lr: float | None = None
    eps: float = 0.0
    part_name: str = "cross_entropy"

    def __init__(self, class_weights: Sequence[float] | None = None, ignore_index: int | None = -100) -> None:
        super().__init__()
        self._init_weights(class_weights)
        self.ignore_index = check_ignore_index(ignore_index)

    def _init_weights(self, class_weights: Sequence[float] | None) -> None:
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.dim() != 1 or not torch.all(weights >= 0) or not torch.any(weights > 0):
                raise ValueError(
                    f"class_weights must be a list of non-negative numbers, not all zero; got {list(class_weights)}"
                )
        # Configuration, rebuilt from the recipe: not part of the checkpointed state.
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        loss = label_smoothing_cross_entropy(
            logits_of(output), target, self.eps, self.class_weights, self.ignore_index
        )
        return single_part(loss, self.part_name)

    def extra_repr(self) -> str:
        weighted = "" if self.class_weights is None else f", class_weights={self.class_weights.tolist()}"
        return f"eps={self.eps}{weighted}, ignore_index={self.ignore_index}"


@LOSSES.register("label_smoothing_ce")
class LabelSmoothingCrossEntropy(CrossEntropyLoss):
    """Label-smoothed cross-entropy (Szegedy et al. 2016, "Rethinking the Inception Architecture").

    Target ``q' = (1 - eps) * q + eps / K`` over all K classes; soft targets from
    mixup/cutmix are smoothed the same way. Equals ``F.cross_entropy(label_smoothing=eps)``
    and timm's ``LabelSmoothingCrossEntropy`` for class indices.

    Args:
        eps: smoothing mass, default 0.1.
        class_weights: optional per-class weights.
        ignore_index: samples with this target index contribute nothing (torch's default -100);
            None ignores nothing.
    """

    part_name = "label_smoothing_ce"

    def __init__(
        self, eps: float = 0.1, class_weights: Sequence[float] | None = None, ignore_index: int | None = -100
    ) -> None:
        super().__init__(class_weights, ignore_index)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)
