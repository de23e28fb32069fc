"""Learning-rate schedules: values against torch's schedulers and textbook formulas written
out here, warmup by hand, JSON state round trips for every registered schedule, bad input."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from torch.optim import lr_scheduler as torch_sched

from convrecipes.errors import CheckpointError, RecipeError, UnknownNameError
from convrecipes.schedulers import (
    SCHEDULES,
    CosineSchedule,
    CyclicSchedule,
    ReduceOnPlateauSchedule,
    build_scheduler,
    one_cycle_lr,
    one_cycle_momentum,
    schedule_params,
    triangular_cyclic_lr,
)

REL = 1e-12


def make_optimizer(lrs=(0.1,), kind="sgd"):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0])
    if kind == "adagrad":
        return torch.optim.Adagrad(groups, lr=lrs[0])
    raise ValueError(kind)


def momentum_of(group):
    return group["betas"][0] if "betas" in group else group.get("momentum")


def run(optimizer, scheduler, steps):
    """LRs and momenta in force at optimizer steps 0..steps-1, stepping like a trainer."""
    lrs, moms = [], []
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        moms.append([momentum_of(g) for g in optimizer.param_groups])
        optimizer.step()  # no grads: a no-op that keeps torch's call-order check quiet
        scheduler.step()
    return lrs, moms


def assert_close_lists(ours, theirs, rel=REL):
    assert len(ours) == len(theirs)
    for step, (a_row, b_row) in enumerate(zip(ours, theirs)):
        for a, b in zip(a_row, b_row):
            assert math.isclose(a, b, rel_tol=rel, abs_tol=0.0), f"step {step}: ours {a!r} vs torch {b!r}"


# ---------------------------------------------------------------------------------------
# Against torch, step by step


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_cosine_matches_torch(min_lr_ratio):
    n = 60
    ours_opt = make_optimizer()
    ours = build_scheduler("cosine", ours_opt, total_steps=n, steps_per_epoch=10, min_lr_ratio=min_lr_ratio)
    ref_opt = make_optimizer()
    ref = torch_sched.CosineAnnealingLR(ref_opt, T_max=n, eta_min=min_lr_ratio * 0.1)
    # n + 1 values: the one after the last step (== min) too; after that ours holds.
    assert_close_lists(run(ours_opt, ours, n + 1)[0], run(ref_opt, ref, n + 1)[0])
    assert ours.get_last_lr() == [pytest.approx(min_lr_ratio * 0.1, abs=1e-18)]


def test_cosine_two_groups_keep_ratio_like_torch():
    n = 50
    ours_opt = make_optimizer((0.1, 0.01))
    ours = build_scheduler("cosine", ours_opt, total_steps=n, steps_per_epoch=10)
    ref_opt = make_optimizer((0.1, 0.01))
    ref = torch_sched.CosineAnnealingLR(ref_opt, T_max=n)
    assert_close_lists(run(ours_opt, ours, n)[0], run(ref_opt, ref, n)[0])


@pytest.mark.parametrize("end_ratio", [0.0, 0.05])
def test_linear_matches_torch(end_ratio):
    n = 40
    ours_opt = make_optimizer((0.1, 0.03))
    ours = build_scheduler("linear", ours_opt, total_steps=n, steps_per_epoch=10, end_ratio=end_ratio)
    ref_opt = make_optimizer((0.1, 0.03))
    ref = torch_sched.LinearLR(ref_opt, start_factor=1.0, end_factor=end_ratio, total_iters=n)
    assert_close_lists(run(ours_opt, ours, n + 5)[0], run(ref_opt, ref, n + 5)[0])


def test_step_matches_torch():
    ours_opt = make_optimizer((0.1, 0.01))
    ours = build_scheduler("step", ours_opt, total_steps=60, steps_per_epoch=7, step_epochs=2, gamma=0.5)
    ref_opt = make_optimizer((0.1, 0.01))
    ref = torch_sched.StepLR(ref_opt, step_size=14, gamma=0.5)
    assert_close_lists(run(ours_opt, ours, 61)[0], run(ref_opt, ref, 61)[0])


def test_multistep_matches_torch():
    ours_opt = make_optimizer((0.1, 0.01))
    ours = build_scheduler(
        "multistep", ours_opt, total_steps=60, steps_per_epoch=5, milestones_epochs=[2, 5, 9], gamma=0.1
    )
    ref_opt = make_optimizer((0.1, 0.01))
    ref = torch_sched.MultiStepLR(ref_opt, milestones=[10, 25, 45], gamma=0.1)
    assert_close_lists(run(ours_opt, ours, 61)[0], run(ref_opt, ref, 61)[0])


def test_constant_is_the_optimizer_lr():
    opt = make_optimizer((0.1, 0.01))
    sched = build_scheduler("constant", opt, total_steps=10, steps_per_epoch=5)
    assert run(opt, sched, 12)[0] == [[0.1, 0.01]] * 12


@pytest.mark.parametrize(
    ("mode", "gamma"), [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.99)]
)
def test_cyclic_matches_torch(mode, gamma):
    # Two groups: torch gets per-group lists, ours the first group's values and the ratio.
    s, n = 6, 6 * 2 * 4 + 3
    ours_opt = make_optimizer((0.01, 0.001))
    ours = build_scheduler(
        "cyclic", ours_opt, total_steps=n, steps_per_epoch=3, max_lr=0.1, step_size_epochs=2, mode=mode, gamma=gamma
    )
    assert ours.step_size == s
    ref_opt = make_optimizer((0.01, 0.001))
    ref = torch_sched.CyclicLR(
        ref_opt,
        base_lr=[0.01, 0.001],
        max_lr=[0.1, 0.01],
        step_size_up=s,
        mode=mode,
        gamma=gamma,
        cycle_momentum=False,
    )
    assert_close_lists(run(ours_opt, ours, n)[0], run(ref_opt, ref, n)[0])


def test_cyclic_explicit_base_lr_overrides_optimizer_lr_like_torch():
    ours_opt = make_optimizer((0.5,))
    ours = build_scheduler("cyclic", ours_opt, 40, 5, base_lr=0.01, max_lr=0.1, step_size_iters=4)
    ref_opt = make_optimizer((0.5,))
    ref = torch_sched.CyclicLR(ref_opt, base_lr=0.01, max_lr=0.1, step_size_up=4, cycle_momentum=False)
    assert_close_lists(run(ours_opt, ours, 40)[0], run(ref_opt, ref, 40)[0])


@pytest.mark.parametrize("anneal_strategy", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_cycle_matches_torch_lr_and_momentum(anneal_strategy, three_phase, kind):
    n = 100
    kwargs = dict(
        pct_start=0.25,
        anneal_strategy=anneal_strategy,
        three_phase=three_phase,
        div_factor=20.0,
        final_div_factor=100.0,
        base_momentum=0.8,
        max_momentum=0.93,
    )
    ours_opt = make_optimizer((0.1, 0.02), kind)
    ours = build_scheduler("one_cycle", ours_opt, total_steps=n, steps_per_epoch=10, max_lr=0.4, **kwargs)
    ref_opt = make_optimizer((0.1, 0.02), kind)
    ref = torch_sched.OneCycleLR(ref_opt, max_lr=[0.4, 0.08], total_steps=n, **kwargs)
    ours_lrs, ours_moms = run(ours_opt, ours, n)
    ref_lrs, ref_moms = run(ref_opt, ref, n)
    assert_close_lists(ours_lrs, ref_lrs)
    assert_close_lists(ours_moms, ref_moms)
    if kind == "adam":  # beta1 cycled, beta2 untouched
        assert ours_opt.param_groups[0]["betas"][1] == 0.999


def test_one_cycle_single_group_is_bit_identical_to_torch():
    ours_opt = make_optimizer((0.1,))
    ours = build_scheduler("one_cycle", ours_opt, total_steps=37, steps_per_epoch=10, max_lr=0.3)
    ref_opt = make_optimizer((0.1,))
    ref = torch_sched.OneCycleLR(ref_opt, max_lr=0.3, total_steps=37)
    assert run(ours_opt, ours, 37) == run(ref_opt, ref, 37)


def test_one_cycle_max_lr_defaults_to_the_optimizer_lr():
    opt = make_optimizer((0.2,))
    sched = build_scheduler("one_cycle", opt, total_steps=30, steps_per_epoch=10, cycle_momentum=False)
    assert sched.max_lr == 0.2
    assert opt.param_groups[0]["momentum"] == 0.9  # untouched without cycle_momentum


# ---------------------------------------------------------------------------------------
# Formulas against the papers, written out independently


def test_triangular_cyclic_lr_key_iterations():
    base, top, s = 0.01, 0.1, 5
    assert triangular_cyclic_lr(0, base, top, s) == base
    assert triangular_cyclic_lr(s, base, top, s) == pytest.approx(top, rel=1e-15)
    assert triangular_cyclic_lr(2 * s, base, top, s) == pytest.approx(base, rel=1e-15)
    assert triangular_cyclic_lr(3 * s, base, top, s) == pytest.approx(top, rel=1e-15)
    # Half way up and half way down the first cycle.
    assert triangular_cyclic_lr(2, base, top, 4) == pytest.approx((base + top) / 2, rel=1e-15)
    assert triangular_cyclic_lr(6, base, top, 4) == pytest.approx((base + top) / 2, rel=1e-15)
    # triangular2: the peak of cycle k is base + (max - base) / 2**(k - 1).
    peaks = [triangular_cyclic_lr((2 * k + 1) * s, base, top, s, "triangular2") for k in range(4)]
    expected = [top, base + (top - base) / 2, base + (top - base) / 4, base + (top - base) / 8]
    assert peaks == pytest.approx(expected, rel=1e-15)
    assert triangular_cyclic_lr(2 * s, base, top, s, "triangular2") == pytest.approx(base, rel=1e-15)
    # exp_range: the amplitude is scaled by gamma ** iteration.
    assert triangular_cyclic_lr(s, base, top, s, "exp_range", 0.9) == pytest.approx(
        base + (top - base) * 0.9**s, rel=1e-15
    )


def test_cyclic_schedule_hits_the_key_iterations():
    opt = make_optimizer((0.01,))
    sched = build_scheduler("cyclic", opt, 100, 10, max_lr=0.1, step_size_iters=5, mode="triangular2")
    lrs = [row[0] for row in run(opt, sched, 36)[0]]
    assert lrs[0] == 0.01
    assert lrs[5] == pytest.approx(0.1, rel=1e-15)
    assert lrs[10] == pytest.approx(0.01, rel=1e-15)
    assert lrs[15] == pytest.approx(0.01 + 0.09 / 2, rel=1e-15)
    assert lrs[25] == pytest.approx(0.01 + 0.09 / 4, rel=1e-15)
    assert lrs[35] == pytest.approx(0.01 + 0.09 / 8, rel=1e-15)


def test_one_cycle_formula_at_phase_boundaries():
    n, top = 100, 0.4
    assert one_cycle_lr(0, n, top) == pytest.approx(top / 25, rel=1e-15)
    assert one_cycle_lr(29, n, top) == pytest.approx(top, rel=1e-15)  # pct_start * n - 1
    assert one_cycle_lr(n - 1, n, top) == pytest.approx(top / 25 / 1e4, rel=1e-12)
    assert one_cycle_lr(n + 5, n, top) == one_cycle_lr(n - 1, n, top)  # held after the end
    # Linear anneal half way up: the midpoint of start and peak.
    assert one_cycle_lr(0, 21, top, pct_start=1 / 3, anneal_strategy="linear") == pytest.approx(top / 25)
    # Three phases: back to the start at 2 * pct_start * n - 2, then down to the minimum.
    assert one_cycle_lr(58, n, top, three_phase=True) == pytest.approx(top / 25, rel=1e-15)
    assert one_cycle_lr(n - 1, n, top, three_phase=True) == pytest.approx(top / 25 / 1e4, rel=1e-12)
    # Momentum moves inversely: high at the ends, base at the LR's peak.
    assert one_cycle_momentum(0, n) == pytest.approx(0.95)
    assert one_cycle_momentum(29, n) == pytest.approx(0.85)
    assert one_cycle_momentum(n - 1, n) == pytest.approx(0.95)
    assert one_cycle_momentum(80, n, three_phase=True) == pytest.approx(0.95)


# ---------------------------------------------------------------------------------------
# Warmup, by hand


def test_warmup_then_constant_by_hand():
    opt = make_optimizer((0.1, 0.01))
    sched = build_scheduler("constant", opt, 10, 5, warmup_steps=4, warmup_start_factor=0.2)
    lrs = run(opt, sched, 6)[0]
    expected = [[0.02, 0.002], [0.04, 0.004], [0.06, 0.006], [0.08, 0.008], [0.1, 0.01], [0.1, 0.01]]
    for got, want in zip(lrs, expected):
        assert got == pytest.approx(want, rel=1e-15)


def test_warmup_then_cosine_over_the_remaining_steps():
    opt = make_optimizer((0.1,))
    sched = build_scheduler("cosine", opt, total_steps=24, steps_per_epoch=5, warmup_steps=4)
    lrs = [row[0] for row in run(opt, sched, 25)[0]]
    assert lrs[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1], rel=1e-15)
    # The cosine then runs over the remaining 20 steps: at step 4 + 5 it is a quarter through.
    assert lrs[9] == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    assert lrs[14] == pytest.approx(0.05, rel=1e-15)
    assert lrs[24] == pytest.approx(0.0, abs=1e-18)


def test_warmup_then_one_cycle_ramps_to_its_first_lr_with_momentum_held():
    opt = make_optimizer((0.1,))
    sched = build_scheduler("one_cycle", opt, total_steps=23, steps_per_epoch=5, warmup_steps=3, max_lr=0.5)
    lrs, moms = run(opt, sched, 5)
    first = 0.5 / 25
    assert [r[0] for r in lrs[:4]] == pytest.approx([0.0, first / 3, 2 * first / 3, first], rel=1e-15)
    assert [m[0] for m in moms[:4]] == [0.95] * 4
    assert lrs[4][0] > first and moms[4][0] < 0.95  # the cycle has started
    # After warmup the cycle is torch's over the 20 remaining steps.
    ref_opt = make_optimizer((0.1,))
    ref = torch_sched.OneCycleLR(ref_opt, max_lr=0.5, total_steps=20)
    ours_rest = run(opt, sched, 18)
    ref_all = run(ref_opt, ref, 20)
    assert_close_lists(ours_rest[0], ref_all[0][2:])


def test_warmup_then_cyclic_starts_the_cycle_after_warmup():
    opt = make_optimizer((0.01,))
    sched = build_scheduler(
        "cyclic", opt, 40, 5, warmup_steps=2, warmup_start_factor=0.5, max_lr=0.1, step_size_iters=4
    )
    lrs = [row[0] for row in run(opt, sched, 11)[0]]
    assert lrs[:3] == pytest.approx([0.005, 0.0075, 0.01], rel=1e-15)
    assert lrs[6] == pytest.approx(0.1, rel=1e-15)  # peak at warmup + step size
    assert lrs[10] == pytest.approx(0.01, rel=1e-15)


def test_warmup_then_step_counts_epochs_from_the_end_of_warmup():
    opt = make_optimizer((0.1,))
    sched = build_scheduler("step", opt, 30, 5, warmup_steps=3, step_epochs=1, gamma=0.5)
    lrs = [row[0] for row in run(opt, sched, 14)[0]]
    assert lrs[3:8] == [0.1] * 5
    assert lrs[8] == 0.05 and lrs[13] == 0.025


# ---------------------------------------------------------------------------------------
# Every registered schedule: per-group ratios and exact JSON state round trips

ROUND_TRIP_PARAMS = {
    "constant": {},
    "cosine": {"min_lr_ratio": 0.1},
    "linear": {"end_ratio": 0.01},
    "step": {"step_epochs": 2},
    "multistep": {"milestones_epochs": [1, 3, 5]},
    "cyclic": {"max_lr": 0.5, "step_size_iters": 7, "mode": "triangular2"},
    "one_cycle": {"max_lr": 0.5, "three_phase": True},
    "reduce_on_plateau": {"patience": 1, "cooldown": 1, "factor": 0.5},
}
TOTAL, PER_EPOCH, WARMUP = 40, 5, 3
# Validation losses that make reduce_on_plateau reduce, cool down and count bad epochs.
EPOCH_METRICS = [1.0, 0.9, 0.95, 0.97, 0.5, 0.6, 0.7, 0.8]


def _plain_json(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return isinstance(value, (str, int, float)) and (not isinstance(value, float) or math.isfinite(value))


def _build(name, lrs=(0.1, 0.02)):
    opt = make_optimizer(lrs)
    sched = build_scheduler(
        name, opt, TOTAL, PER_EPOCH, warmup_steps=WARMUP, warmup_start_factor=0.1, **ROUND_TRIP_PARAMS[name]
    )
    return opt, sched


def _advance(opt, sched, start, stop, record):
    for it in range(start, stop):
        groups = opt.param_groups
        record.append(([g["lr"] for g in groups], [momentum_of(g) for g in groups], sched.get_last_lr()))
        opt.step()
        sched.step()
        if (it + 1) % PER_EPOCH == 0:
            sched.on_epoch_end({"val_loss": EPOCH_METRICS[it // PER_EPOCH], "val_acc": 0.5})


def test_every_schedule_has_round_trip_params():
    assert set(ROUND_TRIP_PARAMS) == set(SCHEDULES.names()), "add params for each registered schedule"


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_groups_keep_their_lr_ratio(name):
    opt, sched = _build(name)
    record = []
    _advance(opt, sched, 0, TOTAL, record)
    for lrs, _, last in record:
        assert lrs == last
        assert lrs[1] == pytest.approx(0.2 * lrs[0], rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("name", SCHEDULES.names())
@pytest.mark.parametrize("stop_at", [2, 17])  # inside warmup, and mid-schedule (mid-epoch)
def test_json_state_round_trip_continues_exactly(name, stop_at):
    ref_opt, ref_sched = _build(name)
    reference = []
    _advance(ref_opt, ref_sched, 0, TOTAL + 3, reference)

    opt, sched = _build(name)
    before = []
    _advance(opt, sched, 0, stop_at, before)
    saved_lrs = [g["lr"] for g in opt.param_groups]
    saved_moms = [momentum_of(g) for g in opt.param_groups]
    state = sched.state_dict()
    assert _plain_json(state), state
    state = json.loads(json.dumps(state, allow_nan=False))

    # A fresh process: new optimizer (even with other LRs: the checkpoint's base LRs win).
    new_opt, new_sched = _build(name, lrs=(0.3, 0.3))
    new_sched.load_state_dict(state)
    assert [g["lr"] for g in new_opt.param_groups] == saved_lrs
    assert [momentum_of(g) for g in new_opt.param_groups] == saved_moms
    assert new_sched.get_last_lr() == saved_lrs
    after = []
    _advance(new_opt, new_sched, stop_at, TOTAL + 3, after)
    assert before + after == reference


@pytest.mark.parametrize(
    ("name", "params", "state", "lrs"),
    [
        # Written by the schedules before their constructors were shared (same format since).
        ("cosine", {"min_lr_ratio": 0.1}, {"schedule": "cosine", "step": 17, "base_lrs": [0.1, 0.02]},
         [0.0717785415001139, 0.01435570830002278]),
        ("reduce_on_plateau", {"patience": 1, "cooldown": 1, "factor": 0.5},
         {"schedule": "reduce_on_plateau", "step": 22, "base_lrs": [0.1, 0.02], "scale": 0.5, "num_bad_epochs": 0,
          "cooldown_counter": 1, "epochs_seen": 4, "best": 0.9},
         [0.05, 0.01]),
    ],
)
def test_state_written_before_loads_unchanged(name, params, state, lrs):
    opt = make_optimizer((0.3, 0.3))
    sched = build_scheduler(name, opt, TOTAL, PER_EPOCH, warmup_steps=WARMUP, warmup_start_factor=0.1, **params)
    sched.load_state_dict(json.loads(json.dumps(state)))
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert sched.state_dict() == state


def test_loading_another_schedules_state_is_a_checkpoint_error():
    _, cosine = _build("cosine")
    _, linear = _build("linear")
    with pytest.raises(CheckpointError, match="cosine"):
        linear.load_state_dict(cosine.state_dict())
    one_group = build_scheduler("cosine", make_optimizer((0.1,)), TOTAL, PER_EPOCH)
    with pytest.raises(CheckpointError, match="param groups"):
        one_group.load_state_dict(cosine.state_dict())


# ---------------------------------------------------------------------------------------
# Reduce on plateau


def _plateau(patience=2, **params):
    opt = make_optimizer((0.1, 0.01))
    return opt, build_scheduler("reduce_on_plateau", opt, 100, 10, patience=patience, **params)


def test_plateau_reduces_after_patience_bad_epochs():
    opt, sched = _plateau(patience=2)
    lrs = []
    for loss in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:
        sched.on_epoch_end({"val_loss": loss})
        lrs.append(opt.param_groups[0]["lr"])
    # Epoch 0 sets best; bad epochs 1 and 2 are tolerated; the third reduces (torch's meaning).
    assert lrs[:3] == [0.1, 0.1, 0.1]
    assert lrs[3] == pytest.approx(0.01)
    assert lrs[4:6] == pytest.approx([0.01, 0.01])
    assert lrs[6] == pytest.approx(0.001)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0001)  # the ratio is kept


@pytest.mark.parametrize(
    "params",
    [
        dict(mode="min", factor=0.5, patience=1, threshold=0.01, cooldown=1, min_lr=0.02),
        dict(mode="max", factor=0.3, patience=2, threshold=0.05, threshold_mode="abs", cooldown=2),
    ],
)
def test_plateau_matches_torch(params):
    metrics = [1.0, 0.8, 0.795, 0.9, 0.85, 0.7, 0.71, 0.72, 0.73, 0.74, 0.6, 0.61, 0.62, 0.63, 0.64, 0.65]
    if params["mode"] == "max":
        metrics = [1 - m for m in metrics]
    ours_opt = make_optimizer((0.1,))
    ours = build_scheduler("reduce_on_plateau", ours_opt, 100, 10, monitor="score", **params)
    ref_opt = make_optimizer((0.1,))
    ref = torch_sched.ReduceLROnPlateau(ref_opt, **params)
    ours_lrs, ref_lrs = [], []
    for m in metrics:
        ours.on_epoch_end({"score": m})
        ref.step(m)
        ours_lrs.append([ours_opt.param_groups[0]["lr"]])
        ref_lrs.append([ref_opt.param_groups[0]["lr"]])
    assert_close_lists(ours_lrs, ref_lrs)
    assert len({r[0] for r in ref_lrs}) >= 3  # the sequence did reduce more than once


def test_plateau_state_survives_json_round_trip():
    opt, sched = _plateau(patience=3, cooldown=2)
    for loss in [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]:  # reduce at epoch 4, then one cooldown epoch
        sched.on_epoch_end({"val_loss": loss})
    state = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    assert state["best"] == 1.0 and state["cooldown_counter"] == 1 and state["scale"] == pytest.approx(0.1)
    opt2, sched2 = _plateau(patience=3, cooldown=2)
    sched2.load_state_dict(state)
    assert (sched2.best, sched2.num_bad_epochs, sched2.cooldown_counter) == (1.0, 0, 1)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for loss in [1.6, 0.99, 2.0, 2.0, 2.0, 2.0, 2.0]:
        sched.on_epoch_end({"val_loss": loss})
        sched2.on_epoch_end({"val_loss": loss})
        assert sched2.state_dict() == sched.state_dict()
    # Bad epochs mid-count survive too.
    assert sched.num_bad_epochs > 0 or sched.cooldown_counter > 0


def test_plateau_fresh_state_has_no_best_and_round_trips():
    opt, sched = _plateau()
    state = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    assert "best" not in state
    _, sched2 = _plateau()
    sched2.load_state_dict(state)
    assert sched2.best is None


def test_plateau_step_only_drives_warmup():
    opt = make_optimizer((0.1,))
    sched = build_scheduler("reduce_on_plateau", opt, 100, 10, warmup_steps=2, warmup_start_factor=0.5)
    lrs = [row[0] for row in run(opt, sched, 20)[0]]
    assert lrs[:3] == pytest.approx([0.05, 0.075, 0.1], rel=1e-15)
    assert lrs[3:] == [0.1] * 17


def test_plateau_nan_is_a_bad_epoch_and_min_lr_floors():
    opt, sched = _plateau(patience=0, min_lr=0.005)
    sched.on_epoch_end({"val_loss": 1.0})
    sched.on_epoch_end({"val_loss": float("nan")})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    sched.on_epoch_end({"val_loss": 2.0})
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # floored, not 0.001
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0005)


def test_plateau_missing_metric_names_the_available_ones():
    _, sched = _plateau()
    with pytest.raises(RecipeError, match="'val_loss'.*train_loss"):
        sched.on_epoch_end({"train_loss": 1.0})


# ---------------------------------------------------------------------------------------
# Bad input: RecipeError naming the cause and the fix


def test_unknown_param_names_it_and_lists_the_valid_ones():
    with pytest.raises(RecipeError) as err:
        build_scheduler("cosine", make_optimizer(), 10, 5, min_lr=0.1)
    message = str(err.value)
    assert "'min_lr'" in message and "valid params: min_lr_ratio" in message


def test_misspelt_param_gets_did_you_mean():
    with pytest.raises(RecipeError) as err:
        build_scheduler("cosine", make_optimizer(), 10, 5, min_lr_rati=0.1)
    message = str(err.value)
    assert "'min_lr_rati'" in message and "did you mean 'min_lr_ratio'" in message
    assert "schedule.params" in message and "valid params: min_lr_ratio" in message


def test_a_schedule_without_params_says_so():
    with pytest.raises(RecipeError, match=r"no parameter 'gamma'.*valid params: \(none\)"):
        build_scheduler("constant", make_optimizer(), 10, 5, gamma=0.1)


def test_schedule_params_are_the_schedules_own_with_defaults():
    assert {k: p.default for k, p in schedule_params("cosine").items()} == {"min_lr_ratio": 0.0}
    assert schedule_params("constant") == {}
    step = schedule_params("step")
    assert list(step) == ["step_epochs", "gamma"]
    assert step["step_epochs"].default is inspect.Parameter.empty and step["gamma"].default == 0.1
    for name in SCHEDULES.names():  # the trainer's arguments are not recipe params
        assert not set(schedule_params(name)) & {"optimizer", "total_steps", "steps_per_epoch", "warmup_steps",
                                                 "warmup_start_factor"}
    with pytest.raises(UnknownNameError, match="did you mean 'cosine'"):
        schedule_params("cosin")


def test_classes_construct_directly_like_build_scheduler():
    opt, ref_opt = make_optimizer((0.1, 0.02)), make_optimizer((0.1, 0.02))
    sched = CosineSchedule(opt, total_steps=30, steps_per_epoch=5, warmup_steps=3, min_lr_ratio=0.1)
    ref = build_scheduler("cosine", ref_opt, 30, 5, warmup_steps=3, min_lr_ratio=0.1)
    assert run(opt, sched, 31) == run(ref_opt, ref, 31)
    plateau = ReduceOnPlateauSchedule(make_optimizer(), 100, None, 0, 0.0, patience=0)
    assert (plateau.patience, plateau.best, plateau.get_last_lr()) == (0, None, [0.1])
    # The signature shows the common arguments and the class's own keyword-only params.
    params = inspect.signature(CyclicSchedule).parameters
    assert list(params)[:5] == ["optimizer", "total_steps", "steps_per_epoch", "warmup_steps", "warmup_start_factor"]
    assert params["max_lr"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="max_lr"):
        CyclicSchedule(make_optimizer(), 10, step_size_iters=2)


def test_unknown_schedule_lists_the_names():
    with pytest.raises(UnknownNameError, match="one_cycle"):
        build_scheduler("cosine_restarts", make_optimizer(), 10, 5)


def test_missing_required_param():
    with pytest.raises(RecipeError, match="needs 'max_lr'"):
        build_scheduler("cyclic", make_optimizer(), 10, 5, step_size_iters=2)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("cyclic", dict(max_lr=0.01, base_lr=0.1, step_size_iters=2), "below base_lr.*swap"),
        ("cyclic", dict(max_lr=0.5, step_size_iters=0), "step_size_iters must be >= 1"),
        ("cyclic", dict(max_lr=0.5, step_size_epochs=0), "step_size_epochs must be > 0"),
        ("cyclic", dict(max_lr=0.5, step_size_epochs=0.01), "raise step_size_epochs"),
        ("cyclic", dict(max_lr=0.5), "exactly one of step_size_iters and step_size_epochs"),
        ("cyclic", dict(max_lr=0.5, step_size_iters=2, step_size_epochs=1), "got both"),
        ("cyclic", dict(max_lr=0.5, step_size_iters=2, mode="triangle"), "mode must be one of"),
        ("cyclic", dict(max_lr=0.5, step_size_iters=2, gamma=1.5), r"gamma must be in \(0, 1\]"),
        ("constant", dict(total_steps=5, warmup_steps=10), r"warmup_steps \(10\) must be less than total_steps \(5\)"),
        ("cosine", dict(total_steps=5, warmup_steps=5), "lower warmup_steps"),
        ("cosine", dict(total_steps=0), "total_steps must be >= 1"),
        ("cosine", dict(min_lr_ratio="0.1"), "must be a number"),
        ("cosine", dict(warmup_steps=2, warmup_start_factor=1.5), r"warmup_start_factor must be in \[0, 1\]"),
        ("step", dict(step_epochs=0), "step_epochs must be > 0"),
        ("step", dict(step_epochs=1, gamma=0), r"gamma must be in \(0, 1\]"),
        ("multistep", dict(milestones_epochs=[3, 2]), "strictly increasing"),
        ("multistep", dict(milestones_epochs=5), "non-empty list"),
        ("one_cycle", dict(pct_start=1.5), r"pct_start must be in \[0, 1\]"),
        ("one_cycle", dict(pct_start=0.6, three_phase=True), "three_phase needs pct_start <= 0.5"),
        ("one_cycle", dict(anneal_strategy="cosine"), "anneal_strategy must be one of cos, linear"),
        ("one_cycle", dict(base_momentum=0.99), "base_momentum <= max_momentum"),
        ("reduce_on_plateau", dict(mode="lowest"), "mode must be one of min, max"),
        ("reduce_on_plateau", dict(factor=1.0), r"factor must be in \(0, 1\)"),
    ],
)
def test_bad_input_raises_recipe_error_with_a_fix(name, kwargs, match):
    args = {"total_steps": 20, "steps_per_epoch": 5}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in ("total_steps", "warmup_steps", "warmup_start_factor")})
    with pytest.raises(RecipeError, match=match) as err:
        build_scheduler(name, make_optimizer(), **args, **kwargs)
    assert str(err.value).count(";") >= 1  # cause; fix


def test_one_cycle_momentum_needs_an_optimizer_with_momentum():
    with pytest.raises(RecipeError, match="Adagrad has neither.*cycle_momentum=false"):
        build_scheduler("one_cycle", make_optimizer(kind="adagrad"), 20, 5)
    build_scheduler("one_cycle", make_optimizer(kind="adagrad"), 20, 5, cycle_momentum=False)


def test_package_re_exports():
    import convrecipes.schedulers as schedulers

    for name in ["build_scheduler", "SCHEDULES", "triangular_cyclic_lr", "one_cycle_lr", "cosine_annealing_lr",
                 "linear_decay_lr", "step_decay_lr", "multistep_decay_lr", "linear_warmup_factor", "plateau_is_better"]:
        assert name in schedulers.__all__ and hasattr(schedulers, name)
