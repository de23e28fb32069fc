"""Cost of the LR range test against the same number of plain training steps.

One process, one recipe (quickstart by default): ``find_lr`` for N optimizer steps (its state
snapshot and exact restore included) against ``Trainer.fit`` for the same N steps (its epoch
bookkeeping included), alternating round by round so background load hits both alike; the
first round of each is a discarded warm-up. The ratio is the median over rounds of the
two back-to-back runs' ratio, in wall time and in this process's CPU time (less disturbed by
other work on a shared machine), with quartiles. The sweep runs its full length
(``diverge_threshold`` is lifted; a NaN loss would still stop it, and then the ratio is
taken per step). Prints a table and writes JSON. Target (trainer redesign issue): ratio <= 1.05.

    python benchmarks/lr_finder_cost.py                      # quickstart (digits 8x8, tiny_cnn)
    python benchmarks/lr_finder_cost.py --rounds 9 model.kwargs.width=32
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
from convrecipes.lr_finder import find_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--epochs", type=int, default=5, help="plain training epochs; the sweep does as many steps")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of each (after one warm-up round)")
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

    def sweep() -> int:
        return len(find_lr(trainer, loader, num_iters=num_iters, diverge_threshold=math.inf, progress=False).lrs)

    def plain() -> int:
        trainer.load_state_dict(copy.deepcopy(initial))  # back to step 0: fit trains the same steps each round
        trainer.fit(loader, epochs=args.epochs)
        return trainer.global_step

    # wall time, and this process's CPU time, which other processes on a shared machine
    # disturb far less (with one thread it is the compute the work itself needs)
    times: dict[str, list[float]] = {"sweep": [], "plain": []}
    cpu: dict[str, list[float]] = {"sweep": [], "plain": []}
    steps: dict[str, int] = {}
    for round_ in range(args.rounds + 1):
        for name, fn in (("sweep", sweep), ("plain", plain)) if round_ % 2 == 0 else (("plain", plain), ("sweep", sweep)):
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name] = fn()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {k: med[k] / steps[k] for k in med}
    cpu_step = {k: statistics.median(v) / steps[k] for k, v in cpu.items()}
    # ratios of the two runs of the same round (back to back, so under the same load),
    # summarised by their median and quartiles
    scale = steps["plain"] / steps["sweep"]
    paired = {kind: sorted(scale * a / b for a, b in zip(d["sweep"], d["plain"])) for kind, d in (("wall", times), ("cpu", cpu))}
    ratio, ratio_cpu = statistics.median(paired["wall"]), statistics.median(paired["cpu"])
    quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for k, v in paired.items()}

    device = str(trainer.device)
    if trainer.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(trainer.device)})"
    ds = exp.datasets.train
    title = (f"lr-find cost on {recipe.name}: {recipe.data.name} {tuple(ds.image_shape)} x {len(ds)}, "
             f"{recipe.model.name} ({exp.num_parameters:,} params), global batch {loader.batch_size}, {device}, "
             f"{args.threads} thread(s), median of {args.rounds} rounds")
    print(title)
    print(f"  {'':<18} {'steps':>6} {'wall s':>8} {'wall ms/step':>13} {'CPU ms/step':>12}")
    for name, label in (("sweep", "sweep (find_lr)"), ("plain", "plain (fit)")):
        print(f"  {label:<18} {steps[name]:>6} {med[name]:>8.3f} {1000 * per_step[name]:>13.2f} "
              f"{1000 * cpu_step[name]:>12.2f}")
    q = {k: f"{v[0]:.2f}-{v[2]:.2f}" for k, v in quartiles.items()}
    print(f"  ratio sweep / plain per step, median of {args.rounds} paired rounds: {ratio:.3f} wall (quartiles "
          f"{q['wall']}), {ratio_cpu:.3f} CPU (quartiles {q['cpu']}); target <= 1.05")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "lr_finder_cost", "recipe": recipe.name, "overrides": args.overrides, "title": title,
        "num_iters": num_iters, "steps": steps, "times_s": times, "median_s": med,
        "ms_per_step": {k: 1000 * v for k, v in per_step.items()}, "ratio_per_step": ratio,
        "paired_ratios": paired, "ratio_quartiles": quartiles,
        "cpu_times_s": cpu, "cpu_ms_per_step": {k: 1000 * v for k, v in cpu_step.items()},
        "ratio_per_step_cpu": ratio_cpu,
        "threads": args.threads, "device": device, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
