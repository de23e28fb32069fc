"""Cyclical learning rates (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", https://arxiv.org/abs/1506.01186).

What: the LR moves linearly between ``base_lr`` and ``max_lr`` and back, each half cycle
lasting ``step_size`` iterations. ``triangular2`` halves the amplitude every cycle;
``exp_range`` multiplies it by ``gamma ** iteration``.

When: read ``base_lr``/``max_lr`` off an LR range test (base about max / 3-4); use a step
size of 2-10 epochs' worth of iterations and stop training at the end of a cycle (where the
LR is lowest). Expected effect, from the paper: on CIFAR-10 ``triangular2`` reached the
fixed-LR accuracy (81.4%) in 25k instead of 70k iterations.

Equals torch's ``CyclicLR(base_lr, max_lr, step_size_up=s, mode, gamma,
cycle_momentum=False)``; momentum is not cycled here.
"""

from __future__ import annotations

import math

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
) -> float:
    """Smith's cyclical LR at iteration ``it`` (0-based).

    ``cycle = floor(1 + it / (2 s))``, ``x = |it / s - 2 cycle + 1|``,
    ``lr = base + (max - base) * max(0, 1 - x) * scale``, where ``scale`` is 1
    (``triangular``), ``1 / 2 ** (cycle - 1)`` (``triangular2``) or ``gamma ** it``
    (``exp_range``).
    """
    cycle = math.floor(1 + it / (2 * step_size))
    x = abs(it / step_size - 2 * cycle + 1)
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = 1.0 / (2.0 ** (cycle - 1))
    elif mode == "exp_range":
        scale = gamma**it
    else:
        raise ValueError(f"unknown cyclic mode {mode!r}; valid modes: {', '.join(CYCLIC_MODES)}")
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x) * scale


@SCHEDULES.register("cyclic")
class CyclicSchedule(LRSchedule):
    """Cyclical LR between ``base_lr`` and ``max_lr`` (Smith 2017); see the module docstring.

    ``base_lr`` and ``max_lr`` are the first param group's LRs; other groups keep their ratio
    to it. The cycle clock starts after warmup and does not stop at ``total_steps``.

    Args:
        max_lr: the top of the cycle.
        base_lr: the bottom of the cycle; defaults to the optimizer's (first group's) LR.
        step_size_iters: iterations in half a cycle. Give this or ``step_size_epochs``.
        step_size_epochs: half a cycle in epochs (rounded to whole iterations).
        mode: ``triangular``, ``triangular2`` or ``exp_range``.
        gamma: the per-iteration amplitude decay of ``exp_range``.
    """

    name = "cyclic"

    def _setup(
        self,
        *,
        max_lr: float,
        base_lr: float | None = None,
        step_size_iters: int | None = None,
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
        if (step_size_iters is None) == (step_size_epochs is None):
            raise _fail(
                name,
                "give exactly one of step_size_iters and step_size_epochs"
                + (f" (got both: {step_size_iters} and {step_size_epochs})" if step_size_iters is not None else ""),
                "e.g. step_size_epochs=4 (Smith: 2-10 epochs per half cycle)",
            )
        if step_size_iters is not None:
            self.step_size = _as_int(name, "step_size_iters", step_size_iters, 1)
        else:
            self.step_size = _epochs_to_steps(name, "step_size_epochs", step_size_epochs, self.steps_per_epoch)
        self.mode = _as_choice(name, "mode", mode, CYCLIC_MODES)
        self.gamma = _as_number(name, "gamma", gamma)
        if not 0.0 < self.gamma <= 1.0:
            raise _fail(name, f"gamma must be in (0, 1], got {self.gamma}", "use e.g. 0.99994 with mode=exp_range")

    @property
    def base_lr(self) -> float:
        """The bottom of the cycle for the first param group."""
        return self.reference_lr if self._base_lr is None else self._base_lr

    def _lr_at(self, t: int, base_lr: float) -> float:
        lr = triangular_cyclic_lr(t, self.base_lr, self.max_lr, self.step_size, self.mode, self.gamma)
        return lr * (base_lr / self.reference_lr)
