"""Learning-rate schedules: the registry, the shared base class, warmup, and the decays
that torch also defines (constant, cosine, linear, step, multistep).

Every schedule is a tiny pure function of the step (``cosine_annealing_lr``, ...) plus a
thin stateful class that writes its value into the optimizer's param groups.

Contract with the trainer:

- ``step()`` is called once per optimizer step; schedules are sized in optimizer steps of
  one process (``total_steps``, ``steps_per_epoch``). Like torch, the constructor already
  sets the LR for step 0, and after ``k`` calls to ``step()`` the LR is the schedule's value
  at step ``k``.
- Each param group is scaled from its own ``initial_lr`` (set from ``lr`` if absent, as torch
  does), so a group with its own base LR keeps its ratio to the others. Schedules given in
  absolute LRs (``cyclic``'s ``base_lr``/``max_lr``, ``one_cycle``'s ``max_lr``,
  ``reduce_on_plateau``'s ``min_lr``) refer to the *first* param group; the other groups
  are scaled by their ``initial_lr`` relative to it.
- **Warmup** composes with any schedule: for ``it < warmup_steps`` the LR rises linearly
  from ``warmup_start_factor * s(0)`` towards ``s(0)``, the schedule's own first value;
  then the schedule starts its own clock and runs over the remaining
  ``total_steps - warmup_steps`` steps (so ``step``/``multistep`` epochs and cyclic
  cycles count from the end of warmup, and a decay still ends exactly at ``total_steps``).
- The LR is a closed-form function of the step counter (and, for ``reduce_on_plateau``, of
  its reduction scale), never updated recursively, so ``state_dict()`` is a few plain numbers
  (JSON, no pickle) and a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import bisect
import inspect
import math
import numbers
from typing import Any, ClassVar, Sequence

import torch

from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.registry import Registry, check_params, signature_params

SCHEDULES: Registry[type["LRSchedule"]] = Registry("schedule")

# Arguments every schedule takes from the trainer rather than from the recipe's params.
_COMMON_ARGS = ("optimizer", "total_steps", "steps_per_epoch", "warmup_steps", "warmup_start_factor")


# ---------------------------------------------------------------------------------------
# Pure formulas


def linear_warmup_factor(step: int, warmup_steps: int, start_factor: float = 0.0) -> float:
    """Multiplier of a linear warmup: ``start_factor`` at step 0, rising by equal steps to 1.0
    at ``warmup_steps`` and 1.0 after (the same ramp as torch's ``LinearLR`` with
    ``end_factor=1``)."""
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def constant_lr(step: int, base_lr: float) -> float:
    """The constant schedule: ``base_lr`` at every step."""
    return base_lr


def cosine_annealing_lr(step: int, total_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Half-cosine from ``base_lr`` at step 0 to ``min_lr`` at ``total_steps``, held after.

    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` (Loshchilov &
    Hutter 2017, SGDR without restarts; torch's ``CosineAnnealingLR`` with ``T_max=total_steps``,
    which unlike this rises again after ``T_max``).
    """
    step = min(step, total_steps)
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps)) / 2.0


def linear_decay_lr(step: int, total_steps: int, base_lr: float, end_lr: float = 0.0) -> float:
    """Straight line from ``base_lr`` at step 0 to ``end_lr`` at ``total_steps``, held after."""
    step = min(step, total_steps)
    return base_lr + (end_lr - base_lr) * step / total_steps


