"""The fast step (issue 17, item 3): the NaN guard without a host sync per step, thread
resolution, fused optimizers, channels-last and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from convrecipes.build import build
from convrecipes.checkpoint import load_checkpoint, load_model_weights
from convrecipes.data.loader import InMemoryLoader
from convrecipes.errors import NonFiniteLossError, RecipeError
from convrecipes.models import create_model
from convrecipes.optim import build_optimizer, fused_kwargs
from convrecipes.recipe import load_recipe
from convrecipes.threads import _cores_from_topology, resolve_threads
from convrecipes.trainers import ModelCheckpoint, SupervisedTrainer
from convrecipes import threads as threads_module
from tests.conftest import make_blobs_dataset


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


class _NaNFrom(nn.Module):
    """Cross-entropy that is NaN on its ``bad_call``-th call (its gradients too)."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == self.bad_call else loss


def _nan_trainer(tmp_path, bad_call, every_n_steps, **kw):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callbacks = [ModelCheckpoint(tmp_path, every_n_steps=every_n_steps)] if every_n_steps else []
    return SupervisedTrainer(model, opt, _NaNFrom(bad_call), progress=False, callbacks=callbacks, **kw)


# -- the NaN guard --------------------------------------------------------------------
def test_nan_mid_window_stops_at_the_next_checkpoint_which_is_not_written(tmp_path):
    """NaN at step 5 with checks every 10 steps: the checkpoint due at step 6 finds it first,
    names step 5, and last.safetensors stays the finite one of step 3."""
    blobs = make_blobs_dataset(n=160)  # 10 steps of 16 per epoch
    t = _nan_trainer(tmp_path, bad_call=5, every_n_steps=3, nan_check_every_steps=10)
    with pytest.raises(NonFiniteLossError, match=r"\(step 5\); training stopped after step 6 .*last good checkpoint "
                                                 r"is intact .*last\.safetensors.*optimizer\.lr"):
        t.fit(InMemoryLoader(blobs, 16, seed=0), epochs=2)
    state, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["global_step"] == 3
    assert all(bool(torch.isfinite(w).all()) for w in state["model"].values())
    # what changed: the steps after the bad one updated the weights in memory with NaN gradients
    assert not all(bool(torch.isfinite(p).all()) for p in t.unwrapped_model.parameters())


@pytest.mark.parametrize("epochs_steps, expected_stop", [(10, 10), (4, 8)])
def test_nan_without_checkpoints_is_found_at_the_check_or_the_epoch_end(tmp_path, epochs_steps, expected_stop):
    """No checkpoint in the window: the periodic check (every 10 steps) or the epoch's end
    (4 steps an epoch) stops the run, naming the bad step (6)."""
    blobs = make_blobs_dataset(n=16 * epochs_steps)
    t = _nan_trainer(tmp_path, bad_call=6, every_n_steps=None, nan_check_every_steps=10)
    with pytest.raises(NonFiniteLossError, match=rf"\(step 6\); training stopped after step {expected_stop} "):
        t.fit(InMemoryLoader(blobs, 16, seed=0), epochs=3)
    assert t.global_step == expected_stop


def test_the_exact_guard_stops_before_the_update(tmp_path):
    t = _nan_trainer(tmp_path, bad_call=5, every_n_steps=None, nan_check_every_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"\(step 5\); training stopped before this step"):
        t.fit(InMemoryLoader(make_blobs_dataset(n=160), 16, seed=0), epochs=1)
    assert t.global_step == 4 and all(bool(torch.isfinite(p).all()) for p in t.unwrapped_model.parameters())


def _count_host_reads(monkeypatch, trainer, loader, epochs=1):
    """Tensor -> Python reads (item, float, int, bool, tolist) made while ``fit`` trains."""
    counts = {"n": 0}
    inside = {"on": False}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if inside["on"]:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    train_epoch = trainer._train_epoch

    def counted(*args, **kwargs):
        inside["on"] = True
        try:
            return train_epoch(*args, **kwargs)
        finally:
            inside["on"] = False

    monkeypatch.setattr(trainer, "_train_epoch", counted)
    trainer.fit(loader, epochs=epochs)
    return counts["n"]


