"""Fine-tuning: start a model from earlier weights, freeze part of it, unfreeze it later.

What: ``model.init_from`` loads the weights of a ``convrecipes train`` run (the classifier
re-initialised when the classes differ) or a local file of timm pretrained weights;
``model.freeze_stages`` / ``model.freeze`` hold the first stages of the backbone, or the
parameters matching patterns, fixed; ``model.unfreeze_epoch`` lets them train from that
epoch on; ``optimizer.backbone_lr_mult`` trains the backbone at a fraction of the
classifier's learning rate.

When: a small dataset and a model trained on a larger or related one (features transfer,
the new head has to be learned from scratch), or a second stage at a larger image size
(``convrecipes train RECIPE --then data.image_size=...``: FixRes, Touvron et al. 2019,
https://arxiv.org/abs/1906.06423, trains at a low resolution and fine-tunes briefly at the
test resolution).

How freezing works, and why so:

- The optimizer holds every parameter from the start; freezing only sets
  ``requires_grad=False``. A frozen parameter's gradient stays ``None``, which every torch
  optimizer skips (a zero gradient would not do: momentum and weight decay still move it).
  Unfreezing flips ``requires_grad`` back, so the optimizer's param groups and the
  schedule's state are the same before and after, and a checkpoint from either side of the
  unfreeze epoch resumes with the same set-up.
- Whether a parameter is frozen is a function of the epoch alone, re-applied when training
  starts or resumes and at each epoch start (``ParameterFreezer``, a stateless callback):
  a run resumed after its unfreeze epoch trains everything.
- Norm layers inside frozen modules stay in eval mode (BatchNorm would otherwise keep
  updating its running statistics, changing what the frozen layers compute). The trainer
  calls ``model.train()`` at each epoch start and after each evaluation, so a forward
  pre-hook on each frozen norm layer puts it back in eval mode right before it runs.
- Under several processes freezing happens after DDP wrapped the model (so DDP registers
  every parameter and syncs the unfrozen ones later) with ``find_unused_parameters``
  switched on, under which DDP leaves the frozen parameters' gradients ``None`` too.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch.nn as nn

from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.trainers.callbacks import Callback

if TYPE_CHECKING:
    from convrecipes.recipe import Recipe
    from convrecipes.trainers.base import Trainer

PathLike = Union[str, os.PathLike]

__all__ = ["InitSource", "ParameterFreezer", "Stage", "backbone_lr_mult_of", "classifier_parameter_names",
           "frozen_parameter_names", "load_init_weights", "model_stages", "resolve_init_source"]

# weight files we cannot read without unpickling (the project loads no pickle)
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")


# -- the classifier and the stages -----------------------------------------------------
def _classifier_modules(model: nn.Module) -> Optional[list[nn.Module]]:
    """The modules that map features to logits: a ``Classifier``'s embedding and head, or a
    timm model's ``get_classifier()``; None for a model without either."""
    from convrecipes.models import Classifier

    if isinstance(model, Classifier):
        return [model.embedding, model.head]
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    return [head] if isinstance(head, nn.Module) else list(head)


def classifier_parameter_names(model: nn.Module, why: str = "") -> set[str]:
    """Names (as in ``model.named_parameters()``) of the classifier's parameters.

    Raises:
        RecipeError: the model exposes no classifier (``why`` names the recipe key that needs it).
    """
    return {n for n in _classifier_names(model, why, "named_parameters")}


def _classifier_names(model: nn.Module, why: str, what: str) -> list[str]:
    modules = _classifier_modules(model)
    if modules is None:
        raise RecipeError(f"{why or 'this'} needs the model's classifier, but {type(model).__name__} has no "
                          f"get_classifier(); freeze or scale parameters by name instead (model.freeze=[patterns])")
    ids = {id(m) for head in modules for m in head.modules()}
    names = []
    for prefix, module in model.named_modules():
        if id(module) in ids:
            for name, _ in getattr(module, what)(recurse=False):
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def classifier_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) of the classifier."""
    return set(_classifier_names(model, "loading weights", "named_parameters")) | \
        set(_classifier_names(model, "loading weights", "named_buffers"))


@dataclass
class Stage:
    """One stage of a backbone: a label (module path, or its modules joined by ``+``) and the
    full names of its parameters, in order."""

    name: str
    parameters: list[str] = field(default_factory=list)


def _label(names: Sequence[str]) -> str:
    """The deepest module path shared by ``names`` (``layer1``), else their top-level modules
    joined (``conv1+bn1``)."""
    paths = [n.rsplit(".", 1)[0].split(".") if "." in n else [] for n in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common:
        return ".".join(common)
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    return "+".join(tops)


def _is_block_container(module: nn.Module) -> bool:
    """A Sequential/ModuleList of blocks (children that have children of their own), counted
    block by block; one of plain layers (conv, norm, act) is a single stage."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    return any(len(list(child.children())) > 0 for child in module.children())


