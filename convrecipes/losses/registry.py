"""The loss registry, ``build_loss`` for recipes, and the input checks every loss shares.

A recipe names its loss as one term or a list of weighted terms::

    loss: {name: label_smoothing_ce, params: {eps: 0.1}}
    loss: [{name: cross_entropy}, {name: center, weight: 0.003, params: {alpha: 0.5}}]

``num_classes`` and ``embedding_dim`` are filled in from the model when a loss's
constructor takes them, so recipes never repeat them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from convrecipes.errors import RecipeError
from convrecipes.losses.composite import WeightedSumLoss
from convrecipes.models.output import ModelOutput
from convrecipes.registry import Registry, did_you_mean

LOSSES: Registry[type[nn.Module]] = Registry("loss")

# Constructor arguments that come from the model, not from the recipe.
_AUTO_ARGS = ("num_classes", "embedding_dim")
_TERM_KEYS = ("name", "weight", "params")


def class_indices(target: torch.Tensor, batch_size: int, loss_name: str) -> torch.Tensor:
    """Return ``target`` as int64 class indices ``(B,)``, or raise a ``ValueError`` saying what to change.

    Args:
        target: what the trainer passed as the target.
        batch_size: the batch size the target must match.
        loss_name: the loss's class name, for the message.
    """
    if target.is_floating_point() and target.dim() == 2:
        raise ValueError(
            f"{loss_name} needs class indices of shape (B,), got soft targets of shape "
            f"{tuple(target.shape)} (from mixup/cutmix or label smoothing in the data). Soft "
            "targets have no meaning for this loss: turn off mixup/cutmix for this recipe, or "
            "use cross_entropy / label_smoothing_ce, which accept them."
        )
    if target.dim() != 1 or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"{loss_name} needs int64 class indices of shape (B,), got dtype {target.dtype} "
            f"and shape {tuple(target.shape)}."
        )
    if target.shape[0] != batch_size:
        raise ValueError(
            f"{loss_name}: {target.shape[0]} targets for a batch of {batch_size} samples."
        )
    return target.long()


def check_ignore_index(ignore_index: Any) -> int | None:
    """``ignore_index`` as an int (or None: ignore nothing), or a ``ValueError`` naming the fix."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(
            f"ignore_index must be an integer class index (torch's default is -100) or None, got {ignore_index!r}"
        )
    return int(ignore_index)


