"""Distilled student vs the same student trained alone on Fashion-MNIST, over several seeds.

Hinton et al.'s setting: train the small model alone with several seeds, distil the ensemble
of those runs (mean logits) back into one model of the same size, and compare it with the
single models. Every run uses the same student, data, augmentation, schedule and 30 epochs
(recipes/fashion_mnist_student.yaml vs recipes/distill_fashion_mnist.yaml); only the
trainer differs. Reports final-weights test accuracy per seed, the mean and range, the
teacher's accuracy, and writes JSON.

    python benchmarks/distill_seeds.py --jobs 3    # about 2 h on 2 CPU cores
    python benchmarks/distill_seeds.py --seeds 0 1 --jobs 2 --runs-dir /tmp/ds --out /tmp/ds.json \
        --overrides trainer.epochs=2 data.subset_per_class=20       # a smoke test (a few minutes)

Every run is ``convrecipes.run.train_recipe`` called in this process, or with ``--jobs N``
in N spawned processes of ``OMP_NUM_THREADS`` threads each (default 1); what a run prints
goes to ``<runs-dir>/<run>.log``. Runs whose ``results.json`` exists under ``--runs-dir``
are reused and runs with a ``last.safetensors`` but no ``results.json`` resume, so an
interrupted benchmark continues where it stopped (``--overrides`` do not change a run
that is reused or resumed: give another ``--runs-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from _common import output_to, run_jobs, train_run  # benchmarks/ is on sys.path when run as a script
from teacher_accuracy import teacher_accuracy, teacher_spec


def train(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``recipe`` into ``run_dir`` (reused if finished, resumed if not); its row."""
    with output_to(run_dir.with_suffix(".log")):
        run = train_run(recipe, overrides, run_dir)
    return {"run_dir": str(run_dir), "num_parameters": run.results["num_parameters"],
            "test_top1": run.test_top1, "val_top1": run.history[-1].get("val_top1"),
            "wall_time_s": run.results["wall_time_s"]}


def summary(rows: list[dict]) -> dict:
    accs = [r["test_top1"] for r in rows]
    return {"mean": round(statistics.mean(accs), 3), "min": min(accs), "max": max(accs),
            "stdev": round(statistics.stdev(accs), 3) if len(accs) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="runs/distill_seeds")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings at once, in processes of OMP_NUM_THREADS threads (default 1)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="key=value overrides for every run, e.g. trainer.epochs=2 for a smoke test")
    parser.add_argument("--out", default="benchmarks/results/distill_fashion_mnist_seeds.json")
    args = parser.parse_args()
    root = Path(args.runs_dir)
    alone = run_jobs(train, [("fashion_mnist_student", root / f"student_seed{s}", [*args.overrides, f"seed={s}"])
                             for s in args.seeds], args.jobs)
    teachers = [Path(r["run_dir"]).resolve() for r in alone]
    spec = teacher_spec(teachers)
    distilled = run_jobs(train, [("distill_fashion_mnist", root / f"distilled_seed{s}",
                                  [*args.overrides, f"seed={s}", f"trainer.params.teacher={spec}"])
                                 for s in args.seeds], args.jobs)
    teacher_top1 = teacher_accuracy(teachers)["test_top1"]
    a, d = summary(alone), summary(distilled)
    print(f"\nteacher: ensemble of the {len(teachers)} student-alone runs, test top-1 {teacher_top1:.2f}%")
    print(f"{'seed':>4} {'alone %':>8} {'distilled %':>11} {'difference':>10}")
    for seed, ra, rd in zip(args.seeds, alone, distilled):
        print(f"{seed:>4} {ra['test_top1']:>8.2f} {rd['test_top1']:>11.2f} {rd['test_top1'] - ra['test_top1']:>+10.2f}")
    print(f"mean {a['mean']:>8.2f} {d['mean']:>11.2f} {d['mean'] - a['mean']:>+10.2f}")
    print(f"range alone [{a['min']:.2f}, {a['max']:.2f}], distilled [{d['min']:.2f}, {d['max']:.2f}]; "
          f"parameters {alone[0]['num_parameters']:,}")
    out = {"seeds": args.seeds, "overrides": args.overrides,
           "teacher": {"members": [str(t) for t in teachers], "test_top1": teacher_top1},
           "student_alone": alone, "distilled": distilled, "student_alone_summary": a, "distilled_summary": d,
           "mean_difference": round(d["mean"] - a["mean"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
