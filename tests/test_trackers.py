"""Trackers through Accelerate: a TensorBoard run read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest

from convrecipes.errors import RecipeError
from convrecipes.recipe import load_recipe
from convrecipes.run import train_recipe

pytest.importorskip("tensorboard")


def test_tensorboard_event_file_holds_step_loss_and_epoch_accuracy(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    recipe = load_recipe("quickstart", ["model.kwargs.width=4", "trainer.epochs=2", "trainer.progress=false",
                                        "data.subset_per_class=30", "data.batch_size=16",
                                        "trainer.log_with=tensorboard", "trainer.log_every_steps=1"])
    result = train_recipe(recipe, run_dir)
    # the tracker logs to <run dir>/<project = run dir name>; hparams go to a subfolder
    logdir = run_dir / run_dir.name
    assert list(logdir.glob("events.out.tfevents.*")), f"no event file in {logdir}"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss = acc.Scalars("step/train_loss")
    total_steps = 2 * (270 // 16)
    assert [e.step for e in loss] == list(range(1, total_steps + 1)), "one loss point per step"
    assert "step/lr" in tags
    top1 = acc.Scalars("epoch/val_top1")
    assert [e.step for e in top1] == [total_steps // 2, total_steps]
    assert [round(e.value, 4) for e in top1] == [round(h["val_top1"], 4) for h in result.history]


def test_an_unknown_or_missing_tracker_is_a_clear_error(tmp_path):
    recipe = load_recipe("quickstart", ["trainer.log_with=tensorbord", "trainer.progress=false"])
    with pytest.raises(RecipeError, match="unknown tracker 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"):
        train_recipe(recipe, tmp_path / "run")
