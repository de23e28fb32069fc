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
    python examples/distill.py --members 2 --per-class 20 --student-epochs 2 --out /tmp/distill   # a smoke test
    accelerate launch examples/distill.py               # 1 process (or your accelerate config)
    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/distill.py
"""

import argparse
from pathlib import Path

from accelerate import Accelerator

from convrecipes.build import build
from convrecipes.recipe import load_recipe
from convrecipes.run import train_recipe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--teacher", nargs="+", help="run directories of trained teachers (skip training the ensemble)")
parser.add_argument("--members", type=int, default=3, help="student-alone runs (seeds 0..N-1) in the ensemble teacher")
parser.add_argument("--full", action="store_true", help="full training set and the recipes' epochs")
parser.add_argument("--per-class", type=int, default=500, help="training images per class (tiny budget)")
parser.add_argument("--student-epochs", type=int, default=15, help="epochs of every student run (tiny budget)")
parser.add_argument("--out", default="runs/distill_example", help="where the run directories go")
args = parser.parse_args()

# one for every run; `accelerate launch` decides processes and precision. Every process runs every step below.
accelerator = Accelerator()
out = Path(args.out)
budget = [] if args.full else [f"data.subset_per_class={args.per_class}", f"trainer.epochs={args.student_epochs}"]


def recipe(name: str, *overrides: str):
    """The recipe at this script's budget, with ``overrides``."""
    return load_recipe(name, [*budget, "trainer.progress=false", *overrides])


# 1. the student alone with seeds 0..N-1: seed 0 is the baseline, all of them form the teacher
seeds = [0] if args.teacher else list(range(args.members))
# (overwrite=True: running the script again starts afresh; the old runs move to <dir>.old-<timestamp>)
alone = {seed: train_recipe(recipe("fashion_mnist_student", f"seed={seed}"), out / f"student_alone_seed{seed}",
                            accelerator=accelerator, overwrite=True) for seed in seeds}
teacher_dirs = list(args.teacher) if args.teacher else [str(alone[seed].run_dir) for seed in seeds]

# 2. the same student (seed 0) distilled from the ensemble's mean logits
teacher_spec = teacher_dirs[0] if len(teacher_dirs) == 1 else "[" + ",".join(teacher_dirs) + "]"
distilled = train_recipe(recipe("distill_fashion_mnist", f"trainer.params.teacher={teacher_spec}"),
                         out / "student_distilled", accelerator=accelerator, overwrite=True)

# the teacher as distilled from (best.safetensors of each run), measured on the same test set
exp = build(distilled.recipe, accelerator=accelerator)
teacher_top1 = exp.trainer.evaluate(exp.test_loader, model=exp.trainer.teacher)["top1"]

if accelerator.is_main_process:
    budget_text = "full" if args.full else f"tiny ({args.per_class} images per class)"
    print(f"\nFashion-MNIST test accuracy, {budget_text} budget, {accelerator.num_processes} process(es):")
    print(f"  {'model':<36} {'top-1 %':>8} {'train s':>8}")
    kind = f"ensemble of {len(teacher_dirs)} runs" if len(teacher_dirs) > 1 else teacher_dirs[0]
    rows = [(f"teacher ({kind})", teacher_top1, None)]
    rows += [(f"student alone, seed {seed}", alone[seed].test_top1, alone[seed].results["wall_time_s"])
             for seed in seeds if seed != 0]
    rows += [("student alone (seed 0)", alone[0].test_top1, alone[0].results["wall_time_s"]),
             (f"student distilled (T={exp.trainer.temperature:g}, alpha={exp.trainer.alpha:g})",
              distilled.test_top1, distilled.results["wall_time_s"])]
    for name, top1, seconds in rows:
        shown = f"{seconds:>8.0f}" if seconds is not None else f"{'':>8}"
        print(f"  {name:<36} {top1:>8.2f} {shown}")
    print(f"  student parameters: {alone[0].results['num_parameters']:,}; "
          f"distilled - alone (seed 0): {distilled.test_top1 - alone[0].test_top1:+.2f}")
    if teacher_top1 <= alone[0].test_top1:
        print("  note: the teacher is no better than the student alone, so distillation cannot help;\n"
              "  use more ensemble members (--members) or a stronger teacher (--teacher RUN_DIR ...)")
accelerator.end_training()
