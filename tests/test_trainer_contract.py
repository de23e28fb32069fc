"""The trainer contract, checked for every registered trainer.

A new training algorithm joins by registering in ``TRAINERS`` and adding its recipe
overrides to ``CONTRACT_OVERRIDES`` below (a test fails until it does). Each must:

- give the same weights with gradient accumulation as with one batch of the same size;
- resume after SIGKILL mid-epoch to bit-identical weights, EMA and optimizer state;
- stop on a NaN loss with a message naming the fix and leave the last checkpoint intact;
- leave no trace after ``find_lr`` (training afterwards is bit-identical);
- count each evaluation sample exactly once under 2 processes.

A toy two-optimizer algorithm in manual mode is checked against the same algorithm
written as a plain loop, exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.build import build
from convrecipes.checkpoint import load_checkpoint, read_metadata
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import CheckpointError, NonFiniteLossError, RecipeError
from convrecipes.lr_finder import find_lr
from convrecipes.recipe import load_recipe
from convrecipes.run import train_recipe
from convrecipes.trainers import TRAINERS, Callback, ModelCheckpoint, StepOutput, Trainer
from tests.conftest import make_blobs_dataset, run_launched

ROOT = Path(__file__).parent.parent
TINY = ["model.kwargs.width=4", "trainer.progress=false", "data.subset_per_class=30", "data.batch_size=16",
        "schedule.warmup_epochs=0"]


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train_recipe(load_recipe("quickstart", TINY + ["trainer.epochs=2"]), run_dir)
    return run_dir


def _distillation(teacher: Path) -> list[str]:
    return ["trainer.name=distillation", f"trainer.params.teacher={teacher}", "trainer.params.temperature=2.0",
            "trainer.params.alpha=0.5"]


#: recipe overrides that make each registered trainer runnable on the quickstart recipe
CONTRACT_OVERRIDES = {
    "supervised": lambda teacher: [],
    "distillation": _distillation,
    # 5 labels per class of the 27 left after validation: 50 labeled, 220 unlabeled images
    "uda": lambda teacher: ["trainer.name=uda", "data.labels_per_class=5"],
    "mpl": lambda teacher: ["trainer.name=mpl", "data.labels_per_class=5"],
    # a CE warm-up epoch first (resume crosses into bootstrapping), on noisy labels (the
    # memorisation curve's callback is part of the run)
    "bootstrapping": lambda teacher: ["trainer.name=bootstrapping", "trainer.params.warmup_epochs=1",
                                      "data.label_noise.kind=symmetric", "data.label_noise.rate=0.2"],
    # the stagewise boosting network: one active branch per step, the others frozen or skipped
    "freeze_drop_path": lambda teacher: ["trainer.name=freeze_drop_path", "model.name=sbn"],
}
HINT = ['trainer.params.hint_layers=[features.4,features.4]']  # the distillation part with its own weights
#: what each trainer adds to the runs that train over several epochs (the parts and stages beyond the basics)
EXTRA = {"distillation": HINT}
#: the kill/resume run crosses MPL's switch from the MPL stage to finetuning
RESUME_EXTRA = {"mpl": ["trainer.params.finetune_epochs=2"]}
#: accumulation is compared with augmentation off: random views of two half batches are
#: not those of one whole batch
ACCUMULATION_EXTRA = {"uda": ["trainer.params.weak_augment=none", "trainer.params.strong_augment=none",
                              "data.labels_per_class=16"]}  # 160 labeled: 5 batches of 32, 10 of 16
#: a BatchNorm-free model for the accumulation check where the trainer needs its own kind of model
ACCUMULATION_MODEL = {"freeze_drop_path": ["model.name=sbn", "model.kwargs={width: 4, norm: none}"]}


def _overrides(name: str, teacher: Path) -> list[str]:
    return CONTRACT_OVERRIDES[name](teacher) + EXTRA.get(name, [])


def test_every_registered_trainer_is_in_the_contract():
    missing = sorted(set(TRAINERS.names()) - set(CONTRACT_OVERRIDES))
    assert not missing, f"add recipe overrides for {missing} to CONTRACT_OVERRIDES in {__file__}"


@pytest.mark.parametrize("name", TRAINERS.names())
def test_accumulation_equals_one_batch_of_the_same_size(name, teacher_run):
    # a BatchNorm-free model and no augmentation: two micro-batches of 16 are then exactly
    # one batch of 32 (the same samples in the same order, the mean of the two means)
    if TRAINERS.get(name).manual_steps:  # each of its steps is one optimizer update: refused, clearly
        with pytest.raises(RecipeError, match="gradient accumulation is not supported"):
            build(load_recipe("quickstart", TINY + CONTRACT_OVERRIDES[name](teacher_run) +
                              ["trainer.grad_accum_steps=2"]))
        return
    model = ACCUMULATION_MODEL.get(name, ["model.name=test_convnext", "model.kwargs={}"])
    common = TINY + CONTRACT_OVERRIDES[name](teacher_run) + ACCUMULATION_EXTRA.get(name, []) + model + [
        "data.image_size=32", "augment.preset=none",
        "trainer.epochs=1", "data.val_fraction=0", "optimizer.lr=0.02", "trainer.grad_clip=5.0"]
    one = build(load_recipe("quickstart", common + ["data.batch_size=32"]))
    two = build(load_recipe("quickstart", common + ["data.batch_size=16", "trainer.grad_accum_steps=2"]))
    assert len(one.train_loader) * 2 == len(two.train_loader)
    one.trainer.fit(one.train_loader, epochs=1)
    two.trainer.fit(two.train_loader, epochs=1)
    assert one.trainer.global_step == two.trainer.global_step == len(one.train_loader)
    a, b = one.trainer.unwrapped_model.state_dict(), two.trainer.unwrapped_model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
    assert one.trainer.history[-1]["train_loss"] == pytest.approx(two.trainer.history[-1]["train_loss"], rel=1e-4)


TRAIN = [sys.executable, "-m", "convrecipes.cli", "train", "quickstart"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _step_of(path: Path) -> int:
    try:
        return read_metadata(path)["global_step"]
    except (CheckpointError, KeyError):
        return -1


@pytest.mark.parametrize("name", TRAINERS.names())
def test_sigkill_mid_epoch_then_resume_is_bit_identical(name, teacher_run, tmp_path):
    args = TINY + _overrides(name, teacher_run) + RESUME_EXTRA.get(name, []) + [
        "trainer.epochs=4", "trainer.checkpoint_every_steps=3", "trainer.ema_decay=0.9", "trainer.deterministic=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(TRAIN + args + ["--run-dir", str(full)], env=ENV, check=True, capture_output=True)
    steps_per_epoch = read_metadata(full / "last.safetensors")["global_step"] // 4
    proc = subprocess.Popen(TRAIN + args + ["--run-dir", str(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = cut / "last.safetensors"
    deadline = time.time() + 120
    while _step_of(last) < steps_per_epoch + 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("training finished before it could be killed")
    killed_at = read_metadata(last)["global_step"]
    assert killed_at < 4 * steps_per_epoch
    resumed = subprocess.run(TRAIN[:-1] + ["--resume", str(cut)], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = load_checkpoint(full / "last.safetensors")
    b, meta_b = load_checkpoint(last)
    assert meta_b["global_step"] == 4 * steps_per_epoch
    for part in ("model", "ema"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), f"{name}: {part}/{key} differs after resume at {killed_at}"
    for part, weights in a["parts"]["models"].items():  # e.g. the hint projection
        for key, tensor in weights.items():
            assert torch.equal(tensor, b["parts"]["models"][part][key]), f"{name}: {part}/{key} differs"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    for part, opt_state in a["parts"]["optimizers"].items():  # e.g. MPL's teacher and finetune optimizers
        assert opt_state["state"].keys() == b["parts"]["optimizers"][part]["state"].keys(), part
        for k, v in opt_state["state"].items():
            assert torch.equal(v["momentum_buffer"], b["parts"]["optimizers"][part]["state"][k]["momentum_buffer"])
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


class _PoisonWeights(Callback):
    """Set the first weight to NaN before step ``at``: the step's loss becomes NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_start(self, trainer, global_step):
        if global_step == self.at:
            with torch.no_grad():
                next(trainer.unwrapped_model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("name", TRAINERS.names())
def test_nan_loss_stops_with_the_fix_and_keeps_the_last_checkpoint(name, teacher_run, tmp_path):
    run_dir = tmp_path / "run"
    recipe = load_recipe("quickstart", TINY + CONTRACT_OVERRIDES[name](teacher_run) +
                         ["trainer.epochs=2", "trainer.checkpoint_every_steps=2"])
    exp = build(recipe, run_dir=run_dir)
    exp.trainer.callbacks.append(_PoisonWeights(at=6))
    with pytest.raises(NonFiniteLossError, match=r"step 6\).*last good checkpoint is intact.*optimizer\.lr"):
        exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=2)
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    assert meta["global_step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("name", TRAINERS.names())
def test_find_lr_leaves_no_trace(name, teacher_run):
    args = TINY + _overrides(name, teacher_run) + ["trainer.epochs=1", "trainer.ema_decay=0.9"]
    plain = build(load_recipe("quickstart", args))
    swept = build(load_recipe("quickstart", args))
    result = find_lr(swept.trainer, swept.train_loader, num_iters=12, progress=False)
    assert len(result.lrs) >= 2 and result.settings["part"] == swept.trainer.resolve_part(None)
    plain.trainer.fit(plain.train_loader, epochs=1)
    swept.trainer.fit(swept.train_loader, epochs=1)
    a, b = plain.trainer.state_dict(), swept.trainer.state_dict()
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{name}: {part}/{key} differs after find_lr"
    for part, weights in a["parts"]["models"].items():
        for key in weights:
            assert torch.equal(weights[key], b["parts"]["models"][part][key])
    assert plain.trainer.history[-1]["train_loss"] == swept.trainer.history[-1]["train_loss"]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.parametrize("name", TRAINERS.names())
def test_evaluation_counts_each_sample_once_under_two_processes(name, teacher_run, tmp_path):
    out = tmp_path / "eval.json"
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    args = LAUNCH + [str(ROOT / "tests" / "contract_ddp_worker.py"), str(out), *TINY, *_overrides(name, teacher_run)]
    result = run_launched(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["num_processes"] == 2
    assert report["targets"] == report["expected"], "each sample once, in order, padding removed"
    assert report["top1"] == pytest.approx(report["top1_check"])


# -- a toy two-optimizer algorithm in manual mode, against a hand-written loop -------------
class TwoPartTrainer(Trainer):
    """Manual mode: part ``a`` steps on the labels, then part ``b`` on the labels plus
    matching ``a``'s (updated) predictions, each with its own optimizer and schedule."""

    manual_steps = True

    def training_step(self, batch):
        images, targets = batch
        with self.autocast():
            loss_a = F.cross_entropy(self.models["a"](images), targets)
        self.backward(loss_a, "a")
        self.step("a")
        with self.autocast():
            with torch.no_grad():
                guide = self.models["a"](images)
            out_b = self.models["b"](images)
            loss_b = F.cross_entropy(out_b, targets) + 0.5 * F.mse_loss(out_b, guide)
        self.backward(loss_b, "b")
        self.step("b")
        return StepOutput(loss_b.detach(), {"loss_a": loss_a.detach()})


def _toy_parts(seed: int = 0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5)
    return a, b, opt_a, opt_b, sched_a


def _toy_trainer(run_dir=None, **kw):
    a, b, opt_a, opt_b, sched_a = _toy_parts()
    callbacks = [ModelCheckpoint(run_dir, monitor=None, every_n_steps=2)] if run_dir is not None else []
    return TwoPartTrainer(models={"a": a, "b": b}, optimizers={"a": opt_a, "b": opt_b}, schedulers={"a": sched_a},
                          loss_fn=nn.CrossEntropyLoss(), primary="b", progress=False, seed=3, grad_clip=1.0,
                          run_dir=run_dir, callbacks=callbacks, **kw)


def test_toy_two_optimizer_algorithm_equals_its_hand_written_loop():
    ds = make_blobs_dataset(n=96)
    trainer = _toy_trainer()
    trainer.fit(InMemoryLoader(ds, 16, seed=5), epochs=2)

    a, b, opt_a, opt_b, sched_a = _toy_parts()
    loader = InMemoryLoader(ds, 16, seed=5)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, targets in loader:
            x = images.float() / 255.0
            loss_a = F.cross_entropy(a(x), targets)
            loss_a.backward()
            torch.nn.utils.clip_grad_norm_(list(a.parameters()), 1.0)
            opt_a.step()
            opt_a.zero_grad()
            sched_a.step()
            with torch.no_grad():
                guide = a(x)
            out_b = b(x)
            loss_b = F.cross_entropy(out_b, targets) + 0.5 * F.mse_loss(out_b, guide)
            loss_b.backward()
            torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
            opt_b.step()
            opt_b.zero_grad()
    for mine, theirs in ((trainer.unwrap("a"), a), (trainer.unwrap("b"), b)):
        for (key, p), q in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q), key
    assert trainer.global_step == 12 and trainer.current_lr("a") == sched_a.get_last_lr()[0]
    assert "loss_a" in trainer.history[-1] and "lr_a" in trainer.history[-1]


def test_toy_two_optimizer_resume_restores_every_part(tmp_path):
    ds = make_blobs_dataset(n=96)
    full = _toy_trainer(tmp_path / "full")
    full.fit(InMemoryLoader(ds, 16, seed=5), epochs=2)

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_step_end(self, trainer, global_step, logs=None):
            if global_step == 9:  # mid-epoch 2, one step after the checkpoint at step 8
                raise Stop

    cut = _toy_trainer(tmp_path / "cut")
    cut.callbacks.append(StopAt())
    with pytest.raises(Stop):
        cut.fit(InMemoryLoader(ds, 16, seed=5), epochs=2)
    resumed = _toy_trainer(tmp_path / "cut")
    resumed.fit(InMemoryLoader(ds, 16, seed=5), epochs=2, resume_from=tmp_path / "cut" / "last.safetensors")
    for part in ("a", "b"):
        for (key, p), q in zip(full.unwrap(part).state_dict().items(), resumed.unwrap(part).state_dict().values()):
            assert torch.equal(p, q), f"{part}/{key}"
    for name in ("a", "b"):
        sa, sb = full.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        for k in sa:
            for field, value in sa[k].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[k][field])), f"{name} {k} {field}"
    assert full.schedulers["a"].state_dict() == resumed.schedulers["a"].state_dict()
    assert torch.equal(full.shared_generator.get_state(), resumed.shared_generator.get_state())


