"""Batch augmentation: presets, mixing, normalization, mean/std, errors."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from convrecipes.augment import (
    AUGMENT_PRESETS,
    BatchAugment,
    build_augment,
    build_eval_transform,
    dataset_mean_std,
)
from convrecipes.errors import RecipeError

PRESETS = AUGMENT_PRESETS.names()
NUM_CLASSES = 10


def _augment(preset: str, channels: int, size: int = 16, **kwargs) -> BatchAugment:
    kwargs.setdefault("mean", [0.0] * channels)
    kwargs.setdefault("std", [1.0] * channels)
    return build_augment(preset, (size, size), channels, num_classes=NUM_CLASSES, **kwargs)


def _batch(batch: int, channels: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return images, targets


def test_registry_holds_the_documented_presets():
    assert PRESETS == ["light", "none", "standard", "strong"]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_shape_dtype_and_targets(preset, channels):
    torch.manual_seed(0)
    augment = _augment(preset, channels, mean=[0.5] * channels, std=[0.25] * channels).to("cpu")
    images, targets = _batch(32, channels)
    out, out_targets = augment(images, targets)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Normalized [0, 1] pixels lie in [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25].
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5
    assert out_targets.dtype == torch.int64 and torch.equal(out_targets, targets)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_with_mixing_gives_soft_targets(preset, channels):
    torch.manual_seed(0)
    augment = _augment(preset, channels, mixup_alpha=0.4, cutmix_alpha=1.0)
    images, targets = _batch(16, channels)
    out, soft = augment(images, targets)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert soft.shape == (16, NUM_CLASSES) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(16))
    assert (soft >= 0).all()


def test_none_preset_and_eval_transform_equal_manual_normalization():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    images, targets = _batch(4, 3)
    expected = torch.empty_like(images)
    for c in range(3):
        expected[:, c] = (images[:, c] - mean[c]) / std[c]
    for augment in (_augment("none", 3, mean=mean, std=std), build_eval_transform(mean, std)):
        out, out_targets = augment(images, targets)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        assert out_targets is targets


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_same_seed_same_output_and_seeds_differ(preset):
    augment = _augment(preset, 3, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.5)
    images, targets = _batch(16, 3)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        return augment(images, targets)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def _crops(image: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Every (H, W) window of the reflect-padded image, written out independently."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image[None], (pad_w, pad_w, pad_h, pad_h), mode="reflect")[0]
    return torch.stack(
        [padded[:, i : i + h, j : j + w] for i in range(2 * pad_h + 1) for j in range(2 * pad_w + 1)]
    )


def _matches_any(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B,) bool: output b equals (to float tolerance) one of the candidate images."""
    diff = (outputs[:, None] - candidates[None]).abs().flatten(2).amax(dim=2)
    return (diff < 1e-6).any(dim=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_light_pads_crops_and_flips_per_sample(channels):
    height, width = 16, 24  # distinct sides catch a swapped (height, width) padding
    image = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(3))
    augment = build_augment("light", (height, width), channels, [0.0] * channels, [1.0] * channels, NUM_CLASSES)
    torch.manual_seed(0)
    out, _ = augment(image.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.long))
    plain = _matches_any(out, _crops(image, height // 8, width // 8))
    flipped = _matches_any(out, _crops(image.flip(-1), height // 8, width // 8))
    assert (plain ^ flipped).all(), "every output is one crop of the padded image, flipped or not"
    assert 10 < flipped.sum() < 54, "flips are drawn per sample, about half of the batch"


def test_light_without_hflip_never_flips():
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4))
    augment = build_augment("light", (16, 16), 1, [0.0], [1.0], NUM_CLASSES, hflip=False)
    torch.manual_seed(0)
    out, _ = augment(image.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.long))
    assert _matches_any(out, _crops(image, 2, 2)).all()
    assert not _matches_any(out, _crops(image.flip(-1), 2, 2)).any()


@pytest.mark.parametrize("channels", [1, 3])
def test_standard_hflip_switch_on_left_dark_right_bright_images(channels):
    # Crops of >= 35% area with aspect 3/4..4/3 always span the middle column, and resize,
    # brightness and contrast are increasing maps, so unflipped outputs never get darker
    # from left to right; a flipped one does.
    image = torch.full((64, channels, 16, 16), 0.2)
    image[..., 8:] = 0.8
    targets = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    out, _ = _augment("standard", channels, hflip=False)(image, targets)
    assert (out.diff(dim=-1) >= -1e-5).all()
    torch.manual_seed(0)
    out, _ = _augment("standard", channels, hflip=True)(image, targets)
    darker_to_the_right = (out.diff(dim=-1) < -0.05).flatten(1).any(dim=1)
    assert 10 < darker_to_the_right.sum() < 54


@pytest.mark.parametrize("channels, saturation", [(1, 0.0), (3, 0.4)])
def test_color_jitter_has_no_hue_and_saturation_only_on_rgb(channels, saturation):
    for preset in ("standard", "strong"):
        (jitter,) = [m for m in _augment(preset, channels).modules() if isinstance(m, K.ColorJitter)]
        assert jitter.saturation == saturation and jitter.hue == 0.0


@pytest.mark.parametrize("preset", PRESETS)
def test_hflip_false_builds_no_flip(preset):
    modules = list(_augment(preset, 1, hflip=False).modules())
    assert not any(isinstance(m, K.RandomHorizontalFlip) for m in modules)
    assert any(isinstance(m, K.RandomHorizontalFlip) for m in _augment(preset, 1).modules()) == (preset != "none")


def test_strong_gives_each_image_its_own_op_subset():
    augment = _augment("strong", 3)
    torch.manual_seed(0)
    augment(*_batch(64, 3))
    gated = [m for m in augment.ops if isinstance(m, K.AugmentationBase2D) and 0 < m.p < 1]
    assert len(gated) >= 6
    # Kornia records which samples each op was applied to; columns are per-image subsets.
    applied = torch.stack([m._params["batch_prob"].bool() for m in gated], dim=1)
    assert len({tuple(row.tolist()) for row in applied}) > 10


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_random_erasing_default_and_override(channels):
    def erasers(augment: BatchAugment) -> list[float]:
        return [m.p for m in augment.modules() if isinstance(m, K.RandomErasing)]

    assert erasers(_augment("strong", channels)) == [0.25]
    assert erasers(_augment("strong", channels, random_erasing=0.0)) == []
    assert erasers(_augment("standard", channels)) == []
    assert erasers(_augment("standard", channels, random_erasing=0.5)) == [0.5]


def _class_colored_batch(channels: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct labels, and images that are constant per class (a distinct color per class)."""
    colors = torch.linspace(0.05, 0.95, NUM_CLASSES)[:, None].repeat(1, channels)
    colors[:, 0] = colors[:, 0].flip(0)  # channels differ, so a channel mix-up would show
    targets = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(5))[:8]
    images = colors[targets][:, :, None, None].expand(-1, -1, size, size).contiguous()
    return images, targets, colors


def _other_class(soft_row: torch.Tensor, own: int) -> int:
    others = [k for k in soft_row.nonzero().flatten().tolist() if k != own]
    assert len(others) == 1, f"a row mixes two classes, got {soft_row}"
    return others[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_mixup_blends_images_and_targets_with_the_same_lambda_and_pairing(channels):
    images, targets, colors = _class_colored_batch(channels)
    augment = _augment("none", channels, size=8, mixup_alpha=1.0)
    torch.manual_seed(0)
    out, soft = augment(images, targets)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    for i in range(8):
        lam = soft[i, targets[i]].item()
        assert 0.0 < lam < 1.0
        j_class = _other_class(soft[i], targets[i].item())
        assert j_class in targets.tolist()
        expected = lam * colors[targets[i]] + (1 - lam) * colors[j_class]
        torch.testing.assert_close(out[i], expected[:, None, None].expand(-1, 8, 8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_cutmix_second_class_weight_is_the_pasted_area(channels):
    images, targets, colors = _class_colored_batch(channels)
    augment = _augment("none", channels, size=8, cutmix_alpha=1.0)
    pasted_batches = 0
    for seed in range(5):
        torch.manual_seed(seed)
        out, soft = augment(images, targets)
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
        for i in range(8):
            own = colors[targets[i]][:, None, None]
            is_own = (out[i] - own).abs().amax(dim=0) < 1e-6
            if is_own.all():
                assert soft[i, targets[i]] == 1.0
                continue
            j_class = _other_class(soft[i], targets[i].item())
            other = colors[j_class][:, None, None]
            is_other = (out[i] - other).abs().amax(dim=0) < 1e-6
            assert (is_own ^ is_other).all(), "every pixel comes from one of the two images"
            assert soft[i, j_class].item() == pytest.approx(is_other.float().mean().item(), abs=1e-6)
            pasted_batches += i == 0
    assert pasted_batches >= 3


def test_mix_prob_leaves_some_batches_one_hot_and_both_methods_are_chosen():
    images, targets, colors = _class_colored_batch(3)
    augment = _augment("none", 3, size=8, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5)
    one_hot = torch.nn.functional.one_hot(targets, NUM_CLASSES).float()
    kinds = {"unmixed": 0, "mixup": 0, "cutmix": 0}
    torch.manual_seed(0)
    for _ in range(60):
        out, soft = augment(images, targets)
        assert soft.shape == (8, NUM_CLASSES) and soft.dtype == torch.float32
        if torch.equal(soft, one_hot):
            assert torch.equal(out, images)
            kinds["unmixed"] += 1  # also the rare CutMix whose box rounds to nothing
        elif (out[0] - out[0, :, :1, :1]).abs().max() < 1e-6:
            kinds["mixup"] += 1  # a blend of two constant images is constant
        else:
            kinds["cutmix"] += 1
    # Binomial(60, 0.5) unmixed batches: mean 30, sd 3.9.
    assert 15 <= kinds["unmixed"] <= 45 and kinds["mixup"] >= 5 and kinds["cutmix"] >= 5, kinds


@pytest.mark.parametrize("channels", [1, 3])
def test_dataset_mean_std_matches_float64_torch(channels):
    images = torch.randint(0, 256, (10, channels, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    scaled = images.double() / 255
    expected_std, expected_mean = torch.std_mean(scaled, dim=(0, 2, 3), correction=0)
    for chunk_size in (None, 3):  # 3 leaves a partial last chunk
        mean, std = dataset_mean_std(images, chunk_size=chunk_size)
        assert isinstance(mean, list) and len(mean) == len(std) == channels
        torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), expected_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), expected_std, rtol=1e-10, atol=1e-12)


def test_dataset_mean_std_rejects_float_or_channelless_input():
    with pytest.raises(RecipeError, match="unsqueeze"):
        dataset_mean_std(torch.zeros(4, 5, 5, dtype=torch.uint8))
    with pytest.raises(RecipeError, match="uint8"):
        dataset_mean_std(torch.zeros(4, 1, 5, 5))


def test_uint8_images_raise_naming_the_conversion():
    augment = _augment("standard", 1)
    images = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(RecipeError, match=r"float\(\) / 255"):
        augment(images, torch.zeros(2, dtype=torch.long))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(RecipeError) as info:
        _augment("medium", 1)
    message = str(info.value)
    assert "medium" in message and all(name in message for name in PRESETS)
    with pytest.raises(RecipeError, match=r"did you mean 'strong'\?"):
        _augment("strnog", 1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "channels"),
        ({"std": [0.0]}, "positive"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"mix_prob": 1.5}, "mix_prob"),
        ({"random_erasing": 2.0}, "random_erasing"),
    ],
)
def test_bad_settings_raise_recipe_error(kwargs, fragment):
    with pytest.raises(RecipeError, match=fragment):
        _augment("standard", 1, **kwargs)


def test_bad_batches_raise_recipe_error():
    augment = _augment("light", 3)
    images, targets = _batch(2, 3)
    with pytest.raises(RecipeError, match="channel"):
        augment(images[:, :1], targets)
    with pytest.raises(RecipeError, match="int64"):
        augment(images, targets.float())
    with pytest.raises(RecipeError, match=r"augment.to"):
        augment(images.to("meta"), targets.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_run_and_repeat_on_gpu(preset):
    augment = _augment(preset, 3, mixup_alpha=0.4, cutmix_alpha=1.0).to("cuda")
    images, targets = (t.to("cuda") for t in _batch(16, 3))
    torch.manual_seed(0)
    first = augment(images, targets)
    torch.manual_seed(0)
    again = augment(images, targets)
    assert first[0].device.type == "cuda" and first[1].device.type == "cuda"
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
