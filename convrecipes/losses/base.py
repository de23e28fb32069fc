"""What a loss returns, so a trainer can log every part of a composite objective."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch


class LossOutput(NamedTuple):
    """A scalar loss, its named parts and diagnostics.

    Attributes:
        loss: the scalar to backpropagate.
        parts: the weighted components that sum to ``loss`` (0-dim tensors), logged each epoch.
        stats: diagnostics that are not part of the sum (e.g. the fraction of active triplets,
            anchors without a positive), also logged.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = {}


def as_loss_output(value: Union[torch.Tensor, LossOutput], name: str = "loss") -> LossOutput:
    """Normalise a loss module's return value to ``LossOutput``."""
    if isinstance(value, LossOutput):
        return value
    return LossOutput(value, {name: value.detach()}, {})
