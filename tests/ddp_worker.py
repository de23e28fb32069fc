"""Run under `accelerate launch` with 2 CPU processes by tests/test_multiprocess.py."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn as nn
from accelerate.utils import gather_object

from convrecipes.augment import build_augment
from convrecipes.data.loader import InMemoryLoader
from convrecipes.trainers import SupervisedTrainer

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent))
from tests.conftest import ddp_worker_setup, make_blobs_dataset  # noqa: E402


def main(out: str) -> None:
    accelerator, ds, model, opt = ddp_worker_setup()
    augment = build_augment("light", (8, 8), 1, [0.3], [0.3], ds.num_classes)
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), augment=augment, accelerator=accelerator,
                                progress=False, seed=1)
    # draws of the augmentation differ per process (device-specific seeding)
    x = torch.full((4, 1, 8, 8), 0.5)
    x[:, :, :, :4] = 0.0
    trainer.fit(InMemoryLoader(ds, 32, seed=0), epochs=2)
    flips = augment(x, torch.zeros(4, dtype=torch.long))[0].flatten().tolist()
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()]).tolist()
    odd = make_blobs_dataset(n=13)
    logits, targets, _ = trainer.predict(InMemoryLoader(odd, 4, shuffle=False, drop_last=False))
    metrics = trainer.evaluate(InMemoryLoader(odd, 4, shuffle=False, drop_last=False))
    gathered = gather_object([{"rank": accelerator.process_index, "params": params, "aug": flips}])
    if accelerator.is_main_process:
        with open(out, "w") as fh:
            json.dump({"num_processes": accelerator.num_processes, "ranks": gathered,
                       "targets": targets.tolist(), "expected": odd.labels.tolist(),
                       "top1": metrics["top1"],
                       "top1_check": 100.0 * (logits.argmax(1) == targets).float().mean().item(),
                       "steps": trainer.global_step}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
