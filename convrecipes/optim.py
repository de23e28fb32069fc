"""Optimizers for recipes, built with timm's optimizer factory.

By default norm and bias parameters (every parameter with fewer than 2 dimensions) get no
weight decay: decaying BatchNorm scales and biases only fights the normalisation.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, param_groups_weight_decay

from convrecipes.registry import Registry

# recipe name -> how to call timm's factory
OPTIMIZERS: Registry[str] = Registry("optimizer")
for _name in ("sgd", "adamw", "adam", "adamax"):
    OPTIMIZERS.register(_name)(_name)


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr * batch_size / reference_batch_size``."""
    return lr * batch_size / reference_batch_size


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_norm_and_bias: bool = False,
    extra_param_groups: Iterable[dict[str, Any]] = (),
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s parameters plus ``extra_param_groups`` (e.g. a loss's own).

    Args:
        name: sgd, adamw, adam or adamax.
        decay_norm_and_bias: also apply weight decay to 1-D parameters (norms, biases).
    """
    OPTIMIZERS.get(name)
    if decay_norm_and_bias:
        groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad],
                                         "weight_decay": weight_decay}]
    else:
        groups = list(param_groups_weight_decay(model, weight_decay))
    groups += list(extra_param_groups)
    kwargs: dict[str, Any] = {}
    if name == "sgd":
        opt = "nesterov" if nesterov else "momentum"
        if momentum == 0:
            opt, nesterov = "sgd", False
        kwargs["momentum"] = momentum
        if opt == "sgd":
            kwargs["nesterov"] = False
    else:
        opt = name
        kwargs["betas"] = tuple(betas)
        kwargs["eps"] = eps
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=False, **kwargs)
