"""Knowledge distillation: ``DistillationTrainer`` and the plain functions it is made of.

What: a small *student* learns from a trained *teacher*'s softened predictions as well as
from the labels (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", https://arxiv.org/abs/1503.02531)::

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  +  (1 - alpha) * task loss

The KL is summed over classes and averaged over the batch (``reduction="batchmean"``;
torch's ``"mean"`` would also divide by the number of classes and shrink the soft term
C-fold). The T^2 keeps the soft term's gradients on the same scale as the task loss's for
any T. Optionally a *hint* (FitNets, Romero et al. 2015, https://arxiv.org/abs/1412.6550)
adds ``hint_weight * MSE(proj(student layer), teacher layer)`` through a learned 1x1
convolution (or linear map) ``proj``.

When: a strong but slow model exists and a small or fast one must be deployed; or the
student is short of labels (the teacher's soft targets carry "dark knowledge" about class
similarity). Typical settings: T = 4, alpha = 0.9; tiny students prefer T = 2-4.

Expected effect: the student gains part of the gap to the teacher (Hinton: a distilled
MNIST net made 74 test errors against 146 trained alone). A distilled student can even
recognise a class it never saw a label or an example of, once that class's bias is raised
(``benchmarks/distill_omitted_class.py``).

Design notes:

- The teacher is wrapped in ``FrozenTeacher``: parameters frozen, always in eval mode (its
  ``train()`` is a no-op, so BatchNorm statistics and dropout never change), run under
  ``no_grad`` and the accelerator's autocast, moved to ``accelerator.device`` and never
  passed to ``accelerator.prepare``: wrapping a module without trainable parameters in
  DistributedDataParallel raises, and a frozen net has no gradients to synchronise.
- The teacher sees the student's augmented, normalised batch, adapted on the device to
  what the teacher expects (``adapt_images``): un-normalised with the student's mean/std,
  channels repeated (1 -> 3) or averaged (3 -> 1), resized (area when shrinking, bilinear
  when enlarging) and normalised with the teacher's mean/std.
- The hint projection is a trainable module outside the student (so the student's
  checkpoint stays a plain model). Its parameters are added to the trainer's optimizer as
  one more param group (following the LR schedule when the schedule keeps per-group
  ``base_lrs``, as all of ours do), and it is passed through ``accelerator.prepare`` on
  its own, so under DDP its gradients are averaged across processes like the student's;
  its weights are stored through ``extra_state``. It is not covered by ``grad_clip``,
  which the base loop applies to the student's parameters only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.losses.base import as_loss_output
from convrecipes.models.output import logits_of
from convrecipes.trainers.base import StepOutput, Trainer

__all__ = [
    "DistillationTrainer",
    "FrozenTeacher",
    "HintProjection",
    "TeacherEnsemble",
    "TeacherSpec",
    "adapt_images",
    "distillation_kl",
    "hint_mse",
    "load_teacher",
    "weights_sha256",
]


# ---------------------------------------------------------------------------------------
# Plain functions


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: ``T^2 * KL(p_teacher^T || p_student^T)``, batch mean.

    ``p^T = softmax(z / T)`` for both nets; the KL is summed over classes and averaged over
    the batch (``reduction="batchmean"``, not torch's class-averaging ``"mean"``). Computed
    in float32 also under autocast.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``; treated as constants (detach them or compute under no_grad).
        temperature: T > 0.

    Returns:
        A 0-dim tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both nets must predict the same classes")
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def adapt_images(
    images: torch.Tensor,
    *,
    in_chans: Optional[int] = None,
    image_size: Optional[tuple[int, int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    target_mean: Optional[Sequence[float]] = None,
    target_std: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """A normalised batch as another network expects it: channels, size and normalisation.

    Steps, each skipped when not needed: un-normalise with ``mean``/``std`` (the batch's
    own), convert channels (1 -> k: repeat; k -> 1: average), resize to ``image_size``
    (``area`` when shrinking, i.e. box-filter averaging; ``bilinear`` with
    ``align_corners=False`` when enlarging), normalise with ``target_mean``/``target_std``.
    Normalisation is re-done only when both pairs are given and differ.

    Args:
        images: float ``(B, C, H, W)``.
        in_chans: channels the target network expects (None: keep).
        image_size: ``(H, W)`` it expects (None: keep).
        mean, std: the batch's per-channel normalisation (``[0, 1]`` pixel units).
        target_mean, target_std: the target network's.
    """
    renorm = _renormalises(mean, std, target_mean, target_std)
    x = images
    if renorm:
        x = x * _channel_vector(std, x) + _channel_vector(mean, x)
    x = _resize(_convert_channels(x, in_chans), image_size)
    if renorm:
        x = (x - _channel_vector(target_mean, x)) / _channel_vector(target_std, x)
    return x


def _renormalises(mean: Any, std: Any, target_mean: Any, target_std: Any) -> bool:
    """Whether both normalisations are known and differ."""
    if mean is None or std is None or target_mean is None or target_std is None:
        return False
    return [float(v) for v in mean] != [float(v) for v in target_mean] or \
        [float(v) for v in std] != [float(v) for v in target_std]


def _convert_channels(x: torch.Tensor, in_chans: Optional[int]) -> torch.Tensor:
    channels = x.shape[1]
    if in_chans is None or in_chans == channels:
        return x
    if channels == 1:
        return x.expand(-1, in_chans, -1, -1)
    if in_chans == 1:
        return x.mean(dim=1, keepdim=True)
    raise RecipeError(f"cannot adapt {channels}-channel images to a network that expects {in_chans} channels "
                      f"(only 1 -> k by repetition and k -> 1 by averaging are defined); use a teacher "
                      f"trained on {channels}-channel images")


def _resize(x: torch.Tensor, image_size: Optional[tuple[int, int]]) -> torch.Tensor:
    if image_size is None or tuple(image_size) == tuple(x.shape[-2:]):
        return x
    h, w = image_size
    if h <= x.shape[-2] and w <= x.shape[-1]:
        return F.interpolate(x, size=(h, w), mode="area")
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _channel_vector(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=like.dtype,
                        device=like.device).reshape(1, -1, 1, 1)
    if v.shape[1] not in (1, like.shape[1]):
        raise RecipeError(f"a mean/std with {v.shape[1]} values cannot normalise {like.shape[1]}-channel images; "
                          f"give one value per channel")
    return v


def hint_mse(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between the projected student features and the
    teacher's, after pooling/resizing the student's to the teacher's shape."""
    s, t = projected_student.float(), teacher_features.detach().float()
    if t.dim() == 3:  # tokens (B, N, D): compare their means
        t = t.mean(dim=1)
    if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        h, w = t.shape[-2:]
        mode_area = s.shape[-2] >= h and s.shape[-1] >= w
        s = F.adaptive_avg_pool2d(s, (h, w)) if mode_area else F.interpolate(s, size=(h, w), mode="bilinear",
                                                                             align_corners=False)
    elif s.dim() == 2 and t.dim() == 4:
        t = t.mean(dim=(2, 3))
    if s.shape != t.shape:
        raise RecipeError(f"hint features do not match after projection: student {tuple(s.shape)} vs teacher "
                          f"{tuple(t.shape)}; pick hint_layers with compatible outputs")
    return F.mse_loss(s, t)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): a location-free
    fingerprint of a teacher's weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_conv_in_channels(module: nn.Module) -> Optional[int]:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _as_size(value: Any, what: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise RecipeError(f"{what} must be an integer or [height, width], got {value!r}")


