"""Run under `accelerate launch` with 2 CPU processes by tests/test_trainer_contract.py:
train a recipe briefly with any registered trainer, then evaluate on a split whose size
is not a multiple of the batch x processes and report what every process saw."""

from __future__ import annotations

import json
import sys

from convrecipes.build import build, make_accelerator
from convrecipes.data.loader import InMemoryLoader
from convrecipes.recipe import load_recipe


def main(out: str, overrides: list[str]) -> None:
    recipe = load_recipe("quickstart", overrides)
    accelerator = make_accelerator(recipe)  # as `convrecipes train` makes it (find_unused_parameters for some)
    exp = build(recipe, accelerator=accelerator)
    trainer = exp.trainer
    trainer.fit(exp.train_loader, epochs=1)
    test = exp.datasets.test.subset(list(range(37)))  # 37 = 4 x 2 x 4 + 5: the last batch is padded
    loader = InMemoryLoader(test, 8, shuffle=False, drop_last=False)
    logits, targets, _ = trainer.predict(loader)
    metrics = trainer.evaluate(loader)
    if accelerator.is_main_process:
        with open(out, "w") as fh:
            json.dump({"num_processes": accelerator.num_processes, "targets": targets.tolist(),
                       "expected": test.labels.tolist(), "top1": metrics["top1"],
                       "top1_check": 100.0 * (logits.argmax(1) == targets).float().mean().item(),
                       "steps": trainer.global_step, "trainer": type(trainer).__name__}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