def model_stages(model: nn.Module) -> list[Stage]:
    """The backbone's stages in forward order, without the classifier.

    timm models that define ``group_matcher`` use its coarse groups (resnet: ``conv1+bn1``,
    ``layer1`` .. ``layer4``). Other models (ours): the backbone's top-level children in
    order, a Sequential of blocks expanded into its blocks (tiny_cnn: ``features.0`` ..
    ``features.7``; small_resnet: ``stem``, ``blocks.0`` ..), parameterless layers skipped.
    """
    from convrecipes.models import Classifier

    backbone, prefix = (model.backbone, "backbone.") if isinstance(model, Classifier) else (model, "")
    head = classifier_parameter_names(model, "model.freeze_stages")
    stages: list[Stage] = []
    matcher = getattr(backbone, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        for _, names in sorted(group_parameters(backbone, matcher(coarse=True)).items()):
            names = [prefix + n for n in names if prefix + n not in head]
            if names:
                stages.append(Stage(_label([n[len(prefix):] for n in names]), names))
        return stages

    def walk(module: nn.Module, path: str) -> None:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            names = [f"{prefix}{full}.{n}" for n, _ in child.named_parameters()]
            names = [n for n in names if n not in head]
            if not names:
                continue
            if _is_block_container(child):
                walk(child, full)
            else:
                stages.append(Stage(full, names))

    walk(backbone, "")
    return stages


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def frozen_parameter_names(model: nn.Module, freeze_stages: Optional[int] = None,
                           patterns: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The parameters to freeze: those of the first ``freeze_stages`` stages and those whose
    names match any of ``patterns`` (fnmatch, or a regular expression after ``re:``).

    Returns:
        ``(parameter names in model order, what was frozen in words per stage/pattern)``.

    Raises:
        RecipeError: more stages than the model has, a pattern that matches nothing (with a
            few real parameter names), a bad regular expression, or every parameter frozen.
    """
    all_names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    described: list[str] = []
    if freeze_stages:
        stages = model_stages(model)
        if freeze_stages > len(stages):
            listing = ", ".join(s.name for s in stages)
            raise RecipeError(f"model.freeze_stages={freeze_stages} but {type(model).__name__} has {len(stages)} "
                              f"stages before its classifier ({listing}); use model.freeze_stages<={len(stages)}")
        for stage in stages[:freeze_stages]:
            chosen.update(stage.parameters)
            described.append(stage.name)
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise RecipeError(f"model.freeze pattern {pattern!r} is not a valid regular expression ({exc}); "
                                  f"fix it, or drop the re: prefix for a shell-style pattern") from None
        hits = [n for n in all_names if _matches(pattern, n)]
        if not hits:
            shown = all_names[:4] + (["..."] + all_names[-2:] if len(all_names) > 6 else all_names[4:])
            raise RecipeError(f"model.freeze pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                              f"its parameter names look like: {', '.join(shown)} (patterns are shell-style, e.g. "
                              f"'features.0.*', or regular expressions after re:)")
        chosen.update(hits)
        described.append(f"{pattern!r} ({len(hits)} parameters)")
    if chosen and len(chosen) == len(all_names):
        raise RecipeError(f"model.freeze_stages/model.freeze freeze every parameter of {type(model).__name__}, so "
                          f"nothing would train; leave at least the classifier out")
    return [n for n in all_names if n in chosen], described


# -- freezing ---------------------------------------------------------------------------
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _stay_in_eval(module: nn.Module, args: Any) -> None:
    # a module-level function (not a bound method) so that deep copies of the model (EMA)
    # copy the hook without copying the freezer
    module.training = False


def frozen_norm_modules(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """Norm layers all of whose own parameters are frozen; a norm layer without parameters
    (``affine=False``) when every parameter of its parent module is frozen."""
    out = []
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not isinstance(module, _NORMS):
            continue
        own = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
        if own:
            if all(n in frozen for n in own):
                out.append(module)
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        names = [f"{parent}.{n}" if parent else n for n, _ in modules[parent].named_parameters()]
        if names and all(n in frozen for n in names):
            out.append(module)
    return out


class ParameterFreezer(Callback):
    """Holds parameters fixed until ``unfreeze_epoch`` (counted from 1; None: for the whole
    run), their norm layers in eval mode.

    Stateless: the frozen set is a function of the epoch, applied by ``apply`` at fit start
    (after a resume) and at each epoch start, so a resume on either side of the unfreeze
    epoch is right. Call ``apply(0)`` once after the trainer is built (``build`` does) so
    that anything stepping the trainer before ``fit`` (the LR finder) sees it frozen too.

    Args:
        model: the (unwrapped) model whose parameters are frozen.
        names: the parameter names to freeze (``frozen_parameter_names``).
        unfreeze_epoch: the first epoch, counted from 1, that trains them.
        described: what is frozen, in words, for the messages.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], unfreeze_epoch: Optional[int] = None,
                 described: Sequence[str] = ()) -> None:
        params = dict(model.named_parameters())
        self.names = list(names)
        self.params = [params[n] for n in self.names]
        self.norms = frozen_norm_modules(model, set(self.names))
        self.unfreeze_epoch = unfreeze_epoch
        self.described = list(described)
        self.frozen = False
        self._hooks: list[Any] = []

    def frozen_in(self, epoch: int) -> bool:
        """Whether the parameters are frozen in epoch ``epoch`` (counted from 0, as ``Trainer.epoch``)."""
        return self.unfreeze_epoch is None or epoch + 1 < self.unfreeze_epoch

    def apply(self, epoch: int) -> bool:
        """Freeze or unfreeze for epoch ``epoch`` (from 0); returns whether they are frozen."""
        frozen = self.frozen_in(epoch)
        for p in self.params:
            p.requires_grad_(not frozen)
        if frozen and not self._hooks:
            self._hooks = [m.register_forward_pre_hook(_stay_in_eval) for m in self.norms]
        elif not frozen and self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []  # the next model.train() (the epoch start) puts the norms back in train mode
        self.frozen = frozen
        return frozen

    def summary(self) -> str:
        """What is frozen and until when, in one line."""
        count = sum(p.numel() for p in self.params)
        until = f"until epoch {self.unfreeze_epoch}" if self.unfreeze_epoch else "for the whole run"
        return (f"frozen {until}: {', '.join(self.described)} ({len(self.params)} tensors, {count:,} parameters, "
                f"{len(self.norms)} norm layers in eval mode)")

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.apply(trainer.epoch)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        was = self.frozen
        if was and not self.apply(epoch):
            trainer.print(f"epoch {epoch + 1}: unfroze {', '.join(self.described)}; every parameter trains now")


