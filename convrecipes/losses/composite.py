"""A weighted sum of losses whose every part is logged, e.g. softmax + lambda * center loss."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from convrecipes.losses.base import LossOutput, as_loss_output
from convrecipes.models.output import ModelOutput


class WeightedSumLoss(nn.Module):
    """``sum_t weight_t * loss_t(output, target)``.

    Returns a ``LossOutput`` whose ``parts`` are the weighted terms (detached, named by term
    name, summing to ``loss``) and whose ``stats`` are the terms' stats prefixed
    ``"<term name>/"``. ``post_step()`` is forwarded to every term that has one;
    ``needs_embeddings`` is true when any term needs them. The terms live in an
    ``nn.ModuleDict`` so their buffers (centers, iteration counters) are saved under
    ``terms.<name>.`` in checkpoints.

    Args:
        terms: ``(name, weight, module)`` triples; names must be unique and contain no ``.``.
    """

    needs_embeddings: bool = False
    lr: float | None = None

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedSumLoss needs at least one (name, weight, module) term")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"WeightedSumLoss term names must be unique, got {names}")
        for name in names:
            if not name or "." in name or "/" in name:
                raise ValueError(f"WeightedSumLoss term name {name!r} must be non-empty without '.' or '/'")
        self.terms = nn.ModuleDict({name: module for name, _, module in terms})
        self.weights: dict[str, float] = {name: float(weight) for name, weight, _ in terms}
        self.needs_embeddings = any(getattr(m, "needs_embeddings", False) for _, _, m in terms)

    def forward(self, output: Union[torch.Tensor, ModelOutput], target: torch.Tensor) -> LossOutput:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        for name, module in self.terms.items():
            term = as_loss_output(module(output, target), name)
            weighted = self.weights[name] * term.loss
            total = weighted if total is None else total + weighted
            parts[name] = weighted.detach()
            for key, value in term.stats.items():
                stats[f"{name}/{key}"] = value
        assert total is not None
        return LossOutput(total, parts, stats)

    def post_step(self) -> None:
        """Forward the trainer's after-optimizer-step hook to every term."""
        for module in self.terms.values():
            hook = getattr(module, "post_step", None)
            if callable(hook):
                hook()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())


def loss_param_groups(loss: nn.Module) -> list[dict]:
    """Optimizer param groups for a loss's trainable parameters (empty for most losses).

    A bare loss is one group; a ``WeightedSumLoss`` gives one group per term that has
    trainable parameters. A loss's ``lr`` attribute, when not None, is set on its group
    (otherwise the optimizer's default applies).
    """
    losses = list(loss.terms.values()) if isinstance(loss, WeightedSumLoss) else [loss]
    groups: list[dict] = []
    for module in losses:
        if isinstance(module, WeightedSumLoss):
            groups.extend(loss_param_groups(module))
            continue
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        group: dict = {"params": params}
        lr = getattr(module, "lr", None)
        if lr is not None:
            group["lr"] = float(lr)
        groups.append(group)
    return groups
