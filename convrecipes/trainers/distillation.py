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
  what the teacher expects (``FrozenTeacher.adapt``): un-normalised with the student's mean/std,
  channels repeated (1 -> 3) or averaged (3 -> 1), resized (area when shrinking, bilinear
  when enlarging) and normalised with the teacher's mean/std.
- The teacher is a frozen model part (``"teacher"``): on the device, never prepared,
  never checkpointed (its identity and a fingerprint of its weights are, in the metadata,
  and a resume with another teacher warns).
- The hint projection is a trainable model part outside the student (so the student's
  checkpoint stays a plain model): ``add_model("hint_projection", ...)`` prepares it (its
  gradients are averaged across processes like the student's) and checkpoints it, and
  ``add_param_group`` trains it with the student's optimizer and schedule, so
  ``grad_clip`` covers it too.
- Loading a teacher from a run directory, a checkpoint or a timm name is recipe-side code
  (``convrecipes.loading.load_teacher``); this trainer takes modules or ``TeacherSpec``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.checkpoint import weights_sha256
from convrecipes.errors import RecipeError
from convrecipes.losses.base import as_loss_output
from convrecipes.losses.distillation import distillation_kl, hint_mse  # re-exported: public here too
from convrecipes.models.output import logits_of
from convrecipes.trainers.base import StepOutput, Trainer

__all__ = [
    "DistillationTrainer",
    "FrozenTeacher",
    "HintProjection",
    "TeacherEnsemble",
    "TeacherSpec",
    "as_image_size",
    "distillation_kl",
    "hint_mse",
]


# ---------------------------------------------------------------------------------------
# Plain functions


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


def _first_conv_in_channels(module: nn.Module) -> Optional[int]:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def as_image_size(value: Any, what: str) -> Optional[tuple[int, int]]:
    """``None``, an int ``s`` (-> ``(s, s)``) or ``[H, W]`` as an ``(H, W)`` tuple."""
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


def _as_teacher_spec(teacher: Any) -> TeacherSpec:
    """One teacher, given as a ``TeacherSpec`` or an ``nn.Module``."""
    if isinstance(teacher, str):
        raise RecipeError(f"teacher {teacher!r} is a string; the trainer takes modules: load it with "
                          f"convrecipes.loading.load_teacher({teacher!r}) (a run directory, a checkpoint or a timm "
                          f"name), or name it in a recipe as trainer.params.teacher")
    if isinstance(teacher, TeacherSpec):
        return teacher
    if isinstance(teacher, nn.Module):
        return TeacherSpec(teacher, _module_identity(teacher))
    raise RecipeError(f"teacher must be an nn.Module or a TeacherSpec (or a list of these for an ensemble), got "
                      f"{type(teacher).__name__}")


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
        self.image_size = as_image_size(image_size, "teacher_image_size")
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
        teacher: an ``nn.Module`` or a ``TeacherSpec`` (``convrecipes.loading.load_teacher``
            makes one from a run directory, a checkpoint or a timm model name); or a list
            of these: an ensemble whose mean logits are the soft targets
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
        teacher: Union[nn.Module, TeacherSpec, Sequence[Union[nn.Module, TeacherSpec]]],
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
            image_size=as_image_size(teacher_image_size, "teacher_image_size") or spec.image_size,
            in_chans=teacher_in_chans if teacher_in_chans is not None else spec.in_chans,
        ) for spec in specs]
        # a frozen part: on the device, never prepared for DDP, not checkpointed
        self.teacher: nn.Module = self.add_model("teacher", frozen[0] if len(frozen) == 1 else TeacherEnsemble(frozen))
        if len(specs) == 1:
            self.teacher_identity = dict(specs[0].identity)
        else:
            members = [dict(spec.identity) for spec in specs]
            combined = hashlib.sha256("|".join(m.get("weights_sha256", "") for m in members).encode()).hexdigest()
            self.teacher_identity = {"kind": "ensemble", "members": members, "weights_sha256": combined}
        self.checkpoint_metadata["teacher"] = self.teacher_identity
        self.register_state("teacher_identity", _TeacherIdentity(self))
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
        projection = HintProjection(s_feat.shape[1:], t_feat.shape[1:])
        # a model part of its own (prepared for DDP, checkpointed), trained by the student's
        # optimizer and schedule; weight decay as the optimizer's default
        self.hint_projection = self.add_model("hint_projection", projection)
        self.add_param_group(list(projection.parameters()),
                             weight_decay=self.optimizer.defaults.get("weight_decay", 0.0))

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



class _TeacherIdentity:
    """Registered state: the teacher's identity travels with each checkpoint, and resuming
    with a different teacher warns."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.trainer.teacher_identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        old = state.get("teacher") or {}
        saved = old.get("weights_sha256")
        if saved is not None and saved != self.trainer.teacher_identity.get("weights_sha256"):
            self.trainer.print(f"warning: resuming with another teacher than the checkpoint's "
                               f"({old.get('path') or old.get('name') or old.get('class')})")
