"""Unsupervised Data Augmentation: ``UDATrainer`` and the consistency loss MPL's teacher shares.

What: a model trains on its labeled batch and, at the same time, is asked to give a
strongly augmented unlabeled image the same prediction it gives a weakly augmented view of
that image (Xie, Dai, Hovy, Luong & Le 2020, "Unsupervised Data Augmentation for
Consistency Training", https://arxiv.org/abs/1904.12848)::

    loss = CE(labeled) + lambda(t) * mean_u[ 1{max p_weak >= tau} * KL(sharpen(p_weak, T) || p_strong) ]

The target ``sharpen(p_weak, T) = softmax(z_weak / T)`` is a constant (stop-gradient);
``T = 0.7`` sharpens it, ``tau = 0.6`` masks out unlabeled images the model is not yet
confident about, and ``lambda(t)`` ramps linearly from 0 to ``uda_weight`` over
``ramp_steps`` steps so the random early predictions do not dominate. The mean is over
all unlabeled images (masked ones count as 0), so the term's scale does not jump with the
mask rate, and two accumulation micro-batches average to one batch of twice the size.

When: few labels and many unlabeled images of the same classes. It is also the teacher's
auxiliary loss in Meta Pseudo Labels (``convrecipes.trainers.meta_pseudo_labels``), and the
baseline MPL must be reported against: reproductions found most of MPL's gain comes from
its teacher's UDA term.

Expected effect: on CIFAR-10 with 4,000 labels, UDA reported 5.3% error against about 20%
for the supervised baseline with the same labels. Our measured effect (test top-1, 3 seeds,
``python benchmarks/mpl_compare.py``): Fashion-MNIST with 40 labels per class 80.3 -> 83.6,
digits with 4 labels per class 86.7 -> 91.6 (``benchmarks/results/mpl_*.json``).

Data: the loader is a ``SemiSupervisedLoader`` (build one with ``data.labels_per_class``
or ``data.unlabeled_folder`` in a recipe); the labeled batch goes through the trainer's
``augment``, each unlabeled batch through ``weak_augment`` and ``strong_augment``, on the
device, drawn from torch's global generator (so differently on every process, as the base
seeds it). The unlabeled images' true labels (when the data has them) are never trained
on; the trainer only logs how often its weak-view predictions agree with them
(``pseudo_label_acc``, for analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.data.semi_supervised import SemiSupervisedBatch
from convrecipes.errors import RecipeError
from convrecipes.losses.base import as_loss_output
from convrecipes.models.output import logits_of
from convrecipes.trainers.base import StepOutput, Trainer

__all__ = ["UDATrainer", "SemiSupervisedViews", "uda_consistency", "linear_ramp", "prepare_views",
           "check_uda_settings"]


def uda_consistency(weak_logits: torch.Tensor, strong_logits: torch.Tensor, temperature: float = 0.7,
                    threshold: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's masked consistency loss and the share of unlabeled images it kept.

    Args:
        weak_logits: ``(B, C)`` logits on the weak views (used as constants).
        strong_logits: ``(B, C)`` logits on the strong views of the same images.
        temperature: sharpening temperature of the target (UDA/MPL: 0.7).
        threshold: minimum max-probability (unsharpened) of the weak prediction for an
            image to count (UDA/MPL: 0.6).

    Returns:
        ``(loss, mask_rate)``: ``mean over all B of mask * KL(target || softmax(strong))``
        and the fraction of images with ``mask = 1``.
    """
    weak = weak_logits.detach().float()
    confidence = weak.softmax(dim=1).amax(dim=1)
    mask = (confidence >= threshold).float()
    log_target = F.log_softmax(weak / temperature, dim=1)
    per_image = (log_target.exp() * (log_target - F.log_softmax(strong_logits.float(), dim=1))).sum(dim=1)
    return (per_image * mask).mean(), mask.mean()


def linear_ramp(step: int, ramp_steps: int) -> float:
    """``min(1, step / ramp_steps)``; 1 when ``ramp_steps`` is 0."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


@dataclass
class SemiSupervisedViews:
    """One step's data on the device: the augmented labeled batch, a weak and a strong view
    of the unlabeled batch, and the unlabeled images' hidden labels (analysis only, -1
    where unknown; never trained on)."""

    labeled_images: torch.Tensor
    labels: torch.Tensor
    weak_images: torch.Tensor
    strong_images: torch.Tensor
    hidden_labels: torch.Tensor


def prepare_views(trainer: Trainer, batch: Any, weak_augment: Optional[nn.Module],
                  strong_augment: Optional[nn.Module]) -> SemiSupervisedViews:
    """A ``SemiSupervisedBatch`` -> ``SemiSupervisedViews``: the labeled part through the
    trainer's ``augment``, the unlabeled part through both view augments (``None``: the
    trainer's normalisation only)."""
    if not isinstance(batch, SemiSupervisedBatch):
        raise TypeError(f"{type(trainer).__name__} trains on labeled and unlabeled data together, but the loader "
                        f"yielded a {type(batch).__name__}; give it a SemiSupervisedLoader (in a recipe: "
                        f"data.labels_per_class=N or data.unlabeled_folder=<folder>)")
    images, labels = trainer.prepare_batch(*batch.labeled, train=True)
    raw_u, hidden = batch.unlabeled
    raw_u = raw_u.to(trainer.device, non_blocking=True)
    hidden = hidden.to(trainer.device, non_blocking=True)
    floats = raw_u.float().div_(255.0) if raw_u.dtype == torch.uint8 else raw_u.float()
    views = []
    for augment in (weak_augment, strong_augment):
        transform = augment if augment is not None else trainer.eval_transform
        view = floats.clone()
        if transform is not None:
            # the view augments take class indices like every augment; the hidden labels
            # only fill that slot (-1 where unknown) and come back unused
            view, _ = transform(view, hidden.clamp_min(0))
        if trainer.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        views.append(view)
    return SemiSupervisedViews(images, labels, views[0], views[1], hidden)


