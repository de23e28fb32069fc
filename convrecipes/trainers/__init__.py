"""Trainers: the loop (``Trainer``) and one module per training algorithm."""

from convrecipes.registry import Registry
from convrecipes.trainers.base import StepOutput, Trainer
from convrecipes.trainers.bootstrapping import BootstrappingTrainer
from convrecipes.trainers.callbacks import Callback, EarlyStopping, ModelCheckpoint
from convrecipes.trainers.distillation import DistillationTrainer
from convrecipes.trainers.freeze_drop_path import FreezeDropPathTrainer
from convrecipes.trainers.meta_pseudo_labels import MetaPseudoLabelsTrainer
from convrecipes.trainers.supervised import SupervisedTrainer
from convrecipes.trainers.uda import UDATrainer

TRAINERS: Registry[type] = Registry("trainer")
TRAINERS.register("supervised")(SupervisedTrainer)
TRAINERS.register("distillation")(DistillationTrainer)
TRAINERS.register("uda")(UDATrainer)
TRAINERS.register("mpl")(MetaPseudoLabelsTrainer)
TRAINERS.register("bootstrapping")(BootstrappingTrainer)
TRAINERS.register("freeze_drop_path")(FreezeDropPathTrainer)

__all__ = [
    "TRAINERS", "Trainer", "StepOutput", "SupervisedTrainer", "DistillationTrainer", "UDATrainer",
    "MetaPseudoLabelsTrainer", "BootstrappingTrainer", "FreezeDropPathTrainer",
    "Callback", "EarlyStopping", "ModelCheckpoint",
]
