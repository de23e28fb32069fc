"""The LR range test: exact restoration, a known divergence LR, the sweep and smoothing
formulas, the suggestion rules on constructed curves, the CLI and optimizer.lr=auto."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, TensorDataset

from convrecipes.augment import build_augment
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import DataError, RecipeError
from convrecipes.schedulers import CosineSchedule
from convrecipes.lr_finder import (
    agreeing_rules,
    cyclic_max_index,
    debiased_ema,
    find_lr,
    find_lr_repeated,
    steepest_index,
    suggest,
    sweep_lrs,
    valley_index,
)
from convrecipes.trainers import ModelCheckpoint, StepOutput, SupervisedTrainer
from tests.conftest import make_blobs_dataset, run_launched

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["model.kwargs.width=4", "trainer.progress=false"]


# -- helpers --------------------------------------------------------------------------------
def _cnn(seed: int = 0) -> nn.Module:
    """BatchNorm (running statistics) and dropout (RNG) make restoration non-trivial."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(4 * 64, 4))


def _trainer(ds, tmp_path=None, **kw) -> SupervisedTrainer:
    model = _cnn()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "lr": 0.025}],
                          lr=0.05, momentum=0.9, nesterov=True)
    sched = CosineSchedule(opt, total_steps=12, warmup_steps=2)
    callbacks = [ModelCheckpoint(tmp_path, monitor=None, every_n_steps=1)] if tmp_path is not None else []
    augment = build_augment("light", (8, 8), 1, [0.3], [0.3], ds.num_classes, hflip=True)
    return SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, augment=augment, ema_decay=0.9,
                             grad_accum_steps=2, grad_clip=1.0, callbacks=callbacks, progress=False, seed=3, **kw)


def _assert_same(a, b, where="state"):
    """Recursive equality with torch.equal for tensors (bit-identical)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _snapshot(trainer):
    return copy.deepcopy(trainer.state_dict())


# -- (a) exact restoration --------------------------------------------------------------------
def test_training_after_find_lr_is_bit_identical_to_training_without_it(tmp_path):
    ds = make_blobs_dataset(n=96)
    plain = _trainer(ds)
    plain_loader = InMemoryLoader(ds, 16, seed=1)
    plain.fit(plain_loader, epochs=2)
    plain_rng = torch.get_rng_state()

    swept = _trainer(ds, tmp_path=tmp_path / "ckpt")
    loader = InMemoryLoader(ds, 16, seed=1)
    result = find_lr(swept, loader, num_iters=15)
    assert len(result.lrs) > 5
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir()), "the sweep wrote a checkpoint"
    assert swept.global_step == 0 and swept.scheduler.last_step == 0
    swept.fit(loader, epochs=2)

    assert plain.global_step == swept.global_step == 6
    _assert_same(plain.unwrapped_model.state_dict(), swept.unwrapped_model.state_dict(), "model")
    _assert_same(plain.ema.module.state_dict(), swept.ema.module.state_dict(), "ema")
    _assert_same(plain.optimizer.state_dict(), swept.optimizer.state_dict(), "optimizer")  # momentum buffers
    _assert_same(plain.scheduler.state_dict(), swept.scheduler.state_dict(), "scheduler")
    assert torch.equal(plain_rng, torch.get_rng_state())


def test_find_lr_in_mid_training_restores_every_piece_of_state_and_the_rng(tmp_path):
    ds = make_blobs_dataset(n=96)
    trainer = _trainer(ds)
    loader = InMemoryLoader(ds, 16, seed=1)
    trainer.fit(loader, epochs=1)
    trainer.batch_in_epoch = 2  # as if stopped inside an epoch: the sweep must not move it
    loader.set_epoch(5, start_batch=1)
    random.seed(7)
    np.random.seed(7)
    before = _snapshot(trainer)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    modes = [m.training for m in trainer.model.modules()]
    trainer.model.eval()  # the sweep trains in train mode and must give eval mode back
    find_lr(trainer, loader, num_iters=12)
    assert not trainer.model.training
    trainer.model.train()
    assert [m.training for m in trainer.model.modules()] == modes
    _assert_same(before, _snapshot(trainer))  # model, EMA, optimizer, schedule, loss, progress, callbacks, RNG
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate() and np.array_equal(rng[2], np.random.get_state()[1])
    assert (loader.epoch, loader.start_batch, loader.seed) == (5, 1, 1)
    assert all(p.grad is None for p in trainer.model.parameters())
    # the RNG continues exactly where it was: the next draws are the ones it would have made
    torch.set_rng_state(rng[0])
    expected = torch.rand(4)
    torch.set_rng_state(rng[0])
    find_lr(trainer, loader, num_iters=4)
    assert torch.equal(torch.rand(4), expected)


class _CompositeTrainer(SupervisedTrainer):
    """A training step with an extra term and a record of each group's LR at every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_lrs: list[list[float]] = []

    def training_step(self, batch):
        self.seen_lrs.append([float(g["lr"]) for g in self.optimizer.param_groups])
        out = super().training_step(batch)
        return StepOutput(out.loss + 100.0, out.logs)


