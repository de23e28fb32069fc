"""``SupervisedTrainer``: plain supervised training, the base loop unchanged."""

from __future__ import annotations

from convrecipes.trainers.base import Trainer


class SupervisedTrainer(Trainer):
    """Supervised training: ``loss_fn(model(images), targets)``.

    The base class's ``training_step`` is exactly this; the subclass exists so recipes and
    user code name the algorithm they run, like the other trainers.
    """
