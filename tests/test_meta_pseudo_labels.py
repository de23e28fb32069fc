"""Meta Pseudo Labels and UDA, each formula against an independent computation.

The MPL feedback h = old - new is checked against its first-order Taylor form
lr * grad L_l(theta') . grad L_u(theta) computed here with autograd; the student's and the
teacher's updates against plain-SGD updates computed here from the recorded pseudo
labels; BatchNorm running statistics against a copy of the student that only ran its
training forward; UDA's loss against the formula written out.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.cli import main
from convrecipes.data.loader import ImageTensorDataset
from convrecipes.data.semi_supervised import SemiSupervisedLoader
from convrecipes.trainers import TRAINERS, Callback, MetaPseudoLabelsTrainer, UDATrainer
from convrecipes.trainers.meta_pseudo_labels import (FeedbackBaseline, frozen_batchnorm_stats, pseudo_labels,
                                                     same_noise, teacher_feedback)
from convrecipes.trainers.uda import linear_ramp, uda_consistency

SIDE, CLASSES = 4, 3


def _data(seed: int = 0, n_l: int = 24, n_u: int = 96) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Three classes told apart by which third of the image is bright."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> ImageTensorDataset:
        labels = torch.arange(n) % CLASSES
        images = torch.randint(0, 80, (n, 1, SIDE, SIDE), generator=g)
        for c in range(CLASSES):
            images[labels == c, :, :, c] += 150
        return ImageTensorDataset(images.to(torch.uint8), labels, [str(c) for c in range(CLASSES)])

    return make(n_l), make(n_u)


def _loader(seed: int = 0) -> SemiSupervisedLoader:
    labeled, unlabeled = _data(seed)
    return SemiSupervisedLoader.from_datasets(labeled, unlabeled, batch_size=8, unlabeled_batch_size=16, seed=seed)


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, CLASSES))


def _mpl(student: nn.Module, teacher: nn.Module, student_lr: float = 0.1, teacher_lr: float = 0.1,
         **kw) -> MetaPseudoLabelsTrainer:
    kw.setdefault("uda_weight", 0.0)
    return MetaPseudoLabelsTrainer(student, torch.optim.SGD(student.parameters(), lr=student_lr), nn.CrossEntropyLoss(),
                                   teacher=teacher, teacher_optimizer=torch.optim.SGD(teacher.parameters(), lr=teacher_lr),
                                   progress=False, seed=0, **kw)


def _first_batch(trainer, loader):
    loader = trainer.configure_loader(loader)
    loader.set_epoch(0)
    return next(iter(loader))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _linear_logits(params, x):
    weight, bias = params
    return x.flatten(1) @ weight.T + bias


def _grad(params, x, y):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    loss = F.cross_entropy(_linear_logits(params, x), y)
    return torch.autograd.grad(loss, params)


# -- the feedback coefficient -------------------------------------------------------------
def test_feedback_tends_to_its_first_order_form_as_the_learning_rate_shrinks():
    errors = []
    for lr in (0.1, 0.01, 0.001):
        trainer = _mpl(_linear(1), _linear(2), student_lr=lr)
        batch = _first_batch(trainer, _loader())
        before = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
        trainer.train_step([batch])
        after = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
        rec = trainer.last_step
        views = rec.views
        # independent: the pseudo-label gradient before the step, the labeled gradient after it
        g_before = _flat(_grad(before, views.strong_images, rec.pseudo_labels))
        g_after = _flat(_grad(after, views.labeled_images, views.labels))
        first_order = lr * torch.dot(g_after, g_before)
        old = F.cross_entropy(_linear_logits(before, views.labeled_images), views.labels)
        new = F.cross_entropy(_linear_logits(after, views.labeled_images), views.labels)
        torch.testing.assert_close(rec.feedback, (old - new).detach(), rtol=1e-4, atol=1e-6)
        assert torch.sign(rec.feedback) == torch.sign(first_order)
        errors.append(abs(float(rec.feedback / first_order) - 1.0))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.01, errors


def test_student_and_teacher_updates_are_plain_sgd_on_the_same_pseudo_labels():
    for view in ("weak", "strong"):
        trainer = _mpl(_linear(1), _linear(2), student_lr=0.2, teacher_lr=0.5, teacher_supervised_weight=0.0,
                       pseudo_label_view=view)
        batch = _first_batch(trainer, _loader())
        s0 = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
        t0 = [p.detach().clone() for p in trainer.unwrap("teacher").parameters()]
        trainer.train_step([batch])
        rec = trainer.last_step
        x_v = rec.views.weak_images if view == "weak" else rec.views.strong_images
        # the student stepped on CE(S(x_strong), y_hat)
        expected_s = [p - 0.2 * g for p, g in zip(s0, _grad(s0, rec.views.strong_images, rec.pseudo_labels))]
        for p, e in zip(trainer.unwrapped_model.parameters(), expected_s):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
        # the teacher (MPL term only) stepped on h * CE(T(x_v), the same y_hat)
        grads = _grad(t0, x_v, rec.pseudo_labels)
        assert float(_flat(grads).norm()) > 1e-3 and abs(float(rec.feedback)) > 0, "the MPL gradient is nonzero"
        expected_t = [p - 0.5 * float(rec.feedback) * g for p, g in zip(t0, grads)]
        for p, e in zip(trainer.unwrap("teacher").parameters(), expected_t):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
        # other labels would have given another teacher update
        other = (rec.pseudo_labels + 1) % CLASSES
        wrong = [p - 0.5 * float(rec.feedback) * g for p, g in zip(t0, _grad(t0, x_v, other))]
        assert not torch.allclose(_flat(wrong), _flat(list(trainer.unwrap("teacher").parameters())).detach())


def test_an_mpl_only_teacher_step_moves_the_log_probability_of_the_labels_with_the_sign_of_h():
    trainer = _mpl(_linear(1), _linear(2), student_lr=0.5, teacher_lr=0.05, teacher_supervised_weight=0.0)
    loader = trainer.configure_loader(_loader())
    loader.set_epoch(0)
    seen = set()
    for batch in loader:
        t0 = copy.deepcopy(trainer.unwrap("teacher"))
        trainer.train_step([batch])
        rec = trainer.last_step
        x_v, y_hat = rec.views.weak_images, rec.pseudo_labels
        with torch.no_grad():
            before = F.log_softmax(t0(x_v), 1).gather(1, y_hat[:, None]).mean()
            after = F.log_softmax(trainer.unwrap("teacher")(x_v), 1).gather(1, y_hat[:, None]).mean()
        if abs(float(rec.feedback)) < 1e-6:
            continue
        assert torch.sign(after - before) == torch.sign(rec.feedback), (float(rec.feedback), float(after - before))
        seen.add(float(torch.sign(rec.feedback)))
    assert 1.0 in seen, "at least one step where the student's step lowered its labeled loss"


def test_old_and_new_passes_leave_batchnorm_running_statistics_untouched():
    torch.manual_seed(3)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * SIDE * SIDE, CLASSES))
    trainer = _mpl(student, _linear(2), student_lr=0.1)
    batch = _first_batch(trainer, _loader())
    reference = copy.deepcopy(trainer.unwrapped_model).train()
    trainer.train_step([batch])
    rec = trainer.last_step
    bn = trainer.unwrapped_model[1]
    # the only forward that may move the statistics: the training pass on the strong view
    before_step = copy.deepcopy(reference)
    with torch.no_grad():
        reference(rec.views.strong_images)
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)
    assert int(bn.num_batches_tracked) == int(reference[1].num_batches_tracked) == 1
    # old and new were measured in train mode (batch statistics) on the labeled batch alone
    with torch.no_grad():
        old = F.cross_entropy(before_step(rec.views.labeled_images), rec.views.labels)
        new = F.cross_entropy(copy.deepcopy(trainer.unwrapped_model).train()(rec.views.labeled_images),
                              rec.views.labels)
    torch.testing.assert_close(rec.old_loss, old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.new_loss, new, rtol=1e-5, atol=1e-6)


def test_frozen_batchnorm_uses_batch_statistics_and_changes_no_buffer():
    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    buffers = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen_batchnorm_stats(bn):
        y = bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + bn.eps))
    assert bn.track_running_stats
    bn(x)
    assert int(bn.num_batches_tracked) == 1


def test_same_noise_repeats_dropout_and_leaves_the_global_stream():
    drop = nn.Dropout(0.5).train()
    x = torch.ones(1000)
    state = torch.get_rng_state()
    with same_noise(123, torch.device("cpu")):
        a = drop(x)
    with same_noise(123, torch.device("cpu")):
        b = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_feedback_modes_pseudo_label_modes_and_the_baseline():
    old, new = torch.tensor(1.0), torch.tensor(0.75)
    assert float(teacher_feedback(old, new, "on")) == 0.25
    assert float(teacher_feedback(old, new, "flipped")) == -0.25
    assert float(teacher_feedback(old, new, "off")) == 0.0
    # an unquoted YAML off/on arrives as a bool and means the same
    assert _mpl(_linear(1), _linear(2), feedback=False).feedback == "off"
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    assert pseudo_labels(logits, "argmax").tolist() == [1, 0]
    torch.manual_seed(0)
    draws = torch.stack([pseudo_labels(logits, "sample") for _ in range(4000)])
    p = logits.softmax(1)
    for row in range(2):  # sampled with the teacher's probabilities
        freq = torch.bincount(draws[:, row], minlength=3).float() / 4000
        torch.testing.assert_close(freq, p[row], atol=0.03, rtol=0)
    base = FeedbackBaseline(0.5)
    assert float(base(torch.tensor(2.0))) == 0.0  # bias-corrected: the first baseline is h itself
    # EMA 0.5*2*0.5 + 0.5*4 = 2.5 over a correction of 1 - 0.25: baseline 10/3
    assert float(base(torch.tensor(4.0))) == pytest.approx(4.0 - (0.5 * 0.5 * 2.0 + 0.5 * 4.0) / 0.75)


def test_flipped_feedback_is_the_negated_coefficient_of_the_same_step():
    hs = {}
    for mode in ("on", "flipped"):
        trainer = _mpl(_linear(1), _linear(2), feedback=mode)
        trainer.train_step([_first_batch(trainer, _loader())])
        hs[mode] = float(trainer.last_step.feedback)
    assert hs["on"] != 0 and hs["flipped"] == pytest.approx(-hs["on"])


def test_feedback_off_trains_the_teacher_on_its_own_losses_only():
    torch.manual_seed(0)
    trainer = _mpl(_linear(1), _linear(2), feedback="off", teacher_lr=0.5)
    batch = _first_batch(trainer, _loader())
    t0 = [p.detach().clone() for p in trainer.unwrap("teacher").parameters()]
    trainer.train_step([batch])
    views = trainer.last_step.views
    grads = _grad(t0, views.labeled_images, views.labels)  # supervised CE alone (UDA is off here)
    for p, e in zip(trainer.unwrap("teacher").parameters(), [p - 0.5 * g for p, g in zip(t0, grads)]):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
    assert trainer.last_step.new_loss is None


# -- UDA -------------------------------------------------------------------------------
def test_uda_consistency_is_the_masked_sharpened_kl():
    torch.manual_seed(0)
    weak, strong = torch.randn(6, 4) * 2, torch.randn(6, 4, requires_grad=True)
    loss, rate = uda_consistency(weak, strong, temperature=0.7, threshold=0.6)
    p = weak.softmax(1)
    q = (weak / 0.7).softmax(1)  # sharpened target
    mask = (p.max(1).values >= 0.6).float()
    kl = (q * (q.log() - strong.log_softmax(1))).sum(1)
    torch.testing.assert_close(loss, (kl * mask).sum() / 6)
    assert float(rate) == pytest.approx(float(mask.mean()))
    loss.backward()
    assert strong.grad is not None and weak.grad is None  # the target is a constant
    assert linear_ramp(0, 10) == 0 and linear_ramp(5, 10) == 0.5 and linear_ramp(50, 10) == 1 and linear_ramp(3, 0) == 1


def test_uda_trainer_step_is_cross_entropy_plus_the_ramped_term():
    model = _linear(1)
    trainer = UDATrainer(model, torch.optim.SGD(model.parameters(), lr=0.3), nn.CrossEntropyLoss(),
                         uda_weight=2.0, uda_ramp_steps=4, uda_threshold=0.0, progress=False)
    batch = _first_batch(trainer, _loader())
    w0 = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
    views = trainer.prepare_train_batch(batch)
    trainer.train_step([batch])
    params = [p.clone().requires_grad_(True) for p in w0]
    sup = F.cross_entropy(_linear_logits(params, views.labeled_images), views.labels)
    # threshold 0 keeps every image; the weight at step 1 of a 4-step ramp is 2 * 1/4
    cons, _ = uda_consistency(_linear_logits(params, views.weak_images), _linear_logits(params, views.strong_images),
                              threshold=0.0)
    grads = torch.autograd.grad(sup + 0.5 * cons, params)
    for p, e in zip(trainer.unwrapped_model.parameters(), [p - 0.3 * g for p, g in zip(w0, grads)]):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


# -- the stages, the recipe side ------------------------------------------------------------
class _TeacherAt(Callback):
    def __init__(self) -> None:
        self.weights = {}

    def on_epoch_end(self, trainer, metrics):
        self.weights[trainer.epoch] = [p.detach().clone() for p in trainer.unwrap("teacher").parameters()]


def test_finetune_stage_trains_the_student_alone_with_its_own_optimizer():
    student, teacher = _linear(1), _linear(2)
    finetune = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    watch = _TeacherAt()
    trainer = _mpl(student, teacher, finetune_epochs=2, finetune_optimizer=finetune, callbacks=[watch])
    history = trainer.fit(_loader(), epochs=4)
    assert "student_loss" in history[1] and "finetune_loss" in history[2] and "finetune_loss" in history[3]
    for a, b in zip(watch.weights[2], watch.weights[4]):
        assert torch.equal(a, b), "the teacher does not train while the student finetunes"
    assert trainer.optimizers["finetune"].state, "the finetune optimizer stepped"
    with pytest.raises(Exception, match="finetune_epochs=2 leaves no MPL epochs"):
        _mpl(_linear(1), _linear(2), finetune_epochs=2, finetune_optimizer=finetune).fit(_loader(), epochs=2)


TINY_DIGITS = ["trainer.progress=false", "trainer.epochs=2", "trainer.params.finetune_epochs=1",
               "model.kwargs.width=4"]


def test_mpl_recipe_runs_and_reports_student_ema_and_teacher(tmp_path):
    from convrecipes.recipe import load_recipe
    from convrecipes.run import train_recipe

    result = train_recipe(load_recipe("mpl_digits", TINY_DIGITS + ["trainer.ema_decay=0.9"]), tmp_path / "run")
    for key in ("test_final", "test_final_ema", "test_final_teacher"):
        assert 0 <= result.results[key]["test_top1"] <= 100
    last = result.history[-1]
    assert "teacher_val_top1" in last and "val_top1" in last and "ema_val_top1" in last


@pytest.mark.parametrize("overrides, message", [
    (["trainer.params={}", "data.labels_per_class=null"], "trains on unlabeled images too.*data.labels_per_class=N"),
    (["data.labels_per_class=500"], "data.labels_per_class=500 is more than class"),
    (["trainer.params.teacher_model=resnet_nope"], "teacher_model.*resnet_nope"),
    (["model.name=tiny_cnnn"], "tiny_cnnn"),
    (["trainer.params.strong_augment=strongest"], "unknown augment preset 'strongest'.*did you mean 'strong'"),
    (["trainer.params.weak_augment=lite"], "unknown augment preset 'lite'.*trainer.params.weak_augment"),
    (["trainer.params.feedback=sideways"], "feedback must be one of on, off, flipped"),
    (["trainer.params.finetune_epochs=2"], "finetune_epochs=2 leaves no MPL epochs"),
    (["trainer.params.teacher=x"], "has no parameter 'teacher'"),
])
def test_bad_semi_supervised_input_exits_2_with_one_clear_message(overrides, message, capsys, tmp_path):
    code = main(["train", "mpl_digits", *TINY_DIGITS, *overrides, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    import re

    assert re.search(message, err), err
    assert "Traceback" not in err


def test_uda_recipe_without_unlabeled_data_exits_2(capsys, tmp_path):
    code = main(["train", "digits_4labels_uda", "data.labels_per_class=null", "trainer.progress=false",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "trains on unlabeled images too" in capsys.readouterr().err


def test_labels_per_class_keeps_a_stratified_labeled_set_and_the_rest_unlabeled():
    from convrecipes.build import load_datasets
    from convrecipes.recipe import load_recipe

    full = load_datasets(load_recipe("quickstart"))
    ds = load_datasets(load_recipe("quickstart", ["data.labels_per_class=7"]))
    assert torch.bincount(ds.train.labels).tolist() == [7] * 10
    assert len(ds.train) + len(ds.unlabeled) == len(full.train)
    assert torch.equal(ds.val.images, full.val.images), "the validation split is unchanged and labeled"

    # labeled + unlabeled is exactly the training split (as a multiset of images): nothing
    # duplicated, nothing from validation
    def rows(*parts):
        return sorted(map(tuple, torch.cat([d.images.flatten(1) for d in parts]).tolist()))
    assert rows(ds.train, ds.unlabeled) == rows(full.train)
    assert torch.equal(ds.unlabeled.labels >= 0, torch.ones(len(ds.unlabeled), dtype=torch.bool))
    again = load_datasets(load_recipe("quickstart", ["data.labels_per_class=7"]))
    assert torch.equal(again.train.images, ds.train.images), "seeded"
    other = load_datasets(load_recipe("quickstart", ["data.labels_per_class=7", "seed=1"]))
    assert not torch.equal(other.train.images, ds.train.images)


def test_registered_and_importable():
    assert TRAINERS.get("mpl") is MetaPseudoLabelsTrainer and TRAINERS.get("uda") is UDATrainer
    import convrecipes.trainers.meta_pseudo_labels as module

    for word in ("What", "When", "Expected effect", "arxiv.org/abs/2003.10580"):
        assert word in module.__doc__


@pytest.mark.parametrize("part, loss", [("teacher", "teacher_loss"), ("student", "train_loss")])
def test_lr_find_sweeps_the_student_or_the_teacher_and_says_which(part, loss, tmp_path, capsys):
    import json

    out = tmp_path / "lrf"
    code = main(["lr-find", "mpl_digits", *TINY_DIGITS, "--part", part, "--num-iters", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"optimizer {part!r}, loss {loss!r}" in printed
    report = json.loads((out / "lr_find.json").read_text())
    settings = report.get("settings") or report["runs"][0]["settings"]
    assert settings["part"] == part and settings["loss"] == loss


def test_lr_find_of_an_unknown_part_exits_2(tmp_path, capsys):
    code = main(["lr-find", "mpl_digits", *TINY_DIGITS, "--part", "techer", "--num-iters", "4", "--out",
                 str(tmp_path / "x")])
    assert code == 2 and "no optimizer part 'techer'" in capsys.readouterr().err


def test_an_image_folder_with_an_unlabeled_folder_trains_mpl_end_to_end(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from convrecipes.build import build
    from convrecipes.recipe import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path))  # the decode cache goes under ~/.cache
    rng = np.random.RandomState(0)
    root = tmp_path / "shapes"
    for name, count in (("dark", 12), ("bright", 12), ("unlabeled", 40)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            level = {"dark": 40, "bright": 200}.get(name, 40 if i % 2 else 200)
            pixels = np.clip(rng.normal(level, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    recipe = load_recipe("mpl_digits", [
        "data.name=image_folder", f"data.data_dir={root}", "data.unlabeled_folder=unlabeled", "data.image_size=12",
        "data.labels_per_class=null", "data.val_fraction=0.25", "data.batch_size=6", "data.unlabeled_batch_size=12",
        "trainer.progress=false", "trainer.epochs=2", "trainer.params.finetune_epochs=1", "model.kwargs.width=4"])
    exp = build(recipe)
    assert exp.datasets.train.classes == ["bright", "dark"], "the unlabeled folder is not a class"
    assert len(exp.datasets.unlabeled) == 40 and bool((exp.datasets.unlabeled.labels == -1).all())
    history = exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=2)
    assert "pseudo_label_acc" not in history[0], "no hidden labels to compare with"
    assert "teacher_val_top1" in history[-1]
