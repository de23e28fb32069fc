"""Distilled student vs the same student trained alone on Fashion-MNIST, over several seeds.

Hinton et al.'s setting: train the small model alone with several seeds, distil the ensemble
of those runs (mean logits) back into one model of the same size, and compare it with the
single models. Every run uses the same student, data, augmentation, schedule and 30 epochs
(recipes/fashion_mnist_student.yaml vs recipes/distill_fashion_mnist.yaml); only the
trainer differs. Reports final-weights test accuracy per seed, the mean and range, the
teacher's accuracy, and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/distill_seeds.py --jobs 3    # about 2 h on 2 CPU cores

Runs whose ``results.json`` exists under ``--runs-dir`` are reused, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from teacher_accuracy import teacher_accuracy, teacher_spec  # benchmarks/ is on sys.path when run as a script

CLI = [sys.executable, "-m", "convrecipes.cli"]


def train(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train with ``convrecipes train`` unless ``run_dir`` already holds a finished run."""
    if not (run_dir / "results.json").is_file():
        log = run_dir.with_suffix(".log")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            done = subprocess.run(CLI + ["train", recipe, "trainer.progress=false", *overrides, "--run-dir", str(run_dir)],
                                  stdout=fh, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{recipe} {overrides} failed; see {log}")
    results = json.loads((run_dir / "results.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": str(run_dir), "num_parameters": results["num_parameters"],
            "test_top1": results["test_final"]["test_top1"], "val_top1": history[-1].get("val_top1"),
            "wall_time_s": results["wall_time_s"]}


def summary(rows: list[dict]) -> dict:
    accs = [r["test_top1"] for r in rows]
    return {"mean": round(statistics.mean(accs), 3), "min": min(accs), "max": max(accs),
            "stdev": round(statistics.stdev(accs), 3) if len(accs) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="runs/distill_seeds")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (set OMP_NUM_THREADS to cores / jobs)")
    parser.add_argument("--out", default="benchmarks/results/distill_fashion_mnist_seeds.json")
    args = parser.parse_args()
    root = Path(args.runs_dir)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        alone = list(pool.map(lambda s: train("fashion_mnist_student", root / f"student_seed{s}", [f"seed={s}"]),
                              args.seeds))
        teachers = [Path(r["run_dir"]).resolve() for r in alone]
        spec = teacher_spec(teachers)
        distilled = list(pool.map(lambda s: train("distill_fashion_mnist", root / f"distilled_seed{s}",
                                                  [f"seed={s}", f"trainer.params.teacher={spec}"]), args.seeds))
    teacher_top1 = teacher_accuracy(teachers)["test_top1"]
    a, d = summary(alone), summary(distilled)
    print(f"\nteacher: ensemble of the {len(teachers)} student-alone runs, test top-1 {teacher_top1:.2f}%")
    print(f"{'seed':>4} {'alone %':>8} {'distilled %':>11} {'difference':>10}")
    for seed, ra, rd in zip(args.seeds, alone, distilled):
        print(f"{seed:>4} {ra['test_top1']:>8.2f} {rd['test_top1']:>11.2f} {rd['test_top1'] - ra['test_top1']:>+10.2f}")
    print(f"mean {a['mean']:>8.2f} {d['mean']:>11.2f} {d['mean'] - a['mean']:>+10.2f}")
    print(f"range alone [{a['min']:.2f}, {a['max']:.2f}], distilled [{d['min']:.2f}, {d['max']:.2f}]; "
          f"parameters {alone[0]['num_parameters']:,}")
    out = {"seeds": args.seeds, "teacher": {"members": [str(t) for t in teachers], "test_top1": teacher_top1},
           "student_alone": alone, "distilled": distilled, "student_alone_summary": a, "distilled_summary": d,
           "mean_difference": round(d["mean"] - a["mean"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
