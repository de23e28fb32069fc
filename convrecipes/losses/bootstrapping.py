"""Bootstrapping losses for noisy labels (Reed et al. 2015, "Training Deep Neural Networks on
Noisy Labels with Bootstrapping"), soft and hard.

The target mixes the given label ``t`` with the model's own current belief, rebuilt from
the prediction ``q = softmax(logits)`` at every batch, so a confident prediction can outvote
a wrong label:

- soft: ``L = -sum_k [beta t_k + (1 - beta) q_k] log q_k`` (beta 0.95). ``q`` is **not**
  detached: the ``(1 - beta) q log q`` part is an entropy term, and the gradient equals that
  of ``beta * CE(t, q) + (1 - beta) * H(q)``. (Detached, as a widely copied PyTorch port does,
  the gradient is exactly ``beta`` times cross-entropy's: the same training under Adam.)
- hard: ``L = -sum_k [beta t_k + (1 - beta) z_k] log q_k`` with ``z = onehot(argmax q)``
  (beta 0.8); argmax has no gradient, so this is cross-entropy against the fixed target.

Both take logits ``(B, K)`` and class indices ``(B,)`` (or soft targets ``(B, K)``) and return
the batch mean. Samples whose index is ``ignore_index`` (torch's default -100) have no given
label to mix with the prediction, so they contribute nothing and the mean is over the others.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.losses.base import LossOutput, single_part
from convrecipes.losses.registry import LOSSES, at_least_fp32, check_ignore_index, kept_class_indices, mean_over_kept
from convrecipes.models.output import ModelOutput, logits_of


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (the weight of the given label), got {beta!r}")
    return float(beta)


def _target_distribution(
    logits: torch.Tensor, target: torch.Tensor, name: str, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The given labels as distributions ``(B, K)`` and the mask of kept samples (None: all)."""
    if target.is_floating_point() and target.dim() == 2:
        if target.shape != logits.shape:
            raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got "
                             f"{tuple(target.shape)}")
        return target.to(logits.dtype), None
    indices, keep = kept_class_indices(target, logits.shape[0], name, check_ignore_index(ignore_index))
    return F.one_hot(indices, logits.shape[1]).to(logits.dtype), keep


def soft_bootstrapping_loss(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 0.95, ignore_index: int | None = -100
) -> torch.Tensor:
    """``-mean_i sum_k [beta t_ik + (1 - beta) q_ik] log q_ik``, ``q = softmax(logits)`` attached.

    The mean is over the samples whose index is not ``ignore_index`` (None: all).
    """
    beta = _check_beta(beta)
    logits = at_least_fp32(logits)
    t, keep = _target_distribution(logits, target, "soft_bootstrapping", ignore_index)
    log_q = F.log_softmax(logits, dim=1)
    q = log_q.exp()  # attached: the entropy part of the gradient comes through q
    return mean_over_kept(-((beta * t + (1.0 - beta) * q) * log_q).sum(dim=1), keep)


def hard_bootstrapping_loss(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 0.8, ignore_index: int | None = -100
) -> torch.Tensor:
    """``-mean_i sum_k [beta t_ik + (1 - beta) z_ik] log q_ik``, ``z = onehot(argmax q)``.

    The mean is over the samples whose index is not ``ignore_index`` (None: all).
    """
    beta = _check_beta(beta)
    logits = at_least_fp32(logits)
    t, keep = _target_distribution(logits, target, "hard_bootstrapping", ignore_index)
    log_q = F.log_softmax(logits, dim=1)
    z = F.one_hot(logits.detach().argmax(dim=1), logits.shape[1]).to(log_q.dtype)
    return mean_over_kept(-((beta * t + (1.0 - beta) * z) * log_q).sum(dim=1), keep)


@LOSSES.register("soft_bootstrapping")
class SoftBootstrappingLoss(nn.Module):
    """Reed et al.'s soft bootstrapping (see the module docstring).

    Returns a ``LossOutput`` (a 0-dim tensor) whose one part is named ``soft_bootstrapping``
    (``hard_bootstrapping`` for the hard one).

    Args:
        beta: weight of the given label, default 0.95 (Reed et al.).
        ignore_index: samples with this target index contribute nothing and the mean is over
            the others (torch's default -100); None ignores nothing.
    """

    needs_embeddings: bool = False
    lr: float | None = None

    def __init__(self, beta: float = 0.95, ignore_index: int | None = -100) -> None:
        super().__init__()
        self.beta = _check_beta(beta)
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        loss = soft_bootstrapping_loss(logits_of(output), target, self.beta, self.ignore_index)
        return single_part(loss, "soft_bootstrapping")

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}"


@LOSSES.register("hard_bootstrapping")
class HardBootstrappingLoss(SoftBootstrappingLoss):
    """Reed et al.'s hard bootstrapping (see the module docstring).

    Args:
        beta: weight of the given label, default 0.8 (Reed et al.).
        ignore_index: samples with this target index contribute nothing (torch's default
            -100); None ignores nothing.
    """

    def __init__(self, beta: float = 0.8, ignore_index: int | None = -100) -> None:
        super().__init__(beta, ignore_index)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        loss = hard_bootstrapping_loss(logits_of(output), target, self.beta, self.ignore_index)
        return single_part(loss, "hard_bootstrapping")