def test_the_sweep_runs_the_trainers_own_step_and_keeps_group_ratios():
    ds = make_blobs_dataset(n=64)
    model = _cnn()
    opt = torch.optim.SGD([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:],
                                                                      "lr": 0.5}], lr=0.1)
    # warmup from 0 sets the current LR to 0: the ratios must come from the base LRs
    sched = CosineSchedule(opt, total_steps=10, warmup_steps=5)
    trainer = _CompositeTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, progress=False)
    result = find_lr(trainer, InMemoryLoader(ds, 16), start_lr=1e-4, end_lr=1e-2, num_iters=6)
    assert min(result.losses) > 100.0, "the subclass's objective is what is swept"
    assert [s[0] for s in trainer.seen_lrs] == pytest.approx(result.lrs, rel=1e-12)
    assert all(s[1] == pytest.approx(5.0 * s[0], rel=1e-12) for s in trainer.seen_lrs)
    assert result.settings["param_group_ratios"] == pytest.approx([1.0, 5.0])
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # the warmup's step-0 LRs, restored


def _distiller(ds):
    from convrecipes.models import create_model
    from convrecipes.trainers import DistillationTrainer

    torch.manual_seed(3)
    teacher = create_model("small_resnet8", 1, ds.num_classes, width=4)
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 1, ds.num_classes, width=4, drop_rate=0.2)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    aug = build_augment("light", (8, 8), 1, [0.3], [0.3], ds.num_classes, hflip=True)
    return DistillationTrainer(student, opt, nn.CrossEntropyLoss(), teacher=teacher, temperature=2.0, alpha=0.8,
                               hint_layers=("blocks.1", "features.4"), input_shape=(1, 8, 8),
                               scheduler=CosineSchedule(opt, total_steps=12, warmup_steps=2), augment=aug,
                               ema_decay=0.9, progress=False, seed=7)


def test_a_distillation_sweep_leaves_student_teacher_and_hint_head_as_they_were():
    """The composite objective (KD + task + hint, with its own projection head in the
    optimizer) is swept as trained, and training afterwards is bit-identical."""
    ds = make_blobs_dataset(n=64)
    plain = _distiller(ds)
    plain.fit(InMemoryLoader(ds, 16, seed=0), epochs=2)
    swept = _distiller(ds)
    teacher_before = copy.deepcopy(swept.teacher.state_dict())
    result = find_lr(swept, InMemoryLoader(ds, 16, seed=0), num_iters=10, end_lr=1.0)
    assert len(result.lrs) >= 5 and len(result.settings["param_group_ratios"]) == len(swept.optimizer.param_groups)
    _assert_same(teacher_before, swept.teacher.state_dict(), "teacher")
    assert not swept.teacher.training
    swept.fit(InMemoryLoader(ds, 16, seed=0), epochs=2)
    _assert_same(plain.state_dict()["model"], swept.state_dict()["model"], "student")
    _assert_same(plain.state_dict()["parts"], swept.state_dict()["parts"], "hint projection")
    _assert_same(plain.state_dict()["optimizer"], swept.state_dict()["optimizer"], "optimizer")


