"""Run under `accelerate launch` with 2 CPU processes by tests/test_multi_branch.py: train the
quickstart's SBN with freeze-drop-path (momentum and weight decay on) and record, on each
rank, the active branch of every step, whether any frozen or dropped branch changed, whether
the active one moved, a hash of the frozen branches' BatchNorm buffers after every step, and
a hash of the final weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from convrecipes.build import build, make_accelerator
from convrecipes.recipe import load_recipe
from convrecipes.trainers import Callback


class BranchAudit(Callback):
    def __init__(self) -> None:
        self.branches: list[int] = []
        self.violations: list[str] = []
        self.active_moved = 0
        self.frozen_buffer_hashes: list[str] = []
        self._before = None

    def _state(self, trainer):
        return [[{k: v.clone() for k, v in br.state_dict().items()} for br in join.branches] for join in trainer.joins]

    def on_step_start(self, trainer, global_step):
        self._before = self._state(trainer)

    def on_step_end(self, trainer, global_step, logs=None):
        b = trainer.active_branch
        self.branches.append(b)
        moved = True
        frozen_buffers = hashlib.sha256()
        for j, (before, join) in enumerate(zip(self._before, trainer.joins)):
            for i, branch in enumerate(join.branches):
                after = branch.state_dict()
                params = {name for name, _ in branch.named_parameters()}
                if i == b:
                    moved &= not all(torch.equal(before[i][k], after[k]) for k in params)
                    continue
                # weights never move on any rank; BatchNorm buffers never move on rank 0, whose
                # buffers DDP broadcasts to the others at every forward (so another rank's copy
                # of a branch trained in the last step catches up with rank 0's, checked by hash)
                watched = after if trainer.accelerator.is_main_process else params
                changed = [k for k in watched if not torch.equal(before[i][k], after[k])]
                if changed:
                    self.violations.append(f"step {global_step}: join {j} branch {i} changed with {b} active: "
                                           f"{changed}")
                for k in sorted(set(after) - params):
                    frozen_buffers.update(after[k].cpu().numpy().tobytes())
        self.frozen_buffer_hashes.append(frozen_buffers.hexdigest())
        self.active_moved += int(moved)


def main(out_dir: str) -> None:
    recipe = load_recipe("quickstart", ["trainer.name=freeze_drop_path", "model.name=sbn", "model.kwargs={width: 4}",
                                        "trainer.progress=false", "data.batch_size=8", "data.subset_per_class=30",
                                        "optimizer.weight_decay=0.01", "schedule.warmup_epochs=0"])
    accelerator = make_accelerator(recipe)
    exp = build(recipe, accelerator=accelerator)
    audit = BranchAudit()
    exp.trainer.callbacks.append(audit)
    exp.trainer.fit(exp.train_loader, epochs=3)
    weights = dict(exp.trainer.unwrapped_model.named_parameters())  # buffers: rank 0's are broadcast at forward
    sha = hashlib.sha256(b"".join(weights[k].detach().cpu().numpy().tobytes() for k in sorted(weights))).hexdigest()
    report = {"rank": accelerator.process_index, "branches": audit.branches, "steps": exp.trainer.global_step,
              "frozen_violations": audit.violations, "active_moved": audit.active_moved, "weights_sha": sha,
              "frozen_buffer_hashes": audit.frozen_buffer_hashes}
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