# ---------------------------------------------------------------------------------------
# The teacher


@dataclass
class TeacherSpec:
    """A teacher network plus what the trainer must know about it.

    Attributes:
        module: the network (images -> logits or ``ModelOutput``).
        identity: JSON-able facts naming it (recorded in the student's checkpoints).
        mean, std: the normalisation it was trained with (None: the student's).
        image_size: the ``(H, W)`` it expects (None: the student's).
        in_chans: the channels it expects (None: its first convolution's, else the student's).
    """

    module: nn.Module
    identity: dict[str, Any] = field(default_factory=dict)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    image_size: Optional[tuple[int, int]] = None
    in_chans: Optional[int] = None


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"teacher run directory {path} has no best.safetensors or last.safetensors; pass a "
                              f"run directory written by `convrecipes train` (or one of its .safetensors files)")
    if not path.is_file():
        raise CheckpointError(f"no teacher checkpoint or run directory at {path}; train the teacher first (e.g. "
                              f"`convrecipes train recipes/fashion_mnist.yaml`) and pass its run directory as "
                              f"trainer.params.teacher=runs/<run>")
    return path


def _teacher_from_checkpoint(path: Path, num_classes: Optional[int]) -> TeacherSpec:
    from convrecipes.checkpoint import load_checkpoint, load_model_weights
    from convrecipes.losses import LOSSES
    from convrecipes.models import count_parameters, create_model
    from convrecipes.recipe import loss_terms, recipe_from_dict

    file = _checkpoint_file(path)
    state, meta = load_checkpoint(file)
    if "recipe" not in meta or "classes" not in meta:
        raise CheckpointError(f"teacher checkpoint {file} records no recipe; a teacher given by path must be written "
                              f"by `convrecipes train` (for another network pass an nn.Module as the teacher)")
    recipe = recipe_from_dict(meta["recipe"])
    classes = list(meta["classes"])
    if num_classes is not None and len(classes) != num_classes:
        raise RecipeError(f"teacher {file} predicts {len(classes)} classes but the student has {num_classes}; "
                          f"distil from a teacher trained on the same classes (same dataset)")
    weights = state["model"]
    in_chans = recipe.data.channels
    if in_chans is None:  # native channels: read them off the stem convolution
        in_chans = next((int(w.shape[1]) for w in weights.values() if w.dim() == 4), 3)
    needs_embeddings, head_factory = False, None
    for term in loss_terms(recipe.loss):
        cls = LOSSES.get(term["name"])
        needs_embeddings = needs_embeddings or bool(getattr(cls, "needs_embeddings", False))
        head_factory = getattr(cls, "make_head", head_factory)
    m = recipe.model
    module = create_model(m.name, in_chans=in_chans, num_classes=len(classes), drop_rate=m.drop_rate,
                          drop_path_rate=m.drop_path_rate, pretrained=False, with_embeddings=needs_embeddings,
                          embedding_dim=m.embedding_dim, head_factory=head_factory, **m.kwargs)
    load_model_weights(module, weights, file)
    identity = {
        "kind": "checkpoint",
        "path": str(file.resolve()),
        "sha256": _file_sha256(file),
        "model": m.name,
        "recipe": recipe.name,
        "epoch": meta.get("epoch"),
        "num_parameters": count_parameters(module),
        "weights_sha256": weights_sha256(module),
    }
    image_size = _as_size(recipe.data.image_size, "teacher data.image_size")
    return TeacherSpec(module, identity, recipe.augment.mean, recipe.augment.std, image_size, in_chans)


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