# -- (b) a problem with a known answer --------------------------------------------------------
@pytest.mark.parametrize("mode,start,end", [("exp", 1e-4, 10.0), ("linear", 1e-3, 1.0)])
def test_divergence_point_of_linear_regression_is_two_over_the_largest_curvature(mode, start, end):
    """MSE of a linear model: Hessian H = 2/n X~^T X~ (X~ = [X, 1] for the bias). Gradient
    descent diverges once lr > 2 / lambda_max(H). SGD on minibatches (as a range test runs)
    keeps exciting the unstable direction, so the loss shows the divergence promptly."""
    g = torch.Generator().manual_seed(0)
    n, d = 2048, 4
    x = torch.randn(n, d, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    y = x @ torch.randn(d, generator=g) + 0.5 + 0.3 * torch.randn(n, generator=g)
    xt = torch.cat([x, torch.ones(n, 1)], dim=1)
    lr_star = 2.0 / torch.linalg.eigvalsh(2.0 / n * xt.T @ xt).max().item()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 1), nn.Flatten(0))
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    result = find_lr(trainer, loader, start_lr=start, end_lr=end, num_iters=100, mode=mode, seed=0)
    assert result.stop_reason == "diverged"
    assert lr_star / 2 <= result.divergence_lr <= 2 * lr_star, (result.divergence_lr, lr_star)
    # the stop rule needs the smoothed loss to reach 4x its best: later, never earlier
    assert lr_star <= result.stop_lr <= 4 * lr_star, (result.stop_lr, lr_star)
    if mode == "exp":  # the rules are fastai's, made for exponential sweeps
        assert result.suggestions["min_div_10"] < lr_star and result.suggestions["valley"] < lr_star


# -- (c) the sweep's LRs ------------------------------------------------------------------------
def test_exp_and_linear_sweeps_follow_their_formulas():
    lrs = sweep_lrs(1e-7, 10.0, 100, "exp")
    assert lrs[0] == pytest.approx(1e-7, rel=1e-12) and lrs[-1] == pytest.approx(10.0, rel=1e-12)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10 ** (8 / 99)] * 99, rel=1e-9)  # equal ratios: 8 decades in 99 steps
    lin = sweep_lrs(0.01, 1.0, 34, "linear")
    assert lin[0] == pytest.approx(0.01) and lin[-1] == pytest.approx(1.0)
    assert np.diff(lin) == pytest.approx([0.99 / 33] * 33, rel=1e-9)
    for bad in [dict(start_lr=1.0, end_lr=0.1), dict(start_lr=0.0), dict(num_iters=1), dict(mode="cosine")]:
        args = {**dict(start_lr=1e-7, end_lr=10.0, num_iters=10, mode="exp"), **bad}
        with pytest.raises(RecipeError):
            sweep_lrs(**args)


# -- (d) the debiased EMA -----------------------------------------------------------------------
def test_debiased_ema_matches_the_closed_form_and_the_recorded_curve():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    beta = 0.9
    # closed form: sum_k (1 - beta) beta^(i-k) x_k / (1 - beta^(i+1))
    expected = [sum((1 - beta) * beta ** (i - k) * values[k] for k in range(i + 1)) / (1 - beta ** (i + 1))
                for i in range(len(values))]
    assert debiased_ema(values, beta) == pytest.approx(expected, rel=1e-12)
    assert debiased_ema(values, beta)[0] == values[0]  # seeded with the first loss
    ds = make_blobs_dataset(n=64)
    model = _cnn()
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                                progress=False)
    result = find_lr(trainer, InMemoryLoader(ds, 16), num_iters=10, smooth_beta=0.7, end_lr=1.0)
    assert result.smoothed == pytest.approx(debiased_ema(result.losses, 0.7), rel=1e-12)


# -- (e) suggestions on constructed curves -----------------------------------------------------
def _constructed_curve(n: int = 200):
    """Piecewise in x = log10(lr) on [-6, 1]: a slightly rising plateau to -3, a descent with
    slopes -0.2 on [-3, -2], -1.0 on [-2, -1.5] (the steepest) and -0.2 on [-1.5, -1], then a
    quadratic rise. Minimum at x = -1."""
    x = np.linspace(-6, 1, n)

    def loss(v):
        if v < -3:
            return 2.0 + 0.001 * (v + 6)
        base = 2.003
        if v < -2:
            return base - 0.2 * (v + 3)
        if v < -1.5:
            return base - 0.2 - 1.0 * (v + 2)
        if v < -1:
            return base - 0.7 - 0.2 * (v + 1.5)
        return base - 0.8 + 2.0 * (v + 1) ** 2

    return x, [10.0 ** v for v in x], [loss(v) for v in x]