def test_host_reads_per_step_go_down(monkeypatch):
    """20 steps: with the check and the progress line every 5 steps, two reads per 5 steps
    plus a constant for the epoch's end (the summary metrics); the exact guard reads at least
    once a step."""
    blobs = make_blobs_dataset(n=320)  # 20 steps of 16
    every = 5
    fast = SupervisedTrainer(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), nn.CrossEntropyLoss(),
                             progress=True, nan_check_every_steps=every, log_every_steps=every)
    n_fast = _count_host_reads(monkeypatch, fast, InMemoryLoader(blobs, 16, seed=0))
    exact = SupervisedTrainer(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), nn.CrossEntropyLoss(),
                              progress=False, nan_check_every_steps=1)
    n_exact = _count_host_reads(monkeypatch, exact, InMemoryLoader(blobs, 16, seed=0))
    assert fast.global_step == exact.global_step == 20
    assert n_fast <= 2 * math.ceil(20 / every) + 3, n_fast
    assert n_exact >= 20


def test_the_check_interval_is_validated():
    with pytest.raises(RecipeError, match="nan_check_every_steps must be an integer >= 1"):
        SupervisedTrainer(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), nn.CrossEntropyLoss(),
                          nan_check_every_steps=0)
    with pytest.raises(RecipeError, match="trainer.nan_check_every_steps"):
        load_recipe("quickstart", ["trainer.nan_check_every_steps=0"])


# -- threads --------------------------------------------------------------------------
@pytest.mark.parametrize("requested, cores, processes, env, expected", [
    (None, 8, 1, {}, 8),                          # all physical cores
    (None, 8, 2, {}, 4),                          # shared among the machine's processes
    (None, 2, 4, {}, 1),                          # never below one
    (None, 8, 3, {}, 2),                          # rounded down: never oversubscribed
    (None, 8, 1, {"OMP_NUM_THREADS": "3"}, 3),    # the environment is respected
    (None, 8, 1, {"OMP_NUM_THREADS": "x"}, 8),    # ... when it is a count
    (5, 8, 2, {"OMP_NUM_THREADS": "1"}, 5),       # an explicit setting wins
])
def test_thread_resolution(requested, cores, processes, env, expected):
    threads, why = resolve_threads(requested, cores, processes, env)
    assert threads == expected and why


def test_physical_cores_from_the_topology(tmp_path, monkeypatch):
    """Four logical CPUs, two hyper-threads per core: two physical cores; a subset on one
    core: one."""
    for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(threads_module, "_SYS_CPU", tmp_path)
    assert _cores_from_topology({0, 1, 2, 3}) == 2
    assert _cores_from_topology({0, 2}) == 1
    assert _cores_from_topology({0, 7}) is None  # unreadable: the caller falls back


# -- fused optimizers -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_matches_the_loop(name):
    """Five steps of the recipe's optimizer, fused and per-parameter, from the same weights
    and gradients: the same weights."""
    results = []
    for fused in (True, False):
        model = create_model("tiny_cnn", 1, 4, width=4)
        torch.manual_seed(0)
        model.load_state_dict(create_model("tiny_cnn", 1, 4, width=4).state_dict())
        opt = build_optimizer(model, name, lr=0.05, weight_decay=5e-4, fused=fused)
        assert opt.param_groups[0]["fused"] is (True if fused else None)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_fused_is_the_default_where_it_is_safe():
    assert fused_kwargs("adamw") == fused_kwargs("adam") == {"fused": True}
    assert fused_kwargs("sgd") == fused_kwargs("adamax") == {"foreach": True}
    assert fused_kwargs("sgd", True) == {"fused": True} and fused_kwargs("sgd", False) == {}
    with pytest.raises(RecipeError, match="no fused adamax"):
        fused_kwargs("adamax", True)


