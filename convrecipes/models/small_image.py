"""CNNs for small images (8-32 px), registered with timm so ``timm.create_model`` builds them.

ImageNet architectures downsample 32x in their stem and first stages, which leaves a
28 px image with no spatial extent; these keep full resolution in the first stage and
downsample twice. Each follows timm's conventions: ``num_classes=0`` returns pooled
features, ``num_features`` is the feature width, ``drop_rate`` is dropout before the
classifier and ``drop_path_rate`` is stochastic depth over the residual blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import register_model

__all__: list[str] = []  # filled by @register_model


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ClassifierMixin:
    """timm-style classifier handling shared by the models below."""

    num_features: int
    drop_rate: float

    def _init_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(self.drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._init_classifier(num_classes)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.head_drop(features)
        return features if pre_logits else self.fc(features)


class TinyCNN(_ClassifierMixin, nn.Module):
    """Three VGG-style stages of two 3x3 conv-BN-ReLU layers, max-pooling between, global
    average pooling. ``width=16`` has about 72K parameters for 1-channel input."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16, drop_rate: float = 0.0,
                 **_: Any) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, w), _conv_bn_relu(w, w), nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w), _conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w), _conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 4 * w
        self.drop_rate = drop_rate
        self._init_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _BasicBlock(nn.Module):
    """Pre-activation-free ResNet basic block (He et al. 2016, CIFAR variant)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(self.shortcut(x) + self.drop_path(out))


class SmallResNet(_ClassifierMixin, nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of ``depth`` blocks at widths
    (w, 2w, 4w) with strides (1, 2, 2), global average pooling."""

    def __init__(self, depth: int, in_chans: int = 3, num_classes: int = 10, width: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = _conv_bn_relu(in_chans, width)
        rates = torch.linspace(0, drop_path_rate, 3 * depth).tolist()  # linear decay rule (Huang et al.)
        blocks, cin, i = [], width, 0
        for stage, cout in enumerate(widths):
            for b in range(depth):
                blocks.append(_BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, rates[i]))
                cin, i = cout, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self._init_classifier(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch (Goyal et al.)
            if isinstance(m, _BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set model.pretrained=false")


@register_model
def tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """Tiny VGG-style CNN (about 72K parameters at width 16, 1 channel)."""
    _no_pretrained("tiny_cnn", pretrained)
    return TinyCNN(**kwargs)


@register_model
def small_resnet8(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-8 (1 block per stage)."""
    _no_pretrained("small_resnet8", pretrained)
    return SmallResNet(depth=1, **kwargs)


@register_model
def small_resnet14(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-14 (2 blocks per stage)."""
    _no_pretrained("small_resnet14", pretrained)
    return SmallResNet(depth=2, **kwargs)


@register_model
def small_resnet20(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-20 (3 blocks per stage)."""
    _no_pretrained("small_resnet20", pretrained)
    return SmallResNet(depth=3, **kwargs)


@register_model
def small_resnet32(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-32 (5 blocks per stage)."""
    _no_pretrained("small_resnet32", pretrained)
    return SmallResNet(depth=5, **kwargs)
