"""Optimizers for recipes, built with timm's optimizer factory.

By default norm and bias parameters (every parameter with fewer than 2 dimensions) get no
weight decay: decaying BatchNorm scales and biases only fights the normalisation.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, param_groups_weight_decay

from convrecipes.errors import RecipeError
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
    lr_mult: Optional[Callable[[str], float]] = None,
    fused: Optional[bool] = None,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s parameters plus ``extra_param_groups`` (e.g. a loss's own).

    Args:
        name: sgd, adamw, adam or adamax.
        decay_norm_and_bias: also apply weight decay to 1-D parameters (norms, biases).
        lr_mult: ``parameter name -> LR multiplier`` (e.g. a lower LR for a pretrained
            backbone than for a new classifier): each weight-decay group is split by
            multiplier, the groups at ``lr`` first (so the logged LR, the first group's, is
            the recipe's); schedules scale every group from its own initial LR.
        fused: one fused kernel per step for all parameters (``fused_kwargs``); None: where
            torch has it and it is safe (adam, adamw), else a foreach kernel.
    """
    OPTIMIZERS.get(name)
    if decay_norm_and_bias:
        groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad],
                                         "weight_decay": weight_decay}]
    else:
        groups = list(param_groups_weight_decay(model, weight_decay))
    if lr_mult is not None:
        groups = split_by_lr_mult(model, groups, lr, lr_mult)
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
    kwargs.update(fused_kwargs(name, fused))
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=False, **kwargs)


#: the torch class timm's factory builds for each recipe name
_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
                     "adamax": torch.optim.Adamax}


def has_fused(name: str) -> bool:
    """Whether torch has a fused implementation of optimizer ``name``."""
    cls = _TORCH_OPTIMIZERS.get(name)
    return cls is not None and "fused" in inspect.signature(cls).parameters


def fused_kwargs(name: str, fused: Optional[bool] = None) -> dict[str, Any]:
    """The optimizer arguments for ``fused`` (the arithmetic is the per-parameter loop's).

    None: ``{"fused": True}`` (one kernel for every parameter, measured 5x faster per
    ``step`` than the loop on CPU for the small CNNs) for adam and adamw; a foreach kernel
    per parameter group (1.5x) for the others. Fused SGD is not the default because torch's
    fused SGD with momentum fails when a parameter gets its first gradient after the others
    already have momentum buffers (layers that unfreeze, branches trained one at a time).
    True: fused (sgd: only when every parameter trains from the first step). False:
    torch's default (foreach on GPUs, the loop on CPU).
    """
    if fused is None:
        return {"fused": True} if has_fused(name) and name != "sgd" else {"foreach": True}
    if not fused:
        return {}
    if not has_fused(name):
        raise RecipeError(f"optimizer.fused=true but torch has no fused {name}; use sgd, adam or adamw, or set "
                          f"optimizer.fused=null")
    return {"fused": True}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` keeping this optimizer's implementation flags
    (``fused``, ``foreach``: how it computes, not what), which torch would otherwise take
    from the saved param groups: a checkpoint written without fused kernels resumes with
    them, and one written with them resumes where they are not available."""
    kept = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)


def split_by_lr_mult(model: nn.Module, groups: Sequence[dict[str, Any]], lr: float,
                     lr_mult: Callable[[str], float]) -> list[dict[str, Any]]:
    """``groups`` (of ``model``'s parameters) split so each holds one LR multiplier, with
    ``"lr": lr * multiplier`` set; the multiplier-1 groups come first, then the others by
    decreasing multiplier, empty groups dropped."""
    names = {id(p): n for n, p in model.named_parameters()}
    split: list[tuple[float, int, dict[str, Any]]] = []
    for index, group in enumerate(groups):
        by_mult: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_mult.setdefault(float(lr_mult(names[id(p)])), []).append(p)
        for mult, params in by_mult.items():
            split.append((mult, index, {**group, "params": params, "lr": lr * mult}))
    split.sort(key=lambda item: (item[0] != 1.0, -item[0], item[1]))
    return [group for _, _, group in split]
