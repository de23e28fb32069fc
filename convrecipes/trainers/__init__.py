"""Trainers: the loop (``Trainer``) and one module per training algorithm."""

from convrecipes.registry import Registry
from convrecipes.trainers.base import StepOutput, Trainer
from convrecipes.trainers.callbacks import Callback, EarlyStopping, ModelCheckpoint
from convrecipes.trainers.distillation import DistillationTrainer
from convrecipes.trainers.supervised import SupervisedTrainer

TRAINERS: Registry[type] = Registry("trainer")
TRAINERS.register("supervised")(SupervisedTrainer)
TRAINERS.register("distillation")(DistillationTrainer)

__all__ = [
    "TRAINERS", "Trainer", "StepOutput", "SupervisedTrainer", "DistillationTrainer",
    "Callback", "EarlyStopping", "ModelCheckpoint",
]
