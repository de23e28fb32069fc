"""Loading what earlier runs wrote: the checkpoint of a run directory, the model a run
trained (rebuilt from the recipe recorded in its checkpoint), and distillation teachers
named by a run directory, a checkpoint or a timm name.

This is recipe-side code: trainers take the resulting modules (``TeacherSpec``), never
paths, so ``convrecipes.trainers`` does not import recipes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from convrecipes.checkpoint import file_sha256, load_checkpoint, load_model_weights, model_weights_of, weights_sha256
from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.trainers.distillation import TeacherSpec, as_image_size

PathLike = Union[str, os.PathLike]


def find_checkpoint(path: PathLike, prefer: str = "best", what: str = "run") -> Path:
    """A checkpoint file from a file path or a run directory (``best`` or ``last`` inside
    it, ``prefer`` first).

    Raises:
        CheckpointError: nothing there, or a directory without checkpoints.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            if (p / f"{name}.safetensors").is_file():
                return p / f"{name}.safetensors"
        raise CheckpointError(f"{what} directory {p} has no best.safetensors or last.safetensors; pass a run "
                              f"directory written by `convrecipes train` (or one of its .safetensors files)")
    if not p.is_file():
        raise CheckpointError(f"no {what} directory or checkpoint at {p}; train it first (e.g. `convrecipes train "
                              f"recipes/quickstart.yaml`) and pass its run directory")
    return p


@dataclass
class LoadedRun:
    """A trained model rebuilt from a checkpoint, with the recipe and metadata it records."""

    module: nn.Module
    recipe: Any
    metadata: dict[str, Any]
    file: Path
    in_chans: int


def load_run_model(path: PathLike, prefer: str = "best", num_classes: Optional[int] = None,
                   what: str = "run", ema: bool = False) -> LoadedRun:
    """Rebuild the model a ``convrecipes train`` run trained, with its weights.

    Args:
        path: a run directory or a checkpoint file.
        prefer: ``best`` or ``last`` (for a run directory).
        num_classes: refuse a model predicting another number of classes.
        what: the word for it in error messages ("teacher", "run").
        ema: load the checkpoint's EMA weights instead of the raw ones.
    """
    from convrecipes.build import build_model
    from convrecipes.recipe import recipe_from_dict

    file = find_checkpoint(path, prefer, what)
    state, meta = load_checkpoint(file)
    if "recipe" not in meta or "classes" not in meta:
        raise CheckpointError(f"{what} checkpoint {file} records no recipe; it must be written by `convrecipes "
                              f"train` (for another network pass an nn.Module)")
    recipe = recipe_from_dict(meta["recipe"])
    classes = list(meta["classes"])
    if num_classes is not None and len(classes) != num_classes:
        needed = "the student has" if what == "teacher" else "the data has"
        raise RecipeError(f"{what} {file} predicts {len(classes)} classes but {needed} {num_classes}; use one "
                          f"trained on the same classes (same dataset)")
    weights = model_weights_of(state, file)
    if ema:
        if not isinstance(state.get("ema"), dict) or not state["ema"]:
            raise CheckpointError(f"{what} checkpoint {file} has no EMA weights (trained without trainer.ema_decay); "
                                  f"drop --ema")
        weights = state["ema"]
    in_chans = recipe.data.channels
    if in_chans is None:  # native channels: read them off the stem convolution
        in_chans = next((int(w.shape[1]) for w in weights.values() if w.dim() == 4), 3)
    module = build_model(recipe, in_chans=in_chans, num_classes=len(classes), pretrained=False)
    load_model_weights(module, weights, file)
    return LoadedRun(module, recipe, meta, file, in_chans)


