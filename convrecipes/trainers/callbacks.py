"""Callbacks: code that runs at fixed points of ``Trainer.fit`` without changing the loop.

Each callback's ``state_dict`` is JSON-able and saved in checkpoints, so early-stopping
counters and the best metric survive a resume.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional


if TYPE_CHECKING:
    from convrecipes.trainers.base import Trainer


def _improved(value: float, best: Optional[float], mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


class Callback:
    """Base class; override the hooks you need."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first epoch (after a resume has been applied)."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before each training epoch."""

    def on_step_start(self, trainer: "Trainer", global_step: int) -> None:
        """Before each training step (``global_step`` is the number the step will have, from 1).

        The step's batches are fetched but not yet augmented, so a choice made here (e.g.
        with ``trainer.shared_generator``, identical on every process) applies to the step."""

    def on_step_end(self, trainer: "Trainer", global_step: int, logs: Optional[dict[str, Any]] = None) -> None:
        """After each training step (``global_step`` counts steps, from 1). ``logs`` holds
        the step's logged values as 0-dim tensors: ``train_loss`` (the mean over the step's
        samples) and whatever the algorithm logs; ``float()`` on one waits for the device."""

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each epoch's training and validation, before the epoch is logged: a
        callback may add entries to ``metrics`` (they are logged, plotted and checkpointed
        like the others). ``trainer.validated`` says whether validation ran this epoch."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each epoch's training and evaluation, with that epoch's metrics."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last epoch, or after an early stop."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 10, min_delta: float = 0.0) -> None:
        self.monitor, self.mode, self.patience, self.min_delta = monitor, _check_mode(mode), patience, min_delta
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each epoch's training and validation, before the epoch is logged: a
        callback may add entries to ``metrics`` (they are logged, plotted and checkpointed
        like the others). ``trainer.validated`` says whether validation ran this epoch."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            return
        value = metrics[self.monitor]
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.print(f"early stopping: {self.monitor} has not improved for {self.patience} epochs "
                          f"(best {self.best:.4f})")
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


class ModelCheckpoint(Callback):
    """Keep ``last.safetensors`` (every epoch, and every ``every_n_steps`` optimizer steps)
    and ``best.safetensors`` (when ``monitor`` improves) in ``dirpath``.

    Both are full training states (resume from either). On an improved epoch the state is
    serialised once and written to ``best`` first, then to ``last``: a kill between the two
    leaves ``last`` at the previous epoch, so the resume redoes the epoch and rewrites both;
    ``best`` is never behind what ``last`` records. Temp files of killed writes are removed
    when training starts or resumes.
    """

    def __init__(self, dirpath: str | os.PathLike, monitor: Optional[str] = "val_top1", mode: str = "max",
                 every_n_steps: Optional[int] = None) -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.mode, self.every_n_steps = monitor, _check_mode(mode), every_n_steps
        self.best: Optional[float] = None
        self._warned = False

    def on_fit_start(self, trainer: "Trainer") -> None:
        if trainer.is_main_process and self.dirpath.is_dir():
            from convrecipes.checkpoint import remove_stale_temp_files

            removed = remove_stale_temp_files(self.dirpath)
            if removed:
                trainer.print(f"removed {len(removed)} temp file(s) of interrupted writes in {self.dirpath}")

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.safetensors"

    def on_step_end(self, trainer: "Trainer", global_step: int, logs: Optional[dict[str, Any]] = None) -> None:
        if self.every_n_steps and global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.last_path)

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each epoch's training and validation, before the epoch is logged: a
        callback may add entries to ``metrics`` (they are logged, plotted and checkpointed
        like the others). ``trainer.validated`` says whether validation ran this epoch."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        improved = False
        if self.monitor is not None:
            value = metrics.get(self.monitor)
            if value is None and not getattr(trainer, "validated", True):
                pass  # validation skipped this epoch (eval_every_epochs): nothing to compare
            elif value is None or not math.isfinite(value):
                if not self._warned:
                    trainer.print(f"checkpoint: metric {self.monitor!r} is not logged; keeping only last.safetensors")
                    self._warned = True
            elif _improved(value, self.best, self.mode):
                self.best, improved = value, True
        # The new best is recorded before writing, so both files carry the callback state it implies.
        trainer.save_checkpoint([self.best_path, self.last_path] if improved else [self.last_path])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
