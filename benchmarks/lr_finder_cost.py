"""Cost of the LR range test against the same number of plain training steps.

One process, one recipe (quickstart by default): ``find_lr`` for N optimizer steps (its state
snapshot and exact restore included) against ``Trainer.fit`` for the same N steps (its epoch
bookkeeping included), alternating round by round so background load hits both alike; the
first round of each is a discarded warm-up. The sweep runs its full length
(``diverge_threshold`` is lifted; a NaN loss would still stop it, and then the ratio is
taken per step). Prints a table and writes JSON. The issue's target: ratio <= 1.15.

    python benchmarks/lr_finder_cost.py                      # quickstart (digits 8x8, tiny_cnn)
    python benchmarks/lr_finder_cost.py --rounds 7 model.kwargs.width=32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from convrecipes.build import build
from convrecipes.recipe import load_recipe
from convrecipes.schedulers.lr_finder import find_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--epochs", type=int, default=5, help="plain training epochs; the sweep does as many steps")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/lr_finder_cost.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, ["trainer.progress=false", "schedule.warmup_epochs=0", *args.overrides])
    recipe.trainer.epochs = args.epochs
    exp = build(recipe)
    trainer, loader = exp.trainer, exp.train_loader
    steps_per_epoch = math.ceil(len(loader) / trainer.grad_accum_steps)
    num_iters = steps_per_epoch * args.epochs
    initial = copy.deepcopy(trainer.state_dict())

    def sweep() -> tuple[float, int]:
        t0 = time.perf_counter()
        result = find_lr(trainer, loader, num_iters=num_iters, diverge_threshold=math.inf, progress=False)
        return time.perf_counter() - t0, len(result.lrs)

    def plain() -> tuple[float, int]:
        trainer.load_state_dict(copy.deepcopy(initial))  # back to step 0: fit trains the same steps each round
        t0 = time.perf_counter()
        trainer.fit(loader, epochs=args.epochs)
        return time.perf_counter() - t0, trainer.global_step

    times: dict[str, list[float]] = {"sweep": [], "plain": []}
    steps: dict[str, int] = {}
    for round_ in range(args.rounds + 1):
        for name, fn in (("sweep", sweep), ("plain", plain)) if round_ % 2 == 0 else (("plain", plain), ("sweep", sweep)):
            seconds, done = fn()
            steps[name] = done
            if round_ > 0:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {k: med[k] / steps[k] for k in med}
    ratio = per_step["sweep"] / per_step["plain"]

    device = str(trainer.device)
    if trainer.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(trainer.device)})"
    ds = exp.datasets.train
    title = (f"lr-find cost on {recipe.name}: {recipe.data.name} {tuple(ds.image_shape)} x {len(ds)}, "
             f"{recipe.model.name} ({exp.num_parameters:,} params), global batch {loader.batch_size}, {device}, "
             f"{args.threads} thread(s), median of {args.rounds} rounds")
    print(title)
    print(f"  {'':<18} {'steps':>6} {'median s':>9} {'ms/step':>8}")
    for name, label in (("sweep", "sweep (find_lr)"), ("plain", "plain (fit)")):
        print(f"  {label:<18} {steps[name]:>6} {med[name]:>9.3f} {1000 * per_step[name]:>8.2f}")
    print(f"  ratio sweep / plain per step: {ratio:.3f} (target <= 1.15)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "lr_finder_cost", "recipe": recipe.name, "overrides": args.overrides, "title": title,
        "num_iters": num_iters, "steps": steps, "times_s": times, "median_s": med,
        "ms_per_step": {k: 1000 * v for k, v in per_step.items()}, "ratio_per_step": ratio,
        "threads": args.threads, "device": device, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
