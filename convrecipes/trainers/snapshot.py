"""An exact in-memory copy of a trainer's whole training state, and putting it back.

Tools that train for a while and must leave no trace (the LR range test, a probe of the
loss surface) take a ``TrainingSnapshot`` first and ``restore`` it after: model weights,
every named optimizer and schedule, EMA, loss state, registered state, the gradient
scaler, callbacks, position, the shared generator, the gradients, every buffer (also
non-persistent ones, e.g. a loss's pending sums), every module's train/eval mode and the
RNGs (torch CPU and CUDA, Python, NumPy). Training after ``restore`` is bit-identical to
training without the interruption.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from convrecipes.trainers.base import Trainer


@dataclass
class TrainingSnapshot:
    """Everything training can change, copied (tensors deep-copied, on their device)."""

    state: dict[str, Any]
    python_rng: Any
    numpy_rng: Any
    cuda_rng: Optional[list[torch.Tensor]]
    grads: list[Optional[torch.Tensor]]
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]]
    modes: list[tuple[torch.nn.Module, bool]]
    should_stop: bool


def _submodules(trainer: "Trainer") -> list[torch.nn.Module]:
    """Every submodule of every module the trainer holds, each once."""
    seen: dict[int, torch.nn.Module] = {}
    for module in trainer.modules().values():
        for sub in module.modules():
            seen.setdefault(id(sub), sub)
    return list(seen.values())


def take_snapshot(trainer: "Trainer") -> TrainingSnapshot:
    """Copy ``trainer``'s training state (collective: every process must call it)."""
    # state_dict() holds references to live tensors (weights, momentum buffers, EMA weights)
    # that training updates in place: deep-copy it.
    state = copy.deepcopy(trainer.state_dict())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    subs = _submodules(trainer)
    # by (module, name): a module may replace a buffer rather than update it in place
    buffers = [(sub, name, b.detach().clone()) for sub in subs for name, b in sub._buffers.items() if b is not None]
    return TrainingSnapshot(
        state=state,
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        cuda_rng=cuda_rng,
        grads=[None if p.grad is None else p.grad.detach().clone() for p in trainer.parameters()],
        buffers=buffers,
        modes=[(sub, sub.training) for sub in subs],
        should_stop=trainer.should_stop,
    )


def restore_snapshot(trainer: "Trainer", snap: TrainingSnapshot) -> None:
    """Put ``snap`` back into ``trainer`` (collective)."""
    for optimizer in trainer.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    trainer.load_state_dict(snap.state, source="<snapshot>")
    with torch.no_grad():
        for module, name, saved in snap.buffers:
            live = module._buffers.get(name)
            if live is not None and live.shape == saved.shape and live.dtype == saved.dtype:
                live.copy_(saved)
            else:
                module._buffers[name] = saved
    for p, g in zip(trainer.parameters(), snap.grads):
        p.grad = g
    for module, mode in snap.modes:
        module.training = mode
    random.setstate(snap.python_rng)
    np.random.set_state(snap.numpy_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng)
    trainer.should_stop = snap.should_stop
