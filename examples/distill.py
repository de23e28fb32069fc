"""Distil an ensemble of small CNNs back into one of them on Fashion-MNIST, and compare.

Hinton et al.'s setting: train the small student alone with a few seeds (recipes/
fashion_mnist_student.yaml), then train the same student with the same budget distilled from
the ensemble of those runs (recipes/distill_fashion_mnist.yaml; the teacher is the members'
mean logits). Prints the teacher's, the student-alone (seed 0) and the distilled student's
test accuracy. The teacher must be better than the student alone, or distillation cannot
help: a ResNet-8 trained for as long as the student is not (README, "Distillation").
One run of each is a demonstration; benchmarks/distill_seeds.py measures the gain over seeds.
At the tiny budget (500 images per class, 15 epochs) one run printed: teacher 87.80%, students
alone 86.77 / 87.07 / 87.15%, distilled 87.20% (+0.43 over seed 0).

    python examples/distill.py                          # tiny budget: about 4 minutes on one CPU core
    python examples/distill.py --teacher runs/a runs/b  # distil from trained run dirs instead
    python examples/distill.py --full                   # the recipes' full data and epochs (hours on a CPU)
    accelerate launch examples/distill.py               # 1 process (or your accelerate config)
    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/distill.py
"""

import argparse
import time
from pathlib import Path

from accelerate import Accelerator

from convrecipes.build import build
from convrecipes.recipe import load_recipe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--teacher", nargs="+", help="run directories of trained teachers (skip training the ensemble)")
parser.add_argument("--members", type=int, default=3, help="student-alone runs (seeds 0..N-1) in the ensemble teacher")
parser.add_argument("--full", action="store_true", help="full training set and the recipes' epochs")
parser.add_argument("--per-class", type=int, default=500, help="training images per class (tiny budget)")
parser.add_argument("--student-epochs", type=int, default=15, help="epochs of every student run (tiny budget)")
parser.add_argument("--out", default="runs/distill_example", help="where the run directories go")
args = parser.parse_args()

accelerator = Accelerator()  # one for all three runs; `accelerate launch` decides processes and precision
tiny = [] if args.full else [f"data.subset_per_class={args.per_class}"]
student_budget = [] if args.full else [f"trainer.epochs={args.student_epochs}"]


def train(recipe_name: str, overrides: list[str], run_name: str):
    """Build a recipe with overrides, train it, return (experiment, test top-1, seconds)."""
    recipe = load_recipe(recipe_name, tiny + ["trainer.progress=false"] + overrides)
    t0 = time.perf_counter()
    exp = build(recipe, accelerator=accelerator, run_dir=Path(args.out) / run_name)
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=recipe.trainer.epochs)
    return exp, exp.trainer.evaluate(exp.test_loader)["top1"], time.perf_counter() - t0


# 1. the student alone with seeds 0..N-1: seed 0 is the baseline, all of them form the teacher
alone_top1, alone_time = {}, {}
seeds = [0] if args.teacher else list(range(args.members))
for seed in seeds:
    exp, alone_top1[seed], alone_time[seed] = train(
        "fashion_mnist_student", student_budget + [f"seed={seed}"], f"student_alone_seed{seed}")
    if seed == 0:
        alone = exp
teacher_dirs = list(args.teacher) if args.teacher else [str(Path(args.out) / f"student_alone_seed{s}") for s in seeds]

# 2. the same student (seed 0) distilled from the ensemble's mean logits
teacher_spec = teacher_dirs[0] if len(teacher_dirs) == 1 else "[" + ",".join(teacher_dirs) + "]"
distilled, distilled_top1, distilled_time = train(
    "distill_fashion_mnist", student_budget + [f"trainer.params.teacher={teacher_spec}"], "student_distilled")

# the teacher as distilled from (best.safetensors of each run), measured on the same test set
teacher_top1 = distilled.trainer.evaluate(distilled.test_loader, model=distilled.trainer.teacher)["top1"]

if accelerator.is_main_process:
    budget = "full" if args.full else f"tiny ({args.per_class} images per class)"
    print(f"\nFashion-MNIST test accuracy, {budget} budget, {accelerator.num_processes} process(es):")
    print(f"  {'model':<36} {'top-1 %':>8} {'train s':>8}")
    kind = f"ensemble of {len(teacher_dirs)} runs" if len(teacher_dirs) > 1 else teacher_dirs[0]
    rows = [(f"teacher ({kind})", teacher_top1, None)]
    rows += [(f"student alone, seed {seed}", alone_top1[seed], alone_time[seed]) for seed in seeds if seed != 0]
    rows += [("student alone (seed 0)", alone_top1[0], alone_time[0]),
             (f"student distilled (T={distilled.trainer.temperature:g}, alpha={distilled.trainer.alpha:g})",
              distilled_top1, distilled_time)]
    for name, top1, seconds in rows:
        shown = f"{seconds:>8.0f}" if seconds is not None else f"{'':>8}"
        print(f"  {name:<36} {top1:>8.2f} {shown}")
    print(f"  student parameters: {alone.num_parameters:,}; distilled - alone (seed 0): {distilled_top1 - alone_top1[0]:+.2f}")
    if teacher_top1 <= alone_top1[0]:
        print("  note: the teacher is no better than the student alone, so distillation cannot help;\n"
              "  use more ensemble members (--members) or a stronger teacher (--teacher RUN_DIR ...)")
accelerator.end_training()
