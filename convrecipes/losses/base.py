"""What a loss returns, so a trainer can log every part of a composite objective."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch


class LossOutput(NamedTuple):
    """A scalar loss and its named parts (already weighted), each a 0-dim tensor."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def as_loss_output(value: Union[torch.Tensor, LossOutput], name: str = "loss") -> LossOutput:
    """Normalise a loss module's return value to ``LossOutput``."""
    if isinstance(value, LossOutput):
        return value
    return LossOutput(value, {name: value.detach()})
