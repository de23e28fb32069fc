"""Mixup and CutMix on a batch already on the device, producing soft targets.

What: mixup (Zhang et al., 2018, https://arxiv.org/abs/1710.09412) blends two images and
their labels with a weight ``lam ~ Beta(alpha, alpha)``; CutMix (Yun et al., 2019,
https://arxiv.org/abs/1905.04899) pastes a box of one image into another and weights the
labels by the pasted area. When: longer training runs where the model starts to memorize
(typically 100+ epochs); on short runs they usually cost accuracy. Expected effect: better
calibration and a little higher top-1 on long runs, at the cost of slower convergence.

The sampling and pasting are torchvision's ``v2.MixUp`` / ``v2.CutMix`` (one ``lam`` per
batch, each image paired with its predecessor in the batch, which the shuffling loader makes
random). They draw ``lam`` and the box from torch's global CPU generator and do the pixel
work on whatever device the batch is on, so they need no ``.to(device)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from convrecipes.errors import RecipeError


def check_mixing_args(num_classes: int, mixup_alpha: float, cutmix_alpha: float, mix_prob: float) -> None:
    """Raise ``RecipeError`` naming the bad value when a mixing setting is out of range."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise RecipeError(
            f"mixup_alpha and cutmix_alpha must be >= 0 (0 turns one off), got "
            f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}; typical values are 0.2-1.0"
        )
    if not 0.0 <= mix_prob <= 1.0:
        raise RecipeError(f"mix_prob is a probability per batch and must be in [0, 1], got {mix_prob}")
    if (mixup_alpha > 0 or cutmix_alpha > 0) and num_classes < 2:
        raise RecipeError(f"mixup/cutmix need num_classes >= 2, got {num_classes}; set num_classes to the dataset's")


class BatchMixing(nn.Module):
    """Mixup and/or CutMix applied to a whole batch with probability ``mix_prob``.

    When both alphas are positive, each mixed batch gets one of the two, chosen with equal
    probability. Targets always come back as float ``(B, num_classes)`` rows summing to 1,
    one-hot for batches that were not mixed, so the loss sees one target format throughout.

    Args:
        num_classes: number of classes, for one-hot encoding.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 disables CutMix.
        mix_prob: probability that a batch is mixed at all.
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0
    ) -> None:
        super().__init__()
        check_mixing_args(num_classes, mixup_alpha, cutmix_alpha, mix_prob)
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise RecipeError("BatchMixing needs mixup_alpha > 0 or cutmix_alpha > 0; leave mixing out instead")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.mix_prob = float(mix_prob)
        choices: list[nn.Module] = []
        # Beta(0, 0) is not a distribution, so a zero alpha means "leave this one out".
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix: nn.Module = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def forward(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Mix ``images`` (B, C, H, W) float and int64 ``targets`` (B,); return soft targets."""
        # Draw the gate only when it can go either way, so mix_prob=1 consumes no extra RNG.
        if self.mix_prob >= 1.0 or (self.mix_prob > 0.0 and torch.rand(()).item() < self.mix_prob):
            return self.mix(images, targets)
        return images, nn.functional.one_hot(targets, self.num_classes).float()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, mix_prob={self.mix_prob}"
        )
