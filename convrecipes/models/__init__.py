"""Models: any timm name, our small-image models (registered with timm), and ``Classifier``."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import timm
import torch.nn as nn

from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.models import small_image  # noqa: F401  (registers our models with timm)
from convrecipes.models.classifier import Classifier
from convrecipes.models.output import ModelOutput, logits_of

__all__ = ["Classifier", "ModelOutput", "logits_of", "create_model", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those requiring gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def create_model(
    name: str,
    in_chans: int,
    num_classes: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    with_embeddings: bool = False,
    embedding_dim: Optional[int] = None,
    head_factory: Optional[Callable[[int, int], nn.Module]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model (ours included) for ``in_chans``-channel images and ``num_classes``.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``small_resnet8`` or ``resnet18``.
        with_embeddings: return a ``Classifier`` whose forward gives ``ModelOutput(logits,
            embeddings)`` (needed by metric losses); implied by ``embedding_dim`` or
            ``head_factory``.
        embedding_dim: add a linear projection of the features to this size (e.g. 2 for
            the 2-D feature plots of the center-loss and SphereFace papers).
        head_factory: ``(embedding_width, num_classes) -> head``; default ``nn.Linear``.
        **kwargs: passed to the model's constructor (e.g. ``width`` for our models).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint} (any name in timm.list_models() works)")
    wants_embeddings = with_embeddings or embedding_dim is not None or head_factory is not None
    try:
        backbone = timm.create_model(
            name,
            pretrained=pretrained,
            in_chans=in_chans,
            num_classes=0 if wants_embeddings else num_classes,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except TypeError as exc:  # an unsupported constructor argument
        raise RecipeError(f"model {name!r} does not accept these arguments: {exc}; check model.kwargs") from None
    if not wants_embeddings:
        return backbone
    width = backbone.num_features
    embedding = None
    if embedding_dim is not None:
        embedding = nn.Linear(width, embedding_dim)
        width = embedding_dim
    head = head_factory(width, num_classes) if head_factory is not None else nn.Linear(width, num_classes)
    return Classifier(backbone, head, embedding)