def _teacher_from_checkpoint(path: Path, num_classes: Optional[int]) -> TeacherSpec:
    from convrecipes.models import count_parameters

    run = load_run_model(path, prefer="best", num_classes=num_classes, what="teacher")
    recipe = run.recipe
    identity = {
        "kind": "checkpoint",
        "path": str(run.file.resolve()),
        "sha256": file_sha256(run.file),
        "model": recipe.model.name,
        "recipe": recipe.name,
        "epoch": run.metadata.get("epoch"),
        "num_parameters": count_parameters(run.module),
        "weights_sha256": weights_sha256(run.module),
    }
    image_size = as_image_size(recipe.data.image_size, "teacher data.image_size")
    return TeacherSpec(run.module, identity, recipe.augment.mean, recipe.augment.std, image_size, run.in_chans)


def _teacher_from_timm(name: str, num_classes: Optional[int]) -> TeacherSpec:
    import timm
    from timm.models import get_pretrained_cfg

    from convrecipes.models import count_parameters

    try:  # the head size is known before any download for registry names
        predicted = getattr(get_pretrained_cfg(name), "num_classes", None) if ":" not in name else None
    except Exception:
        predicted = None
    mismatch_fix = (f"fine-tune it on your data first (`convrecipes train <recipe> model.name={name} "
                    f"model.pretrained=true`) and pass that run directory as trainer.params.teacher")
    if num_classes is not None and predicted is not None and predicted != num_classes:
        raise RecipeError(f"timm's pretrained {name!r} predicts {predicted} classes but the student has "
                          f"{num_classes}; {mismatch_fix}")
    try:
        module = timm.create_model(name, pretrained=True)
    except Exception as exc:  # offline (huggingface_hub errors), no weights for this name, ...
        raise RecipeError(f"could not load pretrained weights for the timm teacher {name!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); a teacher by timm name needs pretrained "
                          f"weights, downloaded once to the Hugging Face cache. Fix: run once on a machine with "
                          f"internet (or copy its ~/.cache/huggingface), or train a teacher with `convrecipes train` "
                          f"and pass its run directory") from None
    if num_classes is not None and getattr(module, "num_classes", num_classes) != num_classes:
        raise RecipeError(f"timm's pretrained {name!r} predicts {module.num_classes} classes but the student has "
                          f"{num_classes}; {mismatch_fix}")
    pcfg = getattr(module, "pretrained_cfg", {}) or {}
    input_size = pcfg.get("input_size")
    identity = {"kind": "timm", "name": name, "pretrained": True, "pretrained_tag": pcfg.get("tag"),
                "num_parameters": count_parameters(module), "weights_sha256": weights_sha256(module)}
    return TeacherSpec(module, identity,
                       list(pcfg["mean"]) if "mean" in pcfg else None, list(pcfg["std"]) if "std" in pcfg else None,
                       tuple(input_size[1:]) if input_size else None, input_size[0] if input_size else None)


def load_teacher(spec: str, num_classes: Optional[int] = None) -> TeacherSpec:
    """A teacher from a string: a ``convrecipes train`` run directory or ``.safetensors``
    checkpoint, or a timm model name (with its pretrained weights).

    A checkpoint teacher is rebuilt from the recipe recorded in its metadata
    (``create_model``), its weights loaded with ``load_model_weights`` (``best.safetensors``
    of a run directory, else ``last.safetensors``), and its normalisation taken from that
    recipe's ``augment.mean``/``std``.

    Args:
        spec: the path or name.
        num_classes: the student's number of classes, checked against the teacher's.

    Raises:
        CheckpointError: a missing or unreadable checkpoint.
        RecipeError: a different number of classes, an unknown name, or pretrained weights
            that cannot be downloaded.
    """
    path = Path(spec).expanduser()
    looks_like_path = path.exists() or spec.endswith(".safetensors") or os.sep in spec or spec.startswith(".")
    if looks_like_path and not spec.startswith(("hf-hub:", "hf_hub:")):
        return _teacher_from_checkpoint(path, num_classes)
    import timm

    if timm.is_model(spec) or spec.startswith(("hf-hub:", "hf_hub:")):
        return _teacher_from_timm(spec, num_classes)
    raise RecipeError(f"teacher {spec!r} is neither an existing run directory / .safetensors checkpoint nor a timm "
                      f"model name; pass the run directory of a trained teacher (trainer.params.teacher=runs/<run>)")