def check_uda_settings(uda_weight: float, temperature: float, threshold: float, ramp_steps: int) -> None:
    """Refuse out-of-range UDA settings with the key to fix."""
    if not uda_weight >= 0:
        raise RecipeError(f"uda_weight must be >= 0 (0 turns UDA off), got {uda_weight}; e.g. trainer.params.uda_weight=1.0")
    if not temperature > 0:
        raise RecipeError(f"uda_temperature must be > 0, got {temperature}; e.g. trainer.params.uda_temperature=0.7")
    if not 0.0 <= threshold < 1.0:
        raise RecipeError(f"uda_threshold must be in [0, 1), got {threshold}; e.g. trainer.params.uda_threshold=0.6")
    if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 0:
        raise RecipeError(f"uda_ramp_steps must be an integer >= 0, got {ramp_steps!r}; e.g. "
                          f"trainer.params.uda_ramp_steps=500")


class UDATrainer(Trainer):
    """UDA: supervised loss on the labeled batch plus the ramped consistency term on the
    unlabeled batch, in one forward of the concatenated batch (automatic mode: the base
    does backward, accumulation, clipping and the optimizer step).

    Args:
        model, optimizer, loss_fn, scheduler: as for ``Trainer`` (``loss_fn`` is the
            supervised loss on the labeled batch, e.g. label-smoothed cross-entropy).
        weak_augment: the weak view's augment (e.g. ``build_augment("light", ...)``).
        strong_augment: the strong view's augment (e.g. ``build_augment("strong", ...)``).
        uda_weight: the consistency term's weight after the ramp (0: supervised only).
        uda_temperature: the target's sharpening temperature.
        uda_threshold: the confidence mask's threshold.
        uda_ramp_steps: steps over which the weight ramps up linearly from 0.
        **kwargs: the loop's arguments (``Trainer``).
    """

    #: recipes build a ``SemiSupervisedLoader`` for trainers that set this
    uses_unlabeled_data = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                 weak_augment: Optional[nn.Module] = None, strong_augment: Optional[nn.Module] = None,
                 uda_weight: float = 1.0, uda_temperature: float = 0.7, uda_threshold: float = 0.6,
                 uda_ramp_steps: int = 0, **kwargs: Any) -> None:
        check_uda_settings(uda_weight, uda_temperature, uda_threshold, uda_ramp_steps)
        super().__init__(model, optimizer, loss_fn, **kwargs)
        self.weak_augment = weak_augment.to(self.device) if weak_augment is not None else None
        self.strong_augment = strong_augment.to(self.device) if strong_augment is not None else None
        self.uda_weight = float(uda_weight)
        self.uda_temperature = float(uda_temperature)
        self.uda_threshold = float(uda_threshold)
        self.uda_ramp_steps = int(uda_ramp_steps)

    def prepare_train_batch(self, batch: Any) -> SemiSupervisedViews:
        return prepare_views(self, batch, self.weak_augment, self.strong_augment)

    def training_step(self, views: SemiSupervisedViews) -> StepOutput:
        n_l, n_u = views.labeled_images.shape[0], views.weak_images.shape[0]
        logits = logits_of(self.model(torch.cat([views.labeled_images, views.weak_images, views.strong_images])))
        logits_l, logits_w, logits_s = logits.split([n_l, n_u, n_u])
        supervised = as_loss_output(self.loss_fn(logits_l, views.labels)).loss
        consistency, mask_rate = uda_consistency(logits_w, logits_s, self.uda_temperature, self.uda_threshold)
        weight = self.uda_weight * linear_ramp(self.global_step + 1, self.uda_ramp_steps)
        logs = {"sup_loss": supervised.detach(), "uda_loss": consistency.detach(), "uda_mask": mask_rate,
                "uda_weight": torch.tensor(weight, device=logits.device)}
        known = views.hidden_labels >= 0
        if bool(known.any()):
            guess = logits_w.detach().argmax(dim=1)
            logs["pseudo_label_acc"] = (guess[known] == views.hidden_labels[known]).float().mean()
        return StepOutput(supervised + weight * consistency, logs, batch_size=n_l)
