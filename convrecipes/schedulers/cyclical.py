"""Cyclical learning rates (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", https://arxiv.org/abs/1506.01186).

What: the LR moves linearly between ``base_lr`` and ``max_lr`` and back, each half cycle
lasting ``step_size`` iterations. ``triangular2`` halves the amplitude every cycle;
``exp_range`` multiplies it by ``gamma ** iteration``.

When: read ``base_lr``/``max_lr`` off an LR range test (base about max / 3-4); use a step
size of 2-10 epochs' worth of iterations and stop training at the end of a cycle (where the
LR is lowest). Expected effect, from the paper: on CIFAR-10 ``triangular2`` reached the
fixed-LR accuracy (81.4%) in 25k instead of 70k iterations.

Equals torch's ``CyclicLR(base_lr, max_lr, step_size_up=s, step_size_down, mode, gamma,
cycle_momentum=False)`` (the same arithmetic, so the same floats for one param group), and
takes those arguments too::

    CyclicSchedule(optimizer, base_lr=1e-3, max_lr=1e-2, step_size_up=2000, mode="triangular2")

Momentum is not cycled here (use ``one_cycle``, or torch's ``CyclicLR`` for that).
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch

from convrecipes.schedulers.schedules import (
    SCHEDULES,
    LRSchedule,
    _as_choice,
    _as_int,
    _as_number,
    _epochs_to_steps,
    _fail,
)

CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def triangular_cyclic_lr(
    it: int,
    base_lr: float,
    max_lr: float,
    step_size: int,
    mode: str = "triangular",
    gamma: float = 1.0,
    step_size_down: int | None = None,
) -> float:
    """Smith's cyclical LR at iteration ``it`` (0-based).

    With ``s = step_size`` up and as many down: ``cycle = floor(1 + it / (2 s))``,
    ``x = |it / s - 2 cycle + 1|``, ``lr = base + (max - base) * max(0, 1 - x) * scale``,
    where ``scale`` is 1 (``triangular``), ``1 / 2 ** (cycle - 1)`` (``triangular2``) or
    ``gamma ** it`` (``exp_range``). A different ``step_size_down`` makes the descent take
    that many iterations. Evaluated in torch ``CyclicLR``'s order of operations (cycle
    position ``x = 1 + it / total - cycle``, rising for the first ``step_size / total`` of
    it), so the floats are the same as torch's.
    """
    if mode not in CYCLIC_MODES:
        raise ValueError(f"unknown cyclic mode {mode!r}; valid modes: {', '.join(CYCLIC_MODES)}")
    up = float(step_size)
    down = up if step_size_down is None else float(step_size_down)
    total = up + down
    rise = up / total
    cycle = math.floor(1 + it / total)
    x = 1.0 + it / total - cycle
    height = (max_lr - base_lr) * (x / rise if x <= rise else (x - 1) / (rise - 1))
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = 1 / (2.0 ** (cycle - 1))
    else:
        scale = gamma**it
    return base_lr + height * scale


# Stands in for "no end" (torch's CyclicLR has none) in the base class's step bookkeeping.
_NO_END = sys.maxsize


@SCHEDULES.register("cyclic")
class CyclicSchedule(LRSchedule):
    """Cyclical LR between ``base_lr`` and ``max_lr`` (Smith 2017); see the module docstring.

    ``base_lr`` and ``max_lr`` are the first param group's LRs; other groups keep their ratio
    to it (torch's ``CyclicLR`` sets every group to ``base_lr`` instead; with one group the
    two agree exactly). The cycle clock starts after warmup and does not stop at
    ``total_steps``, which only bounds the warmup and may be left out.

    Built from a recipe (``build_scheduler``) or like torch's ``CyclicLR``:
    ``CyclicSchedule(optimizer, base_lr=..., max_lr=..., step_size_up=..., mode=..., gamma=...)``
    (keywords; ``cycle_momentum=False`` is accepted, ``True`` refused, since momentum is not
    cycled here). Unlike torch there is no default step size: give one.

    Args:
        max_lr: the top of the cycle.
        base_lr: the bottom of the cycle; defaults to the optimizer's (first group's) LR.
        step_size_iters: iterations in half a cycle. Give this, ``step_size_up`` or
            ``step_size_epochs``.
        step_size_up: iterations of the rising half (torch's name for ``step_size_iters``).
        step_size_down: iterations of the falling half (torch's; default: the rising half's).
        step_size_epochs: half a cycle in epochs (rounded to whole iterations).
        mode: ``triangular``, ``triangular2`` or ``exp_range``.
        gamma: the per-iteration amplitude decay of ``exp_range``.
    """

    name = "cyclic"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.0,
        *,
        cycle_momentum: bool = False,
        **params: Any,
    ) -> None:
        if isinstance(total_steps, float) or isinstance(steps_per_epoch, float):
            # CyclicLR(optimizer, base_lr, max_lr) positionally lands LRs here.
            raise _fail(
                self.name,
                f"got a fractional total_steps/steps_per_epoch ({total_steps!r}, {steps_per_epoch!r}); "
                "were these torch CyclicLR's positional base_lr and max_lr?",
                "pass them by keyword: CyclicSchedule(optimizer, base_lr=..., max_lr=..., step_size_up=...)",
            )
        if cycle_momentum:
            raise _fail(
                self.name,
                "cycle_momentum=True: this schedule cycles the LR only",
                "pass cycle_momentum=False, or use the one_cycle schedule (which moves momentum inversely)",
            )
        super().__init__(optimizer, _NO_END if total_steps is None else total_steps, steps_per_epoch,
                         warmup_steps, warmup_start_factor, **params)
        if total_steps is None:
            self.total_steps = None  # type: ignore[assignment]
            self.schedule_steps = None  # type: ignore[assignment]

    def _setup(
        self,
        *,
        max_lr: float,
        base_lr: float | None = None,
        step_size_iters: int | None = None,
        step_size_up: int | None = None,
        step_size_down: int | None = None,
        step_size_epochs: float | None = None,
        mode: str = "triangular",
        gamma: float = 1.0,
    ) -> None:
        name = self.name
        self._require_reference_lr()
        # None follows the first group's initial LR, also when a checkpoint restores it.
        self._base_lr = None if base_lr is None else _as_number(name, "base_lr", base_lr)
        self.max_lr = _as_number(name, "max_lr", max_lr)
        if self.base_lr <= 0:
            raise _fail(
                name, f"base_lr must be > 0, got {self.base_lr}", "take it from an LR range test (about max_lr / 3-4)"
            )
        if self.max_lr < self.base_lr:
            raise _fail(
                name,
                f"max_lr ({self.max_lr:g}) is below base_lr ({self.base_lr:g})",
                "swap them: max_lr is the top of the cycle, base_lr the bottom",
            )
        given = {key: value for key, value in (("step_size_iters", step_size_iters), ("step_size_up", step_size_up),
                                               ("step_size_epochs", step_size_epochs)) if value is not None}
        if len(given) != 1:
            raise _fail(
                name,
                "give exactly one of step_size_iters and step_size_epochs (or step_size_up, torch's name "
                "for step_size_iters)"
                + (f" (got {'both' if len(given) == 2 else 'all three'}: "
                   f"{' and '.join(f'{k}={v!r}' for k, v in given.items())})" if given else ""),
                "e.g. step_size_epochs=4 (Smith: 2-10 epochs per half cycle)",
            )
        (key, value), = given.items()
        if key == "step_size_epochs":
            self.step_size = _epochs_to_steps(name, key, value, self.steps_per_epoch)
        else:
            self.step_size = _as_int(name, key, value, 1)
        self.step_size_down = None if step_size_down is None else _as_int(name, "step_size_down", step_size_down, 1)
        self.mode = _as_choice(name, "mode", mode, CYCLIC_MODES)
        self.gamma = _as_number(name, "gamma", gamma)
        if not 0.0 < self.gamma <= 1.0:
            raise _fail(name, f"gamma must be in (0, 1], got {self.gamma}", "use e.g. 0.99994 with mode=exp_range")

    @property
    def base_lr(self) -> float:
        """The bottom of the cycle for the first param group."""
        return self.reference_lr if self._base_lr is None else self._base_lr

    def _lr_at(self, t: int, base_lr: float) -> float:
        lr = triangular_cyclic_lr(
            t, self.base_lr, self.max_lr, self.step_size, self.mode, self.gamma, self.step_size_down
        )
        # The first group gets ``lr`` exactly (ratio 1.0); the others keep their ratio to it.
        return lr * (base_lr / self.reference_lr)


# The base class gave CyclicSchedule the common signature; its total_steps is optional and
# it takes torch's cycle_momentum (False only).
_signature = inspect.signature(CyclicSchedule)
CyclicSchedule.__signature__ = _signature.replace(parameters=[
    p.replace(default=None, annotation="int | None") if p.name == "total_steps" else p
    for p in _signature.parameters.values()
] + [inspect.Parameter("cycle_momentum", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)])