def step_decay_lr(step: int, step_size: int, base_lr: float, gamma: float = 0.1) -> float:
    """``base_lr * gamma ** (step // step_size)``: multiply by ``gamma`` every ``step_size``
    steps (torch's ``StepLR``)."""
    return base_lr * gamma ** (step // step_size)


def multistep_decay_lr(step: int, milestones: Sequence[int], base_lr: float, gamma: float = 0.1) -> float:
    """``base_lr * gamma ** k`` where ``k`` milestones (sorted steps) are ``<= step``
    (torch's ``MultiStepLR``)."""
    return base_lr * gamma ** bisect.bisect_right(list(milestones), step)


# ---------------------------------------------------------------------------------------
# Validation helpers: every message names the cause and the fix.


def _fail(schedule: str, cause: str, fix: str) -> RecipeError:
    return RecipeError(f"schedule {schedule!r}: {cause}; {fix}")


def _as_number(schedule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(schedule, f"{name} must be a number, got {value!r}", f"set {name} to a number")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(schedule, f"{name} must be finite, got {value!r}", f"set {name} to a finite number")
    return value


def _as_fraction(schedule: str, name: str, value: Any, fix: str) -> float:
    """A number in [0, 1]; ``fix`` says what to set instead."""
    value = _as_number(schedule, name, value)
    if not 0.0 <= value <= 1.0:
        raise _fail(schedule, f"{name} must be in [0, 1], got {value}", fix)
    return value


def _as_int(schedule: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(schedule, f"{name} must be an integer, got {value!r}", f"set {name} to an integer >= {minimum}")
    if value < minimum:
        raise _fail(schedule, f"{name} must be >= {minimum}, got {value}", f"set {name} to at least {minimum}")
    return int(value)


def _as_choice(schedule: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        listing = ", ".join(choices)
        raise _fail(schedule, f"{name} must be one of {listing}, got {value!r}", f"pick one of {listing}")
    return value


def _epochs_to_steps(schedule: str, name: str, epochs: Any, steps_per_epoch: int | None) -> int:
    """A duration given in epochs, in optimizer steps (rounded, at least 1)."""
    epochs = _as_number(schedule, name, epochs)
    if epochs <= 0:
        raise _fail(schedule, f"{name} must be > 0, got {epochs}", f"set {name} to a positive number of epochs")
    if steps_per_epoch is None:
        raise _fail(schedule, f"{name} is in epochs but steps_per_epoch was not given", "pass steps_per_epoch")
    steps = round(epochs * steps_per_epoch)
    if steps < 1:
        raise _fail(
            schedule,
            f"{name}={epochs} is {epochs * steps_per_epoch:g} optimizer steps at {steps_per_epoch} steps per epoch",
            f"raise {name} to at least {1 / steps_per_epoch:g}",
        )
    return steps


def _set_group_value(group: dict[str, Any], key: str, value: float) -> None:
    # A tensor LR (capturable / fused optimizers) must be updated in place, as torch does.
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


# ---------------------------------------------------------------------------------------
# The stateful base class


class LRSchedule:
    """Base of every schedule: warmup, per-group scaling, stepping and JSON state.

    A subclass does not define ``__init__``: it declares its own recipe params once, as the
    keyword-only signature of ``_setup(self, *, ...)`` (which validates and stores them), and
    defines ``_lr_at(t, base_lr)``: its LR at its own step ``t`` (counted from the end of
    warmup) for a param group whose initial LR is ``base_lr``. It may define
    ``_momentum_at(t)`` to drive momentum (or Adam's beta1) too. ``__init__`` checks the
    common arguments, calls ``_setup(**params)`` and sets the LRs for step 0.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` this sets.
        total_steps: optimizer steps of one process over the whole run, warmup included.
        steps_per_epoch: optimizer steps per epoch of one process (needed by schedules
            given in epochs).
        warmup_steps: steps of linear warmup before the schedule starts.
        warmup_start_factor: the warmup's first LR as a fraction of the schedule's first LR.
        **params: the schedule's own params, passed to ``_setup``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The constructor is shared, so give each class the signature it really accepts
        # (common arguments, then its ``_setup`` params) for help(), IDEs and inspect.
        own = list(inspect.signature(cls._setup).parameters.values())[1:]  # without self
        clash = {p.name for p in own} & set(_COMMON_ARGS)
        if clash:
            raise TypeError(f"{cls.__name__}._setup redefines the common argument(s) {sorted(clash)}")
        common = list(inspect.signature(LRSchedule.__init__).parameters.values())[1:-1]  # less self, **params
        cls.__signature__ = inspect.Signature([*common, *own])

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: int | None = None,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.0,
        **params: Any,
    ) -> None:
        name = self.name
        self.total_steps = _as_int(name, "total_steps", total_steps, 1)
        if steps_per_epoch is not None:
            steps_per_epoch = _as_int(name, "steps_per_epoch", steps_per_epoch, 1)
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = _as_int(name, "warmup_steps", warmup_steps, 0)
        if self.warmup_steps >= self.total_steps:
            raise _fail(
                name,
                f"warmup_steps ({self.warmup_steps}) must be less than total_steps ({self.total_steps})",
                "lower warmup_steps or train for more steps",
            )
        self.warmup_start_factor = _as_fraction(
            name, "warmup_start_factor", warmup_start_factor, "use a fraction of the first LR such as 0.0 or 0.1"
        )
        # The schedule proper runs after warmup, over the remaining steps.
        self.schedule_steps = self.total_steps - self.warmup_steps
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            initial = group["lr"]
            group.setdefault("initial_lr", float(initial) if isinstance(initial, torch.Tensor) else initial)
        self.base_lrs: list[float] = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self._last_lrs: list[float] = []
        self._setup(**params)
        # Like torch, construction already sets the LRs for step 0.
        self._apply()

    # -- what subclasses define -------------------------------------------------------

    def _setup(self) -> None:
        """Validate and store the schedule's own params; its keyword-only signature is the
        schedule's recipe params (see ``schedule_params``). The base takes none."""

    def _lr_at(self, t: int, base_lr: float) -> float:
        raise NotImplementedError

    def _momentum_at(self, t: int) -> float | None:
        return None

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- shared machinery ---------------------------------------------------------------

    @property
    def reference_lr(self) -> float:
        """The first param group's initial LR, which absolute LRs in params refer to."""
        return self.base_lrs[0]

    def _require_reference_lr(self) -> float:
        ref = self.reference_lr
        if not ref > 0:
            raise _fail(
                self.name,
                f"the first param group's lr is {ref}, but this schedule's absolute LRs are scaled "
                "per group relative to it",
                "give the first param group a positive lr",
            )
        return ref

    def _apply(self) -> None:
        it = self.last_step
        if it < self.warmup_steps:
            factor: float | None = linear_warmup_factor(it, self.warmup_steps, self.warmup_start_factor)
            t = 0
        else:
            factor = None
            t = it - self.warmup_steps
        lrs = []
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            lr = self._lr_at(t, base_lr)
            if factor is not None:
                lr = factor * lr
            _set_group_value(group, "lr", lr)
            lrs.append(lr)
        self._last_lrs = lrs
        momentum = self._momentum_at(t)
        if momentum is not None:
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum

    def step(self) -> None:
        """Advance one optimizer step and set the next step's LRs."""
        self.last_step += 1
        self._apply()

    def on_epoch_end(self, metrics: dict[str, float]) -> None:
        """Called by the trainer after each epoch's validation; only plateau schedules act."""

    def sync_param_groups(self) -> None:
        """Take in param groups added to the optimizer after construction (e.g. a projection
        head sized by a probe): each new group is scaled from its own ``initial_lr`` (set
        from its ``lr`` if absent) like the others, and gets the current step's LR."""
        for group in self.optimizer.param_groups[len(self.base_lrs):]:
            initial = group["lr"]
            group.setdefault("initial_lr", float(initial) if isinstance(initial, torch.Tensor) else initial)
            self.base_lrs.append(float(group["initial_lr"]))
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The LR of each param group as last set by this schedule."""
        return list(self._last_lrs)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state: the schedule's name, the step and the base LRs."""
        state: dict[str, Any] = {"schedule": self.name, "step": self.last_step, "base_lrs": list(self.base_lrs)}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output and set the optimizer's LRs to those at save time."""
        if state.get("schedule") != self.name:
            raise CheckpointError(
                f"the checkpoint's schedule state is for {state.get('schedule')!r}, not {self.name!r}; "
                f"resume with the schedule the checkpoint was trained with"
            )
        missing = [key for key in ("step", "base_lrs") if key not in state]
        if missing:
            raise CheckpointError(
                f"the checkpoint's schedule state lacks {', '.join(missing)}; it was not written by this schedule"
            )
        base_lrs = [float(x) for x in state["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"the checkpoint's schedule state has {len(base_lrs)} param groups but the optimizer has "
                f"{len(self.optimizer.param_groups)}; build the optimizer with the same param groups as the checkpoint"
            )
        self.base_lrs = base_lrs
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
            group["initial_lr"] = base_lr
        self.last_step = int(state["step"])
        self._load_extra_state(state)
        self._apply()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.last_step}, total_steps={self.total_steps}, lr={self._last_lrs})"


# ---------------------------------------------------------------------------------------
# Decays that torch also defines


@SCHEDULES.register("constant")
class ConstantSchedule(LRSchedule):
    """The optimizer's LR throughout (after the optional warmup).

    When: a baseline, or with warmup alone. Expected effect: none beyond the warmup.
    """

    name = "constant"

    def _lr_at(self, t: int, base_lr: float) -> float:
        return constant_lr(t, base_lr)


@SCHEDULES.register("cosine")
class CosineSchedule(LRSchedule):
    """Cosine annealing to ``min_lr_ratio * lr`` at the last step (Loshchilov & Hutter 2017).

    When: the default decay for most recipes. Expected effect: matches or beats step decay
    without tuning milestones. Equals torch's ``CosineAnnealingLR(T_max=total_steps -
    warmup_steps, eta_min=min_lr_ratio * lr)`` up to the end of training.

    Args:
        min_lr_ratio: the final LR as a fraction of each group's initial LR.
    """

    name = "cosine"

    def _setup(self, *, min_lr_ratio: float = 0.0) -> None:
        self.min_lr_ratio = _as_fraction(self.name, "min_lr_ratio", min_lr_ratio, "use e.g. 0.0 or 0.01")

    def _lr_at(self, t: int, base_lr: float) -> float:
        return cosine_annealing_lr(t, self.schedule_steps, base_lr, self.min_lr_ratio * base_lr)


@SCHEDULES.register("linear")
class LinearSchedule(LRSchedule):
    """Linear decay to ``end_ratio * lr`` at the last step.

    When: short fine-tuning runs, or when a schedule must reach zero exactly. Equals torch's
    ``LinearLR(start_factor=1, end_factor=end_ratio, total_iters=total_steps - warmup_steps)``.

    Args:
        end_ratio: the final LR as a fraction of each group's initial LR.
    """

    name = "linear"

    def _setup(self, *, end_ratio: float = 0.0) -> None:
        self.end_ratio = _as_number(self.name, "end_ratio", end_ratio)
        if self.end_ratio < 0:
            raise _fail(self.name, f"end_ratio must be >= 0, got {self.end_ratio}", "use e.g. 0.0")

    def _lr_at(self, t: int, base_lr: float) -> float:
        return linear_decay_lr(t, self.schedule_steps, base_lr, self.end_ratio * base_lr)


def _check_gamma(schedule: str, gamma: Any) -> float:
    gamma = _as_number(schedule, "gamma", gamma)
    if not 0.0 < gamma <= 1.0:
        raise _fail(schedule, f"gamma must be in (0, 1], got {gamma}", "use a decay factor such as 0.1")
    return gamma


@SCHEDULES.register("step")
class StepSchedule(LRSchedule):
    """Multiply the LR by ``gamma`` every ``step_epochs`` epochs (He et al. 2016's ResNet recipe).

    Epochs count from the end of warmup. Equals torch's ``StepLR(step_size=step_epochs *
    steps_per_epoch, gamma=gamma)``.

    Args:
        step_epochs: epochs between decays (may be fractional; rounded to whole steps).
        gamma: the decay factor.
    """

    name = "step"

    def _setup(self, *, step_epochs: float, gamma: float = 0.1) -> None:
        self.step_size = _epochs_to_steps(self.name, "step_epochs", step_epochs, self.steps_per_epoch)
        self.gamma = _check_gamma(self.name, gamma)

    def _lr_at(self, t: int, base_lr: float) -> float:
        return step_decay_lr(t, self.step_size, base_lr, self.gamma)


@SCHEDULES.register("multistep")
class MultiStepSchedule(LRSchedule):
    """Multiply the LR by ``gamma`` at each epoch in ``milestones_epochs``.

    Epochs count from the end of warmup. Equals torch's ``MultiStepLR(milestones=[e *
    steps_per_epoch ...], gamma=gamma)``.

    Args:
        milestones_epochs: strictly increasing epochs (may be fractional; rounded to steps).
        gamma: the decay factor.
    """

    name = "multistep"

    def _setup(self, *, milestones_epochs: list[float], gamma: float = 0.1) -> None:
        is_list = isinstance(milestones_epochs, Sequence) and not isinstance(milestones_epochs, (str, bytes))
        if not is_list or not milestones_epochs:
            raise _fail(
                self.name,
                f"milestones_epochs must be a non-empty list of epochs, got {milestones_epochs!r}",
                "e.g. milestones_epochs=[30, 60, 80]",
            )
        spe = self.steps_per_epoch
        self.milestones = [_epochs_to_steps(self.name, "milestones_epochs", e, spe) for e in milestones_epochs]
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise _fail(
                self.name,
                f"milestones_epochs must be strictly increasing, "
                f"got {list(milestones_epochs)} (steps {self.milestones})",
                "sort them and drop duplicates",
            )
        self.gamma = _check_gamma(self.name, gamma)

    def _lr_at(self, t: int, base_lr: float) -> float:
        return multistep_decay_lr(t, self.milestones, base_lr, self.gamma)


# ---------------------------------------------------------------------------------------
# The factory


def schedule_params(name: str) -> dict[str, inspect.Parameter]:
    """The recipe params of schedule ``name`` (the keyword-only arguments of its ``_setup``),
    by name; an unknown name raises listing the valid names."""
    return signature_params(SCHEDULES.get(name)._setup)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    **params: Any,
) -> LRSchedule:
    """Build the schedule registered as ``name`` for ``optimizer``.

    Args:
        name: a name in ``SCHEDULES`` (an unknown one raises listing the valid names).
        optimizer: the optimizer whose param groups' LRs the schedule sets.
        total_steps: optimizer steps of one process over the whole run, warmup included.
        steps_per_epoch: optimizer steps of one process per epoch.
        warmup_steps: linear warmup steps before the schedule starts its own clock.
        warmup_start_factor: the warmup's first LR as a fraction of the schedule's first LR.
        **params: the schedule's own parameters; an unknown or missing one raises
            ``RecipeError`` naming the closest valid one and listing them all.

    Returns:
        The schedule, with the optimizer's LRs already set for the first step.
    """
    cls = SCHEDULES.get(name)
    check_params(f"schedule {name!r}", params, schedule_params(name), key="schedule.params")
    return cls(
        optimizer,
        total_steps,
        steps_per_epoch,
        warmup_steps=warmup_steps,
        warmup_start_factor=warmup_start_factor,
        **params,
    )
