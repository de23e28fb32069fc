"""The loss zoo: one module per loss family, all registered in ``LOSSES`` for recipes.

A loss is an ``nn.Module`` called as ``loss(output, target)``:

- ``output`` is logits ``(B, C)`` or ``ModelOutput(logits, embeddings)``. The metric losses
  (triplet, center) also take the embeddings tensor ``(B, D)`` itself; A-Softmax does when
  it owns its head (``AngularSoftmaxLoss.with_head``). A plain tensor is the logits for the
  classification losses and the embeddings for the metric ones, so to combine the two kinds
  pass ``ModelOutput(logits, embeddings)``.
- ``target`` is class indices ``(B,)`` or soft targets ``(B, C)``; the classification losses
  leave out samples whose index is ``ignore_index`` (torch's default -100).

Every loss returns a ``LossOutput``: a 0-dim tensor (``.backward()``, ``.item()``) that
carries ``parts`` (the terms that sum to it) and ``stats`` (diagnostics) for logging.
Optional hooks a trainer calls: ``post_step()`` after every optimizer step;
``state_dict()`` is checkpointed. ``needs_embeddings`` says whether the model must return
embeddings; ``lr`` (None = the optimizer's) is the learning rate for a loss's own trainable
parameters. Each loss is also a plain function (``label_smoothing_cross_entropy``,
``triplet_loss``, ``center_loss``, ``distillation_kl``, ...).
"""

from convrecipes.losses.registry import LOSSES, build_loss  # noqa: I001  (registry first: the others register into it)
from convrecipes.losses.base import LossOutput, as_loss_output
from convrecipes.losses.angular_softmax import (
    AngularHead,
    AngularSoftmaxLoss,
    angular_softmax_loss,
    cos_multiple_angle,
    sphereface_lambda,
    sphereface_psi,
)
from convrecipes.losses.bootstrapping import (
    HardBootstrappingLoss,
    SoftBootstrappingLoss,
    hard_bootstrapping_loss,
    soft_bootstrapping_loss,
)
from convrecipes.losses.center import CenterLoss, center_loss
from convrecipes.losses.composite import WeightedSumLoss, loss_param_groups
from convrecipes.losses.cross_entropy import (
    CrossEntropyLoss,
    LabelSmoothingCrossEntropy,
    label_smoothing_cross_entropy,
)
from convrecipes.losses.distillation import distillation_kl, hint_mse
from convrecipes.losses.hinge import MultiClassHingeLoss, multi_class_hinge_loss
from convrecipes.losses.triplet import TripletLoss, pairwise_distances, triplet_loss

__all__ = [
    "LOSSES",
    "AngularHead",
    "AngularSoftmaxLoss",
    "CenterLoss",
    "CrossEntropyLoss",
    "HardBootstrappingLoss",
    "LabelSmoothingCrossEntropy",
    "LossOutput",
    "MultiClassHingeLoss",
    "SoftBootstrappingLoss",
    "TripletLoss",
    "WeightedSumLoss",
    "angular_softmax_loss",
    "as_loss_output",
    "build_loss",
    "center_loss",
    "cos_multiple_angle",
    "distillation_kl",
    "hard_bootstrapping_loss",
    "hint_mse",
    "label_smoothing_cross_entropy",
    "loss_param_groups",
    "multi_class_hinge_loss",
    "pairwise_distances",
    "soft_bootstrapping_loss",
    "sphereface_lambda",
    "sphereface_psi",
    "triplet_loss",
]
