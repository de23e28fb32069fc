"""Plots that tell the truth (issue 16, item 5).

curves.png: the LR per optimizer step (checked against the schedule formulas written out
here), resumed without duplicates, the best epoch marked where ModelCheckpoint put
best.safetensors, loss parts apart from the validation loss, no top-5 below 10 classes.
lr_find.png / lr_find.json: the auto LR marked, no divergence marker while the smoothed
loss falls, the spread of several seeds drawn, a warning when the rules disagree by more
than 10x, one JSON layout from lr-find and optimizer.lr=auto, and suggestions read off a
zero-lag smoothing that no longer move with the sweep length (against the online EMA's,
which do). Figures are inspected through their artists, not pixels.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from convrecipes.checkpoint import load_checkpoint
from convrecipes.data.loader import InMemoryLoader
from convrecipes.lr_finder import LRFinderResult, RepeatedLRFinderResult, debiased_ema, suggest, sweep_lrs
from convrecipes.lr_finder.result import lr_find_figure
from convrecipes.lr_finder.rules import (
    centred_smooth,
    disagreement_warning,
    divergence_index,
    geometric_mean,
    read_sweep,
)
from convrecipes.schedulers import CosineSchedule
from convrecipes.schedulers.cyclical import CyclicSchedule
from convrecipes.trainers import ModelCheckpoint, SupervisedTrainer
from convrecipes.trainers.curves import (
    LR_STEPS_FILE,
    StepLRLog,
    best_epoch,
    curves_context,
    curves_figure,
    is_loss_part,
    read_lr_steps,
)
from convrecipes.trainers.metrics_log import read_jsonl
from tests.conftest import make_blobs_dataset

TINY = ["model.kwargs.width=4", "trainer.progress=false"]


# -- helpers --------------------------------------------------------------------------------
def _model(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, num_classes))


def _axis(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def _gids(ax) -> list[str]:
    return [artist.get_gid() for artist in [*ax.lines, *ax.collections, *ax.texts] if artist.get_gid()]


def _steps_of_run(run_dir) -> list[dict]:
    return read_jsonl(run_dir / LR_STEPS_FILE)


# -- curves.png: the LR of every optimizer step ------------------------------------------------
def test_warmup_cosine_lr_is_recorded_per_step_and_drawn(tmp_path):
    """12 steps (3 epochs x 4), 3 of warmup from 0, then a half cosine to 0 over the other 9:
    the LR optimizer step s (from 1) trains with is the schedule's value at k = s - 1."""
    ds = make_blobs_dataset(n=64)
    model = _model()
    base, warmup, total = 0.2, 3, 12
    opt = torch.optim.SGD(model.parameters(), lr=base)
    sched = CosineSchedule(opt, total_steps=total, warmup_steps=warmup)
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, run_dir=tmp_path, progress=False)
    trainer.fit(InMemoryLoader(ds, 16, seed=0), epochs=3)

    def expected(k: int) -> float:  # linear warmup from 0, then cosine annealing (Loshchilov & Hutter)
        if k < warmup:
            return base * k / warmup
        return base * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2

    records = _steps_of_run(tmp_path)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert [r["lr"] for r in records] == pytest.approx([expected(s - 1) for s in range(1, total + 1)], abs=1e-12)
    assert [r["epoch"] for r in records] == pytest.approx([s / 4 for s in range(1, total + 1)])
    # drawn per step: every recorded point is on the LR panel, not one point per epoch
    fig = curves_figure(read_jsonl(tmp_path / "metrics.jsonl"), **curves_context(trainer))
    line = next(l for l in _axis(fig, "learning rate").lines if l.get_gid() == "lr")
    assert list(line.get_ydata()) == pytest.approx([expected(s - 1) for s in range(1, total + 1)], abs=1e-12)
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_cyclic_lr_of_every_part_is_recorded_per_step():
    """Smith's triangular2 written out: cycle = floor(1 + k / 2s), x = |k / s - 2 cycle + 1|,
    lr = base + (max - base) max(0, 1 - x) / 2^(cycle - 1). A second optimizer part with a
    constant LR is recorded under lr_<part>."""
    import tempfile
    from pathlib import Path

    ds = make_blobs_dataset(n=64)
    model, aux = _model(), nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux_opt = torch.optim.SGD(aux.parameters(), lr=0.3)
    lo, hi, s = 0.01, 0.1, 3
    sched = CyclicSchedule(opt, base_lr=lo, max_lr=hi, step_size_up=s, mode="triangular2")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SupervisedTrainer(models={"model": model, "aux": aux}, optimizers={"model": opt, "aux": aux_opt},
                                    schedulers={"model": sched}, loss_fn=nn.CrossEntropyLoss(), run_dir=tmp,
                                    progress=False)
        trainer.fit(InMemoryLoader(ds, 8, seed=0), epochs=2)  # 16 steps: almost three cycles
        records = read_lr_steps(Path(tmp))

    def smith(k: int) -> float:
        cycle = math.floor(1 + k / (2 * s))
        x = abs(k / s - 2 * cycle + 1)
        return lo + (hi - lo) * max(0.0, 1 - x) / 2 ** (cycle - 1)

    assert [r["step"] for r in records] == list(range(1, 17))
    assert [r["lr"] for r in records] == pytest.approx([smith(k) for k in range(16)], rel=1e-9)
    assert [r["lr_aux"] for r in records] == [0.3] * 16
    fig = curves_figure([{"epoch": 1, "lr": 0.1}, {"epoch": 2, "lr": 0.1}], lr_steps=records, monitor=None)
    drawn = {l.get_gid(): l for l in _axis(fig, "learning rate").lines}
    assert set(drawn) == {"lr", "lr_aux"} and len(drawn["lr"].get_xdata()) == 16
    assert max(drawn["lr"].get_ydata()) == pytest.approx(hi) and min(drawn["lr"].get_ydata()) == pytest.approx(lo)


