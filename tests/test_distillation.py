"""Knowledge distillation: the KD formula, the frozen teacher, batch adaptation, hints,
checkpoints, resume, recipes and two-process DDP."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.augment import build_augment, build_eval_transform
from convrecipes.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.models import create_model
from convrecipes.recipe import recipe_from_dict, recipe_to_dict
from convrecipes.schedulers import CosineSchedule
from convrecipes.trainers import TRAINERS, ModelCheckpoint
from convrecipes.build import TrainerContext, distillation_params
from convrecipes.checkpoint import weights_sha256
from convrecipes.loading import load_teacher
from convrecipes.trainers.distillation import (
    DistillationTrainer,
    FrozenTeacher,
    TeacherEnsemble,
    distillation_kl,
)
from tests.conftest import run_launched

REPO = Path(__file__).resolve().parent.parent


# -- independent computations, written out ------------------------------------------------
def _textbook_kd(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """T^2 * (1/B) sum_i sum_k p_t[i,k] (log p_t[i,k] - log p_s[i,k]), p = softmax(z / T)."""
    total = 0.0
    for zs, zt in zip(student.double().tolist(), teacher.double().tolist()):
        es, et = [math.exp(v / T) for v in zs], [math.exp(v / T) for v in zt]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    return T * T * total / len(student)


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """1-D linear interpolation weights, half-pixel centres (align_corners=False), edges clamped."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        w[o, i0] += 1 - lam
        w[o, i1] += lam
    return w


def _block_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    h, w = x.shape[-2] // f, x.shape[-1] // f
    out = torch.zeros(*x.shape[:-2], h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., i * f:(i + 1) * f, j * f:(j + 1) * f].mean(dim=(-2, -1))
    return out


# -- the KD term ----------------------------------------------------------------------------
def test_distillation_kl_matches_the_textbook_formula_and_mean_would_fail():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    for T in (1.0, 2.0, 4.0):
        expected = torch.tensor(_textbook_kd(student, teacher, T), dtype=torch.float32)
        torch.testing.assert_close(distillation_kl(student, teacher, T), expected, rtol=1e-5, atol=1e-6)
        # the classes-averaging reduction is C times too small and fails the same check
        with warnings.catch_warnings():  # torch warns that "mean" is not the KL definition
            warnings.simplefilter("ignore", UserWarning)
            wrong = T * T * F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1),
                                     reduction="mean", log_target=True)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(wrong, expected, rtol=1e-5, atol=1e-6)
        assert float(expected / wrong) == pytest.approx(7.0, rel=1e-4)
    # without the T^2 factor the value at T = 4 would be 16x smaller
    assert float(distillation_kl(student, teacher, 4.0)) == pytest.approx(_textbook_kd(student, teacher, 4.0), rel=1e-5)
    assert float(distillation_kl(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-6)


# -- adapting the batch to the teacher ------------------------------------------------------
def test_adaptation_1_to_3_channels_upsampled_and_renormalised_matches_hand_computation():
    pixels = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    student = ((pixels - 0.3) / 0.2).float()
    t_mean, t_std = [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    frozen = FrozenTeacher(nn.Identity(), student_mean=[0.3], student_std=[0.2], teacher_mean=t_mean,
                           teacher_std=t_std, image_size=(6, 6), in_chans=3)
    w = _bilinear_matrix(3, 6)
    up = w @ pixels[:, 0] @ w.T  # (B, 6, 6) raw pixels
    expected = torch.stack([(up - m) / s for m, s in zip(t_mean, t_std)], dim=1)
    torch.testing.assert_close(frozen(student).double(), expected, rtol=1e-5, atol=1e-5)


def test_adaptation_3_to_1_channel_downsampled_and_renormalised_matches_hand_computation():
    pixels = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    s_mean, s_std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.1, 0.2, 0.3])
    student = ((pixels - s_mean.view(1, 3, 1, 1).double()) / s_std.view(1, 3, 1, 1).double()).float()
    frozen = FrozenTeacher(nn.Identity(), student_mean=s_mean.tolist(), student_std=s_std.tolist(),
                           teacher_mean=[0.3], teacher_std=[0.2], image_size=4, in_chans=1)
    gray = pixels.mean(dim=1, keepdim=True)
    expected = (_block_mean(gray, 2) - 0.3) / 0.2
    torch.testing.assert_close(frozen(student).double(), expected, rtol=1e-5, atol=1e-5)
    # same normalisation, size and channels: the batch is passed through untouched
    same = FrozenTeacher(nn.Identity(), student_mean=[0.3], student_std=[0.2], teacher_mean=[0.3],
                         teacher_std=[0.2], in_chans=1)
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(same(x), x)