def _as_teacher_spec(teacher: Any) -> TeacherSpec:
    """One teacher, given as a path/name string, a ``TeacherSpec`` or an ``nn.Module``."""
    if isinstance(teacher, str):
        return load_teacher(teacher)
    if isinstance(teacher, TeacherSpec):
        return teacher
    if isinstance(teacher, nn.Module):
        return TeacherSpec(teacher, _module_identity(teacher))
    raise RecipeError(f"teacher must be an nn.Module, a run directory / checkpoint path or a timm model name (or a "
                      f"list of these for an ensemble), got {type(teacher).__name__}")


def _module_identity(module: nn.Module) -> dict[str, Any]:
    from convrecipes.models import count_parameters

    cls = type(module)
    return {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}",
            "num_parameters": count_parameters(module), "weights_sha256": weights_sha256(module)}


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: frozen parameters, always in eval mode, ``no_grad``.

    Its forward takes the *student's* normalised batch and adapts it (``adapt_images``)
    before running the teacher, so ``trainer.evaluate(loader, model=trainer.teacher)``
    measures the teacher on the student's data pipeline.

    Args:
        module: the teacher network (its parameters get ``requires_grad=False``).
        student_mean, student_std: the normalisation of the batches it is given.
        teacher_mean, teacher_std: the normalisation the teacher was trained with.
        image_size: the ``(H, W)`` the teacher expects (None: as given).
        in_chans: the channels the teacher expects (None: its first convolution's).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        student_mean: Optional[Sequence[float]] = None,
        student_std: Optional[Sequence[float]] = None,
        teacher_mean: Optional[Sequence[float]] = None,
        teacher_std: Optional[Sequence[float]] = None,
        image_size: Optional[tuple[int, int]] = None,
        in_chans: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.module = module
        module.requires_grad_(False)
        self.in_chans = in_chans if in_chans is not None else _first_conv_in_channels(module)
        self.image_size = _as_size(image_size, "teacher_image_size")
        self.student_mean = None if student_mean is None else [float(v) for v in student_mean]
        self.student_std = None if student_std is None else [float(v) for v in student_std]
        self.teacher_mean = None if teacher_mean is None else [float(v) for v in teacher_mean]
        self.teacher_std = None if teacher_std is None else [float(v) for v in teacher_std]
        if (self.teacher_mean is None) != (self.teacher_std is None):
            raise RecipeError("give the teacher's normalisation as both teacher_mean and teacher_std, or neither")
        if self.teacher_mean is not None and self.student_mean is None:
            raise RecipeError("teacher_mean/teacher_std are given but the student's normalisation is unknown: the "
                              "augment has no mean/std; pass student_mean/student_std to DistillationTrainer")
        self.renormalise = _renormalises(self.student_mean, self.student_std, self.teacher_mean, self.teacher_std)
        if self.renormalise:
            if len(self.student_mean) != len(self.student_std) or len(self.teacher_mean) != len(self.teacher_std):
                raise RecipeError("a mean and its std need the same number of values (one per channel)")
            if self.in_chans is not None and len(self.teacher_mean) not in (1, self.in_chans):
                raise RecipeError(f"teacher_mean/teacher_std have {len(self.teacher_mean)} values for a teacher "
                                  f"with {self.in_chans} input channels; give one value per channel")
        # decided once; as (non-persistent) buffers the statistics follow .to(device)
        for name in ("student_mean", "student_std", "teacher_mean", "teacher_std"):
            values = getattr(self, name) if self.renormalise else [0.0]
            self.register_buffer(f"_{name}", torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Always eval mode: BatchNorm statistics and dropout of a teacher never change."""
        return super().train(False)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher expects it."""
        x = images
        if self.renormalise:
            x = x * self._student_std.to(x.dtype) + self._student_mean.to(x.dtype)
        x = _resize(_convert_channels(x, self.in_chans), self.image_size)
        if self.renormalise:
            x = (x - self._teacher_mean.to(x.dtype)) / self._teacher_std.to(x.dtype)
        return x

    def forward(self, images: torch.Tensor) -> Any:
        if self.module.training:  # someone called .train() on the inner module directly
            self.module.eval()
        with torch.no_grad():
            return self.module(self.adapt(images))


class TeacherEnsemble(nn.Module):
    """Several frozen teachers acting as one: the mean of their logits.

    Hinton et al. distilled an ensemble into one net; an ensemble of k teachers is usually
    more accurate than any member, and cheap to build from runs that already exist (seeds,
    architectures). Averaging logits is averaging log-probabilities, i.e. the soft targets
    at temperature T are the normalised geometric mean of the members' distributions at T.
    Each member keeps its own input adaptation (size, channels, normalisation).
    """

    def __init__(self, members: Sequence[FrozenTeacher]) -> None:
        super().__init__()
        if len(members) < 2:
            raise RecipeError("a teacher ensemble needs at least two teachers; pass one teacher directly")
        self.members = nn.ModuleList(members)
        super().train(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        """Always eval mode, like each ``FrozenTeacher``."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [logits_of(member(images)).float() for member in self.members]
        if len({tuple(z.shape) for z in logits}) != 1:
            raise RecipeError(f"the ensemble's teachers give logits of shapes {[tuple(z.shape) for z in logits]}; "
                              f"all teachers must predict the same classes")
        return torch.stack(logits).mean(dim=0)


class HintProjection(nn.Module):
    """Learned map from a student layer's features to a teacher layer's: a 1x1 convolution
    for feature maps ``(C, H, W)``, a linear map for vectors ``(D,)`` (feature maps are
    average-pooled first when the other side is a vector)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(t) == 2:  # tokens (N, D)
            t = (t[-1],)
        self.pool_student = len(s) == 3 and len(t) != 3
        if len(s) == 2:
            raise RecipeError(f"hint student layer gives token features {s}; pick a convolutional or vector layer")
        if len(s) == 3 and len(t) == 3:
            self.proj: nn.Module = nn.Conv2d(s[0], t[0], kernel_size=1)
        else:
            self.proj = nn.Linear(s[0], t[-1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool_student:
            features = features.mean(dim=(2, 3))
        return self.proj(features)


# ---------------------------------------------------------------------------------------
# The trainer


class DistillationTrainer(Trainer):
    """Knowledge distillation (Hinton et al. 2015), optionally with a FitNets hint.

    ``loss = alpha * distillation_kl(student, teacher, T) + (1 - alpha) * loss_fn(output,
    targets) [+ hint_weight * hint_mse(proj(student layer), teacher layer)]``. The task loss
    is the trainer's ``loss_fn``: hard labels, or the soft targets of mixup/cutmix. The parts
    are logged as ``kd`` (already times T^2), ``task`` and ``hint``.

    Everything else is the base ``Trainer`` (accumulation, mixed precision, EMA of the
    student, checkpoints, resume). The student's checkpoint is an ordinary convrecipes
    checkpoint; its metadata records the teacher under ``"teacher"`` (path and file
    SHA-256, or timm name, or class name; always a weights fingerprint).

    Args:
        model, optimizer, loss_fn: the student, its optimizer and the task loss (as ``Trainer``).
        teacher: an ``nn.Module``, a ``TeacherSpec``, or a string for ``load_teacher`` (a
            ``convrecipes train`` run directory / ``.safetensors``, or a timm model name);
            or a list of these: an ensemble whose mean logits are the soft targets
            (``TeacherEnsemble``; hints need a single teacher).
        temperature: T of the soft targets.
        alpha: weight of the soft term; ``1 - alpha`` weighs the task loss.
        teacher_mean, teacher_std: the teacher's normalisation if it differs from the
            student's (default: the teacher spec's, else the student's).
        teacher_image_size: ``(H, W)`` or one int the teacher expects (default: the spec's,
            else the student's size).
        teacher_in_chans: channels the teacher expects (default: its first convolution's).
        student_mean, student_std: the student batches' normalisation (default: the
            ``augment``'s ``mean``/``std``; ``[0, 1]`` pixels when there is no augment).
        hint_layers: ``(teacher layer name, student layer name)`` as in ``named_modules()``.
        hint_weight: weight of the hint's MSE.
        input_shape: ``(C, H, W)`` of the student's batches; used to size the hint
            projection and to check the class counts at construction (``build`` sets it).
        **kwargs: everything ``Trainer`` takes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        *,
        teacher: Union[nn.Module, str, TeacherSpec, Sequence[Union[nn.Module, str, TeacherSpec]]],
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_mean: Optional[Sequence[float]] = None,
        teacher_std: Optional[Sequence[float]] = None,
        teacher_image_size: Optional[Union[int, Sequence[int]]] = None,
        teacher_in_chans: Optional[int] = None,
        student_mean: Optional[Sequence[float]] = None,
        student_std: Optional[Sequence[float]] = None,
        hint_layers: Optional[Sequence[str]] = None,
        hint_weight: float = 1.0,
        input_shape: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> None:
        if not temperature > 0:
            raise RecipeError(f"distillation temperature must be > 0, got {temperature}; typical values are 2-4")
        if not 0.0 <= alpha <= 1.0:
            raise RecipeError(f"distillation alpha must be in [0, 1], got {alpha}; typical value 0.9")
        if not hint_weight >= 0:
            raise RecipeError(f"hint_weight must be >= 0, got {hint_weight}")
        if hint_layers is not None and (len(hint_layers) != 2 or not all(isinstance(n, str) for n in hint_layers)):
            raise RecipeError(f"hint_layers must be [teacher layer name, student layer name], got {hint_layers!r}")
        super().__init__(model, optimizer, loss_fn, **kwargs)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.hint_weight = float(hint_weight)
        self.hint_layers = tuple(hint_layers) if hint_layers is not None else None

        many = isinstance(teacher, (list, tuple))
        specs = [_as_teacher_spec(t) for t in (teacher if many else [teacher])]
        if not specs:
            raise RecipeError("the teacher list is empty; give one teacher or several for an ensemble")
        if len(specs) > 1 and (hint_layers is not None or teacher_mean is not None or teacher_image_size is not None
                               or teacher_in_chans is not None):
            raise RecipeError("hint_layers and teacher_mean/teacher_std/teacher_image_size/teacher_in_chans need a "
                              "single teacher; an ensemble's members are adapted from their own checkpoints")
        if student_mean is None and self.augment is not None and hasattr(self.augment, "mean"):
            student_mean = self.augment.mean.flatten().tolist()
            student_std = self.augment.std.flatten().tolist()
        elif student_mean is None and self.augment is None:  # raw [0, 1] pixels
            channels = input_shape[0] if input_shape is not None else 1
            student_mean, student_std = [0.0] * channels, [1.0] * channels
        frozen = [FrozenTeacher(
            spec.module, student_mean=student_mean, student_std=student_std,
            teacher_mean=teacher_mean if teacher_mean is not None else spec.mean,
            teacher_std=teacher_std if teacher_std is not None else spec.std,
            image_size=_as_size(teacher_image_size, "teacher_image_size") or spec.image_size,
            in_chans=teacher_in_chans if teacher_in_chans is not None else spec.in_chans,
        ) for spec in specs]
        self.teacher: nn.Module = (frozen[0] if len(frozen) == 1 else TeacherEnsemble(frozen)).to(self.device)
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        if len(specs) == 1:
            self.teacher_identity = dict(specs[0].identity)
        else:
            members = [dict(spec.identity) for spec in specs]
            combined = hashlib.sha256("|".join(m.get("weights_sha256", "") for m in members).encode()).hexdigest()
            self.teacher_identity = {"kind": "ensemble", "members": members, "weights_sha256": combined}
        self.checkpoint_metadata["teacher"] = self.teacher_identity
        self.checkpoint_metadata["distillation"] = {
            "temperature": self.temperature, "alpha": self.alpha,
            "hint_layers": list(self.hint_layers) if self.hint_layers else None, "hint_weight": self.hint_weight,
        }

        # hint features are captured by forward hooks, only while a training step runs
        self._capturing = False
        self._features: dict[str, torch.Tensor] = {}
        self.hint_projection: Optional[nn.Module] = None
        if self.hint_layers is not None:
            t_name, s_name = self.hint_layers
            self._hook(self.teacher.module, t_name, "teacher", "teacher")
            self._hook(self.unwrapped_model, s_name, "student", "student")
            if input_shape is None:
                raise RecipeError("hint_layers needs input_shape=(C, H, W) of the training batches to size the "
                                  "hint projection; build() sets it from the data, in code pass "
                                  "input_shape=images.shape[1:]")
        if input_shape is not None:
            self._probe(tuple(int(v) for v in input_shape))

    # -- set-up ---------------------------------------------------------------------------
    def _hook(self, root: nn.Module, name: str, key: str, which: str) -> None:
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n]
            shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
            raise RecipeError(f"the {which} has no layer {name!r} for hint_layers; valid names: {shown}") from None

        def store(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._capturing:
                self._features[key] = output[0] if isinstance(output, (tuple, list)) else output

        layer.register_forward_hook(store)

    @torch.no_grad()
    def _probe(self, input_shape: tuple[int, ...]) -> None:
        """Run both nets once on a zero batch (eval mode: no statistics change, no RNG
        drawn) to check their class counts and size the hint projection."""
        x = torch.zeros(1, *input_shape, device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        student = self.unwrapped_model
        was_training = student.training
        student.eval()
        self._capturing = self.hint_layers is not None
        try:
            with self.accelerator.autocast():
                s_logits, t_logits = logits_of(student(x)), logits_of(self.teacher(x))
        finally:
            student.train(was_training)
            self._capturing = False
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise RecipeError(f"the teacher predicts {t_logits.shape[-1]} classes but the student "
                              f"{s_logits.shape[-1]}; distil from a teacher trained on the same classes")
        if self.hint_layers is None:
            return
        s_feat, t_feat = self._features.pop("student"), self._features.pop("teacher")
        projection = HintProjection(s_feat.shape[1:], t_feat.shape[1:]).to(self.device)
        self._add_param_group(list(projection.parameters()))
        # a separate prepare: under DDP it is wrapped on its own and its gradients averaged
        self.hint_projection = self.accelerator.prepare(projection)

    def _add_param_group(self, params: list[nn.Parameter]) -> None:
        """Optimise ``params`` with the first group's LR, following the schedule when it
        keeps per-group ``base_lrs`` (ours and torch's do)."""
        ref = self.optimizer.param_groups[0]
        group: dict[str, Any] = {"params": params, "lr": ref["lr"],
                                 "weight_decay": self.optimizer.defaults.get("weight_decay", 0.0)}
        if "initial_lr" in ref:
            group["initial_lr"] = ref["initial_lr"]
        self.optimizer.add_param_group(group)
        base_lrs = getattr(self.scheduler, "base_lrs", None)
        if isinstance(base_lrs, list) and len(base_lrs) == len(self.optimizer.param_groups) - 1:
            base_lrs.append(float(group.get("initial_lr", group["lr"])))
            for attr in ("_last_lrs", "_last_lr"):
                last = getattr(self.scheduler, attr, None)
                if isinstance(last, list) and len(last) == len(base_lrs) - 1:
                    last.append(group["lr"])

    # -- recipes --------------------------------------------------------------------------
    @classmethod
    def resolve_recipe_params(
        cls, params: dict[str, Any], *, num_classes: int, in_chans: int, image_size: tuple[int, int],
        mean: Sequence[float], std: Sequence[float], device: torch.device,
    ) -> dict[str, Any]:
        """Recipe params -> constructor args: load a teacher named by a string, fill in the
        student's batch shape and normalisation."""
        params = dict(params)
        teacher = params.get("teacher")
        if teacher is None:
            raise RecipeError("trainer 'distillation' needs a teacher: set trainer.params.teacher=<run directory or "
                              ".safetensors written by `convrecipes train`, or a timm model name>")
        if isinstance(teacher, (list, tuple)):
            if not teacher:
                raise RecipeError("trainer.params.teacher is an empty list; give one teacher or several for an "
                                  "ensemble")
            specs = [load_teacher(t, num_classes=num_classes) if isinstance(t, str) else t for t in teacher]
            for spec in specs:
                if isinstance(spec, TeacherSpec):
                    spec.module.to(device)
            params["teacher"] = specs
        elif isinstance(teacher, str):
            spec = load_teacher(teacher, num_classes=num_classes)
            spec.module.to(device)
            params["teacher"] = spec
        params.setdefault("input_shape", (in_chans, *image_size))
        params.setdefault("student_mean", list(mean))
        params.setdefault("student_std", list(std))
        return params

    # -- the step -------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        """KD + task (+ hint) loss of one augmented batch; the teacher sees the same batch."""
        images, targets = batch
        self._capturing = self.hint_layers is not None
        try:
            output = self.model(images)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = logits_of(self.teacher(images))
        finally:
            self._capturing = False
        student_logits = logits_of(output)
        if teacher_logits.shape != student_logits.shape:
            raise RecipeError(f"the teacher gives logits of shape {tuple(teacher_logits.shape)} and the student "
                              f"{tuple(student_logits.shape)}; distil from a teacher trained on the same classes")
        task = as_loss_output(self.loss_fn(output, targets))
        kd = distillation_kl(student_logits, teacher_logits, self.temperature)
        loss = self.alpha * kd + (1.0 - self.alpha) * task.loss
        logs = {"kd": kd.detach(), "task": task.loss.detach()}
        if len(task.parts) > 1:
            logs.update({f"task_{k}": v for k, v in task.parts.items()})
        logs.update({f"task_{k}": v for k, v in task.stats.items()})
        if self.hint_projection is not None:
            s_feat, t_feat = self._features.pop("student"), self._features.pop("teacher")
            hint = hint_mse(self.hint_projection(s_feat), t_feat)
            loss = loss + self.hint_weight * hint
            logs["hint"] = hint.detach()
        return StepOutput(loss, logs)

    # -- checkpoints ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher": self.teacher_identity}
        if self.hint_projection is not None:
            state["hint_projection"] = self.accelerator.unwrap_model(self.hint_projection).state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        from convrecipes.checkpoint import load_model_weights

        if self.hint_projection is not None:
            if "hint_projection" not in state:
                raise CheckpointError("the checkpoint has no hint projection (it was trained without hint_layers); "
                                      "resume with the hint_layers it was trained with")
            load_model_weights(self.accelerator.unwrap_model(self.hint_projection), state["hint_projection"],
                               "the checkpoint's hint projection")
        saved = (state.get("teacher") or {}).get("weights_sha256")
        if saved is not None and saved != self.teacher_identity.get("weights_sha256"):
            old = state["teacher"]
            self.print(f"warning: resuming with another teacher than the checkpoint's "
                       f"({old.get('path') or old.get('name') or old.get('class')})")
