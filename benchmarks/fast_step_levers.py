"""The fast-step levers (issue 17, item 3), one at a time: images/s of ``convrecipes train``'s
trainer on Fashion-MNIST (28 px, batch 128, the ``standard`` augmentation), lever on vs off,
alternating on/off epochs of ``--steps`` steps so drifting machine load hits both alike.

Levers: ``model.channels_last``, ``optimizer.fused``, ``trainer.nan_check_every_steps``
(10 vs 1: the per-step host sync), ``trainer.threads`` (auto, the physical cores, vs 1) and,
with ``--compile``, ``trainer.compile`` (its compilation is excluded: a warm-up epoch runs
first). Every lever but ``threads`` runs at ``--threads`` (default 1). The load average is
recorded next to each number.

    python benchmarks/fast_step_levers.py --models tiny_cnn small_resnet8 --rounds 3 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from _training_speed import RECIPE, fashion_mnist_train, model_kwargs, random_subset, timed_fit
from convrecipes.build import Datasets, build
from convrecipes.recipe import load_recipe
from convrecipes.threads import physical_cores

#: lever -> (overrides on, overrides off)
LEVERS = {
    "channels_last": (["model.channels_last=true"], ["model.channels_last=false"]),
    "fused_optimizer": (["optimizer.fused=true"], ["optimizer.fused=false"]),
    "nan_check_every_10": (["trainer.nan_check_every_steps=10"], ["trainer.nan_check_every_steps=1"]),
    "threads_auto": (["trainer.threads=null"], ["trainer.threads=1"]),
    "compile": (["trainer.compile=true"], ["trainer.compile=false"]),
}


def build_trainer(model: str, train, overrides: list[str], threads: int):
    recipe = load_recipe(str(RECIPE), [
        f"model.name={model}", "model.kwargs={}", "augment.preset=standard", "augment.random_erasing=0",
        "data.val_fraction=0", "data.batch_size=128", "trainer.epochs=1000", "schedule.warmup_epochs=0",
        "trainer.progress=false", f"trainer.threads={threads}", *overrides])
    recipe.model.kwargs = model_kwargs(model)
    exp = build(recipe, datasets=Datasets(train=train, val=None, test=train))
    return exp.trainer, exp.train_loader, torch.get_num_threads()  # build applied trainer.threads


def measure(model: str, lever: str, steps: int, rounds: int, threads: int) -> dict:
    train = random_subset(fashion_mnist_train(), steps * 128, seed=0)
    sides = {}
    for side, overrides in zip(("on", "off"), LEVERS[lever]):
        trainer, loader, used = build_trainer(model, train, overrides, threads)
        sides[side] = {"trainer": trainer, "loader": loader, "threads": used, "images_per_s": []}
    for side in sides.values():  # warm-up (compilation, allocator), not timed
        torch.set_num_threads(side["threads"])
        timed_fit(side["trainer"], side["loader"])
    for _ in range(rounds):
        for side in sides.values():
            torch.set_num_threads(side["threads"])
            side["images_per_s"].append(timed_fit(side["trainer"], side["loader"]))
    on, off = (statistics.median(sides[s]["images_per_s"]) for s in ("on", "off"))
    return {"model": model, "lever": lever, "steps": steps, "rounds": rounds,
            "threads_on": sides["on"]["threads"], "threads_off": sides["off"]["threads"],
            "images_per_s_on": on, "images_per_s_off": off, "ratio": on / off,
            "all_on": sides["on"]["images_per_s"], "all_off": sides["off"]["images_per_s"],
            "loadavg_after": os.getloadavg()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny_cnn", "small_resnet8"])
    parser.add_argument("--levers", nargs="+", default=[k for k in LEVERS if k != "compile"], choices=list(LEVERS))
    parser.add_argument("--compile", action="store_true", help="also the torch.compile lever (slow to build)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads of every lever but threads_auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fast_step_levers.json")
    args = parser.parse_args(argv)
    levers = args.levers + (["compile"] if args.compile and "compile" not in args.levers else [])
    print(f"physical cores available: {physical_cores()}; load average {os.getloadavg()}", flush=True)
    results = []
    for model in args.models:
        for lever in levers:
            row = measure(model, lever, args.steps, args.rounds, args.threads)
            results.append(row)
            print(f"{model:14s} {lever:20s} on {row['images_per_s_on']:7.0f} img/s (threads {row['threads_on']})  "
                  f"off {row['images_per_s_off']:7.0f} img/s (threads {row['threads_off']})  x{row['ratio']:.2f}  "
                  f"load {row['loadavg_after'][0]:.1f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))


if __name__ == "__main__":
    main()