def test_a_long_run_is_thinned_to_every_kth_step(tmp_path, monkeypatch):
    import convrecipes.trainers.curves as curves

    assert StepLRLog.start(tmp_path / "a.jsonl", 0, 4 * curves.MAX_LR_POINTS + 1).stride == 5
    monkeypatch.setattr(curves, "MAX_LR_POINTS", 5)
    ds = make_blobs_dataset(n=64)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CosineSchedule(opt, total_steps=12)
    SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, run_dir=tmp_path / "run",
                      progress=False).fit(InMemoryLoader(ds, 16, seed=0), epochs=3)
    records = _steps_of_run(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 4, 7, 10]  # 12 steps, at most 5 points: every 3rd
    assert [r["lr"] for r in records] == pytest.approx(
        [0.1 * (1 + math.cos(math.pi * (s - 1) / 12)) / 2 for s in (1, 4, 7, 10)], abs=1e-12)


def test_a_resumed_run_continues_the_lr_curve_without_duplicates(tmp_path):
    """Kill after epoch 3 of 4 with last.safetensors still at epoch 1 (its LR records for
    epochs 2-3 written): the resume drops them, retrains, and the file equals an
    uninterrupted run's."""
    ds = make_blobs_dataset(n=64)

    def make(run_dir, callbacks=()):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = CosineSchedule(opt, total_steps=16, warmup_steps=4)
        return SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, run_dir=run_dir,
                                 callbacks=list(callbacks), progress=False, seed=1)

    make(tmp_path / "plain").fit(InMemoryLoader(ds, 16, seed=0), epochs=4)

    class KeepEpochOne(ModelCheckpoint):
        def on_epoch_end(self, trainer, metrics):
            super().on_epoch_end(trainer, metrics)
            if metrics["epoch"] == 1:
                shutil.copy(self.last_path, tmp_path / "epoch1.safetensors")

    run = tmp_path / "run"
    make(run, [KeepEpochOne(run, monitor=None)]).fit(InMemoryLoader(ds, 16, seed=0), epochs=3)
    assert [r["step"] for r in _steps_of_run(run)] == list(range(1, 13))
    make(run, [ModelCheckpoint(run, monitor=None)]).fit(InMemoryLoader(ds, 16, seed=0), epochs=4,
                                                       resume_from=tmp_path / "epoch1.safetensors")
    resumed, plain = _steps_of_run(run), _steps_of_run(tmp_path / "plain")
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert resumed == plain