# -- learning rates ---------------------------------------------------------------------
def backbone_lr_mult_of(model: nn.Module, mult: float) -> Callable[[str], float]:
    """``name -> LR multiplier``: 1 for the classifier's parameters, ``mult`` for the rest."""
    head = classifier_parameter_names(model, "optimizer.backbone_lr_mult")
    return lambda name: 1.0 if name in head else mult


# -- initial weights --------------------------------------------------------------------
@dataclass
class InitSource:
    """Where ``model.init_from`` points: ``kind`` is ``checkpoint`` (a ``convrecipes train``
    checkpoint, ``file`` the one chosen in a run directory), ``timm`` (a plain state dict
    for a timm model with pretrained configs, loaded by timm's pretrained loader: it adapts
    the stem to the input channels and drops a classifier of another size) or
    ``state_dict`` (a plain state dict for another model, e.g. ours)."""

    kind: str
    file: Path
    given: str


def _is_our_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    from convrecipes.checkpoint import FORMAT

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def _has_pretrained_cfg(model_name: str) -> bool:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(model_name) is not None
    except Exception:
        return False


def resolve_init_source(given: str, model_name: str) -> InitSource:
    """What ``model.init_from`` names, checked before anything is built.

    Raises:
        RecipeError: nothing there, or a pickled weight file (with the command that converts it).
        CheckpointError: a run directory without checkpoints.
    """
    from convrecipes.loading import find_checkpoint

    path = Path(given).expanduser()
    if path.is_dir():
        return InitSource("checkpoint", find_checkpoint(path, prefer="best", what="model.init_from run"), given)
    if not path.is_file():
        raise RecipeError(f"model.init_from={given!r}: no such run directory or file; pass a run directory or "
                          f".safetensors written by `convrecipes train`, or a local .safetensors of pretrained "
                          f"weights")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise RecipeError(f"model.init_from={given!r} is a pickled weight file, and convrecipes loads no pickle "
                          f"(unpickling can run code); convert it once to safetensors: python -c \"import torch; "
                          f"from safetensors.torch import save_file; sd = torch.load('{path}', weights_only=True); "
                          f"save_file(sd.get('state_dict', sd), '{path.with_suffix('.safetensors')}')\" and point "
                          f"model.init_from at the .safetensors file")
    if _is_our_checkpoint(path):
        return InitSource("checkpoint", path, given)
    if path.suffix.lower() != ".safetensors":
        raise RecipeError(f"model.init_from={given!r} is neither a run directory nor a .safetensors file; pass a "
                          f"run directory written by `convrecipes train` or a .safetensors weight file")
    return InitSource("timm" if _has_pretrained_cfg(model_name) else "state_dict", path, given)


