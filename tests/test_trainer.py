"""The training loop: accumulation, clipping, NaN guard, EMA, callbacks, logs, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from convrecipes.augment import build_augment, build_eval_transform
from convrecipes.checkpoint import load_checkpoint
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import CheckpointError, NonFiniteLossError
from convrecipes.models import create_model
from convrecipes.trainers import EarlyStopping, ModelCheckpoint, SupervisedTrainer
from tests.conftest import make_blobs_dataset


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


def _trainer(model, lr=0.1, momentum=0.0, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    kw.setdefault("progress", False)
    return SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), **kw)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_matches_one_big_batch(blobs):
    """Two micro-batches of 16 with accumulation = one batch of 32 (no BatchNorm, plain SGD)."""
    big = _trainer(_mlp())
    big.fit(InMemoryLoader(blobs, 32, seed=3), epochs=2)
    acc = _trainer(_mlp(), grad_accum_steps=2)
    acc.fit(InMemoryLoader(blobs, 16, seed=3), epochs=2)
    assert big.global_step == acc.global_step == 6
    torch.testing.assert_close(_params(big.model), _params(acc.model), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_params(big.model), _params(_mlp()))


def test_accumulation_with_a_partial_last_group(blobs):
    """96 samples / 16 = 6 micro-batches; accumulating 4 gives steps of 4 and 2 micro-batches."""
    t = _trainer(_mlp(), grad_accum_steps=4)
    t.fit(InMemoryLoader(blobs, 16, seed=0), epochs=1)
    assert t.global_step == 2


def test_gradient_clipping_bounds_the_update(blobs):
    """With plain SGD the first update is lr * clipped gradient, whose norm is the clip value."""
    model = _mlp()
    before = _params(model).clone()
    t = _trainer(model, lr=1.0, grad_clip=1e-3)
    loader = InMemoryLoader(blobs, 96, seed=0)
    t.fit(loader, epochs=1)
    step = (_params(t.model) - before).norm().item()
    assert step == pytest.approx(1e-3, rel=1e-3)


class _NaNAfter(nn.Module):
    """Cross-entropy that turns NaN on its ``bad_call``-th call."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == self.bad_call else loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(blobs, tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # nan_check_every_steps=1: the exact guard, before the bad step's update (the default
    # checks later, without a host sync per step: tests/test_fast_step.py)
    t = SupervisedTrainer(model, opt, _NaNAfter(bad_call=5), progress=False, nan_check_every_steps=1,
                          callbacks=[ModelCheckpoint(tmp_path, every_n_steps=1)])
    with pytest.raises(NonFiniteLossError, match="lower the learning rate") as info:
        t.fit(InMemoryLoader(blobs, 16, seed=0), epochs=3)
    assert "last.safetensors" in str(info.value)
    state, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["global_step"] == 4
    for name, w in state["model"].items():
        assert torch.isfinite(w).all(), name
        # the checkpoint holds the weights from right before the bad step, which were never updated
        torch.testing.assert_close(w, t.unwrapped_model.state_dict()[name], rtol=0, atol=0)


def test_metrics_log_plot_and_top5_rule(tmp_path):
    ds10 = make_blobs_dataset(num_classes=10, n=100)
    ds4 = make_blobs_dataset(num_classes=4, n=40)
    for ds, has_top5 in ((ds10, True), (ds4, False)):
        model = create_model("tiny_cnn", 1, ds.num_classes, width=4)
        run = tmp_path / f"c{ds.num_classes}"
        t = _trainer(model, run_dir=run, ema_decay=0.9)
        history = t.fit(InMemoryLoader(ds, 20), InMemoryLoader(ds, 32, shuffle=False, drop_last=False), epochs=2)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in lines] == [1, 2] and lines == history
        for key in ("train_loss", "val_loss", "val_top1", "lr", "images_per_s", "ema_val_top1"):
            assert key in lines[-1], key
        assert ("val_top5" in lines[-1]) == has_top5
        assert (run / "curves.png").stat().st_size > 1000


def test_evaluate_counts_every_sample_once():
    """13 samples in batches of 4: the last batch is partial; accuracy is over exactly 13."""
    ds = make_blobs_dataset(n=13)
    model = _mlp()
    t = _trainer(model)
    loader = InMemoryLoader(ds, 4, shuffle=False, drop_last=False)
    logits, targets, _ = t.predict(loader)
    assert targets.tolist() == ds.labels.tolist()
    expected = 100.0 * (logits.argmax(1) == ds.labels).float().mean().item()
    assert t.evaluate(loader)["top1"] == pytest.approx(expected)


