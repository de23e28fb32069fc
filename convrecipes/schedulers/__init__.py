"""Learning-rate schedules, stepped once per optimizer step (see ``schedules`` for the
contract): ``build_scheduler(name, optimizer, total_steps, steps_per_epoch, ...)`` builds
any name in ``SCHEDULES``; each formula is also a plain function. The LR range test lives
in ``convrecipes.lr_finder``."""

from convrecipes.schedulers.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    LRSchedule,
    MultiStepSchedule,
    StepSchedule,
    build_scheduler,
    constant_lr,
    cosine_annealing_lr,
    linear_decay_lr,
    linear_warmup_factor,
    multistep_decay_lr,
    schedule_params,
    step_decay_lr,
)
from convrecipes.schedulers.cyclical import CyclicSchedule, triangular_cyclic_lr
from convrecipes.schedulers.one_cycle import OneCycleSchedule, one_cycle_lr, one_cycle_momentum
from convrecipes.schedulers.plateau import ReduceOnPlateauSchedule, plateau_is_better

__all__ = [
    "SCHEDULES",
    "build_scheduler",
    "schedule_params",
    "LRSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "StepSchedule",
    "MultiStepSchedule",
    "CyclicSchedule",
    "OneCycleSchedule",
    "ReduceOnPlateauSchedule",
    "linear_warmup_factor",
    "constant_lr",
    "cosine_annealing_lr",
    "linear_decay_lr",
    "step_decay_lr",
    "multistep_decay_lr",
    "triangular_cyclic_lr",
    "one_cycle_lr",
    "one_cycle_momentum",
    "plateau_is_better",
]