class _Recorder(nn.Module):
    """First layer of a teacher: remembers every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


def _tiny_teacher(in_chans: int, num_classes: int = 4, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_resnet8", in_chans, num_classes, width=4)


def test_teacher_sees_the_students_augmented_batch_adapted(blobs):
    """Augmented (random crop + flip) 1-channel 8x8 student batches reach a 3-channel 16x16
    teacher with another normalisation, exactly as the hand computation adapts them."""
    recorder = _Recorder()
    teacher = nn.Sequential(recorder, _tiny_teacher(3))
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    student_seen: list[torch.Tensor] = []
    student.register_forward_pre_hook(lambda m, args: student_seen.append(args[0].detach().clone()))
    aug = build_augment("light", (8, 8), 1, [0.3], [0.2], 4, hflip=True)
    t_mean, t_std = [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    trainer = DistillationTrainer(student, torch.optim.SGD(student.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                                  teacher=teacher, teacher_mean=t_mean, teacher_std=t_std, teacher_image_size=16,
                                  teacher_in_chans=3, augment=aug, progress=False)
    trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=1)
    assert len(recorder.seen) == len(student_seen) == 3
    w = _bilinear_matrix(8, 16)
    for s, t in zip(student_seen, recorder.seen):
        raw = s.double()[:, 0] * 0.2 + 0.3
        up = w @ raw @ w.T
        expected = torch.stack([(up - m) / sd for m, sd in zip(t_mean, t_std)], dim=1)
        torch.testing.assert_close(t.double(), expected, rtol=1e-5, atol=1e-5)


# -- the frozen teacher ---------------------------------------------------------------------
def _kd_trainer(student, teacher, **kw):
    kw.setdefault("progress", False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    return DistillationTrainer(student, opt, nn.CrossEntropyLoss(), teacher=teacher, **kw)


def test_teacher_gets_no_gradient_stays_in_eval_and_is_bit_unchanged(blobs):
    teacher = _tiny_teacher(1)
    teacher.train()  # as handed over: the trainer must put and keep it in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BatchNorm buffers are part of the check
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _kd_trainer(student, teacher, hint_layers=("blocks.1", "features.4"), input_shape=(1, 8, 8),
                          augment=build_augment("light", (8, 8), 1, [0.3], [0.3], 4))
    trainer.teacher.train()  # a stray .train() is a no-op

    seen_modes = []
    teacher.register_forward_pre_hook(lambda m, a: seen_modes.append([x.training for x in m.modules()]))
    trainer.fit(InMemoryLoader(blobs, 16, seed=0), InMemoryLoader(blobs, 32, shuffle=False, drop_last=False),
                epochs=2)
    assert seen_modes and not any(any(modes) for modes in seen_modes)
    assert not trainer.teacher.training and not any(m.training for m in teacher.modules())
    for p in teacher.parameters():
        assert p.grad is None and not p.requires_grad
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the student did train, and the teacher was never handed to accelerator.prepare
    assert any(not torch.equal(v, student_before[k]) for k, v in trainer.unwrapped_model.state_dict().items())
    assert all(m is not teacher and m is not trainer.teacher for m in trainer.accelerator._models)
    for key in ("kd", "task", "hint", "train_loss"):
        assert key in trainer.history[-1], key


def test_bf16_with_accumulation_and_ema(blobs):
    """The rest of the loop composes: bf16 autocast (CPU), gradient accumulation, student EMA."""
    teacher = _tiny_teacher(1)
    before = weights_sha256(teacher)
    torch.manual_seed(0)
    trainer = _kd_trainer(create_model("tiny_cnn", 1, 4, width=4), teacher, mixed_precision="bf16",
                          grad_accum_steps=2, ema_decay=0.9, hint_layers=("blocks.1", "features.4"),
                          input_shape=(1, 8, 8))
    history = trainer.fit(InMemoryLoader(blobs, 16, seed=0), InMemoryLoader(blobs, 32, shuffle=False, drop_last=False),
                          epochs=1)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.global_step == 3
    assert all(math.isfinite(history[-1][k]) for k in ("kd", "task", "hint", "ema_val_top1"))
    assert weights_sha256(teacher) == before


# -- the loss: parts, soft targets ----------------------------------------------------------
class _RecordingCE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, logits, targets):
        self.targets.append(targets.detach().clone())
        if targets.is_floating_point():
            return -(targets * F.log_softmax(logits.float(), 1)).sum(1).mean()
        return F.cross_entropy(logits, targets)


def test_step_loss_combines_kd_and_the_task_loss_on_soft_targets():
    teacher = _tiny_teacher(1)
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    alpha, T = 0.7, 3.0
    trainer = _kd_trainer(student, teacher, alpha=alpha, temperature=T)
    trainer.model.train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 1, 8, 8, generator=g)
    soft = torch.softmax(torch.randn(6, 4, generator=g), 1)
    out = trainer.training_step((images, soft))
    with torch.no_grad():  # the student in train mode (batch statistics), as in the step
        zs, zt = student(images).double(), teacher(images).double()
    task = -(soft.double() * torch.log_softmax(zs, 1)).sum(1).mean()
    expected = alpha * _textbook_kd(zs, zt, T) + (1 - alpha) * float(task)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(out.logs["task"]) == pytest.approx(float(task), rel=1e-4)
    assert float(out.logs["kd"]) == pytest.approx(_textbook_kd(zs, zt, T), rel=1e-4)


def test_mixup_soft_targets_reach_the_task_loss(blobs):
    loss = _RecordingCE()
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    aug = build_augment("none", (8, 8), 1, [0.3], [0.3], 4, mixup_alpha=1.0)
    trainer = DistillationTrainer(student, torch.optim.SGD(student.parameters(), lr=0.01), loss,
                                  teacher=_tiny_teacher(1), augment=aug, progress=False)
    trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=1)
    assert len(loss.targets) == 3
    for t in loss.targets:
        assert t.shape == (32, 4) and t.is_floating_point()
        torch.testing.assert_close(t.sum(1), torch.ones(32))
    assert any(float(t.max(1).values.min()) < 0.999 for t in loss.targets)  # genuinely mixed, not one-hot


# -- checkpoints and resume -----------------------------------------------------------------
def _resumable(run_dir, ds):
    teacher = _tiny_teacher(1, seed=3)
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, ds.num_classes, width=4, drop_rate=0.2)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = CosineSchedule(opt, total_steps=18, warmup_steps=2)
    aug = build_augment("light", (8, 8), 1, [0.3], [0.3], ds.num_classes, hflip=True)
    return DistillationTrainer(student, opt, nn.CrossEntropyLoss(), teacher=teacher, temperature=2.0, alpha=0.8,
                               hint_layers=("blocks.1", "features.4"), input_shape=(1, 8, 8), scheduler=sched,
                               augment=aug, eval_transform=build_eval_transform([0.3], [0.3]), ema_decay=0.9,
                               grad_accum_steps=2, run_dir=run_dir, progress=False, seed=7,
                               callbacks=[ModelCheckpoint(run_dir, every_n_steps=2)])


def test_the_hint_projection_is_a_trained_part_scheduled_like_the_student(blobs, tmp_path):
    full = _resumable(tmp_path / "full", blobs)
    init = {k: v.clone() for k, v in full.hint_projection.state_dict().items()}
    full.fit(InMemoryLoader(blobs, 8, seed=1), epochs=1)
    # its own param group in the student's optimizer, following the same schedule
    assert len(full.optimizer.param_groups) == 2 and full.scheduler.base_lrs == [0.05, 0.05]
    assert full.optimizer.param_groups[1]["lr"] == full.optimizer.param_groups[0]["lr"]
    assert any(not torch.equal(v, init[k]) for k, v in full.hint_projection.state_dict().items())
    assert "hint_projection" in full.state_dict()["parts"]["models"]  # checkpointed (resume: the contract suite)


def _write_teacher_checkpoint(path: Path, num_classes: int = 4) -> tuple[nn.Module, dict]:
    """A checkpoint as `convrecipes train` writes it: model weights + the recipe and classes."""
    recipe = recipe_from_dict({"name": "teacher_recipe", "data": {"name": "digits"},
                               "model": {"name": "small_resnet8", "kwargs": {"width": 4}},
                               "augment": {"mean": [0.25], "std": [0.35]}})
    teacher = _tiny_teacher(1, num_classes)
    meta = {"recipe": recipe_to_dict(recipe), "classes": [f"c{i}" for i in range(num_classes)], "epoch": 3}
    save_checkpoint(path, {"model": teacher.state_dict()}, meta)
    return teacher, meta


def test_checkpoint_records_the_teacher_identity(blobs, tmp_path):
    run = tmp_path / "teacher_run"
    teacher, _ = _write_teacher_checkpoint(run / "best.safetensors")
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    trainer = _kd_trainer(student, load_teacher(str(run)), input_shape=(1, 8, 8),
                          augment=build_augment("none", (8, 8), 1, [0.3], [0.3], 4))
    # rebuilt from the recorded recipe, with the recorded weights and normalisation
    for k, v in teacher.state_dict().items():
        assert torch.equal(trainer.teacher.module.state_dict()[k], v), k
    assert trainer.teacher.teacher_mean == [0.25] and trainer.teacher.student_mean == pytest.approx([0.3])
    trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=1)
    path = trainer.save_checkpoint(tmp_path / "student.safetensors")
    meta = read_metadata(path)
    file = run / "best.safetensors"
    assert meta["teacher"]["kind"] == "checkpoint"
    assert meta["teacher"]["path"] == str(file.resolve())
    assert meta["teacher"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert meta["teacher"]["model"] == "small_resnet8"
    assert meta["distillation"]["temperature"] == 4.0
    state, _ = load_checkpoint(path)
    assert set(state["model"]) == set(student.state_dict())  # a plain student checkpoint

    # an nn.Module teacher is named by its class and a weights fingerprint
    module_trainer = _kd_trainer(create_model("tiny_cnn", 1, 4, width=4), teacher)
    module_trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=1)
    meta = read_metadata(module_trainer.save_checkpoint(tmp_path / "student2.safetensors"))
    assert meta["teacher"]["class"].endswith("SmallResNet")
    assert meta["teacher"]["weights_sha256"] == weights_sha256(teacher)


def test_teacher_ensemble_distils_from_the_mean_of_the_members_logits(blobs, tmp_path):
    """A list of teachers is one teacher whose logits are the members' mean: the KD term
    equals the textbook formula on hand-averaged logits, each member keeps its own input
    normalisation, and the checkpoint records every member."""
    run_a = tmp_path / "a"
    teacher_a, _ = _write_teacher_checkpoint(run_a / "best.safetensors")  # trained on mean 0.25 / std 0.35
    module_b = _tiny_teacher(1, seed=7)  # an nn.Module: sees the student's batch as is
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, 4, width=4)
    aug = build_augment("none", (8, 8), 1, [0.3], [0.3], 4)
    trainer = _kd_trainer(student, [load_teacher(str(run_a)), module_b], input_shape=(1, 8, 8), augment=aug, temperature=2.0)
    assert isinstance(trainer.teacher, TeacherEnsemble) and len(trainer.teacher.members) == 2

    images = torch.randn(5, 1, 8, 8)
    teacher_a.eval(), module_b.eval()
    with torch.no_grad():
        expected = (teacher_a((images * 0.3 + 0.3 - 0.25) / 0.35) + module_b(images)) / 2
        torch.testing.assert_close(trainer.teacher(images), expected, rtol=1e-5, atol=1e-5)
        s_logits = student(images)
    kd = distillation_kl(s_logits, trainer.teacher(images), 2.0)
    assert kd.item() == pytest.approx(_textbook_kd(s_logits, expected, 2.0), rel=1e-4)

    trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=1)
    meta = read_metadata(trainer.save_checkpoint(tmp_path / "student.safetensors"))
    assert meta["teacher"]["kind"] == "ensemble"
    kinds = [m["kind"] for m in meta["teacher"]["members"]]
    assert kinds == ["checkpoint", "module"]
    assert meta["teacher"]["members"][1]["weights_sha256"] == weights_sha256(module_b)
    for p in list(teacher_a.parameters()) + list(module_b.parameters()):
        assert p.grad is None
    with pytest.raises(RecipeError, match="single teacher"):
        _kd_trainer(create_model("tiny_cnn", 1, 4, width=4), [module_b, module_b],
                    hint_layers=("blocks.1", "features.4"), input_shape=(1, 8, 8))
    with pytest.raises(RecipeError, match="empty"):
        _kd_trainer(create_model("tiny_cnn", 1, 4, width=4), [])


def test_recipe_builds_a_distillation_run_from_a_teacher_run_dir(tmp_path):
    """The build() hook turns trainer.params.teacher=<run dir> into the teacher (digits, 8x8)."""
    from convrecipes.build import build
    from convrecipes.recipe import load_recipe

    teacher_run = tmp_path / "teacher"
    recipe = load_recipe("quickstart", ["data.subset_per_class=16", "model.kwargs.width=4", "trainer.epochs=1",
                                        "trainer.progress=false", "schedule.warmup_epochs=0"])
    exp = build(recipe, run_dir=teacher_run)
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=1)
    student = load_recipe("quickstart", ["data.subset_per_class=16", "model.kwargs.width=4", "trainer.epochs=1",
                                         "trainer.progress=false", "schedule.warmup_epochs=0",
                                         "trainer.name=distillation", f"trainer.params.teacher={teacher_run}",
                                         "trainer.params.temperature=2.0"])
    exp2 = build(student, run_dir=tmp_path / "student")
    assert isinstance(exp2.trainer, DistillationTrainer) and TRAINERS.get("distillation") is DistillationTrainer
    exp2.trainer.fit(exp2.train_loader, exp2.val_loader, epochs=1)
    meta = read_metadata(tmp_path / "student" / "last.safetensors")
    assert meta["teacher"]["path"] == str((teacher_run / "best.safetensors").resolve())
    assert meta["recipe"]["trainer"]["params"]["teacher"] == str(teacher_run)  # the recipe stays plain data
    assert "kd" in exp2.trainer.history[-1]


# -- clear errors ---------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    ctx = TrainerContext(None, num_classes=10, in_chans=1, image_size=(8, 8), mean=[0.3], std=[0.3],
                         device=torch.device("cpu"))
    with pytest.raises(RecipeError, match="needs a teacher"):
        distillation_params({}, ctx)
    with pytest.raises(CheckpointError, match="no teacher directory or checkpoint .* train it first"):
        distillation_params({"teacher": str(tmp_path / "runs" / "missing")}, ctx)
    _write_teacher_checkpoint(tmp_path / "t4.safetensors", num_classes=4)
    with pytest.raises(RecipeError, match="predicts 4 classes but the student has 10"):
        load_teacher(str(tmp_path / "t4.safetensors"), num_classes=10)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        load_teacher(str(tmp_path / "empty_run"))
    with pytest.raises(RecipeError, match="neither an existing run directory"):
        load_teacher("no_such_model_name")
    with pytest.raises(RecipeError, match="predicts 1000 classes but the student has 10; fine-tune"):
        load_teacher("resnet18", num_classes=10)  # checked before any download
    with pytest.raises(RecipeError, match="could not load pretrained weights .* run once on a machine with internet"):
        load_teacher("tiny_cnn", num_classes=10)  # ours: no pretrained weights exist
    student = create_model("tiny_cnn", 1, 4, width=4)
    with pytest.raises(RecipeError, match="teacher predicts 10 classes but the student 4"):
        _kd_trainer(student, _tiny_teacher(1, num_classes=10), input_shape=(1, 8, 8))
    with pytest.raises(RecipeError, match="no layer 'nope'.*valid names: stem"):
        _kd_trainer(student, _tiny_teacher(1), hint_layers=("nope", "features.4"), input_shape=(1, 8, 8))
    with pytest.raises(RecipeError, match="alpha must be in"):
        _kd_trainer(student, _tiny_teacher(1), alpha=1.5)


# -- two processes --------------------------------------------------------------------------
_DDP_SCRIPT = """
import json, sys
import torch, torch.nn as nn
from accelerate import Accelerator
from convrecipes.data.loader import ImageTensorDataset, InMemoryLoader
from convrecipes.models import create_model
from convrecipes.trainers import DistillationTrainer
from convrecipes.checkpoint import weights_sha256
from tests.conftest import run_launched

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
labels = torch.arange(64) % 4
images = torch.randint(0, 256, (64, 1, 8, 8), generator=g).to(torch.uint8)
ds = ImageTensorDataset(images, labels, ["a", "b", "c", "d"])
torch.manual_seed(1)
teacher = create_model("small_resnet8", 1, 4, width=4)
teacher_before = weights_sha256(teacher)
torch.manual_seed(0)
student = create_model("tiny_cnn", 1, 4, width=4)
trainer = DistillationTrainer(student, torch.optim.SGD(student.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                              teacher=teacher, accelerator=Accelerator(), hint_layers=("blocks.1", "features.4"),
                              input_shape=(1, 8, 8), progress=False, seed=0)
trainer.fit(InMemoryLoader(ds, 16, seed=0), epochs=2)
trainer.save_checkpoint(out + "/student.safetensors")
acc = trainer.accelerator
with open(f"{out}/rank{acc.process_index}.json", "w") as fh:
    json.dump({"world": acc.num_processes, "model": type(trainer.model).__name__,
               "projection": type(trainer.hint_projection).__name__, "teacher": type(trainer.teacher).__name__,
               # parameters only: BatchNorm running statistics are per rank after the last forward
               "student": [p.detach().flatten().tolist() for p in trainer.unwrapped_model.parameters()],
               "proj": weights_sha256(acc.unwrap_model(trainer.hint_projection)),
               "teacher_before": teacher_before, "teacher_after": weights_sha256(teacher),
               "kd": trainer.history[-1]["kd"]}, fh)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_distillation_runs(tmp_path):
    """Real 2-process DDP on CPU (FIELD_NOTES' verified command, explicit flags): both ranks
    end with the same student and projection, the teacher is unwrapped and unchanged."""
    script = tmp_path / "ddp_distill.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--machine_rank", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    proc = run_launched(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2
        assert r["model"] == r["projection"] == "DistributedDataParallel"
        assert r["teacher"] == "FrozenTeacher"
        assert r["teacher_before"] == r["teacher_after"]
    assert ranks[0]["student"] == ranks[1]["student"] and ranks[0]["proj"] == ranks[1]["proj"]
    assert read_metadata(tmp_path / "student.safetensors")["teacher"]["kind"] == "module"
