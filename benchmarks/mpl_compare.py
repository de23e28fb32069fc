"""Meta Pseudo Labels against supervised-only and a UDA-only teacher, same labels, model and steps.

For a semi-supervised recipe family (``--family fashion_mnist``: ``recipes/
fashion_mnist_40labels_supervised.yaml``, ``..._uda.yaml`` and ``mpl_fashion_mnist.yaml``;
``--family digits``: the 4-labels-per-class digits set), trains

- supervised only on the labeled images, UDA alone, and MPL (student after finetuning),
  with ``--seeds`` each (default 0 1 2);
- the MPL ablations ``feedback=off`` (plain pseudo labels from a UDA teacher) and
  ``feedback=flipped`` (the official code's sign of h) with ``--ablation-seeds`` (default 0);

and prints one table of test top-1 (final weights; the student for MPL, with its teacher
beside it) and validation top-1 (the numbers settings were chosen on), and writes JSON.

    python benchmarks/mpl_compare.py --family digits --jobs 2            # about 3 min on 2 CPU cores
    python benchmarks/mpl_compare.py --family fashion_mnist --jobs 2     # about 40 min on 2 CPU cores

Every run is ``convrecipes.run.train_recipe`` in this process or, with ``--jobs N``, in N
spawned processes of one thread each; a run's output goes to ``<runs-dir>/<run>.log``.
Finished runs (``results.json``) are reused and unfinished ones (``last.safetensors``)
resume, so an interrupted benchmark continues where it stopped; ``--overrides`` apply to
new runs only (use another ``--runs-dir`` when changing them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import output_to, run_jobs, summary, train_run  # benchmarks/ is on sys.path when run as a script

FAMILIES = {
    "fashion_mnist": ("fashion_mnist_40labels_supervised", "fashion_mnist_40labels_uda", "mpl_fashion_mnist"),
    "digits": ("digits_4labels_supervised", "digits_4labels_uda", "mpl_digits"),
}


def train(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``recipe`` into ``run_dir`` (reused if finished, resumed if not); its row."""
    with output_to(run_dir.with_suffix(".log")):
        run = train_run(recipe, overrides, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = run.results
    row = {"run_dir": str(run_dir), "recipe": recipe, "overrides": overrides,
           "test_top1": results["test_final"]["test_top1"],
           "test_top1_best_by_val": results.get("test_best", {}).get("test_top1"),
           "val_top1": rows[-1].get("val_top1"), "wall_time_s": results["wall_time_s"]}
    if "test_final_teacher" in results:
        row["teacher_test_top1"] = results["test_final_teacher"]["test_top1"]
        row["teacher_val_top1"] = rows[-1].get("teacher_val_top1")
        mpl_rows = [r for r in rows if "student_loss" in r]
        if mpl_rows:  # the student just before finetuning, on validation
            row["val_top1_before_finetune"] = mpl_rows[-1].get("val_top1")
            row["pseudo_label_acc_last_mpl_epoch"] = mpl_rows[-1].get("pseudo_label_acc")
            row["h_mean_over_mpl_epochs"] = statistics.mean(r["h"] for r in mpl_rows)
    return row




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="fashion_mnist")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--runs-dir", default=None, help="default runs/mpl_compare_<family>")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--out", default=None, help="default benchmarks/results/mpl_<family>.json")
    args = parser.parse_args()
    supervised, uda, mpl = FAMILIES[args.family]
    root = Path(args.runs_dir or f"runs/mpl_compare_{args.family}")
    methods = {"supervised": (supervised, [], args.seeds), "uda": (uda, [], args.seeds),
               "mpl": (mpl, [], args.seeds),
               "mpl_feedback_off": (mpl, ["trainer.params.feedback='off'"], args.ablation_seeds),
               "mpl_feedback_flipped": (mpl, ["trainer.params.feedback='flipped'"], args.ablation_seeds)}
    calls, keys = [], []
    for method, (recipe, extra, seeds) in methods.items():
        for seed in seeds:
            calls.append((recipe, root / f"{method}_seed{seed}", [*args.overrides, *extra, f"seed={seed}"]))
            keys.append(method)
    rows = run_jobs(train, calls, jobs=args.jobs)
    by_method: dict[str, list[dict]] = {}
    for key, row in zip(keys, rows):
        by_method.setdefault(key, []).append(row)
    report = {"family": args.family, "recipes": {"supervised": supervised, "uda": uda, "mpl": mpl},
              "overrides": args.overrides, "seeds": args.seeds, "ablation_seeds": args.ablation_seeds,
              "methods": {m: {"rows": r, "test_top1": summary(r), "val_top1": summary(r, "val_top1"),
                              "teacher_test_top1": summary(r, "teacher_test_top1")} for m, r in by_method.items()}}
    out = Path(args.out or f"benchmarks/results/mpl_{args.family}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.family}: test top-1 % of the final weights (student), mean [min, max] over seeds")
    print(f"{'method':<22}{'seeds':>6}{'test top-1':>24}{'val top-1':>12}{'teacher test':>14}")
    for method, stats in report["methods"].items():
        t, v, teacher = stats["test_top1"], stats["val_top1"], stats["teacher_test_top1"]
        cell = f"{t['mean']:.2f} [{t['min']:.2f}, {t['max']:.2f}]"
        teacher_cell = f"{teacher['mean']:.2f}" if teacher else "-"
        print(f"{method:<22}{t['n']:>6}{cell:>24}{v.get('mean', float('nan')):>12.2f}{teacher_cell:>14}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
