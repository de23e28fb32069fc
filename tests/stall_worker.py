"""Run under `accelerate launch` with 2 CPU processes by tests/test_hardening.py: rank 1
stalls at step 3, longer than trainer.collective_timeout_s; rank 0 must stop with a
message naming the step instead of waiting for torch's 30 minutes."""

from __future__ import annotations

import sys
import time

from convrecipes.build import build, make_accelerator
from convrecipes.errors import ConvrecipesError
from convrecipes.recipe import load_recipe
from convrecipes.trainers import Callback


class Stall(Callback):
    def on_step_start(self, trainer, global_step):
        if global_step == 3 and trainer.accelerator.process_index == 1:
            time.sleep(float(sys.argv[1]))


recipe = load_recipe("quickstart", ["trainer.progress=false", "model.kwargs.width=4", "trainer.collective_timeout_s=4",
                                    "schedule.warmup_epochs=0", "trainer.epochs=1"])
exp = build(recipe, accelerator=make_accelerator(recipe))
exp.trainer.callbacks.append(Stall())
try:
    exp.trainer.fit(exp.train_loader, epochs=1)
except ConvrecipesError as exc:
    print(f"rank {exp.trainer.accelerator.process_index}: {exc}", flush=True)
    sys.exit(2)
