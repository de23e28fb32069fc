"""Test accuracy of a distillation teacher (one run directory, or several as an ensemble).

Builds recipes/distill_fashion_mnist.yaml with the given teachers and measures
``trainer.teacher`` on the student's test data pipeline, as the student sees it.

    python benchmarks/teacher_accuracy.py runs/fm_teacher                 # one teacher
    python benchmarks/teacher_accuracy.py runs/fm_seed0 runs/fm_seed1     # their ensemble (mean logits)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convrecipes.build import build
from convrecipes.recipe import load_recipe


def teacher_spec(teachers: list[str | Path]) -> str:
    """The ``trainer.params.teacher`` override value: one path, or ``[a,b,...]`` for an ensemble."""
    return str(teachers[0]) if len(teachers) == 1 else "[" + ",".join(str(t) for t in teachers) + "]"


def teacher_accuracy(teachers: list[str | Path], recipe: str = "distill_fashion_mnist") -> dict:
    """Test top-1 and loss of the teacher (or ensemble) through ``recipe``'s test pipeline."""
    exp = build(load_recipe(recipe, [f"trainer.params.teacher={teacher_spec(teachers)}", "trainer.progress=false"]))
    metrics = exp.trainer.evaluate(exp.test_loader, model=exp.trainer.teacher)
    return {"test_top1": metrics["top1"], "test_loss": metrics["loss"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teachers", nargs="+", help="run directories (or .safetensors) written by `convrecipes train`")
    parser.add_argument("--recipe", default="distill_fashion_mnist")
    args = parser.parse_args()
    print(json.dumps({"teachers": args.teachers, **teacher_accuracy(args.teachers, args.recipe)}))
