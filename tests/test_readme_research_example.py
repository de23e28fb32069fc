"""The README's "Using convrecipes in your own training code" example runs as written and
is what it says it is: a plain torch DataLoader, a model of the user's own, losses from the
zoo and a cyclic schedule, in a plain loop and in SupervisedTrainer."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from convrecipes.losses import LossOutput, WeightedSumLoss
from convrecipes.schedulers import CyclicSchedule

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- research-example -->"


def _research_example() -> str:
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README.md has a ```python block right after {MARKER}"
    return match.group(1)


def test_readme_research_example_runs_as_written(tmp_path, monkeypatch, capsys):
    source = _research_example()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_research_example"}
    exec(compile(source, str(README), "exec"), namespace)
    printed = capsys.readouterr().out

    # what the README promises it uses
    assert isinstance(namespace["train"], DataLoader) and isinstance(namespace["test"], DataLoader)
    model_cls = namespace["Net"]
    assert issubclass(model_cls, nn.Module) and model_cls.__module__ == "readme_research_example"
    assert isinstance(namespace["schedule"], CyclicSchedule)
    assert isinstance(namespace["loss_fn"], WeightedSumLoss)

    # the plain loop trained: the losses gave tensors, the schedule came back to base_lr
    # after one triangular2 cycle (2 epochs up, 2 down), the centers moved
    assert isinstance(namespace["loss"], torch.Tensor) and torch.isfinite(namespace["loss"])
    assert namespace["accuracy"] > 0.8, printed
    assert namespace["center"].centers.abs().sum() > 0
    assert "plain loop: test accuracy" in printed and "LR back at 0.01" in printed

    # the trainer logged each part of the loss and learned
    last = namespace["trainer"].history[-1]
    assert {"ce", "center", "train_loss", "val_top1"} <= set(last), last
    assert abs(last["ce"] + last["center"] - last["train_loss"]) < 1e-6 * max(1.0, last["train_loss"])
    assert last["val_top1"] > 80.0, last
    assert last["lr"] == 0.01

    # what a loss call returns in such a loop
    x, y = next(iter(namespace["test"]))
    out = namespace["loss_fn"](namespace["model"](x), y)
    assert isinstance(out, LossOutput) and set(out.parts) == {"ce", "center"}