def test_manual_mode_refuses_accumulation_with_a_clear_message():
    a, b, opt_a, opt_b, _ = _toy_parts()
    with pytest.raises(ValueError, match="gradient accumulation is not supported.*grad_accum_steps=1"):
        TwoPartTrainer(models={"a": a, "b": b}, optimizers={"a": opt_a, "b": opt_b}, loss_fn=nn.CrossEntropyLoss(),
                       grad_accum_steps=2)


def test_find_lr_sweeps_a_named_part_and_leaves_no_trace():
    ds = make_blobs_dataset(n=96)
    plain, swept = _toy_trainer(), _toy_trainer()
    result = find_lr(swept, InMemoryLoader(ds, 16, seed=5), num_iters=8, end_lr=1.0, part="a", progress=False)
    assert result.settings["part"] == "a" and len(result.lrs) >= 2
    plain.fit(InMemoryLoader(ds, 16, seed=5), epochs=1)
    swept.fit(InMemoryLoader(ds, 16, seed=5), epochs=1)
    for part in ("a", "b"):
        for p, q in zip(plain.unwrap(part).parameters(), swept.unwrap(part).parameters()):
            assert torch.equal(p, q), part
    with pytest.raises(Exception, match="no optimizer part 'c'"):
        find_lr(swept, InMemoryLoader(ds, 16, seed=5), num_iters=4, part="c")


