"""Test accuracy of a distillation teacher (one run directory, or several as an ensemble).

Builds recipes/distill_fashion_mnist.yaml with the given teachers and measures
``trainer.teacher`` on the student's test data pipeline, as the student sees it.

    python benchmarks/teacher_accuracy.py runs/fm_teacher                 # one teacher
    python benchmarks/teacher_accuracy.py runs/fm_seed0 runs/fm_seed1     # their ensemble (mean logits)
"""

from __future__ import annotations

import argparse
import json

from convrecipes.build import build
from convrecipes.recipe import load_recipe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("teachers", nargs="+", help="run directories (or .safetensors) written by `convrecipes train`")
parser.add_argument("--recipe", default="distill_fashion_mnist")
args = parser.parse_args()

teacher = args.teachers[0] if len(args.teachers) == 1 else "[" + ",".join(args.teachers) + "]"
recipe = load_recipe(args.recipe, [f"trainer.params.teacher={teacher}", "trainer.progress=false"])
exp = build(recipe)
metrics = exp.trainer.evaluate(exp.test_loader, model=exp.trainer.teacher)
print(json.dumps({"teachers": args.teachers, "test_top1": metrics["top1"], "test_loss": metrics["loss"]}))
