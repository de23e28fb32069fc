"""The candidate models of a comparison, checked before anything trains.

``prepare_candidates`` turns ``--models`` into one recipe per model (``model.name=<model>``,
and ``model.kwargs={}`` for models other than the recipe's own, whose kwargs would not fit
them), refuses an unknown name (did-you-mean from timm's list) and finds, by a dry forward
of one zero image on the CPU, whether each model can take the data's image size. ImageNet
architectures downsample 32x; at 28 px, VGG's five max-pools or DenseNet's transitions run
out of pixels. Such a model is either resized (``data.image_size``, done once when the data
is loaded) to the smallest of ``RESIZE_SIZES`` it works at, with a printed note, or refused
with one message naming the size that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.recipe import Recipe, load_recipe, parse_override

#: ``--models families``: one small member of each architecture family (timm 1.0 names,
#: built with ``pretrained=False``), then ours. Parameters are for 1-channel input and 10
#: classes; MACs per image at 28 px (32 px where marked: the model needs the resize).
#: VGG has no small member in timm: vgg11_bn is its smallest, and 119M of its parameters are
#: the 4096-wide classifier (the conv stages hold 9.2M); ``tiny_cnn`` is a VGG-style net of ours.
FAMILIES: dict[str, str] = {
    "vgg11_bn": "VGG",  # 128.8M params, 271M MACs at 32 px
    "resnet10t": "ResNet",  # 4.9M params, 20M MACs (resnet18: 11.2M, 33M)
    "xception41": "Inception/Xception",  # 24.9M params, 97M MACs (inception_v3 needs >= 75 px)
    "mobilenetv3_small_050": "MobileNet",  # 0.58M params, 0.8M MACs
    "efficientnet_b0": "EfficientNet",  # 4.0M params, 7.9M MACs
    "densenet121": "DenseNet",  # 7.0M params, 56M MACs at 32 px
    "tiny_cnn": "ours: VGG-style",  # 73K params, 7.3M MACs
    "small_resnet8": "ours: ResNet (CIFAR-style)",  # 78K params, 9.3M MACs
    "small_resnet20": "ours: ResNet (CIFAR-style)",  # 272K params, 31M MACs
    "small_mlp": "ours: MLP baseline",  # 670K params, 0.7M MACs
    "fractalnet": "ours: FractalNet",  # 809K params, 84M MACs
    "sbn": "ours: stagewise boosting",  # 862K params, 87M MACs
}
FAMILIES_NAME = "families"

#: sizes a model that cannot take the data's size is resized to (the smallest that works)
RESIZE_SIZES = (32, 64)
#: further sizes tried only to name a working size in the error message
_PROBE_SIZES = (96, 128, 160, 224, 299)


@dataclass
class Candidate:
    """One model of a comparison and how it will be trained.

    Attributes:
        model: the timm name.
        overrides: the ``key=value`` overrides that make the recipe train this model
            (without the seed).
        recipe: the recipe loaded with them (validated).
        input_shape: ``(C, H, W)`` the model sees.
        num_classes: the data's classes.
        native_size: the data's own image size (before any resize for this model).
        resized: True when this model got ``data.image_size`` because it cannot take the
            data's size.
        family: its architecture family, for the members of ``FAMILIES``.
    """

    model: str
    overrides: list[str]
    recipe: Recipe
    input_shape: tuple[int, int, int]
    num_classes: int
    native_size: int
    resized: bool = False
    family: str = ""

    @property
    def image_size(self) -> int:
        """The image size this model is trained and measured at."""
        return self.input_shape[1]


def parse_models(models: Union[None, str, Sequence[str]]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> names in order, duplicates dropped; ``families``
    expands to ``FAMILIES``."""
    if models is None:
        return []
    items = [models] if isinstance(models, str) else list(models)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            expanded = list(FAMILIES) if name == FAMILIES_NAME else [name] if name else []
            names.extend(n for n in expanded if n not in names)
    return names


def check_known(names: Sequence[str]) -> None:
    """Refuse an unknown model name among ``names`` (the wording of ``create_model``).

    Raises:
        UnknownNameError: the first unknown name, its close matches from timm's list, and
            where to fix it.
    """
    import timm

    from convrecipes.models import create_model

    for name in names:
        if not timm.is_model(name):
            try:
                create_model(name, in_chans=1, num_classes=2)  # raises with timm's close matches
            except UnknownNameError as exc:
                raise UnknownNameError(f"{exc}; fix it in --models (or use --models {FAMILIES_NAME})") from None


def parse_image_size(value: Union[None, str, int]) -> Union[str, int]:
    """``--image-size``: ``auto`` (resize only the models that need it), ``native`` (never
    resize: refuse them) or a size N (resize every model to N x N)."""
    if value is None or value == "auto":
        return "auto"
    if value == "native":
        return "native"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1:
        raise RecipeError(f"--image-size must be auto, native or a positive integer (e.g. --image-size 32), "
                          f"got {value!r}")
    return size


