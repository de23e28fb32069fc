"""Batch augmentation presets on the device, built from Kornia per-sample ops.

An augment is called as ``augment(images, targets) -> (images, targets)`` on a batch already
on the device: float images ``(B, C, H, W)`` in ``[0, 1]`` and int64 class indices ``(B,)``.
The order inside is: geometric ops, photometric ops, random erasing, mixup/cutmix, and
normalization last (Kornia's color ops clamp to ``[0, 1]``, so they must see raw pixels).

Randomness comes only from torch's global generators (Kornia draws on the module's device,
torchvision's mixing on the CPU), so a seeded process reproduces its augmentations exactly
and restoring the RNG state resumes them. Move the module to the batch's device with
``.to(device)`` so Kornia samples there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from convrecipes.augment.mixing import BatchMixing, check_mixing_args
from convrecipes.errors import RecipeError
from convrecipes.registry import Registry

OpsFactory = Callable[[tuple[int, int], int, bool], list[nn.Module]]


@dataclass(frozen=True)
class AugmentPreset:
    """A named set of per-sample ops.

    Attributes:
        build_ops: ``(image_size, channels, hflip) -> [ops]``, applied in order before mixing.
        random_erasing: the preset's default random-erasing probability per image.
        description: one line for listings and docs.
    """

    build_ops: OpsFactory
    random_erasing: float = 0.0
    description: str = ""


AUGMENT_PRESETS: Registry[AugmentPreset] = Registry("augment preset")


def _flip(hflip: bool) -> list[nn.Module]:
    # Flipping changes the class of some data (digits, text), hence the switch.
    return [K.RandomHorizontalFlip(p=0.5)] if hflip else []


def _color_jitter(channels: int) -> nn.Module:
    # No hue: RGB<->HSV costs 3-9x the rest of the jitter. Saturation is meaningless on
    # anything but RGB (Kornia's adjust_saturation needs exactly 3 channels).
    return K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if channels == 3 else 0.0, hue=0.0, p=1.0)


def _none_ops(image_size: tuple[int, int], channels: int, hflip: bool) -> list[nn.Module]:
    return []


def _light_ops(image_size: tuple[int, int], channels: int, hflip: bool) -> list[nn.Module]:
    height, width = image_size
    # Kornia's two-value padding is (left/right, top/bottom), i.e. (width, height).
    crop = K.RandomCrop(image_size, padding=(width // 8, height // 8), padding_mode="reflect", p=1.0)
    return [crop, *_flip(hflip)]


def _standard_ops(image_size: tuple[int, int], channels: int, hflip: bool) -> list[nn.Module]:
    return [K.RandomResizedCrop(image_size, scale=(0.35, 1.0), p=1.0), *_flip(hflip), _color_jitter(channels)]


def _strong_ops(image_size: tuple[int, int], channels: int, hflip: bool) -> list[nn.Module]:
    # RandAugment-like ops at roughly its magnitude 9 of 10. Kornia's auto.RandAugment picks
    # one op sequence for the whole batch; independent per-sample gates instead give every
    # image its own subset (about 1.9 ops on average, RandAugment's N=2). Brightness and
    # contrast (and color on RGB) already come from the standard jitter.
    randaugment_like: list[nn.Module] = [
        K.RandomRotation(degrees=25.0, p=0.25),
        K.RandomAffine(degrees=0.0, shear=(-15.0, 15.0, -15.0, 15.0), p=0.25),
        K.RandomAffine(degrees=0.0, translate=(0.25, 0.25), p=0.25),
        K.RandomSharpness(sharpness=(0.1, 1.9), p=0.25),
        K.RandomPosterize(bits=(4.0, 8.0), p=0.2),
        K.RandomEqualize(p=0.2),
        K.RandomAutoContrast(p=0.2),
        K.RandomSolarize(thresholds=(0.5, 0.9), additions=0.0, p=0.2),
    ]
    return [*_standard_ops(image_size, channels, hflip), *randaugment_like]


AUGMENT_PRESETS.register("none")(AugmentPreset(_none_ops, 0.0, "normalize only"))
AUGMENT_PRESETS.register("light")(
    AugmentPreset(_light_ops, 0.0, "reflect-pad by size//8 and random crop back, horizontal flip")
)
AUGMENT_PRESETS.register("standard")(
    AugmentPreset(_standard_ops, 0.0, "random resized crop (0.35-1), flip, brightness/contrast/saturation 0.4")
)
AUGMENT_PRESETS.register("strong")(
    AugmentPreset(_strong_ops, 0.25, "standard + per-sample RandAugment-like ops + random erasing 0.25")
)


class BatchAugment(nn.Module):
    """Per-sample ops, then optional mixing, then normalization, on one batch.

    Args:
        mean: per-channel mean of the data in ``[0, 1]`` units.
        std: per-channel standard deviation in ``[0, 1]`` units, all positive.
        ops: Kornia ops applied in order to float images in ``[0, 1]``.
        mixing: mixup/cutmix; when given, targets come back as ``(B, num_classes)`` floats.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        ops: Sequence[nn.Module] = (),
        mixing: Optional[BatchMixing] = None,
    ) -> None:
        super().__init__()
        _check_mean_std(mean, std, channels=None)
        self.channels = len(mean)
        self.ops = nn.Sequential(*ops)
        self.mixing = mixing
        # Non-persistent: these come from the recipe, not from training, so they stay out of
        # any state_dict; as buffers they still follow .to(device).
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Augment and normalize a batch.

        Args:
            images: float ``(B, C, H, W)`` in ``[0, 1]``, on this module's device.
            targets: int64 class indices ``(B,)``.

        Returns:
            Normalized images, and ``targets`` unchanged or float soft targets
            ``(B, num_classes)`` when mixing is on.
        """
        self._check_batch(images, targets)
        if len(self.ops):
            images = self.ops(images)
        if self.mixing is not None:
            # Mixing before normalizing: both are affine per pixel, and a convex blend or a
            # paste commutes with (x - mean) / std, so the result is the same either way;
            # before keeps the one normalization step last for every preset.
            images, targets = self.mixing(images, targets)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype), targets

    def _check_batch(self, images: Tensor, targets: Tensor) -> None:
        if not images.is_floating_point():
            raise RecipeError(
                f"augment expects float images in [0, 1], got dtype {images.dtype}; "
                "convert the batch with images.float() / 255 before augmenting"
            )
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise RecipeError(
                f"augment expects images (B, {self.channels}, H, W) to match its {self.channels}-channel "
                f"mean/std, got shape {tuple(images.shape)}; build it with the dataset's channel count"
            )
        if targets.dtype != torch.int64 or targets.shape != images.shape[:1]:
            raise RecipeError(
                f"augment expects int64 class indices of shape ({images.shape[0]},), got "
                f"{targets.dtype} {tuple(targets.shape)}; pass labels before any one-hot encoding"
            )
        if images.device != self.mean.device:
            raise RecipeError(
                f"augment is on {self.mean.device} but the images are on {images.device}; "
                "call augment.to(images.device) once so Kornia draws its parameters there"
            )


def _check_mean_std(mean: Sequence[float], std: Sequence[float], channels: Optional[int]) -> None:
    if len(mean) != len(std) or len(mean) == 0:
        raise RecipeError(f"mean and std need one value per channel, got {len(mean)} and {len(std)} values")
    if channels is not None and len(mean) != channels:
        raise RecipeError(
            f"mean/std have {len(mean)} values but the images have {channels} channels; "
            "give one value per channel (dataset_mean_std computes them)"
        )
    if any(not s > 0 for s in std):
        raise RecipeError(
            f"std must be positive in every channel, got {list(std)}; a constant channel cannot be normalized"
        )


def build_augment(
    preset: str,
    image_size: tuple[int, int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    hflip: bool = True,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    random_erasing: Optional[float] = None,
) -> BatchAugment:
    """Build the training augmentation for a recipe.

    Args:
        preset: one of ``AUGMENT_PRESETS`` (``none``, ``light``, ``standard``, ``strong``).
        image_size: ``(height, width)`` the ops produce; images should arrive at this size
            (``standard``/``strong`` resize crops of any input to it).
        channels: image channels (1 or 3 typically).
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation in ``[0, 1]`` units.
        num_classes: number of classes, for soft targets when mixing.
        hflip: random horizontal flips; turn off where flipping changes the class (digits).
        mixup_alpha: mixup's Beta(alpha, alpha) parameter; 0 disables mixup.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 disables CutMix.
        mix_prob: probability that a batch is mixed, when either alpha is positive.
        random_erasing: probability per image of erasing a random box (filled with 0);
            ``None`` keeps the preset's default (0.25 for ``strong``, 0 otherwise).

    Returns:
        A ``BatchAugment``; call ``.to(device)`` before use.

    Raises:
        RecipeError: an unknown preset or an out-of-range setting.
    """
    spec = AUGMENT_PRESETS.get(preset)
    if len(image_size) != 2 or any(int(s) != s or s < 1 for s in image_size):
        raise RecipeError(f"image_size must be (height, width) in positive pixels, got {image_size!r}")
    image_size = (int(image_size[0]), int(image_size[1]))
    if channels < 1:
        raise RecipeError(f"channels must be >= 1, got {channels}")
    _check_mean_std(mean, std, channels)
    check_mixing_args(num_classes, mixup_alpha, cutmix_alpha, mix_prob)
    erasing = spec.random_erasing if random_erasing is None else float(random_erasing)
    if not 0.0 <= erasing <= 1.0:
        raise RecipeError(f"random_erasing is a probability per image and must be in [0, 1], got {random_erasing}")

    ops = spec.build_ops(image_size, channels, hflip)
    if erasing > 0:
        ops.append(K.RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0, p=erasing))
    mixing = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        mixing = BatchMixing(num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mix_prob=mix_prob)
    return BatchAugment(mean, std, ops=ops, mixing=mixing)


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> BatchAugment:
    """Normalization only, with the training augment's call signature.

    Args:
        mean: per-channel mean in ``[0, 1]`` units.
        std: per-channel standard deviation in ``[0, 1]`` units.

    Returns:
        A ``BatchAugment`` that returns ``((images - mean) / std, targets)``.
    """
    return BatchAugment(mean, std)


def dataset_mean_std(images_uint8: Tensor, chunk_size: Optional[int] = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of a uint8 image tensor.

    Sums of x and x^2 are accumulated in float64 over chunks of images, so a dataset like
    60000 x 28 x 28 (or larger images) needs only one chunk's worth of extra memory.

    Args:
        images_uint8: ``(N, C, H, W)`` uint8 images.
        chunk_size: images per chunk; ``None`` picks about 2**24 values (128 MiB in float64).

    Returns:
        ``(mean, std)`` lists with one value per channel, in ``[0, 1]`` units (pixel / 255),
        ready for ``build_augment``.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[0] == 0:
        raise RecipeError(
            f"dataset_mean_std expects uint8 images (N, C, H, W) with N >= 1, got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}; add a channel dimension with .unsqueeze(1) for (N, H, W) data"
        )
    channels = images_uint8.shape[1]
    if chunk_size is None:
        chunk_size = max(1, 2**24 // images_uint8[0].numel())
    if chunk_size < 1:
        raise RecipeError(f"chunk_size must be >= 1, got {chunk_size}")
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images_uint8.shape[0], chunk_size):
        chunk = images_uint8[start : start + chunk_size].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        total_sq += chunk.square().sum(dim=(0, 2, 3)).cpu()
    count = images_uint8.numel() // channels
    mean = total / count
    # Pixel values are integers up to 255 and float64 sums are exact up to 2**53, so
    # E[x^2] - E[x]^2 has no cancellation problem here.
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return (mean / 255.0).tolist(), (var.sqrt() / 255.0).tolist()