def kept_class_indices(
    target: torch.Tensor, batch_size: int, loss_name: str, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class indices with the ignored samples' index replaced by 0, and the mask of kept samples.

    The replacement only keeps ``gather``/``one_hot`` in range; the caller zeroes those
    samples with the mask. The mask is None when ``ignore_index`` is None.
    """
    indices = class_indices(target, batch_size, loss_name)
    if ignore_index is None:
        return indices, None
    keep = indices != ignore_index
    return torch.where(keep, indices, torch.zeros_like(indices)), keep


def mean_over_kept(per_sample: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``per_sample`` over the kept samples (all when ``keep`` is None).

    With every sample ignored the result is a zero that keeps the graph (torch gives NaN),
    so a batch without labels cannot poison the weights.
    """
    if keep is None:
        return per_sample.mean()
    kept = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    return kept.sum() / keep.sum().clamp(min=1).to(per_sample.dtype)


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is fp16/bf16 (autocast outputs), unchanged otherwise."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def embeddings_of(output: Union[torch.Tensor, ModelOutput], loss_name: str) -> torch.Tensor:
    """The ``(B, D)`` embeddings a metric loss works on, or a ``ValueError`` saying how to get them.

    A plain tensor *is* the embeddings (research code calls ``loss(embeddings, labels)``);
    a ``ModelOutput`` gives its ``embeddings`` field.
    """
    if isinstance(output, ModelOutput):
        embeddings = output.embeddings
        if embeddings is None:
            raise ValueError(
                f"{loss_name} needs embeddings but the model returned ModelOutput(embeddings=None). "
                "Wrap the model as convrecipes.models.Classifier(backbone, head) so its forward "
                "returns ModelOutput(logits, embeddings), or call the loss on the embeddings tensor."
            )
    elif isinstance(output, torch.Tensor):
        embeddings = output
    else:
        raise ValueError(
            f"{loss_name} takes an embeddings tensor (B, D) or a ModelOutput, got {type(output).__name__}"
        )
    if embeddings.dim() != 2:
        raise ValueError(
            f"{loss_name} needs embeddings of shape (B, D), got {tuple(embeddings.shape)}; "
            "flatten or pool the features before the head."
        )
    return embeddings


def _term_module(term: Mapping[str, Any], num_classes: int, embedding_dim: int | None) -> nn.Module:
    name = term["name"]
    cls = LOSSES.get(name)  # an unknown name lists the valid ones
    if not isinstance(term.get("params") or {}, Mapping):
        raise RecipeError(f"loss {name!r}: params must be a mapping, got {term['params']!r}")
    params = dict(term.get("params") or {})
    accepted = LOSSES.params(name)
    # The model fills these in; a recipe may still give them (checked against the model below).
    filled = [key for key in _AUTO_ARGS if key in accepted]
    LOSSES.check_params(name, {k: v for k, v in params.items() if k not in filled}, exclude=filled,
                        key="loss.params")
    auto = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    for key in _AUTO_ARGS:
        if key not in accepted:
            continue
        if auto[key] is None:
            if key not in params:
                raise RecipeError(
                    f"loss {name!r} needs {key}, but the model gives none: use a model that "
                    "returns embeddings (convrecipes.models.Classifier) or set "
                    f"params: {{{key}: ...}} for this loss."
                )
        elif key in params and params[key] != auto[key]:
            raise RecipeError(
                f"loss {name!r}: params.{key}={params[key]!r} contradicts the model's "
                f"{key}={auto[key]}; remove it, it is filled in automatically."
            )
        else:
            params[key] = auto[key]
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"loss {name!r}: {err}") from err


def build_loss(
    spec: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
    num_classes: int,
    embedding_dim: int | None = None,
) -> nn.Module:
    """Build the loss a recipe describes.

    Args:
        spec: one term or a list of terms, each ``{name, weight (default 1.0), params (default {})}``.
        num_classes: filled into constructors that take ``num_classes``.
        embedding_dim: filled into constructors that take ``embedding_dim`` (None when the model
            returns no embeddings).

    Returns:
        The bare loss module for a single term without ``weight``; otherwise a
        ``WeightedSumLoss`` whose parts are named by the loss names (``center``,
        ``center_2`` when a name repeats).

    Raises:
        RecipeError: an unknown name (listing the valid ones), an unknown key or parameter
            (listing the valid ones), or a value the loss rejects.
    """
    single = isinstance(spec, Mapping)
    terms = [spec] if single else list(spec)
    if not terms:
        raise RecipeError("loss: the list of terms is empty; give at least one {name: ...}")
    for term in terms:
        if not isinstance(term, Mapping):
            raise RecipeError(f"loss: each term must be a mapping like {{name: cross_entropy}}, got {term!r}")
        if "name" not in term:
            raise RecipeError(f"loss: a term has no 'name' ({dict(term)!r}); valid names: {', '.join(LOSSES.names())}")
        for key in term:
            if key not in _TERM_KEYS:
                raise RecipeError(
                    f"loss {term['name']!r}: unknown key {key!r}{did_you_mean(key, _TERM_KEYS)}; valid keys: "
                    f"{', '.join(_TERM_KEYS)}"
                )
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RecipeError(f"loss {term['name']!r}: weight must be a number, got {weight!r}")

    if len(terms) == 1 and "weight" not in terms[0]:
        return _term_module(terms[0], num_classes, embedding_dim)

    built: list[tuple[str, float, nn.Module]] = []
    seen: dict[str, int] = {}
    for term in terms:
        seen[term["name"]] = seen.get(term["name"], 0) + 1
        label = term["name"] if seen[term["name"]] == 1 else f"{term['name']}_{seen[term['name']]}"
        built.append((label, float(term.get("weight", 1.0)), _term_module(term, num_classes, embedding_dim)))
    return WeightedSumLoss(built)