def test_suggestions_land_where_the_constructed_curve_puts_them():
    x, lrs, curve = _constructed_curve()
    step = x[1] - x[0]
    sugg, points, warnings = suggest(lrs, curve, num_iters=len(lrs))
    assert warnings == []
    log = {k: math.log10(v) for k, v in sugg.items()}
    assert -2.0 - step <= log["steepest"] <= -1.5  # inside the steepest segment
    assert log["min_div_10"] == pytest.approx(-1.0 - 1.0, abs=step)  # minimum at -1, divided by 10
    # valley: the curve is first flattened above the level where it has covered 10% of its
    # descent (2.003 - 0.1 * 0.8 = 1.923, reached at x = -3 + 0.08 / 0.2 = -2.6), so the
    # longest decreasing run spans [-2.6, -1] (+1 flattened point); fastai takes ~ its middle
    assert log["valley"] == pytest.approx((-2.6 - 1.0) / 2, abs=3 * step)
    # cyclic max: 80% of the descent 2.003 -> 1.203 is covered at 1.363, on the steep segment at x = -1.56
    assert log["cyclic_max"] == pytest.approx(-1.56, abs=step)
    assert sugg["cyclic_base"] == pytest.approx(sugg["cyclic_max"] / 4)
    assert points["min_div_10"] == int(np.argmin(curve))
    # consensus: the geometric mean of the three rules, written out
    expected = (sugg["steepest"] * sugg["valley"] * sugg["min_div_10"]) ** (1 / 3)
    assert sugg["consensus"] == pytest.approx(expected, rel=1e-12)


def test_rules_on_small_hand_made_curves():
    assert steepest_index([1, 10, 100, 1000], [5.0, 4.0, 1.0, 0.5]) == 1  # drop of 3 per decade
    assert steepest_index([1, 10, 100], [1.0, 2.0, 3.0]) is None
    # longest strictly decreasing subsequence: 5.1 (index 1) down to 1.0 (index 8), 8 points;
    # fastai: start = 8 - 8 = 0, sections = 8 / 3, index = 0 + int(8/3) + int(8/6) = 3
    curve = [5.0, 5.1, 5.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0, 3.0, 9.0]
    assert valley_index(curve) == 0 + 2 + 1
    assert valley_index([1.0, 2.0, 3.0]) is None
    assert cyclic_max_index([4.0, 5.0, 3.0, 1.5, 1.0, 2.0]) == 3  # 5 -> 1: 80% covered at 1.8
    assert agreeing_rules({"a": 1.0, "b": 1.9, "c": 3.0, "d": None})["largest_group"] == ["a", "b"]
    assert agreeing_rules({"a": 1.0, "b": 1.9, "c": 3.0})["pairs"] == [["a", "b"], ["b", "c"]]
    assert agreeing_rules({"a": 1.0, "b": 10.0})["largest_group"] == []


def test_warnings_for_a_flat_curve_and_an_immediate_divergence():
    lrs = sweep_lrs(1e-7, 10.0, 50)
    sugg, _, warnings = suggest(lrs, [2.3 + 1e-4 * (i % 3) for i in range(50)], num_iters=50)
    assert all(v is None for v in sugg.values()) and "never descends" in warnings[0]
    _, _, warnings = suggest(lrs[:4], [1.0, 2.0, 5.0, 9.0], num_iters=50, stop_reason="diverged")
    assert any("diverges almost at once" in w for w in warnings)
    assert any("too few" in w for w in warnings)


def test_a_sweep_that_blows_up_at_once_warns_and_restores(tmp_path):
    ds = make_blobs_dataset(n=64)
    model = _cnn()
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                                progress=False)
    before = _snapshot(trainer)
    result = find_lr(trainer, InMemoryLoader(ds, 16), start_lr=1e4, end_lr=1e8, num_iters=30)
    assert result.diverged and len(result.lrs) < 30
    assert any("at once" in w for w in result.warnings)
    _assert_same(before, _snapshot(trainer))
    result.to_json(tmp_path / "r.json")  # NaN/inf losses are written as null
    json.loads((tmp_path / "r.json").read_text())


