"""Meta Pseudo Labels: ``MetaPseudoLabelsTrainer`` and the plain functions it is made of.

What: a *teacher* labels unlabeled images for a *student*, and is itself trained by how
much the student's step on those labels helped on labeled data (Pham, Dai, Xie, Luong &
Le 2021, "Meta Pseudo Labels", https://arxiv.org/abs/2003.10580). One step:

1. The teacher sees the labeled batch ``x_l``, a weak view ``x_w`` and a strong view
   ``x_s`` of the unlabeled batch, and gives hard pseudo labels ``y_hat`` from its
   prediction on one view (``pseudo_label_view``, default the weak one, whose labels are
   more often right), sampled from its softmax or its argmax. The student learns them on
   the strong view.
2. The student's labeled loss ``old = CE(S(x_l), y_l)`` is measured, the student takes one
   optimizer step on ``CE(S(x_s), y_hat)``, and ``new = CE(S'(x_l), y_l)`` is measured.
3. Feedback ``h = old - new``: positive when the step on the teacher's labels helped. To
   first order (plain SGD, learning rate ``eta``) ``h = eta * grad CE_l(theta') .
   grad CE_u(theta)``, the paper's coefficient.
4. The teacher steps on ``h * CE(T(x_v), y_hat)`` (``h`` a constant, the SAME ``y_hat``
   the student stepped on, ``x_v`` the view they were drawn on: with sampling this is the
   REINFORCE estimate of the gradient of the student's improvement) plus its supervised ``CE(T(x_l), y_l)`` (label smoothing
   optional) plus UDA's consistency term on ``(x_w, x_s)`` (``convrecipes.trainers.uda``).
5. After MPL, the student is finetuned on the labeled data alone (``finetune_epochs``).

Measuring ``old`` and ``new`` correctly: both passes run the student in train mode on the
same labeled batch alone, with BatchNorm using that batch's statistics but *not* updating
its running statistics (``frozen_batchnorm_stats``), and with the same dropout draw
(``same_noise``); so ``h`` measures the step, not a change of BatchNorm batch
composition or of noise. The student's running statistics move only in its training
forward on ``x_s``. Under several processes ``h`` is averaged over them, so it is the
global batch's feedback (as one process would compute it) and the same on every rank.

Known deviations elsewhere (see shared/FIELD_NOTES.md): the official code's MPL term has
zero gradient in one version, uses ``h = new - old`` (``feedback="flipped"`` reproduces
it), and measures ``old`` inside the student's joint labeled+unlabeled forward but ``new``
on the labeled batch alone (different BatchNorm batch compositions).

When: few labels, many unlabeled images, and budget for two models. Report it against a
UDA-only teacher with the same labels, model and steps (``UDATrainer``) and against
supervised-only training: reproductions found most of the gain comes from the teacher's UDA
term. The ablation switches are ``feedback="off"`` (plain pseudo labels from a UDA
teacher), ``feedback="flipped"`` and ``uda_weight=0``.

Expected effect (paper): CIFAR-10 with 4,000 labels, WRN-28-2: MPL 96.1% against UDA's
94.5% and supervised 82.1%.

Our measured effect (final weights, test top-1, 3 seeds; ``python benchmarks/mpl_compare.py
--family digits|fashion_mnist``, ``benchmarks/results/mpl_*.json``, README "Semi-supervised
training"): digits with 4 labels per class, supervised 86.7, UDA alone 91.6, MPL student
93.6; Fashion-MNIST with 40 labels per class (1,800 steps, tiny CNN), supervised 80.3, UDA
alone 83.6, MPL student 82.1 (teacher 83.7), and the feedback-off and flipped-sign ablations
are no worse. At 4x the budget (7,200 steps, 3 seeds) supervised 81.0, UDA alone 84.8, MPL
student 85.1 (teacher 85.3): MPL is +4.1 over supervised and level with UDA within seed noise.
At these budgets the gain is UDA's, not the MPL feedback's.

Design notes: manual mode on the base loop (``backward(loss, part)``/``step(part)``), so
mixed precision (one shared GradScaler), clipping per part, the NaN guard, EMA of the
student (the primary part), checkpoints of both models and all optimizers, exact resume and
``accelerate launch`` are the base's. The finetune stage is a third optimizer part over
the student's parameters with its own schedule, switched on by epoch, so a resumed run
lands in the right stage.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.errors import RecipeError
from convrecipes.losses.base import as_loss_output
from convrecipes.models.output import logits_of
from convrecipes.trainers.base import StepOutput, Trainer
from convrecipes.trainers.uda import (SemiSupervisedViews, check_uda_settings, linear_ramp, prepare_views,
                                      uda_consistency)

__all__ = ["MetaPseudoLabelsTrainer", "MPLStepRecord", "FeedbackBaseline", "frozen_batchnorm_stats", "same_noise",
           "pseudo_labels", "teacher_feedback", "FEEDBACK_MODES", "PSEUDO_LABEL_MODES"]

FEEDBACK_MODES = ("on", "off", "flipped")
PSEUDO_LABEL_MODES = ("sample", "argmax")
PSEUDO_LABEL_VIEWS = ("weak", "strong")
STUDENT, TEACHER, FINETUNE = "student", "teacher", "finetune"


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers in train mode normalise with the batch's statistics but
    leave ``running_mean``/``running_var``/``num_batches_tracked`` untouched (torch's
    batch norm takes no running buffers when ``track_running_stats`` is off)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextlib.contextmanager
def same_noise(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on a private RNG stream seeded with ``seed`` (CPU and ``device``) and
    leave the global streams as they were: two blocks with the same seed draw the same
    dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def pseudo_labels(logits: torch.Tensor, mode: str = "sample") -> torch.Tensor:
    """Hard pseudo labels from teacher logits: sampled from the softmax (one draw from
    torch's global generator per image) or the argmax."""
    probs = logits.detach().float().softmax(dim=1)
    if mode == "argmax":
        return probs.argmax(dim=1)
    if mode == "sample":
        return torch.multinomial(probs, 1).squeeze(1)
    raise RecipeError(f"pseudo_labels must be one of {', '.join(PSEUDO_LABEL_MODES)}, got {mode!r}")


def teacher_feedback(old: torch.Tensor, new: torch.Tensor, mode: str = "on") -> torch.Tensor:
    """The MPL coefficient from the student's labeled loss before (``old``) and after
    (``new``) its step: ``old - new`` (``"on"``), ``new - old`` (``"flipped"``, the
    official code's sign) or 0 (``"off"``). A detached 0-dim tensor."""
    if mode == "on":
        return (old - new).detach()
    if mode == "flipped":
        return (new - old).detach()
    if mode == "off":
        return torch.zeros((), device=old.device)
    raise RecipeError(f"feedback must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")


class FeedbackBaseline:
    """An exponential moving average of ``h`` subtracted from it (a variance-reducing
    baseline, as in REINFORCE); registered state, so it resumes."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise RecipeError(f"feedback_baseline must be in (0, 1) (an EMA decay) or null, got {decay}; e.g. "
                              f"trainer.params.feedback_baseline=0.99")
        self.decay = float(decay)
        self.value = 0.0
        self.count = 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        # the first step has no history: its baseline is h itself (bias-corrected EMA)
        self.count += 1
        h_value = float(h)
        self.value = self.decay * self.value + (1.0 - self.decay) * h_value
        corrected = self.value / (1.0 - self.decay ** self.count)
        return h - corrected

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.count = float(state["value"]), int(state["count"])


@dataclass
class MPLStepRecord:
    """The last MPL step's inputs and feedback (for analysis and tests; detached)."""

    views: SemiSupervisedViews
    pseudo_labels: torch.Tensor
    old_loss: torch.Tensor
    new_loss: Optional[torch.Tensor]
    feedback: torch.Tensor


class MetaPseudoLabelsTrainer(Trainer):
    """Meta Pseudo Labels on the base loop's manual mode. The student is the primary part
    (evaluated, EMA'd, checkpointed as ``model``, exported); the teacher is part
    ``"teacher"`` and is tested at the end too (``evaluation_models``).

    Args:
        model: the student.
        optimizer: the student's optimizer for the MPL stage.
        loss_fn: the student's loss for finetuning and evaluation (the MPL stage uses plain
            cross-entropy on hard labels, as the method defines).
        scheduler: the student's schedule over the MPL stage.
        teacher: the teacher model (same classes; any architecture).
        teacher_optimizer: the teacher's optimizer; ``teacher_scheduler`` its schedule.
        weak_augment, strong_augment: the unlabeled views' augments (``None``: normalise only).
        pseudo_labels: ``"sample"`` (from the teacher's softmax) or ``"argmax"``.
        pseudo_label_view: the unlabeled view the teacher labels, ``"weak"`` or ``"strong"``
            (the student always learns the labels on the strong view).
        feedback: ``"on"`` (``h = old - new``), ``"off"`` (no MPL term: plain pseudo labels
            from a UDA teacher) or ``"flipped"`` (``h = new - old``).
        feedback_baseline: EMA decay of a moving-average baseline subtracted from ``h``
            (None: no baseline).
        mpl_weight: weight of the teacher's MPL term.
        teacher_supervised_weight: weight of the teacher's supervised CE.
        teacher_label_smoothing: label smoothing of the teacher's supervised CE.
        uda_weight, uda_temperature, uda_threshold, uda_ramp_steps: the teacher's UDA term
            (``uda_weight=0``: UDA off).
        finetune_epochs: the last this-many epochs of ``fit`` train the student on the
            labeled batches alone with ``finetune_optimizer`` (and ``finetune_scheduler``);
            the teacher is not trained then.
        **kwargs: the loop's arguments (``Trainer``).
    """

    manual_steps = True
    uses_unlabeled_data = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *,
                 teacher: nn.Module, teacher_optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 teacher_scheduler: Any = None, weak_augment: Optional[nn.Module] = None,
                 strong_augment: Optional[nn.Module] = None, pseudo_labels: str = "sample",
                 pseudo_label_view: str = "weak", feedback: str = "on",
                 feedback_baseline: Optional[float] = None, mpl_weight: float = 1.0,
                 teacher_supervised_weight: float = 1.0, teacher_label_smoothing: float = 0.0,
                 uda_weight: float = 1.0, uda_temperature: float = 0.7, uda_threshold: float = 0.6,
                 uda_ramp_steps: int = 0, finetune_epochs: int = 0,
                 finetune_optimizer: Optional[torch.optim.Optimizer] = None, finetune_scheduler: Any = None,
                 **kwargs: Any) -> None:
        if isinstance(feedback, bool):  # YAML 1.1 reads an unquoted on/off as true/false
            feedback = "on" if feedback else "off"
        if pseudo_labels not in PSEUDO_LABEL_MODES:
            raise RecipeError(f"pseudo_labels must be one of {', '.join(PSEUDO_LABEL_MODES)}, got {pseudo_labels!r}; "
                              f"e.g. trainer.params.pseudo_labels=sample")
        if pseudo_label_view not in PSEUDO_LABEL_VIEWS:
            raise RecipeError(f"pseudo_label_view must be one of {', '.join(PSEUDO_LABEL_VIEWS)}, got "
                              f"{pseudo_label_view!r}; e.g. trainer.params.pseudo_label_view=weak")
        if feedback not in FEEDBACK_MODES:
            raise RecipeError(f"feedback must be one of {', '.join(FEEDBACK_MODES)}, got {feedback!r}; e.g. "
                              f"trainer.params.feedback=on")
        check_uda_settings(uda_weight, uda_temperature, uda_threshold, uda_ramp_steps)
        if not 0.0 <= teacher_label_smoothing < 1.0:
            raise RecipeError(f"teacher_label_smoothing must be in [0, 1), got {teacher_label_smoothing}")
        if not (mpl_weight >= 0 and teacher_supervised_weight >= 0):
            raise RecipeError("mpl_weight and teacher_supervised_weight must be >= 0")
        if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
            raise RecipeError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
        if finetune_epochs and finetune_optimizer is None:
            raise RecipeError("finetune_epochs > 0 needs a finetune_optimizer over the student's parameters")
        optimizers = {STUDENT: optimizer, TEACHER: teacher_optimizer}
        schedulers = {k: v for k, v in ((STUDENT, scheduler), (TEACHER, teacher_scheduler)) if v is not None}
        if finetune_optimizer is not None:
            optimizers[FINETUNE] = finetune_optimizer
            if finetune_scheduler is not None:
                schedulers[FINETUNE] = finetune_scheduler
        super().__init__(models={STUDENT: model, TEACHER: teacher}, optimizers=optimizers, schedulers=schedulers,
                         primary=STUDENT, loss_fn=loss_fn, **kwargs)
        self.weak_augment = weak_augment.to(self.device) if weak_augment is not None else None
        self.strong_augment = strong_augment.to(self.device) if strong_augment is not None else None
        self.pseudo_label_mode = pseudo_labels
        self.pseudo_label_view = pseudo_label_view
        self.feedback = feedback
        self.mpl_weight = float(mpl_weight)
        self.teacher_supervised_weight = float(teacher_supervised_weight)
        self.teacher_label_smoothing = float(teacher_label_smoothing)
        self.uda_weight = float(uda_weight)
        self.uda_temperature = float(uda_temperature)
        self.uda_threshold = float(uda_threshold)
        self.uda_ramp_steps = int(uda_ramp_steps)
        self.finetune_epochs = finetune_epochs
        self.total_epochs: Optional[int] = None
        self.baseline = FeedbackBaseline(feedback_baseline) if feedback_baseline is not None else None
        if self.baseline is not None:
            self.register_state("feedback_baseline", self.baseline)
        #: the last MPL step's pseudo labels, losses and feedback (analysis, tests)
        self.last_step: Optional[MPLStepRecord] = None

    # -- stages -------------------------------------------------------------------------
    def fit(self, train_loader: Any, val_loader: Any = None, epochs: int = 1, resume_from: Any = None) -> list:
        """``Trainer.fit``; the last ``finetune_epochs`` of ``epochs`` are the finetune stage."""
        if self.finetune_epochs >= epochs:
            raise RecipeError(f"finetune_epochs={self.finetune_epochs} leaves no MPL epochs in {epochs}; "
                              f"trainer.epochs counts both stages, so raise it above finetune_epochs")
        self.total_epochs = epochs
        return super().fit(train_loader, val_loader, epochs=epochs, resume_from=resume_from)

    @property
    def finetuning(self) -> bool:
        """Whether the current epoch belongs to the finetune stage."""
        return bool(self.finetune_epochs) and self.total_epochs is not None and \
            self.epoch >= self.total_epochs - self.finetune_epochs

    def loss_key_of(self, part: str) -> Optional[str]:
        # the step's loss is the student's; the teacher's own objective is logged beside it
        return {TEACHER: "teacher_loss", FINETUNE: "finetune_loss"}.get(part)

    def evaluation_models(self) -> dict[str, nn.Module]:
        return {TEACHER: self.models[TEACHER]}

    def prepare_train_batch(self, batch: Any) -> SemiSupervisedViews:
        return prepare_views(self, batch, self.weak_augment, self.strong_augment)

    # -- the step -----------------------------------------------------------------------
    def training_step(self, views: SemiSupervisedViews) -> StepOutput:
        if self.finetuning:
            return self._finetune_step(views)
        return self._mpl_step(views)

    def _finetune_step(self, views: SemiSupervisedViews) -> StepOutput:
        with self.autocast():
            loss = as_loss_output(self.loss_fn(self.models[STUDENT](views.labeled_images), views.labels)).loss
        self.backward(loss, FINETUNE)
        self.step(FINETUNE)
        return StepOutput(loss.detach(), {"finetune_loss": loss.detach()}, batch_size=views.labels.shape[0])

    def _labeled_loss(self, views: SemiSupervisedViews, seed: int) -> torch.Tensor:
        """The student's labeled CE in train mode without touching BatchNorm's running
        statistics, on dropout stream ``seed`` (the same for the old and new passes)."""
        student = self.models[STUDENT]
        with torch.no_grad(), frozen_batchnorm_stats(student), same_noise(seed, self.device), self.autocast():
            logits = logits_of(student(views.labeled_images))
        return F.cross_entropy(logits.float(), views.labels)

    def _mpl_step(self, views: SemiSupervisedViews) -> StepOutput:
        teacher, student = self.models[TEACHER], self.models[STUDENT]
        n_l, n_u = views.labeled_images.shape[0], views.weak_images.shape[0]
        with self.autocast():
            t_logits = logits_of(teacher(torch.cat([views.labeled_images, views.weak_images, views.strong_images])))
        t_l, t_w, t_s = t_logits.float().split([n_l, n_u, n_u])
        t_v = t_w if self.pseudo_label_view == "weak" else t_s  # the view the labels are drawn on
        y_hat = pseudo_labels(t_v, self.pseudo_label_mode)

        # the student's step on the teacher's labels, with its labeled loss either side
        noise_seed = int(torch.randint(0, 2**62, (1,)))
        old = self._labeled_loss(views, noise_seed)
        with self.autocast():
            s_logits = logits_of(student(views.strong_images))
        student_loss = F.cross_entropy(s_logits.float(), y_hat)
        self.backward(student_loss, STUDENT)
        self.step(STUDENT)
        new = None
        if self.feedback != "off":
            new = self._labeled_loss(views, noise_seed)
            old_new = torch.stack([old, new])
            if self.accelerator.num_processes > 1:  # the global batch's losses: h is one number on every rank
                old_new = self.accelerator.reduce(old_new, "mean")
            old, new = old_new[0], old_new[1]
        h = teacher_feedback(old, new if new is not None else old, self.feedback)
        h_used = self.baseline(h) if (self.baseline is not None and self.feedback != "off") else h

        # the teacher: supervised + UDA + MPL on the SAME pseudo labels
        supervised = F.cross_entropy(t_l, views.labels, label_smoothing=self.teacher_label_smoothing)
        consistency, mask_rate = uda_consistency(t_w, t_s, self.uda_temperature, self.uda_threshold)
        uda_weight = self.uda_weight * linear_ramp(self.global_step + 1, self.uda_ramp_steps)
        teacher_loss = self.teacher_supervised_weight * supervised + uda_weight * consistency
        mpl = torch.zeros((), device=t_s.device)
        if self.feedback != "off" and self.mpl_weight > 0:
            mpl = h_used.detach() * F.cross_entropy(t_v, y_hat)
            teacher_loss = teacher_loss + self.mpl_weight * mpl
        self.backward(teacher_loss, TEACHER)
        self.step(TEACHER)

        self.last_step = MPLStepRecord(views, y_hat, old.detach(), new.detach() if new is not None else None, h)
        logs = {"student_loss": student_loss.detach(), "student_labeled_loss": old.detach(),
                "teacher_loss": teacher_loss.detach(), "teacher_sup_loss": supervised.detach(),
                "teacher_uda_loss": consistency.detach(), "teacher_mpl_loss": mpl.detach(), "h": h,
                "uda_mask": mask_rate, "uda_weight": torch.tensor(uda_weight, device=t_s.device)}
        known = views.hidden_labels >= 0
        if bool(known.any()):
            logs["pseudo_label_acc"] = (y_hat[known] == views.hidden_labels[known]).float().mean()
        return StepOutput(student_loss.detach(), logs, batch_size=n_l)
