"""The 1cycle policy (Smith & Topin 2018, "Super-Convergence: Very Fast Training of Neural
Networks Using Large Learning Rates", https://arxiv.org/abs/1708.07120).

What: one cycle from ``max_lr / div_factor`` up to ``max_lr`` and back down, annealing
far below the start (``/ final_div_factor``) by the end, with momentum moving inversely
(high when the LR is low). The default two-phase form is fastai's; ``three_phase=True`` is
the paper's (up, symmetric down, then a final annihilation phase).

When: a fixed training budget and an LR range test's ``max_lr``. Expected effect: the paper
reports reaching a given accuracy in several times fewer iterations than a step schedule
(super-convergence), at large LRs that also regularise.

Equals torch's ``OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor,
final_div_factor, three_phase, cycle_momentum, base_momentum, max_momentum)`` at every step
it uses (0 to ``total_steps - 1``), momentum included; after the last step the final value
is held (torch extrapolates one step past it and raises after).
"""

from __future__ import annotations

import math

from convrecipes.schedulers.schedules import SCHEDULES, LRSchedule, _as_choice, _as_fraction, _as_number, _fail

ANNEAL_STRATEGIES = ("cos", "linear")


def _check_bool(schedule: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(schedule, f"{name} must be true or false, got {value!r}", f"set {name} to true or false")


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    # Written as torch writes them so that the values agree to the last bit.
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    if strategy == "linear":
        return (end - start) * pct + start
    raise ValueError(f"unknown anneal_strategy {strategy!r}; valid: {', '.join(ANNEAL_STRATEGIES)}")


def _one_cycle_position(step: int, total_steps: int, pct_start: float, three_phase: bool) -> tuple[int, float]:
    """(phase index, fraction of that phase done) at ``step``, held at the last step."""
    step = min(step, total_steps - 1)
    if three_phase:
        ends = [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2, total_steps - 1]
    else:
        ends = [float(pct_start * total_steps) - 1, total_steps - 1]
    start = 0.0
    for phase, end in enumerate(ends):
        if step <= end or phase == len(ends) - 1:
            # A zero-length phase (e.g. pct_start * total_steps == 1) is already complete.
            return phase, (step - start) / (end - start) if end != start else 1.0
        start = end
    raise AssertionError("unreachable")


def one_cycle_lr(
    step: int,
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> float:
    """The 1cycle LR at ``step`` of ``total_steps``.

    Two phases: ``max_lr / div_factor`` -> ``max_lr`` over the first ``pct_start`` of the
    steps, then -> ``max_lr / div_factor / final_div_factor`` at step ``total_steps - 1``.
    Three phases: up, back down to the start over as many steps, then down to the minimum.
    """
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    if three_phase:
        phases = [(initial_lr, max_lr), (max_lr, initial_lr), (initial_lr, min_lr)]
    else:
        phases = [(initial_lr, max_lr), (max_lr, min_lr)]
    phase, pct = _one_cycle_position(step, total_steps, pct_start, three_phase)
    return _anneal(*phases[phase], pct, anneal_strategy)


def one_cycle_momentum(
    step: int,
    total_steps: int,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> float:
    """The 1cycle momentum at ``step``: ``max_momentum`` -> ``base_momentum`` while the LR rises,
    back to ``max_momentum`` while it falls (and held there in the third phase)."""
    if three_phase:
        phases = [(max_momentum, base_momentum), (base_momentum, max_momentum), (max_momentum, max_momentum)]
    else:
        phases = [(max_momentum, base_momentum), (base_momentum, max_momentum)]
    phase, pct = _one_cycle_position(step, total_steps, pct_start, three_phase)
    return _anneal(*phases[phase], pct, anneal_strategy)


@SCHEDULES.register("one_cycle")
class OneCycleSchedule(LRSchedule):
    """The 1cycle policy over the steps after warmup; see the module docstring.

    ``max_lr`` is the first param group's peak; other groups keep their ratio to it. With
    ``cycle_momentum`` the optimizer's ``momentum`` (SGD, RMSprop) or ``betas[0]`` (Adam family)
    moves inversely to the LR; during warmup it is held at ``max_momentum``.

    Args:
        max_lr: the peak LR; defaults to the optimizer's (first group's) LR.
        pct_start: fraction of the steps spent raising the LR.
        div_factor: the first LR is ``max_lr / div_factor``.
        final_div_factor: the last LR is ``max_lr / div_factor / final_div_factor``.
        anneal_strategy: ``cos`` or ``linear``.
        three_phase: the paper's three phases instead of fastai's two.
        cycle_momentum: move momentum inversely to the LR.
        base_momentum: the momentum at the LR's peak.
        max_momentum: the momentum at the start and the end.
    """

    name = "one_cycle"

    def _setup(
        self,
        *,
        max_lr: float | None = None,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        anneal_strategy: str = "cos",
        three_phase: bool = False,
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
    ) -> None:
        name = self.name
        self._require_reference_lr()
        # None follows the first group's initial LR, also when a checkpoint restores it.
        self._max_lr = None if max_lr is None else _as_number(name, "max_lr", max_lr)
        if self._max_lr is not None and self._max_lr <= 0:
            raise _fail(name, f"max_lr must be > 0, got {self._max_lr}", "take it from an LR range test")
        self.pct_start = _as_fraction(
            name, "pct_start", pct_start, "use e.g. 0.3 (the fraction of steps spent rising to max_lr)"
        )
        _check_bool(name, "three_phase", three_phase)
        self.three_phase = three_phase
        if three_phase and self.pct_start > 0.5:
            raise _fail(
                name,
                f"three_phase needs pct_start <= 0.5 (the LR comes back down over as many steps), got {self.pct_start}",
                "lower pct_start, e.g. to 0.3",
            )
        self.div_factor = _as_number(name, "div_factor", div_factor)
        self.final_div_factor = _as_number(name, "final_div_factor", final_div_factor)
        for key, value in (("div_factor", self.div_factor), ("final_div_factor", self.final_div_factor)):
            if value <= 0:
                default = 25 if key == "div_factor" else 1e4
                raise _fail(name, f"{key} must be > 0, got {value}", f"use e.g. {key}={default:g}")
        self.anneal_strategy = _as_choice(name, "anneal_strategy", anneal_strategy, ANNEAL_STRATEGIES)
        _check_bool(name, "cycle_momentum", cycle_momentum)
        self.cycle_momentum = cycle_momentum
        self.base_momentum = _as_number(name, "base_momentum", base_momentum)
        self.max_momentum = _as_number(name, "max_momentum", max_momentum)
        if cycle_momentum:
            if "momentum" not in self.optimizer.defaults and "betas" not in self.optimizer.defaults:
                raise _fail(
                    name,
                    f"cycle_momentum needs an optimizer with momentum or betas, "
                    f"and {type(self.optimizer).__name__} has neither",
                    "set cycle_momentum=false or use SGD / Adam / AdamW",
                )
            if not 0.0 <= self.base_momentum <= self.max_momentum < 1.0:
                raise _fail(
                    name,
                    f"need 0 <= base_momentum <= max_momentum < 1, got base_momentum={self.base_momentum}, "
                    f"max_momentum={self.max_momentum}",
                    "use e.g. base_momentum=0.85, max_momentum=0.95",
                )

    @property
    def max_lr(self) -> float:
        """The peak LR for the first param group."""
        return self.reference_lr if self._max_lr is None else self._max_lr

    def _lr_at(self, t: int, base_lr: float) -> float:
        lr = one_cycle_lr(
            t,
            self.schedule_steps,
            self.max_lr,
            self.pct_start,
            self.div_factor,
            self.final_div_factor,
            self.anneal_strategy,
            self.three_phase,
        )
        return lr * (base_lr / self.reference_lr)

    def _momentum_at(self, t: int) -> float | None:
        if not self.cycle_momentum:
            return None
        return one_cycle_momentum(
            t,
            self.schedule_steps,
            self.base_momentum,
            self.max_momentum,
            self.pct_start,
            self.anneal_strategy,
            self.three_phase,
        )
