"""Stagewise boosting network (Smith & Topin 2016, "Deep Convolutional Neural Network Design
Patterns", SBN), registered with timm.

Each of ``stages`` stages holds ``branches`` parallel branches of growing depth - branch
``b`` is ``b + 1`` 3x3 conv-BN layers (ReLU between them) - joined by **sum** in a
``FreezeDropPathJoin``, then a ReLU; 2x2 max-pooling between stages, global average
pooling and the classifier. Under freeze-drop-path each branch learns with the shallower
ones frozen, i.e. it fits what their sum still gets wrong (the "boosting"). We tried
starting every branch but the first at zero (its last BatchNorm weight 0, as in ResNets):
a deeper branch then trains from silence behind random frozen ones, and on digits the
loss stayed at chance for about 60 steps, so branches start from the usual init.

Trained by ``FreezeDropPathTrainer`` one active branch ``b`` at a time (the same ``b`` in
every stage): branches 0..b forward, only ``b`` learning, the deeper ones skipped; at
evaluation all branches are summed. Trained by any other trainer every branch runs and
learns (the "trained normally" baseline). ``branch=b`` (constructor argument or
``set_branch``) evaluates branch ``b`` of every stage alone.

Our reading of the paper: it describes SBN as FractalNet-like with summation joins and
branches trained stagewise; its exact layer counts are in its Caffe prototxt, which we
did not copy. Defaults (3 stages, 3 branches, width 32) have 862K parameters for
1-channel 28 px input (864K for RGB).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import register_model

from convrecipes.models.branch_joins import FreezeDropPathJoin, JoinError
from convrecipes.models.small_image import (
    MODELS,
    ModelArgumentError,
    _build,
    _check_common,
    _check_int,
    _ClassifierMixin,
)

__all__ = ["StagewiseBoostingNet"]


NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def _branch(cin: int, cout: int, depth: int, norm: str) -> nn.Sequential:
    """``depth`` conv-norm layers with ReLU between them (not after the last: the join sums
    pre-activations)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout)]
        if i < depth - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class StagewiseBoostingNet(_ClassifierMixin, nn.Module):
    """SBN: stages of summed branches of depth 1..``branches``, widths ``w, 2w, 4w, 4w...``.

    Args:
        stages: stages (each but the last followed by 2x2 max-pooling).
        branches: branches per stage (>= 2); branch ``b`` has ``b + 1`` conv layers.
        width: channels of the first stage.
        branch: evaluate (and train) only this branch of every stage (None: the sum).
        norm: ``batch`` (BatchNorm), ``group`` (GroupNorm, 8 groups) or ``none``.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, stages: int = 3, branches: int = 3, width: int = 32,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, branch: Optional[int] = None,
                 norm: str = "batch") -> None:
        super().__init__()
        _check_common(in_chans, num_classes, width, drop_rate)
        _check_int("stages", stages, 1)
        _check_int("branches", branches, 2)
        if drop_path_rate:
            raise ModelArgumentError("drop_path_rate", f"sbn drops its branches by freeze-drop-path "
                                                       f"(trainer.name=freeze_drop_path), not drop_path_rate: it must "
                                                       f"be 0, got {drop_path_rate!r}")
        if norm not in NORMS:
            raise ModelArgumentError("norm", f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        widths = [width * min(2 ** i, 4) for i in range(stages)]
        joins, cin = [], in_chans
        for cout in widths:
            joins.append(FreezeDropPathJoin([_branch(cin, cout, b + 1, norm) for b in range(branches)]))
            cin = cout
        self.joins = nn.ModuleList(joins)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_branches = branches
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self._init_classifier(num_classes)
        try:
            self.set_branch(branch)
        except JoinError as exc:  # as a constructor argument: create_model names model.kwargs.branch
            raise ModelArgumentError("branch", str(exc)) from None

    def set_branch(self, branch: Optional[int]) -> None:
        """Run only ``branch`` of every stage from now on (None: the sum of all)."""
        for join in self.joins:
            join.only = join.check_branch(branch, "branch")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, join in enumerate(self.joins):
            if i:
                x = self.pool(x)
            x = self.act(join(x))
        return self.head_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


MODELS["sbn"] = (StagewiseBoostingNet, {})


@register_model
def sbn(pretrained: bool = False, **kwargs: Any) -> StagewiseBoostingNet:
    """Stagewise boosting network (3 stages x 3 branches, width 32: 862K parameters at 1 channel)."""
    return _build("sbn", pretrained, kwargs)

