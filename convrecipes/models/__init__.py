"""Models: any timm name, our small-image models (registered with timm), and ``Classifier``."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import typing
from typing import Any, Callable, Optional

import timm
import torch.nn as nn

from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.models import small_image  # registers our models with timm
from convrecipes.models import fractalnet, sbn  # noqa: F401  (register with timm too)
from convrecipes.models.small_image import ModelArgumentError
from convrecipes.registry import check_params, did_you_mean, signature_params
from convrecipes.models.classifier import Classifier
from convrecipes.models.output import ModelOutput, logits_of

__all__ = ["Classifier", "ModelOutput", "logits_of", "create_model", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those requiring gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Constructor arguments create_model fills in itself (not settable through model.kwargs).
_FILLED = ("in_chans", "num_classes", "drop_rate", "drop_path_rate", "pretrained")
# timm.create_model's own keywords (checkpoint_path, scriptable, ...): valid for every model.
_TIMM_CREATE_ARGS = frozenset(signature_params(timm.create_model, exclude=("model_name", "pretrained")))
_KWARGS_FIX = "check model.kwargs; switching model.name may need model.kwargs={}"
_UNEXPECTED = re.compile(r"got an unexpected keyword argument '([^']+)'")


def _timm_model_class(arch: str, message: str) -> Optional[type]:
    """Best effort: the class a timm entrypoint builds, from the TypeError's ``Cls.__init__()``
    or the entrypoint's return annotation."""
    try:
        entrypoint = timm.models.model_entrypoint(arch)
    except Exception:
        return None
    module = sys.modules.get(getattr(entrypoint, "__module__", ""))
    named = re.match(r"(\w+)\.__init__\(\)", message)
    candidates: list[Any] = [getattr(module, named.group(1), None)] if named and module else []
    try:
        candidates.append(typing.get_type_hints(entrypoint).get("return"))
    except Exception:
        annotation = getattr(entrypoint, "__annotations__", {}).get("return")
        candidates.append(getattr(module, annotation, None) if isinstance(annotation, str) and module else annotation)
    for cls in candidates:
        if inspect.isclass(cls) and issubclass(cls, nn.Module):
            return cls
    return None


def _unknown_timm_kwarg(name: str, arch: str, exc: TypeError, kwargs: dict[str, Any]) -> RecipeError:
    """The RecipeError for timm's ``... got an unexpected keyword argument 'x'``."""
    message = str(exc)
    found = _UNEXPECTED.search(message)
    if found is None or found.group(1) not in kwargs:  # not one of model.kwargs: say what timm said
        return RecipeError(f"model {name!r} could not be built from these arguments ({message}); {_KWARGS_FIX}")
    bad = found.group(1)
    cls = _timm_model_class(arch, message)
    try:
        valid = sorted(signature_params(cls, exclude=_FILLED)) if cls is not None else []
    except (TypeError, ValueError):
        valid = []
    listing = (f"; valid params of {cls.__name__}: {', '.join(valid) or '(none)'}" if cls is not None and valid
               else "")
    return RecipeError(f"model {name!r} has no parameter {bad!r}{did_you_mean(bad, valid)} (model.kwargs)"
                       f"{listing}; {_KWARGS_FIX}")


def _bad_value(name: str, arch: str, exc: ModelArgumentError, kwargs: dict[str, Any]) -> RecipeError:
    if exc.param in kwargs:
        key = f"model.kwargs.{exc.param}"
    elif exc.param in ("drop_rate", "drop_path_rate", "pretrained"):
        key = f"model.{exc.param}"
    elif exc.param == "in_chans":
        key = "data.channels"
    else:
        key = ""
    prefix = "" if str(exc).startswith(arch) else f"model {name!r}: "
    return RecipeError(f"{prefix}{exc}" + (f" ({key})" if key else ""))


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

    Raises:
        UnknownNameError: ``name`` is no timm model.
        RecipeError: a kwarg the model does not take (naming the closest valid one and,
            where the model class is found, all of them), or a bad value for one of ours.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UnknownNameError(f"unknown model {name!r}{hint} (any name in timm.list_models() works)")
    arch = timm.models.get_arch_name(name)
    if arch in small_image.MODELS:
        cls, fixed = small_image.MODELS[arch]
        own = {k: v for k, v in kwargs.items() if k not in _TIMM_CREATE_ARGS}
        for key in own.keys() & fixed.keys():
            same = ", ".join(n for n, (c, _) in small_image.MODELS.items() if c is cls)
            raise RecipeError(f"model {name!r} fixes {key}={fixed[key]!r} (model.kwargs.{key}); pick the model by "
                              f"name for another {key}: {same}")
        try:
            check_params(f"model {name!r}", own, signature_params(cls, exclude=(*_FILLED, *fixed)),
                         key="model.kwargs", require=False)
        except RecipeError as exc:
            raise RecipeError(f"{exc}; {_KWARGS_FIX}") from None
    wants_embeddings = with_embeddings or embedding_dim is not None or head_factory is not None
    try:
        backbone = timm.create_model(
            name,
            pretrained=pretrained,
            in_chans=in_chans,
            num_classes=0 if wants_embeddings else num_classes,
            drop_rate=drop_rate,
            # None when 0: timm drops None arguments, so models without stochastic depth (VGG,
            # DenseNet, Inception) build; a positive rate still reaches (or is refused by) the model
            drop_path_rate=drop_path_rate or None,
            **kwargs,
        )
    except ModelArgumentError as exc:  # one of ours refused a value
        raise _bad_value(name, arch, exc, kwargs) from None
    except TypeError as exc:  # an unsupported constructor argument
        raise _unknown_timm_kwarg(name, arch, exc, kwargs) from None
    if not wants_embeddings:
        return backbone
    width = backbone.num_features
    embedding = None
    if embedding_dim is not None:
        embedding = nn.Linear(width, embedding_dim)
        width = embedding_dim
    head = head_factory(width, num_classes) if head_factory is not None else nn.Linear(width, num_classes)
    return Classifier(backbone, head, embedding)