# -- curves.png: best epoch, loss parts, top-5 --------------------------------------------------
def test_best_epoch_is_the_one_model_checkpoint_saved_and_is_marked(tmp_path):
    ds, val = make_blobs_dataset(n=64, seed=0), make_blobs_dataset(n=32, seed=1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # lively enough for val_loss to go up and down
    checkpoint = ModelCheckpoint(tmp_path, monitor="val_loss", mode="min")
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), callbacks=[checkpoint], run_dir=tmp_path,
                                progress=False)
    trainer.fit(InMemoryLoader(ds, 16, seed=0), InMemoryLoader(val, 16), epochs=5)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    _, meta = load_checkpoint(tmp_path / "best.safetensors")
    epoch, value = best_epoch(records, "val_loss", "min")
    assert epoch == meta["epoch"] and value == pytest.approx(meta["metrics"]["val_loss"])
    fig = curves_figure(records, **curves_context(trainer))
    loss_ax = _axis(fig, "loss")
    star = next(l for l in loss_ax.lines if l.get_gid() == "best_point")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (epoch, pytest.approx(value))
    for ax in fig.axes:  # the dashed line on every panel
        line = next(l for l in ax.lines if l.get_gid() == "best_epoch")
        assert list(line.get_xdata()) == [epoch, epoch]
    # ties go to the first epoch (ModelCheckpoint keeps a new best only on strict improvement);
    # epochs without the metric or with NaN are skipped
    rows = [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.0}, {"epoch": 3},
            {"epoch": 4, "val_top1": 60.0}, {"epoch": 5, "val_top1": math.nan}]
    assert best_epoch(rows, "val_top1", "max") == (2, 60.0)
    assert best_epoch(rows, "val_top1", "min") == (1, 50.0)
    assert best_epoch(rows, "val_loss") is None