def _forward_error(model: Any, shape: tuple[int, int, int]) -> Optional[str]:
    """None if the model takes one zero image of ``shape``, else the error's first line."""
    import torch

    from convrecipes.models import logits_of

    model.eval()
    try:
        with torch.no_grad():
            logits_of(model(torch.zeros(1, *shape)))
    except Exception as exc:  # any failure: what it was is shown to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{type(exc).__name__}: {first[:200]}"
    return None


def _size_overrides(overrides: Sequence[str]) -> bool:
    return any(parse_override(o)[0] == "data.image_size" for o in overrides)


def prepare_candidates(
    recipe: Union[str, Path],
    models: Union[None, str, Sequence[str]] = None,
    overrides: Sequence[str] = (),
    image_size: Union[None, str, int] = "auto",
    say: Callable[[str], None] = print,
) -> list[Candidate]:
    """One checked ``Candidate`` per model; nothing is trained or written.

    Args:
        recipe: a recipe name or YAML path.
        models: timm names (ours included), comma-separated or a list, or ``families``;
            None: the recipe's own model.
        overrides: ``key=value`` overrides applied to every candidate (after its
            ``model.name`` and ``model.kwargs={}``, so ``model.kwargs.width=8`` reaches all).
        image_size: ``auto``, ``native`` or N (see ``parse_image_size``).
        say: where notes go (a resize).

    Raises:
        UnknownNameError: an unknown model name.
        RecipeError: a bad recipe or override, a model that cannot be built with these
            settings, or one that cannot take the image size (with the size that works).
    """
    from convrecipes.build import build_model, load_datasets

    policy = parse_image_size(image_size)
    overrides = list(overrides)
    names = parse_models(models)
    if names and any(parse_override(o)[0] == "model.name" for o in overrides):
        raise RecipeError("give the models to compare with --models, not model.name=...; e.g. "
                          "--models tiny_cnn,resnet10t")
    if isinstance(policy, int):
        overrides.append(f"data.image_size={policy}")
    base = load_recipe(recipe, overrides)
    own = base.model.name
    names = names or [own]
    check_known(names)  # before the data is read or any model built
    others = [n for n in names if n != own]
    if base.model.init_from and others:
        # the weights belong to the recipe's own architecture: loading them into another
        # candidate fails, and training only some candidates from them is not a fair comparison
        raise RecipeError(f"the recipe starts from model.init_from={base.model.init_from}, weights of {own}, which "
                          f"the other candidates ({', '.join(others)}) cannot load; compare from scratch with "
                          f"model.init_from=null (and without model.freeze*), or compare pretrained timm weights "
                          f"with model.pretrained=true")
    size_fixed = isinstance(policy, int) or _size_overrides(overrides) or base.data.image_size is not None

    test = load_datasets(base, splits=("test",)).test  # the data's shape and classes, without the training split
    shape = tuple(int(s) for s in test.image_shape)
    num_classes = test.num_classes
    kwargs_given = [o for o in overrides if parse_override(o)[0].startswith("model.kwargs")]

    candidates = []
    for name in names:
        cand_overrides = [f"model.name={name}", *([] if name == own else ["model.kwargs={}"]), *overrides]
        cand = load_recipe(recipe, cand_overrides)
        try:
            model = build_model(cand, in_chans=shape[0], num_classes=num_classes, pretrained=False)
        except RecipeError as exc:
            hint = (f" (compare applies the overrides {', '.join(kwargs_given)} to every model)" if kwargs_given
                    else "")
            raise RecipeError(f"candidate {name!r}: {exc}{hint}") from None
        error = _forward_error(model, shape)
        resized = False
        if error is not None:
            working = next((s for s in RESIZE_SIZES if s > shape[1] and _forward_error(model, (shape[0], s, s)) is None),
                           None)
            if working is not None and policy == "auto" and not size_fixed:
                say(f"note: {name} cannot take {shape[1]}x{shape[2]} images ({error}); it is trained and measured "
                    f"on the images resized to {working}x{working} (data.image_size={working}; --image-size N "
                    f"resizes every model alike)")
                cand_overrides.append(f"data.image_size={working}")
                cand = load_recipe(recipe, cand_overrides)
                shape_c = (shape[0], working, working)
                resized = True
            else:
                if working is None:
                    working = next((s for s in _PROBE_SIZES if s > shape[1]
                                    and _forward_error(model, (shape[0], s, s)) is None), None)
                fix = (f"pass --image-size {working} (every model) or data.image_size={working}" if working
                       else f"it fails at every size up to {_PROBE_SIZES[-1]} px too, so it is not a size problem; "
                            f"drop {name} from --models")
                why = " (--image-size native)" if policy == "native" else ""
                raise RecipeError(f"model {name!r} cannot take the {shape[1]}x{shape[2]} images of {base.data.name}"
                                  f"{why}: a forward of one image fails ({error}); {fix}")
        else:
            shape_c = shape
        del model
        candidates.append(Candidate(model=name, overrides=cand_overrides, recipe=cand, input_shape=shape_c,
                                    num_classes=num_classes, native_size=shape[1], resized=resized,
                                    family=FAMILIES.get(name, "")))
    return candidates