def test_repeated_sweeps_report_the_spread_and_agreement(tmp_path):
    ds = make_blobs_dataset(n=96)
    trainer = _trainer(ds)
    loader = InMemoryLoader(ds, 16, seed=1)
    before = _snapshot(trainer)
    rep = find_lr_repeated(trainer, loader, repeat=2, num_iters=20, start_lr=1e-5, end_lr=10.0)
    assert rep.seeds == [3, 4] and len(rep.runs) == 2
    _assert_same(before, _snapshot(trainer))
    for key, sp in rep.spread.items():
        if sp["n"]:
            assert sp["min"] <= sp["geomean"] <= sp["max"] and sp["ratio"] == pytest.approx(sp["max"] / sp["min"])
    assert rep.runs[0].losses != rep.runs[1].losses, "the seeds change the data order and augmentation"
    assert rep.global_batch_size == 16 * 2  # batch 16 x 2 accumulation steps
    rep.to_json(tmp_path / "rep.json")
    rep.plot(tmp_path / "rep.png")
    data = json.loads((tmp_path / "rep.json").read_text())
    assert set(data) >= {"suggestions", "spread", "agreement", "runs", "global_batch_size"}
    assert (tmp_path / "rep.png").stat().st_size > 1000


def test_an_empty_loader_is_a_clear_error():
    ds = make_blobs_dataset(n=8)
    model = _cnn()
    trainer = SupervisedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                                progress=False)
    with pytest.raises(DataError, match="no batches.*lower data.batch_size"):
        find_lr(trainer, InMemoryLoader(ds, 16), num_iters=5)
    with pytest.raises(DataError, match="no batches"):
        find_lr(trainer, DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))),
                num_iters=5)
    with pytest.raises(DataError, match="no batches"):
        find_lr(trainer, [], num_iters=5)
    one_shot = iter([(ds.images[:4], ds.labels[:4])] * 3)
    with pytest.raises(DataError, match="ran out after 3 batches"):
        find_lr(trainer, one_shot, num_iters=5)


# -- (f) the CLI ---------------------------------------------------------------------------------
def test_lr_find_command_writes_json_and_png(tmp_path):
    script = shutil.which("lr-find")
    cmd = [script] if script else [sys.executable, "-c", "import sys; from convrecipes.cli import lr_find_main; "
                                                        "sys.exit(lr_find_main())"]
    out = tmp_path / "lrf"
    result = subprocess.run(cmd + ["recipes/quickstart.yaml", *TINY, "--num-iters", "30", "--out", str(out)],
                            env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "lr_find.json").read_text())
    assert data["global_batch_size"] == 64 and data["recipe"] == "quickstart"
    assert set(data["suggestions"]) == {"steepest", "valley", "min_div_10", "consensus", "cyclic_base",
                                      "cyclic_max"}
    assert (out / "lr_find.png").stat().st_size > 1000
    assert "consensus" in result.stdout and "global batch of 64" in result.stdout