def load_init_weights(model: nn.Module, source: InitSource, classes: Sequence[str]) -> dict[str, Any]:
    """Load ``source`` (kind ``checkpoint`` or ``state_dict``) into ``model``: every weight
    must fit, except the classifier's, which keeps its fresh initialisation when the
    checkpoint's classes differ from ``classes`` (names, or the classifier's shape).

    Returns:
        What was loaded, for the run's metadata: ``from``, ``file``, ``sha256``, ``kind``,
        ``classifier`` (``loaded`` or ``re-initialised``), the source's ``epoch`` and classes.

    Raises:
        CheckpointError: the weights do not fit the model outside its classifier.
    """
    from safetensors.torch import load_file

    from convrecipes.checkpoint import file_sha256, load_checkpoint, model_weights_of, weights_mismatch

    meta: dict[str, Any] = {}
    if source.kind == "checkpoint":
        state, meta = load_checkpoint(source.file)
        weights = dict(model_weights_of(state, source.file))
    else:
        try:
            weights = load_file(str(source.file))
        except Exception as exc:
            raise CheckpointError(f"model.init_from {source.file} is not a readable safetensors file ({exc})") from None
        weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    own = model.state_dict()
    head = classifier_state_keys(model) if _classifier_modules(model) is not None else set()
    old_classes = meta.get("classes")
    reset = old_classes is not None and list(old_classes) != list(classes)
    reset = reset or any(k in weights and weights[k].shape != own[k].shape for k in head)
    reset = reset or bool(head) and not all(k in weights for k in head)
    if reset:
        weights = {k: v for k, v in weights.items() if k not in head}
    expected = [k for k in own if not (reset and k in head)]
    problem = weights_mismatch(own, weights, expected, source_word="file")
    if problem:
        raise CheckpointError(f"model.init_from {source.file} does not fit {type(model).__name__} outside its "
                              f"classifier ({problem}); start from weights of the same architecture "
                              f"(model.name and model.kwargs as the run that wrote them)")
    merged = {**own, **{k: v.to(own[k].dtype) for k, v in weights.items()}}
    model.load_state_dict(merged)
    how = "loaded"
    if reset:
        before = f"{len(old_classes)} classes" if old_classes is not None else "another classifier"
        how = f"re-initialised ({before} -> {len(classes)} classes)"
    return {"from": source.given, "file": str(source.file.resolve()), "sha256": file_sha256(source.file),
            "kind": source.kind, "classifier": how, "epoch": meta.get("epoch"),
            "source_classes": list(old_classes) if old_classes is not None else None}


def pretrained_download_error(model_name: str, exc: BaseException) -> RecipeError:
    """The error for ``model.pretrained=true`` when timm cannot fetch the weights (offline)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    where = f" (Hugging Face hub id {hub!r}: the file model.safetensors there)" if hub else ""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return RecipeError(f"could not get pretrained weights for {model_name!r} ({type(exc).__name__}: {first}); "
                       f"model.pretrained=true downloads them, which needs internet. Fix: download the weights file "
                       f"once on a machine with internet{where} and point model.init_from at the local .safetensors "
                       f"file (model.init_from=/path/to/model.safetensors), or set model.pretrained=false")


def setup_freezing(recipe: "Recipe", model: nn.Module) -> Optional[ParameterFreezer]:
    """The recipe's ``ParameterFreezer`` for ``model`` (None when nothing is frozen)."""
    from convrecipes.recipe import freeze_patterns

    m = recipe.model
    patterns = freeze_patterns(m)
    if not m.freeze_stages and not patterns:
        return None
    names, described = frozen_parameter_names(model, m.freeze_stages, patterns)
    if m.freeze_stages:
        described[0] = f"the first {m.freeze_stages} stage(s) ({', '.join(described[:m.freeze_stages])})"
        del described[1:m.freeze_stages]
    return ParameterFreezer(model, names, m.unfreeze_epoch, described)


def freezes_parameters(recipe: "Recipe") -> bool:
    """Whether the recipe freezes anything (DDP then needs ``find_unused_parameters``)."""
    from convrecipes.recipe import freeze_patterns

    return bool(recipe.model.freeze_stages or freeze_patterns(recipe.model))
