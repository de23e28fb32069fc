"""What models return when a trainer or loss needs more than logits."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch


class ModelOutput(NamedTuple):
    """Logits ``(B, C)`` and, for metric losses, the embeddings ``(B, D)`` they came from."""

    logits: torch.Tensor
    embeddings: Optional[torch.Tensor] = None


def logits_of(output: Union[torch.Tensor, ModelOutput]) -> torch.Tensor:
    """The logits of a model's output, whether it is a tensor or a ``ModelOutput``."""
    return output.logits if isinstance(output, ModelOutput) else output
