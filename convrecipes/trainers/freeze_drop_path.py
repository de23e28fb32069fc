"""Freeze-drop-path: ``FreezeDropPathTrainer`` trains a multi-branch network one branch at a time.

What: for networks whose parallel branches are joined by sum in ``FreezeDropPathJoin``s
(e.g. ``model.name: sbn``), every optimizer step picks one active branch ``b``: branches
``0..b`` run forward and are summed, branches below ``b`` frozen, branches above ``b``
dropped (not executed), and only branch ``b`` (with the layers outside the joins: the
classifier) learns; at evaluation every branch is summed (Smith & Topin 2016, "Deep
Convolutional Neural Network Design Patterns", https://arxiv.org/abs/1611.00847, section
on stagewise boosting networks). ``b`` is drawn with probability proportional to
``(b + 1)^2`` (``branch_order: random``), or cycled deterministically with the same shares
(``branch_order: cycle``); the same ``b`` applies to every join of the network.

"Frozen" means unchanged, which a zero gradient does not give: momentum and weight decay
still move a parameter whose gradient is zero, and BatchNorm in train mode still updates
its running statistics. So frozen branches run under ``no_grad`` in eval mode (their
gradients stay ``None``, which every torch optimizer skips), and dropped ones are never
called. Under several processes the draw comes from ``Trainer.shared_generator`` (the same
on every rank, saved in checkpoints), so every rank leaves the same parameters unused and
DDP (``find_unused_parameters``, switched on for this trainer) leaves their gradients
``None`` too.

When: a network with branches of different depth that you want to train faster at the
start - the shallow branches learn quickly alone, the deeper ones then boost their frozen
sum - or as a research baseline for branch-wise training. Not useful for networks without
``FreezeDropPathJoin`` (the trainer refuses them).

Expected effect (paper): on CIFAR-10 the SBN with freeze-drop-path trained faster early on
than the same network trained normally, ending at a similar accuracy; the paper reports
curves, not a table we could match exactly.

Our measured effect (``python benchmarks/branch_training.py``; Fashion-MNIST, 10K training
images, SBN width 16, 8 epochs, 3 seeds, final weights): freeze-drop-path 81.6% test top-1
against 88.6% for the same SBN trained normally, and 57.5% against 78.7% validation top-1
after a quarter of the budget: no faster start, slower on every seed, for about 2/3 of the
wall time per epoch (cheaper steps). Table: README "Multi-branch networks",
``benchmarks/results/branch_training.json``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from convrecipes.errors import RecipeError
from convrecipes.models.branch_joins import BranchCycle, FreezeDropPathJoin, draw_branch
from convrecipes.trainers.base import StepOutput, Trainer

__all__ = ["BRANCH_ORDERS", "FreezeDropPathTrainer", "freeze_drop_path_joins"]

BRANCH_ORDERS = ("random", "cycle")


def freeze_drop_path_joins(model: nn.Module) -> list[FreezeDropPathJoin]:
    """Every ``FreezeDropPathJoin`` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FreezeDropPathJoin)]


class FreezeDropPathTrainer(Trainer):
    """Supervised training with one active branch per optimizer step (freeze-drop-path).

    Args:
        *args, **kwargs: the base ``Trainer``'s; the model must contain at least one
            ``FreezeDropPathJoin``, all with the same number of branches.
        branch_order: ``random`` (draw ``b`` with probability ``(b + 1)^2 / sum``) or
            ``cycle`` (a fixed sequence with the same shares, by step number).

    ``active_branch`` is the branch of the last step; each step logs ``branch_<b>`` (1 for
    the active branch, else 0), so an epoch's metrics hold each branch's share of its steps.
    """

    leaves_parameters_unused: ClassVar[bool] = True

    def __init__(self, *args: Any, branch_order: str = "random", **kwargs: Any) -> None:
        if branch_order not in BRANCH_ORDERS:
            raise RecipeError(f"unknown branch_order {branch_order!r} (trainer.params.branch_order); valid: "
                              f"{', '.join(BRANCH_ORDERS)}")
        kwargs.setdefault("find_unused_parameters", True)  # used when the trainer makes its accelerator
        super().__init__(*args, **kwargs)
        self.joins = freeze_drop_path_joins(self.unwrapped_model)
        if not self.joins:
            raise RecipeError(f"freeze-drop-path trains networks whose branches are joined by FreezeDropPathJoin "
                              f"(e.g. model.name=sbn), and {type(self.unwrapped_model).__name__} has none; use "
                              f"trainer.name=supervised for this model")
        counts = sorted({join.num_branches for join in self.joins})
        if len(counts) > 1:
            raise RecipeError(f"the model's FreezeDropPathJoins have different numbers of branches ({counts}); "
                              f"freeze-drop-path activates the same branch in every join, so they must agree")
        if any(join.only is not None for join in self.joins):
            raise RecipeError("the model evaluates a single branch (model.kwargs.branch is set); freeze-drop-path "
                              "trains all of them: remove model.kwargs.branch for training")
        self.num_branches = counts[0]
        self.branch_order = branch_order
        self.cycle = BranchCycle(self.num_branches) if branch_order == "cycle" else None
        self.active_branch: Optional[int] = None

    def next_branch(self) -> int:
        """The active branch of the step about to run (``global_step`` steps done so far)."""
        if self.cycle is not None:
            return self.cycle.branch(self.global_step)
        return draw_branch(self.num_branches, generator=self.shared_generator)

    def set_active_branch(self, branch: Optional[int]) -> None:
        """Make ``branch`` active in every join (None: all branches run and learn)."""
        for join in self.joins:
            join.active = join.check_branch(branch, "active branch")
        self.active_branch = branch

    def train_step(self, batches: Sequence[Any], step_schedules: bool = True) -> StepOutput:
        """One optimizer step with a newly chosen active branch (the same for all of the
        step's accumulation micro-batches)."""
        branch = self.next_branch()
        self.set_active_branch(branch)
        out = super().train_step(batches, step_schedules)
        ref = out.loss
        shares = {f"branch_{b}": torch.full_like(ref, float(b == branch)) for b in range(self.num_branches)}
        return StepOutput(out.loss, {**out.logs, **shares}, out.batch_size)
