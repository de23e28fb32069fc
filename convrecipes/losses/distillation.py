"""Distillation losses as plain functions: Hinton's soft-target KL and the FitNets hint.

``DistillationTrainer`` (``convrecipes.trainers.distillation``) is built from these; research
code calls them directly::

    loss = alpha * distillation_kl(student(x), teacher(x), T) + (1 - alpha) * F.cross_entropy(student(x), y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convrecipes.errors import RecipeError


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
    if not t > 0:
        raise ValueError(f"distillation_kl: temperature must be > 0, got {temperature!r}; Hinton et al. use 2-20")
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


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
