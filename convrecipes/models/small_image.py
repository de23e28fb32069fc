"""CNNs for small images (8-32 px), registered with timm so ``timm.create_model`` builds them.

ImageNet architectures downsample 32x in their stem and first stages, which leaves a
28 px image with no spatial extent; these keep full resolution in the first stage and
downsample twice. Each follows timm's conventions: ``num_classes=0`` returns pooled
features, ``num_features`` is the feature width, ``drop_rate`` is dropout before the
classifier and ``drop_path_rate`` is stochastic depth over the residual blocks.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import register_model

__all__: list[str] = []  # filled by @register_model

# Keys timm.create_model (1.0.x, timm/models/_factory.py) passes to every entrypoint for its
# pretrained-weights machinery; ours have no weights, so the entrypoints drop them.
TIMM_BOOKKEEPING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")


class ModelArgumentError(ValueError):
    """A model constructor argument has a bad value; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_int(param: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ModelArgumentError(param, f"{param} must be {what}, got {value!r}")


def _check_rate(param: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise ModelArgumentError(param, f"{param} is a probability and must be in [0, 1), got {value!r}")


def _check_common(in_chans: Any, num_classes: Any, width: Any, drop_rate: Any) -> None:
    _check_int("in_chans", in_chans, 1)
    _check_int("num_classes", num_classes, 0)
    _check_int("width", width, 1)
    _check_rate("drop_rate", drop_rate)


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
    average pooling. ``width=16`` has about 72K parameters for 1-channel input.

    ``drop_path_rate`` is accepted for timm's interface but must be 0: there are no
    residual paths to drop."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        _check_common(in_chans, num_classes, width, drop_rate)
        if drop_path_rate:  # accepted (0) because convrecipes' create_model always passes it
            raise ModelArgumentError(
                "drop_path_rate",
                f"tiny_cnn has no residual paths, so stochastic depth does not apply: drop_path_rate must be 0, "
                f"got {drop_path_rate!r}; use small_resnet8/14/20/32 for stochastic depth",
            )
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
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        _check_int("depth", depth, 1)
        _check_common(in_chans, num_classes, width, drop_rate)
        _check_rate("drop_path_rate", drop_path_rate)
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


# name -> (class, arguments the entrypoint fixes); convrecipes.models.create_model checks
# model.kwargs against the class signature less these.
class SmallMLP(_ClassifierMixin, nn.Module):
    """A multilayer perceptron: the image average-pooled (or repeated) to ``pool_size`` x
    ``pool_size`` (28 leaves a 28 px image as it is), flattened, then ``depth`` hidden
    layers of ``width`` ReLU units. No convolution and no normalisation: the classic
    MNIST-scale baseline, fast on a CPU, and free to memorise its labels (the label-noise
    experiments use it for that)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 512, depth: int = 2,
                 pool_size: int = 28, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        _check_common(in_chans, num_classes, width, drop_rate)
        _check_int("depth", depth, 1)
        _check_int("pool_size", pool_size, 1)
        if drop_path_rate:
            raise ModelArgumentError("drop_path_rate", f"small_mlp has no residual paths: drop_path_rate must be 0, "
                                                       f"got {drop_path_rate!r}")
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
        features = in_chans * pool_size * pool_size
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.drop_rate = drop_rate
        self._init_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "tiny_cnn": (TinyCNN, {}),
    "small_resnet8": (SmallResNet, {"depth": 1}),
    "small_resnet14": (SmallResNet, {"depth": 2}),
    "small_resnet20": (SmallResNet, {"depth": 3}),
    "small_resnet32": (SmallResNet, {"depth": 5}),
    "small_mlp": (SmallMLP, {}),
}


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained:
        raise ModelArgumentError("pretrained", f"{name} has no pretrained weights; set model.pretrained=false")
    for key in TIMM_BOOKKEEPING:
        kwargs.pop(key, None)
    cls, fixed = MODELS[name]
    return cls(**fixed, **kwargs)


@register_model
def tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """Tiny VGG-style CNN (about 72K parameters at width 16, 1 channel)."""
    return _build("tiny_cnn", pretrained, kwargs)


@register_model
def small_resnet8(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-8 (1 block per stage)."""
    return _build("small_resnet8", pretrained, kwargs)


@register_model
def small_resnet14(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-14 (2 blocks per stage)."""
    return _build("small_resnet14", pretrained, kwargs)


@register_model
def small_resnet20(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-20 (3 blocks per stage)."""
    return _build("small_resnet20", pretrained, kwargs)


@register_model
def small_resnet32(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """CIFAR-style ResNet-32 (5 blocks per stage)."""
    return _build("small_resnet32", pretrained, kwargs)


@register_model
def small_mlp(pretrained: bool = False, **kwargs: Any) -> SmallMLP:
    """Multilayer perceptron, 2 hidden layers of 512 by default (669K parameters at 28 px, 1 channel)."""
    return _build("small_mlp", pretrained, kwargs)
