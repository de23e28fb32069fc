"""Run under `accelerate launch` with 2 CPU processes by tests/test_lr_finder.py (slow)."""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn as nn
from accelerate.utils import gather_object

from convrecipes.data.loader import InMemoryLoader
from convrecipes.lr_finder import find_lr
from convrecipes.trainers import SupervisedTrainer

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent))
from tests.conftest import ddp_worker_setup  # noqa: E402


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def main(out: str) -> None:
    accelerator, ds, model, opt = ddp_worker_setup()
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), accelerator=accelerator, progress=False,
                                grad_accum_steps=2, seed=1)
    loader = InMemoryLoader(ds, 16, seed=0)  # global batch 16: 8 per process
    before = copy.deepcopy(trainer.state_dict())
    result = find_lr(trainer, loader, num_iters=20, seed=0)
    restored = _equal(before, copy.deepcopy(trainer.state_dict()))
    ranks = gather_object([{"rank": accelerator.process_index, "losses": result.losses,
                            "suggestions": result.suggestions, "global_batch_size": result.global_batch_size,
                            "restored": restored}])
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(sorted(ranks, key=lambda r: r["rank"]), f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
