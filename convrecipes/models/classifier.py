"""``Classifier``: a backbone producing features and a head producing logits, returning both."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from convrecipes.models.output import ModelOutput


class Classifier(nn.Module):
    """Backbone -> (optional embedding projection) -> head, returning ``ModelOutput``.

    Metric losses (triplet, center loss) and A-Softmax need the features the logits came
    from; a plain ``nn.Module`` returning logits hides them.

    Args:
        backbone: maps images to features ``(B, F)`` (e.g. a timm model with ``num_classes=0``).
        head: maps embeddings ``(B, D)`` to logits ``(B, C)``; may itself return a
            ``ModelOutput`` (A-Softmax's angular head), whose logits are used.
        embedding: optional projection ``(B, F) -> (B, D)``, e.g. a 2-D feature layer for plots.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, embedding: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> ModelOutput:
        embeddings = self.embedding(self.backbone(x))
        logits = self.head(embeddings)
        if isinstance(logits, ModelOutput):
            logits = logits.logits
        return ModelOutput(logits, embeddings)
