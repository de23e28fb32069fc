"""The NaN guard of the training loop, without a device-to-host sync every step.

Reading a loss on the host (``loss.item()``) makes the host wait for the device to finish
everything queued so far; done every step it stalls the pipeline (on a GPU the next step's
kernels cannot be queued while the host waits). ``FiniteGuard`` instead keeps the step's
detached loss tensors and checks them all in one read every ``every`` optimizer steps, at
the end of each epoch, and before every checkpoint or snapshot, so a non-finite state is
never saved.

What a deferred check changes: the optimizer keeps stepping between the bad step and the
check, so the weights in memory (and the EMA and momentum buffers) are non-finite when the
error is raised; they are never written (``Trainer.save_checkpoint`` checks first), and the
message names the step where the loss first went bad and the step where training stopped.
``every=1`` is the exact guard: the check runs before the bad step's update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from convrecipes.errors import NonFiniteLossError

FIX = "Fix: lower the learning rate (optimizer.lr), clip gradients (trainer.grad_clip=1.0), or use bf16 instead of fp16."


@dataclass
class PendingLoss:
    """One loss waiting for the check: its value (a detached device tensor) and where it
    was computed."""

    loss: torch.Tensor
    part: Optional[str]
    where: str
    step: int


def non_finite_message(value: float, part: Optional[str], where: str, step: int, stopped_at: Optional[int],
                       checkpoint: Union[str, Path, None]) -> str:
    """The guard's one-line error: what went non-finite, where, what was kept, the fix.

    ``stopped_at`` None: found before the bad step's update (the weights in memory are the
    ones from before it); else the step after which the deferred check found it.
    """
    what = f"the {part} loss" if part else "the training loss"
    kept = checkpoint or "none written yet"
    if stopped_at is None or stopped_at < step:
        stopped = "training stopped before this step"
    else:
        stopped = (f"training stopped after step {stopped_at} (the loss is checked every few steps; the weights since "
                   f"step {step} are non-finite and were not saved)")
    return f"{what} became {value} at {where} (step {step}); {stopped}, and the last good checkpoint is intact " \
           f"({kept}). {FIX}"


class FiniteGuard:
    """Collects step losses and raises ``NonFiniteLossError`` for the first non-finite one.

    Args:
        reduce_any: ``flags -> flags`` summed over processes (None: one process), so every
            process stops at the same check.
    """

    def __init__(self, reduce_any: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.reduce_any = reduce_any
        self.pending: list[PendingLoss] = []

    def add(self, loss: torch.Tensor, part: Optional[str], where: str, step: int) -> None:
        """Queue ``loss`` for the next check (no host sync)."""
        self.pending.append(PendingLoss(loss.detach(), part, where, step))

    def check_now(self, loss: torch.Tensor, part: Optional[str], where: str, step: int,
                  checkpoint: Union[str, Path, None]) -> None:
        """The exact guard: check ``loss`` (and anything queued) now, before its update."""
        self.add(loss, part, where, step)
        self.flush(checkpoint, stopped_at=None)

    def flush(self, checkpoint: Union[str, Path, None], stopped_at: Optional[int] = None) -> None:
        """Check every queued loss with one host read; raise for the first non-finite one.

        Collective under several processes: every process must call it at the same point
        with the same number of queued losses (they run the same steps).
        """
        pending, self.pending = self.pending, []
        if not pending:  # the same on every process: they queue the same losses
            return
        flags = torch.stack([~torch.isfinite(p.loss.float()).all() for p in pending]).float()
        if self.reduce_any is not None:
            flags = self.reduce_any(flags)
        index = torch.arange(len(pending), device=flags.device)
        first = int(torch.where(flags > 0, index, len(pending)).min())  # the one host read
        if first == len(pending):
            return
        bad = pending[first]
        raise NonFiniteLossError(non_finite_message(float(bad.loss.float()), bad.part, bad.where, bad.step,
                                                    stopped_at, checkpoint))
