"""Distil a ResNet-8 teacher into a 92K-parameter CNN on Fashion-MNIST, and compare.

Trains (or loads) a teacher with recipes/fashion_mnist.yaml, then the same small student
twice with the same budget: alone (recipes/fashion_mnist_student.yaml) and distilled from
the teacher (recipes/distill_fashion_mnist.yaml). Prints the test accuracy of all three.

    python examples/distill.py                          # tiny budget: a few minutes on a CPU (*)
    python examples/distill.py --teacher runs/fm_teacher  # reuse a trained teacher run dir
    python examples/distill.py --full                   # the recipes' full data and epochs
    accelerate launch examples/distill.py               # 1 process (or your accelerate config)
    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/distill.py

(*) The tiny budget shows the mechanics; its teacher is undertrained (ResNet-8 learns more
slowly than the tiny CNN over a few hundred steps) and may not beat the student alone, in
which case distillation cannot help either. The comparison means something with a teacher
trained on the full budget.
"""

import argparse
import time
from pathlib import Path

from accelerate import Accelerator

from convrecipes.build import build
from convrecipes.recipe import load_recipe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--teacher", help="run directory of a trained fashion_mnist teacher (skip training one)")
parser.add_argument("--full", action="store_true", help="full training set and the recipes' epochs")
parser.add_argument("--per-class", type=int, default=500, help="training images per class (tiny budget)")
parser.add_argument("--teacher-epochs", type=int, default=6, help="teacher epochs (tiny budget)")
parser.add_argument("--student-epochs", type=int, default=6, help="student epochs, both students (tiny budget)")
parser.add_argument("--out", default="runs/distill_example", help="where the three run directories go")
args = parser.parse_args()

accelerator = Accelerator()  # one for all three runs; `accelerate launch` decides processes and precision
tiny = [] if args.full else [f"data.subset_per_class={args.per_class}"]
teacher_budget = [] if args.full else [f"trainer.epochs={args.teacher_epochs}"]
student_budget = [] if args.full else [f"trainer.epochs={args.student_epochs}"]


def train(recipe_name: str, overrides: list[str], run_name: str):
    """Build a recipe with overrides, train it, return (experiment, test top-1, seconds)."""
    recipe = load_recipe(recipe_name, tiny + ["trainer.progress=false"] + overrides)
    t0 = time.perf_counter()
    exp = build(recipe, accelerator=accelerator, run_dir=Path(args.out) / run_name)
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=recipe.trainer.epochs)
    return exp, exp.trainer.evaluate(exp.test_loader)["top1"], time.perf_counter() - t0


# 1. the teacher: a ResNet-8 at width 32 (308K parameters)
teacher_dir = args.teacher
teacher_time = 0.0
if teacher_dir is None:
    teacher_dir = str(Path(args.out) / "teacher")
    _, _, teacher_time = train("fashion_mnist", teacher_budget, "teacher")

# 2. the student alone, and 3. the same student distilled from the teacher
alone, alone_top1, alone_time = train("fashion_mnist_student", student_budget, "student_alone")
distilled, distilled_top1, distilled_time = train(
    "distill_fashion_mnist", student_budget + [f"trainer.params.teacher={teacher_dir}"], "student_distilled")

# the teacher as distilled from (best.safetensors of its run), measured on the same test set
teacher_top1 = distilled.trainer.evaluate(distilled.test_loader, model=distilled.trainer.teacher)["top1"]
teacher_params = distilled.trainer.teacher_identity["num_parameters"]

if accelerator.is_main_process:
    budget = "full" if args.full else f"tiny ({args.per_class} images per class)"
    print(f"\nFashion-MNIST test accuracy, {budget} budget, {accelerator.num_processes} process(es):")
    print(f"  {'model':<36} {'params':>8} {'top-1 %':>8} {'train s':>8}")
    rows = [
        (f"teacher ({teacher_dir})", teacher_params, teacher_top1, teacher_time),
        ("student alone", alone.num_parameters, alone_top1, alone_time),
        (f"student distilled (T={distilled.trainer.temperature:g}, alpha={distilled.trainer.alpha:g})",
         distilled.num_parameters, distilled_top1, distilled_time),
    ]
    for name, params, top1, seconds in rows:
        shown = f"{seconds:>8.0f}" if seconds else f"{'loaded':>8}"
        print(f"  {name:<36} {params:>8,} {top1:>8.2f} {shown}")
    if teacher_top1 <= alone_top1:
        print("  note: the teacher is no better than the student alone at this budget, so distillation cannot help;\n"
              "  train it longer (--full, or `convrecipes train recipes/fashion_mnist.yaml` and --teacher RUN_DIR)")
accelerator.end_training()