class _Recorder(Callback):
    def __init__(self) -> None:
        self.starts, self.ends, self.draws = [], [], []

    def on_step_start(self, trainer, global_step):
        self.starts.append(global_step)
        self.draws.append(int(torch.randint(0, 1000, (1,), generator=trainer.shared_generator)))

    def on_step_end(self, trainer, global_step, logs=None):
        self.ends.append((global_step, sorted(logs), float(logs["train_loss"])))


def test_step_hooks_get_the_logs_and_the_shared_generator_resumes(tmp_path):
    ds = make_blobs_dataset(n=96)
    rec = _Recorder()
    trainer = _toy_trainer(tmp_path / "a")
    trainer.callbacks.append(rec)
    trainer.fit(InMemoryLoader(ds, 16, seed=5), epochs=2)
    assert rec.starts == list(range(1, 13)) and [e[0] for e in rec.ends] == rec.starts
    assert rec.ends[0][1] == ["loss_a", "train_loss"]
    # the step mean of train_loss, folded over the epoch, is the epoch's train_loss
    epoch2 = [e[2] for e in rec.ends[6:]]
    assert sum(epoch2) / 6 == pytest.approx(trainer.history[-1]["train_loss"], rel=1e-6)
    # the generator is seeded by the trainer's seed and restored from checkpoints
    resumed = _toy_trainer(tmp_path / "a")
    resumed.load_checkpoint(tmp_path / "a" / "last.safetensors")
    assert torch.equal(resumed.shared_generator.get_state(), trainer.shared_generator.get_state())
    fresh = torch.Generator().manual_seed(3)
    assert rec.draws == [int(torch.randint(0, 1000, (1,), generator=fresh)) for _ in range(12)]


