"""Joins of parallel branches: FractalNet's mean join with drop-path, and freeze-drop-path's sum.

Plain modules a user can put in their own multi-branch network.

- ``MeanJoin`` (Larsson, Maire & Shakhnarovich 2017, "FractalNet: Ultra-Deep Neural Networks
  without Residuals"): the element-wise mean of the *surviving* inputs. Which inputs survive
  is decided by the network's drop-path policy and passed in as a mask; ``local_keep_mask``
  draws FractalNet's local policy (each input dropped with probability p, at least one kept).
- ``FreezeDropPathJoin`` (Smith & Topin 2016, "Deep Convolutional Neural Network Design
  Patterns", freeze-drop-path): holds its branches and joins them by **sum**. With active
  branch ``b`` in training, the output is ``sum(branch_0..b(x))``: branches below ``b`` run
  forward frozen (no autograd graph, BatchNorm in eval mode, so neither their weights nor
  their running statistics can move), only branch ``b`` gets gradient, and branches above
  ``b`` are not executed. At evaluation (or with no active branch) all branches are summed.
- ``branch_shares`` / ``draw_branch`` / ``BranchCycle``: the active branch drawn with
  probability proportional to ``(b + 1)^2``, or cycled deterministically with the same shares.

Draws take a ``torch.Generator``: under several processes pass one that is identical on
every rank (``Trainer.shared_generator``), so every rank drops the same paths.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn


class JoinError(ValueError):
    """A join built or called with arguments that cannot work."""


def _check_prob(p: float, name: str = "drop_prob") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise JoinError(f"{name} must be in [0, 1) (the probability of dropping an input), got {p!r}")
    return float(p)


def _check_inputs(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise JoinError(f"{what} joins at least 2 branches, got {n!r}; a single branch needs no join (use it "
                        f"directly)")
    return n


def local_keep_mask(num_inputs: int, drop_prob: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FractalNet's local drop-path: each of ``num_inputs`` inputs is dropped with probability
    ``drop_prob``; if all were dropped, one chosen uniformly at random is kept.

    Returns:
        ``(num_inputs,)`` bool, True = kept; at least one True.
    """
    _check_inputs(num_inputs, "local drop-path")
    p = _check_prob(drop_prob)
    keep = torch.rand(num_inputs, generator=generator) >= p
    if not bool(keep.any()):
        keep[int(torch.randint(num_inputs, (1,), generator=generator))] = True
    return keep


class MeanJoin(nn.Module):
    """The element-wise mean of the surviving inputs (FractalNet's join).

    Args:
        num_inputs: how many inputs the join takes (>= 2).
    """

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        self.num_inputs = _check_inputs(num_inputs, "MeanJoin")

    def forward(self, inputs: Sequence[Optional[torch.Tensor]], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of ``inputs[i]`` over ``keep[i]`` (all when ``keep`` is None). A dropped input
        may be None (its branch was not computed)."""
        if len(inputs) != self.num_inputs:
            raise JoinError(f"MeanJoin was built for {self.num_inputs} inputs, got {len(inputs)}")
        if keep is None:
            kept = list(inputs)
        else:
            if keep.shape != (self.num_inputs,) or not bool(keep.any()):
                raise JoinError(f"keep must be a ({self.num_inputs},) bool mask with at least one True, got {keep}")
            kept = [x for x, k in zip(inputs, keep.tolist()) if k]
        if any(x is None for x in kept):
            raise JoinError("MeanJoin got None for an input it keeps; only dropped inputs may be None")
        out = kept[0]
        for x in kept[1:]:
            out = out + x
        return out / len(kept)

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}"


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` frozen: no autograd graph and eval mode (BatchNorm reads its running
    statistics and does not update them; dropout is off). Restores the mode after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


class FreezeDropPathJoin(nn.Module):
    """Branches joined by sum, trained one active branch at a time (freeze-drop-path).

    Args:
        branches: the parallel branches (>= 2), each mapping the same input to outputs of one
            shape; index 0 is the first to train (usually the shallowest).

    Set ``active`` (an int, or None for all) before a training forward; ``FreezeDropPathTrainer``
    does it every iteration. ``only`` evaluates one branch alone.
    """

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        _check_inputs(len(self.branches), "FreezeDropPathJoin")
        self.active: Optional[int] = None
        self.only: Optional[int] = None

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def check_branch(self, index: Optional[int], what: str = "branch") -> Optional[int]:
        """``index`` if it names a branch (or is None), else a ``JoinError``."""
        if index is None:
            return None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_branches:
            raise JoinError(f"{what} {index!r} is out of range: this join has branches 0..{self.num_branches - 1}")
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None:
            return self.branches[self.check_branch(self.only, "single branch (only)")](x)
        active = self.check_branch(self.active, "active branch")
        if not self.training or active is None:
            outputs = [branch(x) for branch in self.branches]
            return torch.stack(outputs).sum(0) if len(outputs) > 1 else outputs[0]
        out = self.branches[active](x)
        for i in range(active):  # below b: forward, frozen; above b: never called
            with frozen(self.branches[i]) as branch:
                constant = branch(x)
            out = out + constant  # outside no_grad: the sum keeps branch b's graph
        return out

    def extra_repr(self) -> str:
        return f"num_branches={self.num_branches}"


def branch_shares(num_branches: int) -> list[float]:
    """``(b + 1)^2 / sum_k (k + 1)^2`` for each branch ``b``: later (deeper) branches train more."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, int) or num_branches < 1:
        raise JoinError(f"num_branches must be an integer >= 1, got {num_branches!r}")
    weights = [(b + 1) ** 2 for b in range(num_branches)]
    total = sum(weights)
    return [w / total for w in weights]


def draw_branch(num_branches: int, generator: Optional[torch.Generator] = None) -> int:
    """One active branch, drawn with probability ``branch_shares(num_branches)``."""
    shares = torch.tensor(branch_shares(num_branches), dtype=torch.float64)
    return int(torch.multinomial(shares, 1, generator=generator))


class BranchCycle:
    """The deterministic alternative to ``draw_branch``: a fixed sequence of length
    ``sum (b + 1)^2`` in which branch ``b`` appears ``(b + 1)^2`` times, spread out (each
    branch's occurrences are evenly spaced, interleaved by their phase), repeated forever.

    ``branch(step)`` is the active branch of iteration ``step`` (from 0); no state besides
    the step count, so a resumed run continues the cycle exactly.
    """

    def __init__(self, num_branches: int) -> None:
        branch_shares(num_branches)  # validates
        counts = [(b + 1) ** 2 for b in range(num_branches)]
        period = sum(counts)
        # each occurrence k of branch b sits at phase (k + 0.5) / count: sorting by phase spreads them
        slots = sorted(((k + 0.5) / c, b) for b, c in enumerate(counts) for k in range(c))
        self.sequence = [b for _, b in slots]
        self.period = period
        assert math.isclose(len(self.sequence), period)

    def branch(self, step: int) -> int:
        return self.sequence[step % self.period]


__all__ = ["BranchCycle", "FreezeDropPathJoin", "JoinError", "MeanJoin", "branch_shares", "draw_branch", "frozen",
           "local_keep_mask"]