def test_a_resume_keeps_the_optimizer_implementation(tmp_path):
    """A checkpoint written by the per-parameter loop resumes fused (the flag is how the
    optimizer computes, which torch's load_state_dict would take from the checkpoint), with
    the same momentum buffers."""
    _, path, loop = _losses_and_checkpoint(tmp_path / "loop", ["optimizer.fused=false"])
    fused = build(load_recipe("quickstart", TINY + ["optimizer.fused=true"]), run_dir=tmp_path / "fused")
    fused.trainer.load_checkpoint(path)
    assert all(g["fused"] is True for g in fused.trainer.optimizer.param_groups)
    for a, b in zip(loop.trainer.optimizer.state.values(), fused.trainer.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.parametrize("name", ["sgd", "adamw", "adamax"])
def test_the_default_optimizer_takes_a_parameter_that_starts_training_late(name):
    """A layer without gradient for the first steps (frozen, then unfrozen): the default
    kernel (foreach SGD, fused AdamW) steps it as the per-parameter loop does."""
    results = []
    for fused in (None, False):
        model = _mlp()
        opt = build_optimizer(model, name, lr=0.05, weight_decay=5e-4, fused=fused)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            model[1].weight.requires_grad_(step >= 2)  # no gradient in the first two steps
            x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# -- channels-last and compile ------------------------------------------------------------
TINY = ["model.kwargs.width=4", "trainer.progress=false", "data.subset_per_class=20", "data.batch_size=16",
        "schedule.warmup_epochs=0", "trainer.epochs=1", "model.channels_last=false"]


def _losses_and_checkpoint(tmp_path, overrides):
    exp = build(load_recipe("quickstart", TINY + overrides), run_dir=tmp_path)
    losses = []
    for raw in list(exp.train_loader)[:4]:
        losses.append(float(exp.trainer.train_step([raw]).loss))
    path = exp.trainer.save_checkpoint(tmp_path / "last.safetensors")
    return losses, path, exp


def _loads_into_a_plain_model(path, exp):
    state, _ = load_checkpoint(path)
    assert not any("_orig_mod" in k for k in state["model"])
    plain = create_model("tiny_cnn", 1, exp.datasets.num_classes, width=4)
    load_model_weights(plain, state["model"], path)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), exp.trainer.unwrapped_model.eval()(x), rtol=1e-4, atol=1e-5)


def test_channels_last_trains_like_the_plain_layout(tmp_path):
    plain, _, _ = _losses_and_checkpoint(tmp_path / "plain", [])
    fast, path, exp = _losses_and_checkpoint(tmp_path / "cl", ["model.channels_last=true"])
    assert len(plain) == 4 and plain[0] != plain[-1]
    assert fast == pytest.approx(plain, rel=1e-4)
    _loads_into_a_plain_model(path, exp)


@pytest.mark.slow  # two compilations, about 35 s each on 2 CPU cores (92 s measured under load)
def test_compile_trains_like_the_plain_model_and_resumes(tmp_path):
    plain, _, _ = _losses_and_checkpoint(tmp_path / "plain", ["trainer.ema_decay=0.9"])
    fast, path, exp = _losses_and_checkpoint(tmp_path / "compiled", ["trainer.compile=true", "trainer.ema_decay=0.9"])
    assert exp.trainer.compiled
    assert fast == pytest.approx(plain, rel=1e-4)
    _loads_into_a_plain_model(path, exp)
    state, _ = load_checkpoint(path)
    assert not any("_orig_mod" in k for k in state["ema"])
    # resume: a fresh compiled trainer takes the checkpoint and trains on
    again = build(load_recipe("quickstart", TINY + ["trainer.compile=true", "trainer.ema_decay=0.9"]),
                  run_dir=tmp_path / "again")
    again.trainer.load_checkpoint(path)
    assert again.trainer.global_step == 4
    raw = next(iter(again.train_loader))
    assert math.isfinite(float(again.trainer.train_step([raw]).loss))