class _Counter:
    """Registered state that is not a module."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_registered_state_is_saved_restored_and_required(tmp_path):
    ds = make_blobs_dataset(n=96)
    trainer = _toy_trainer(tmp_path / "r")
    counter = trainer.register_state("counter", _Counter())
    counter.n = 41
    trainer.fit(InMemoryLoader(ds, 16, seed=5), epochs=1)
    other = _toy_trainer()
    restored = other.register_state("counter", _Counter())
    other.load_checkpoint(tmp_path / "r" / "last.safetensors")
    assert restored.n == 41
    without = _toy_trainer()
    without.register_state("missing", _Counter())
    with pytest.raises(CheckpointError, match="has no state 'missing'"):
        without.load_checkpoint(tmp_path / "r" / "last.safetensors")


def test_find_unused_parameters_reaches_ddp_from_the_recipe():
    from accelerate.utils import DistributedDataParallelKwargs

    from convrecipes.build import make_accelerator

    acc = make_accelerator(load_recipe("quickstart", ["trainer.find_unused_parameters=true"]))
    handler = acc.ddp_handler
    assert isinstance(handler, DistributedDataParallelKwargs) and handler.find_unused_parameters


class _SemiSupervised(Trainer):
    """Named streams: supervised CE on the labeled batch plus entropy minimisation on the
    unlabeled one; the base never looks inside the batch."""

    def prepare_train_batch(self, batch):
        (xl, yl), (xu, _) = batch.labeled, batch.unlabeled
        xl, yl = self.prepare_batch(xl, yl, train=True)
        xu, _ = self.prepare_batch(xu, torch.zeros(len(xu), dtype=torch.long), train=True)
        return xl, yl, xu

    def training_step(self, batch):
        xl, yl, xu = batch
        ce = F.cross_entropy(self.model(xl), yl)
        p = self.model(xu).softmax(1)
        entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
        return StepOutput(ce + 0.1 * entropy, {"entropy": entropy.detach()}, batch_size=len(xl))


def _semi(run_dir):
    from convrecipes.data.semi_supervised import SemiSupervisedLoader

    ds = make_blobs_dataset(n=96)
    unl = make_blobs_dataset(n=160, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = SemiSupervisedLoader(InMemoryLoader(ds, 16, seed=1), InMemoryLoader(unl, 32, seed=2))
    callbacks = [ModelCheckpoint(run_dir, monitor=None, every_n_steps=4)] if run_dir is not None else []
    trainer = _SemiSupervised(model, opt, nn.CrossEntropyLoss(), progress=False, run_dir=run_dir,
                              callbacks=callbacks)
    return trainer, loader


def test_a_semi_supervised_stream_trains_and_resumes_exactly(tmp_path):
    full, loader = _semi(tmp_path / "full")
    full.fit(loader, epochs=2)
    assert "entropy" in full.history[-1] and full.global_step == 12

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_step_end(self, trainer, global_step, logs=None):
            if global_step == 9:
                raise Stop

    cut, loader = _semi(tmp_path / "cut")
    cut.callbacks.append(StopAt())
    with pytest.raises(Stop):
        cut.fit(loader, epochs=2)
    resumed, loader = _semi(tmp_path / "cut")
    resumed.fit(loader, epochs=2, resume_from=tmp_path / "cut" / "last.safetensors")
    for p, q in zip(full.unwrapped_model.parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(p, q)


def test_a_stream_the_trainer_cannot_take_is_a_clear_error():
    trainer, loader = _semi(None)
    plain = Trainer(trainer.unwrapped_model, torch.optim.SGD(trainer.unwrapped_model.parameters(), lr=0.1),
                    nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(TypeError, match="trains on \\(images, targets\\) batches.*SemiSupervisedBatch"):
        plain.fit(loader, epochs=1)