def test_early_stopping_and_best_checkpoint(blobs, tmp_path):
    class Scripted(EarlyStopping):
        def on_epoch_end(self, trainer, metrics):
            metrics["val_top1"] = [50.0, 60.0, 55.0, 58.0, 59.0, 70.0][trainer.epoch - 1]
            super().on_epoch_end(trainer, metrics)

    ckpt = ModelCheckpoint(tmp_path, monitor="val_top1", mode="max")
    stop = Scripted(monitor="val_top1", mode="max", patience=3)
    t = _trainer(_mlp(), callbacks=[stop, ckpt])
    t.fit(InMemoryLoader(blobs, 32), epochs=6)
    assert t.epoch == 5  # epochs 3, 4, 5 did not beat 60
    _, meta = load_checkpoint(tmp_path / "best.safetensors")
    assert meta["epoch"] == 2 and ckpt.best == 60.0


def _resumable_trainer(run_dir, ds, **kw):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 1, ds.num_classes, width=4, drop_rate=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    aug = build_augment("light", (8, 8), 1, [0.3], [0.3], ds.num_classes, hflip=True)
    return SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, augment=aug,
                             eval_transform=build_eval_transform([0.3], [0.3]), ema_decay=0.9,
                             grad_accum_steps=2, run_dir=run_dir, progress=False, seed=7,
                             callbacks=[ModelCheckpoint(run_dir, every_n_steps=2)], **kw)


def test_resume_mid_epoch_is_bit_identical(blobs, tmp_path):
    full = _resumable_trainer(tmp_path / "full", blobs)
    val = InMemoryLoader(blobs, 32, shuffle=False, drop_last=False)
    full.fit(InMemoryLoader(blobs, 8, seed=1), val, epochs=3)

    class Stop(Exception):
        pass

    first = _resumable_trainer(tmp_path / "cut", blobs)

    def stop_at_step(trainer, step):
        if step == 9:  # mid-epoch 2 (6 optimizer steps per epoch), just after a checkpoint at step 8
            raise Stop

    first.callbacks[0].on_step_end = lambda trainer, step, logs=None, _cb=first.callbacks[0]: (
        type(_cb).on_step_end(_cb, trainer, step, logs), stop_at_step(trainer, step))
    with pytest.raises(Stop):
        first.fit(InMemoryLoader(blobs, 8, seed=1), val, epochs=3)
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG at start
    second = _resumable_trainer(tmp_path / "cut", blobs)
    second.fit(InMemoryLoader(blobs, 8, seed=1), val, epochs=3, resume_from=tmp_path / "cut" / "last.safetensors")
    for (name, a), b in zip(full.unwrapped_model.state_dict().items(), second.unwrapped_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.ema.module.state_dict().values(), second.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert full.history[-1]["train_loss"] == second.history[-1]["train_loss"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_resume_into_another_architecture_is_a_clear_error(blobs, tmp_path):
    t = _resumable_trainer(tmp_path, blobs)
    t.fit(InMemoryLoader(blobs, 8, seed=1), epochs=1)
    other = _trainer(_mlp())
    with pytest.raises(CheckpointError, match="another architecture"):
        other.load_checkpoint(tmp_path / "last.safetensors")


def test_eval_every_epochs_validates_less_and_trains_the_same_weights(tmp_path):
    from convrecipes.build import build
    from convrecipes.recipe import load_recipe

    args = ["trainer.progress=false", "model.kwargs.width=4", "data.subset_per_class=20", "data.batch_size=16",
            "trainer.epochs=5", "schedule.warmup_epochs=0"]
    every = build(load_recipe("quickstart", args), run_dir=tmp_path / "a")
    sparse = build(load_recipe("quickstart", args + ["trainer.eval_every_epochs=2"]), run_dir=tmp_path / "b")
    every.trainer.fit(every.train_loader, every.val_loader, epochs=5)
    history = sparse.trainer.fit(sparse.train_loader, sparse.val_loader, epochs=5)
    assert [("val_top1" in m) for m in history] == [False, True, False, True, True]  # every 2nd and the last
    a, b = every.trainer.unwrapped_model.state_dict(), sparse.trainer.unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "best.safetensors").is_file()
