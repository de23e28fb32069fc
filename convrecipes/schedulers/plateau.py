"""Reduce the LR when a monitored metric stops improving.

What: after each epoch the trainer hands over its metrics; when ``monitor`` has not
improved (by more than ``threshold``) for more than ``patience`` epochs in a row, every
group's LR is multiplied by ``factor`` (not below ``min_lr``), then ``cooldown`` epochs pass
before bad epochs count again.

When: no fixed budget, or a budget you cannot size a decay for. Expected effect: about a
step schedule's accuracy without choosing milestones, at the cost of some wasted epochs.

Same rule as torch's ``ReduceLROnPlateau`` (with torch's meaning of ``patience``: with
``patience=2`` the third bad epoch in a row reduces). Differences: it is epoch-based through
``on_epoch_end`` while ``step()`` (once per optimizer step) only drives the warmup; and one
reduction scale is shared by all param groups, so groups keep their LR ratios and ``min_lr``
(the first group's floor) is scaled for the others.
"""

from __future__ import annotations

import math
from typing import Any

from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.schedulers.schedules import SCHEDULES, LRSchedule, _as_choice, _as_int, _as_number, _fail

PLATEAU_MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


def plateau_is_better(current: float, best: float | None, mode: str, threshold: float, threshold_mode: str) -> bool:
    """Whether ``current`` improves on ``best`` (``None``: nothing seen yet) by more than the
    threshold: ``current < best * (1 - threshold)`` for ``min``/``rel``, ``current < best -
    threshold`` for ``min``/``abs``, and the mirror images for ``max``. NaN never improves."""
    if math.isnan(current):
        return False
    if best is None:
        return True
    if mode == "min":
        return current < (best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold)
    return current > (best * (1.0 + threshold) if threshold_mode == "rel" else best + threshold)


@SCHEDULES.register("reduce_on_plateau")
class ReduceOnPlateauSchedule(LRSchedule):
    """Reduce the LR by ``factor`` when ``monitor`` plateaus; see the module docstring.

    Args:
        monitor: the metric to watch, a key of the dict passed to ``on_epoch_end``.
        mode: ``min`` (lower is better, e.g. a loss) or ``max`` (e.g. an accuracy).
        factor: the multiplier applied at each reduction, in (0, 1).
        patience: bad epochs in a row that are tolerated; the next one reduces.
        threshold: the least change that counts as an improvement.
        threshold_mode: ``rel`` (a fraction of the best) or ``abs``.
        cooldown: epochs after a reduction during which bad epochs are not counted.
        min_lr: the first param group's LR floor (other groups' floors keep their ratio).
    """

    name = "reduce_on_plateau"

    def _setup(
        self,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 5,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        name = self.name
        if not isinstance(monitor, str) or not monitor:
            raise _fail(name, f"monitor must be a metric name, got {monitor!r}", "e.g. monitor=val_loss")
        self.monitor = monitor
        self.mode = _as_choice(name, "mode", mode, PLATEAU_MODES)
        self.factor = _as_number(name, "factor", factor)
        if not 0.0 < self.factor < 1.0:
            raise _fail(name, f"factor must be in (0, 1), got {self.factor}", "use e.g. factor=0.1")
        self.patience = _as_int(name, "patience", patience, 0)
        self.threshold = _as_number(name, "threshold", threshold)
        if self.threshold < 0:
            raise _fail(name, f"threshold must be >= 0, got {self.threshold}", "use e.g. threshold=1e-4")
        self.threshold_mode = _as_choice(name, "threshold_mode", threshold_mode, THRESHOLD_MODES)
        self.cooldown = _as_int(name, "cooldown", cooldown, 0)
        self.min_lr = _as_number(name, "min_lr", min_lr)
        if self.min_lr < 0:
            raise _fail(name, f"min_lr must be >= 0, got {self.min_lr}", "use e.g. min_lr=0")
        if self.min_lr > 0:
            self._require_reference_lr()
        self.scale = 1.0
        self.best: float | None = None
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.epochs_seen = 0

    def _lr_at(self, t: int, base_lr: float) -> float:
        return base_lr * self.scale

    def on_epoch_end(self, metrics: dict[str, float]) -> None:
        """Count a good or bad epoch of ``metrics[monitor]`` and reduce the LR after too many bad ones."""
        if self.monitor not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            raise RecipeError(
                f"schedule {self.name!r} monitors {self.monitor!r}, which this epoch's metrics lack "
                f"(available: {available}); set monitor to one of them, or pass a validation loader for val_* metrics"
            )
        current = float(metrics[self.monitor])
        self.epochs_seen += 1
        if plateau_is_better(current, self.best, self.mode, self.threshold, self.threshold_mode):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            floor = self.min_lr / self.reference_lr if self.min_lr > 0 else 0.0
            new_scale = max(self.scale * self.factor, floor)
            if new_scale < self.scale:  # never raise the LR to reach a min_lr above it
                self.scale = new_scale
                self._apply()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "scale": self.scale,
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "epochs_seen": self.epochs_seen,
        }
        if self.best is not None:  # absent rather than null/inf: plain JSON numbers only
            state["best"] = self.best
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        try:
            self.scale = float(state["scale"])
            self.num_bad_epochs = int(state["num_bad_epochs"])
            self.cooldown_counter = int(state["cooldown_counter"])
            self.epochs_seen = int(state["epochs_seen"])
        except KeyError as err:
            raise CheckpointError(
                f"the checkpoint's reduce_on_plateau state lacks {err.args[0]!r}; it was not written by this schedule"
            ) from None
        self.best = float(state["best"]) if "best" in state else None