def test_loss_parts_are_drawn_apart_from_the_validation_loss():
    records = [{"epoch": e, "train_loss": 1.0 / e, "kd": 0.5 / e, "task": 0.7 / e, "hint": 0.1, "task_center": 0.2,
                "center/active_fraction": 0.3, "uda_mask": 0.9, "pseudo_label_acc": 0.8, "h": 0.01,
                "branch_0": 1.0, "lr": 0.1, "lr_teacher": 0.05, "images_per_s": 100.0, "train_time_s": 3.0,
                "val_loss": 1.2 / e, "val_top1": 50.0 + e, "ema_val_loss": 1.1 / e, "teacher_val_loss": 0.9}
               for e in (1, 2, 3)]
    fig = curves_figure(records, monitor="val_top1")
    lines = lambda title: {l.get_gid() for l in _axis(fig, title).lines} - {"best_epoch", "best_point"}  # noqa: E731
    assert lines("loss") == {"train_loss", "val_loss", "ema_val_loss", "teacher_val_loss"}
    assert lines("training loss parts") == {"kd", "task", "hint", "task_center"}
    # MPL's step losses are parts of its training, not validation losses
    assert all(is_loss_part(k) for k in ("student_loss", "teacher_loss", "teacher_mpl_loss", "finetune_loss"))
    assert not any(is_loss_part(k) for k in ("val_loss", "train_loss", "lr_teacher", "uda_weight", "flipped_pred_true"))
    # a run without parts gets no parts panel
    plain = curves_figure([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_top1": 50.0, "lr": 0.1}])
    assert [ax.get_title() for ax in plain.axes] == ["loss", "accuracy (%)", "learning rate"]


def test_a_distillation_run_plots_kd_and_task_as_parts(tmp_path):
    from convrecipes.trainers import DistillationTrainer

    ds, val = make_blobs_dataset(n=32), make_blobs_dataset(n=16, seed=1)
    teacher, student = _model(seed=1), _model(seed=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = DistillationTrainer(student, opt, nn.CrossEntropyLoss(), teacher=teacher, run_dir=tmp_path,
                                  progress=False)
    trainer.fit(InMemoryLoader(ds, 16, seed=0), InMemoryLoader(val, 16), epochs=2)
    fig = curves_figure(read_jsonl(tmp_path / "metrics.jsonl"), **curves_context(trainer))
    parts = {l.get_gid() for l in _axis(fig, "training loss parts").lines} - {"best_epoch", "best_point"}
    assert parts == {"kd", "task"}
    assert {l.get_gid() for l in _axis(fig, "loss").lines} >= {"train_loss", "val_loss"}
    assert not {"kd", "task"} & {l.get_gid() for l in _axis(fig, "loss").lines}


@pytest.mark.parametrize("num_classes, drawn", [(6, False), (9, False), (10, True), (None, True)])
def test_top5_is_left_out_below_ten_classes(num_classes, drawn):
    records = [{"epoch": 1, "val_top1": 50.0, "val_top5": 99.0, "ema_val_top5": 99.5}]
    fig = curves_figure(records, num_classes=num_classes)
    gids = {l.get_gid() for l in _axis(fig, "accuracy (%)").lines}
    assert "val_top1" in gids
    assert ("val_top5" in gids) is drawn and ("ema_val_top5" in gids) is drawn


def test_a_six_class_run_records_top5_but_does_not_draw_it(tmp_path):
    ds, val = make_blobs_dataset(n=48, num_classes=6), make_blobs_dataset(n=24, num_classes=6, seed=1)
    model = _model(num_classes=6)
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                                run_dir=tmp_path, progress=False, checkpoint_metadata={"classes": ds.classes})
    trainer.fit(InMemoryLoader(ds, 16, seed=0), InMemoryLoader(val, 8), epochs=1)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert "val_top5" in records[0]  # evaluation still reports it
    fig = curves_figure(records, **curves_context(trainer))
    assert "val_top5" not in {l.get_gid() for l in _axis(fig, "accuracy (%)").lines}


# -- lr_find: the zero-lag reading ---------------------------------------------------------------
def _synthetic_loss(log_lr: np.ndarray) -> np.ndarray:
    """A plateau at 2.3, a descent of 1.8 centred on lr 1e-2 (steepest there), and an
    explosion: the lowest loss is at lr 0.153."""
    return 2.3 - 1.8 / (1 + np.exp(-(log_lr + 2.0) / 0.35)) + 0.5 * np.exp(2.5 * log_lr)


def _synthetic_sweep(num_iters: int, seed: int, sigma: float = 0.02):
    """The sweep ``find_lr`` would record on that curve with Gaussian noise: exp LRs
    1e-7 -> 10, stopped once the online debiased EMA (beta 0.98) exceeds 4x its best.
    Returns ``(EMA reading, zero-lag reading)`` of the suggestions."""
    lrs = sweep_lrs(1e-7, 10.0, num_iters)
    losses = _synthetic_loss(np.log10(lrs)) + sigma * np.random.default_rng(seed).standard_normal(num_iters)
    ema = debiased_ema(losses, 0.98)
    stop, reason, best = num_iters, "completed", math.inf
    for i, value in enumerate(ema):
        best = min(best, value)
        if i > 0 and value > 4 * best:
            stop, reason = i + 1, "diverged"
            break
    old, _, _ = suggest(lrs[:stop], ema[:stop], num_iters, reason)
    _, new, _, _ = read_sweep(lrs[:stop], list(losses[:stop]), num_iters, reason)
    return old, new


RULES = ("steepest", "valley", "min_div_10", "consensus", "cyclic_max")
FACTOR = 1.5  # the stated tolerance between a 100-step and a 300-step sweep


def test_suggestions_no_longer_move_with_the_sweep_length():
    """Same curve, same LR range, 100 vs 300 steps (geometric mean of 3 noise seeds each):
    every zero-lag suggestion within 1.5x between the lengths. Read off the online EMA,
    whose memory of ~49 steps is 4 decades at 100 steps but 1.3 at 300, cyclic_max and
    min_div_10 move by more than that (so this test can fail)."""
    readings = {n: [_synthetic_sweep(n, 10 * k + (n == 300)) for k in range(3)] for n in (100, 300)}
    mean = {(n, which): {k: geometric_mean([r[which][k] for r in readings[n]]) for k in RULES}
            for n in (100, 300) for which in (0, 1)}
    ratio = lambda which, k: max(mean[(100, which)][k], mean[(300, which)][k]) / min(  # noqa: E731
        mean[(100, which)][k], mean[(300, which)][k])
    for rule in RULES:
        assert ratio(1, rule) <= FACTOR, (rule, mean[(100, 1)][rule], mean[(300, 1)][rule])
    for rule in ("cyclic_max", "min_div_10"):
        assert ratio(0, rule) > FACTOR, (rule, mean[(100, 0)][rule], mean[(300, 0)][rule])
    # and they are where the curve puts them: its minimum / 10 and its steepest point, while
    # the EMA's lag puts its minimum an order of magnitude too high
    x = np.linspace(-7, 1, 200001)
    y = _synthetic_loss(x)
    true_min, true_steepest = 10 ** x[np.argmin(y)], 10 ** x[np.argmin(np.gradient(y, x))]
    for n in (100, 300):
        assert mean[(n, 1)]["min_div_10"] == pytest.approx(true_min / 10, rel=0.3)
        assert mean[(n, 1)]["steepest"] == pytest.approx(true_steepest, rel=0.4)
    assert mean[(100, 0)]["min_div_10"] > 5 * true_min / 10


def test_centred_smoothing_has_no_lag_and_a_window_in_decades():
    # a straight line in log LR is left as it is (a centred window has no bias there), the
    # EMA lags behind it
    lrs = sweep_lrs(1e-6, 1.0, 61)
    line = [3.0 - 0.4 * math.log10(v) for v in lrs]
    assert centred_smooth(lrs, line) == pytest.approx(line, abs=1e-12)
    assert debiased_ema(line, 0.98)[-1] > line[-1] + 0.5
    # the median removes a lone spike: 0.5 decades hold 5 points of a 0.1-decade grid
    spiky = [1.0] * 41
    spiky[20] = 50.0
    assert max(centred_smooth(sweep_lrs(1e-3, 1e1, 41), spiky)) == pytest.approx(1.0)
    # NaN after a blow-up stays NaN, the finite part is smoothed
    out = centred_smooth(lrs[:5], [1.0, 1.0, 1.0, 1.0, math.nan])
    assert out[:4] == [1.0] * 4 and math.isnan(out[4])


# -- lr_find.png ------------------------------------------------------------------------------------
def _result(losses, stop_reason="completed", num_iters=None, seed=0):
    n = len(losses)
    lrs = sweep_lrs(1e-7, 10.0, num_iters or n)[:n]
    centred, sugg, points, warnings = read_sweep(lrs, losses, num_iters or n, stop_reason)
    return LRFinderResult(lrs=lrs, losses=list(losses), smoothed=debiased_ema(losses), suggestions=sugg,
                          warnings=warnings, global_batch_size=32, stop_reason=stop_reason,
                          settings={"mode": "exp", "num_iters": num_iters or n, "seed": seed,
                                    "start_lr": 1e-7, "end_lr": 10.0, "per_process_batch_size": 32,
                                    "num_processes": 1, "grad_accum_steps": 1, "part": "model"},
                          points=points, centred=centred)


def _noisy_curve(n=100, seed=0, explode=True):
    x = np.log10(sweep_lrs(1e-7, 10.0, n))
    y = _synthetic_loss(x) if explode else 2.3 - 1.8 / (1 + np.exp(-(x + 2.0) / 0.35))
    return list(y + 0.02 * np.random.default_rng(seed).standard_normal(n))


def test_the_lr_that_auto_uses_is_marked():
    result = _result(_noisy_curve())
    for rule in ("cyclic_max", "consensus"):
        ax = result.figure(auto_rule=rule).axes[0]
        auto = [l for l in ax.lines if l.get_gid() == "auto_lr"]
        assert len(auto) == 1 and list(auto[0].get_xdata()) == [result.suggestions[rule]] * 2
        assert rule in auto[0].get_label()
    assert "auto_lr" not in _gids(result.figure().axes[0])


def test_no_divergence_marker_while_the_smoothed_loss_still_falls():
    # stopped by a NaN while the loss was still falling: nothing diverged before it
    falling = _noisy_curve(n=100, explode=False)[:80] + [math.nan]
    result = _result(falling, stop_reason="non_finite", num_iters=100)
    assert result.divergence_lr is None
    assert "divergence" not in _gids(result.figure().axes[0])
    # a real divergence: the marker sits where the smoothed loss turns up, and it only rises after
    losses = _noisy_curve(n=100)[:95]
    result = _result(losses, stop_reason="diverged", num_iters=100)
    ax = result.figure().axes[0]
    marker = next(l for l in ax.lines if l.get_gid() == "divergence")
    i = result.lrs.index(marker.get_xdata()[0])
    curve = np.asarray(result.centred)
    assert i == int(np.argmin(curve)) and curve[i] < curve[i - 1] and all(curve[i:] >= curve[i])
    # the old marker, the minimum of a 5-point raw average, could sit where the plotted curve still fell
    assert divergence_index([3.0, 2.0, 1.0]) is None


def test_repeat_draws_the_spread_between_seeds():
    runs = [_result(_noisy_curve(seed=s) if s else [v + 0.1 for v in _noisy_curve(seed=s)], seed=s)
            for s in range(3)]
    rep = RepeatedLRFinderResult.from_runs(runs, [0, 1, 2])
    ax = rep.figure(auto_rule="cyclic_max").axes[0]
    band = next(c for c in ax.collections if c.get_gid() == "band")
    assert "3 seeds" in band.get_label()
    # the band reaches, at each LR, from the lowest to the highest seed's smoothed loss
    # (fill_between's polygon: a start point, the lower edge left to right, the upper edge back)
    verts = band.get_paths()[0].vertices
    grid_lr, lower, upper = verts[1:201, 0], verts[1:201, 1], verts[202:402, 1][::-1]
    curves = np.stack([np.interp(np.log(grid_lr), np.log(run.lrs), run.centred) for run in runs])
    assert lower == pytest.approx(curves.min(axis=0), abs=1e-9)
    assert upper == pytest.approx(curves.max(axis=0), abs=1e-9)
    assert (upper - lower).max() > 0.09  # seed 0 sits 0.1 above the others
    assert len([l for l in ax.lines if l.get_gid() == "curve"]) == 3
    # each suggestion's range over the seeds as a horizontal bar from its min to its max
    bars = {c.get_label(): c for c in ax.containers}
    for key in ("cyclic_max", "min_div_10"):
        segment = bars[f"_spread:{key}"].lines[2][0].get_segments()[0]
        assert sorted(segment[:, 0]) == pytest.approx([rep.spread[key]["min"], rep.spread[key]["max"]])


def test_rules_that_disagree_by_more_than_10x_warn_in_the_output_and_on_the_plot():
    from convrecipes.lr_finder.command import format_report

    # a short steep drop at lr 1e-4, then a long slow decline to a minimum at lr 1:
    # steepest sits 1000x below min / 10
    x = np.log10(sweep_lrs(1e-7, 10.0, 100))
    curve = np.where(x < -4.2, 2.3, np.where(x < -3.8, 2.3 - 2.0 * (x + 4.2), 1.5 - 0.15 * (x + 3.8)))
    curve = np.where(x > 0, curve[np.argmin(np.abs(x))] + 2.0 * x ** 2, curve)
    result = _result(list(curve))
    s = result.suggestions
    assert s["min_div_10"] / s["steepest"] > 100
    assert any("disagree by" in w for w in result.warnings)
    report = format_report(RepeatedLRFinderResult.from_runs([result], [0]), "synthetic")
    assert "warning: the LR rules disagree by" in report
    text = next(t for t in result.figure().axes[0].texts if t.get_gid() == "disagreement")
    assert "disagree by" in text.get_text()
    # within 10x: no warning, no text
    assert disagreement_warning({"steepest": 0.1, "valley": 0.02, "min_div_10": 0.05}) is None
    assert "disagree by 12x" in disagreement_warning({"steepest": 0.12, "valley": 0.01, "min_div_10": 0.05})
    calm = _result(_noisy_curve())
    assert not any("disagree" in w for w in calm.warnings)
    assert "disagreement" not in _gids(calm.figure().axes[0])


def test_lr_find_and_optimizer_lr_auto_write_one_json_layout(tmp_path):
    from convrecipes.cli import main

    assert main(["lr-find", "quickstart", *TINY, "--num-iters", "30", "--out", str(tmp_path / "find")]) == 0
    assert main(["train", "quickstart", "optimizer.lr=auto", "trainer.epochs=1", "schedule.warmup_epochs=0", *TINY,
                 "--run-dir", str(tmp_path / "auto")]) == 0
    found = json.loads((tmp_path / "find" / "lr_find.json").read_text())
    auto = json.loads((tmp_path / "auto" / "lr_find.json").read_text())
    assert list(found) == list(auto)
    assert set(found) >= {"recipe", "overrides", "auto", "suggestions", "spread", "agreement", "warnings",
                          "global_batch_size", "seeds", "runs"}
    assert list(found["runs"][0]) == list(auto["runs"][0])
    assert set(found["auto"]) <= set(auto["auto"]) and found["auto"]["rule"] == auto["auto"]["rule"] == "cyclic_max"
    assert found["auto"]["applied"] is False and auto["auto"]["applied"] is True
    assert found["auto"]["suggested_lr"] == found["suggestions"]["cyclic_max"]
    # a single sweep's aggregate is the sweep itself
    assert auto["suggestions"] == auto["runs"][0]["suggestions"] and auto["seeds"] == [0]