def test_lr_find_user_errors_exit_2(tmp_path, capsys):
    from convrecipes.cli import main

    assert main(["lr-find", "quickstart", "data.batch_size=100000", *TINY, "--out", str(tmp_path / "a")]) == 2
    assert "lower data.batch_size" in capsys.readouterr().err
    assert main(["lr-find", "quickstart", "optimizer.lr=fast", "--out", str(tmp_path / "b")]) == 2
    assert "'auto'" in capsys.readouterr().err
    assert main(["lr-find", "quickstart", *TINY, "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "end_lr" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# -- (g) optimizer.lr=auto ------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, rule", [("cosine", "cyclic_max"), ("constant", "consensus")])
def test_optimizer_lr_auto_trains_with_the_rule_for_its_schedule(tmp_path, capsys, schedule, rule):
    """An annealing schedule peaks at the top of the usable range (cyclic_max); any other
    trains with the consensus (the geometric mean of steepest, valley and min/10)."""
    from convrecipes.cli import main
    from convrecipes.lr_finder.command import auto_lr_rule

    assert auto_lr_rule(schedule) == rule
    assert {auto_lr_rule(n) for n in ("linear", "one_cycle")} == {"cyclic_max"}
    assert {auto_lr_rule(n) for n in ("step", "multistep", "reduce_on_plateau", "cyclic")} == {"consensus"}
    run_dir = tmp_path / "auto"
    assert main(["train", "quickstart", "optimizer.lr=auto", "trainer.epochs=1", "schedule.warmup_epochs=0",
                 f"schedule.name={schedule}", *TINY, "--run-dir", str(run_dir)]) == 0
    stdout = capsys.readouterr().out
    found = json.loads((run_dir / "lr_find.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert found["auto"]["rule"] == rule and found["auto"]["schedule"] == schedule
    rules = [found["suggestions"][k] for k in ("steepest", "valley", "min_div_10")]
    assert found["suggestions"]["consensus"] == pytest.approx(math.prod(rules) ** (1 / 3), rel=1e-9)
    assert recipe["optimizer"]["lr"] == found["auto"]["lr"] == pytest.approx(found["suggestions"][rule], rel=1e-3)
    assert (run_dir / "lr_find.png").is_file() and (run_dir / "results.json").is_file()
    assert f"optimizer.lr=auto: {rule} suggestion" in stdout


def test_auto_lr_with_a_cyclic_schedule_equals_training_with_the_numbers(tmp_path):
    """The found LR and cyclical bounds are written into the recipe; training with them
    written out by hand gives bit-identical weights (the sweep leaves nothing behind)."""
    from convrecipes.checkpoint import load_checkpoint
    from convrecipes.cli import main

    cyclic = ["schedule.name=cyclic", "schedule.params.step_size_epochs=0.5", "schedule.warmup_epochs=0",
              "trainer.epochs=1", *TINY]
    auto_dir, manual_dir = tmp_path / "auto", tmp_path / "manual"
    assert main(["train", "quickstart", "optimizer.lr=auto", *cyclic, "--run-dir", str(auto_dir)]) == 0
    resolved = yaml.safe_load((auto_dir / "recipe.yaml").read_text())
    found = json.loads((auto_dir / "lr_find.json").read_text())
    params = resolved["schedule"]["params"]
    assert params["max_lr"] == pytest.approx(found["suggestions"]["cyclic_max"], rel=1e-3)
    assert params["base_lr"] == pytest.approx(found["suggestions"]["cyclic_base"], rel=1e-3)
    numbers = [f"optimizer.lr={resolved['optimizer']['lr']!r}", f"schedule.params.max_lr={params['max_lr']!r}",
               f"schedule.params.base_lr={params['base_lr']!r}"]
    assert main(["train", "quickstart", *numbers, *cyclic, "--run-dir", str(manual_dir)]) == 0
    a, _ = load_checkpoint(auto_dir / "last.safetensors")
    b, _ = load_checkpoint(manual_dir / "last.safetensors")
    _assert_same(a["model"], b["model"], "model")


def test_recipe_lr_accepts_numbers_and_auto_only():
    from convrecipes.build import build
    from convrecipes.recipe import load_recipe

    assert load_recipe("quickstart", ["optimizer.lr=auto"]).optimizer.lr == "auto"
    assert load_recipe("quickstart", ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    with pytest.raises(RecipeError, match="number or 'auto'"):
        load_recipe("quickstart", ["optimizer.lr=fast"])
    with pytest.raises(RecipeError, match="resolve_auto_lr"):
        build(load_recipe("quickstart", ["optimizer.lr=auto"]))


# -- several processes (slow: two launches) ------------------------------------------------------
@pytest.mark.slow
def test_lr_find_under_two_processes(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "worker.json"
    result = run_launched(launch + [str(ROOT / "tests" / "lr_finder_ddp_worker.py"), str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    assert ranks[0]["losses"] == ranks[1]["losses"], "every process sees the mean loss"
    assert ranks[0]["suggestions"] == ranks[1]["suggestions"]
    assert all(r["global_batch_size"] == 8 * 2 * 2 for r in ranks)  # 8 per process x 2 processes x 2 accumulation
    assert all(r["restored"] for r in ranks)
    cli_out = tmp_path / "cli"
    result = run_launched(launch + ["-m", "convrecipes.cli", "lr-find", "quickstart", *TINY, "--num-iters", "20",
                                      "--out", str(cli_out)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((cli_out / "lr_find.json").read_text())
    assert data["global_batch_size"] == 64 and data["runs"][0]["settings"]["num_processes"] == 2
    assert result.stdout.count("wrote ") == 1, "only the main process writes and prints"
