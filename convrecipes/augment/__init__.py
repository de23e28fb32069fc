"""Batch augmentation on the device: Kornia per-sample ops, mixup/cutmix, normalization.

``build_augment(preset, ...)`` gives the training augment, ``build_eval_transform(mean, std)``
the evaluation one; both are called as ``augment(images, targets) -> (images, targets)``.
"""

from convrecipes.augment.mixing import BatchMixing
from convrecipes.augment.presets import (
    AUGMENT_PRESETS,
    AugmentPreset,
    BatchAugment,
    build_augment,
    build_eval_transform,
    dataset_mean_std,
)

__all__ = [
    "AUGMENT_PRESETS",
    "AugmentPreset",
    "BatchAugment",
    "BatchMixing",
    "build_augment",
    "build_eval_transform",
    "dataset_mean_std",
]
