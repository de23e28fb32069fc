"""The loss zoo on Fashion-MNIST: same model (tiny_cnn, 72K parameters) and budget for each loss.

Trains each `recipes/loss_*.yaml` (``convrecipes.run.train_recipe``), evaluates the final
weights (``evaluate_run``: test accuracy, Recall@1 of test embeddings, within/between
spread ratio, largest within-class angle / smallest between-class angle), prints one table
and writes JSON. Optionally draws the 2-D feature plots of the center-loss and SphereFace papers.

    python benchmarks/loss_zoo.py                       # all losses, about 15 minutes on 2 CPU cores
    python benchmarks/loss_zoo.py --recipes loss_ce loss_hinge --overrides trainer.epochs=2
    python benchmarks/loss_zoo.py --recipes loss_center_2d loss_asoftmax_2d --plots benchmarks/results
    python benchmarks/loss_zoo.py --recipes glyphs_triplet_batch_hard glyphs_triplet_batch_all \
        --seeds 0 1 2 --jobs 2 --out benchmarks/results/triplet_mining_glyphs.json   # with OMP_NUM_THREADS=1

    python benchmarks/loss_zoo.py --recipes loss_ce --overrides trainer.epochs=1 schedule.warmup_epochs=0 \
        data.subset_per_class=20 --out /tmp/loss_zoo_smoke.json      # a smoke test (under a minute)

With ``--seeds`` every recipe runs once per seed and the table ends with each recipe's mean.
With ``--jobs N`` the trainings run N at a time, each in its own spawned process with
``OMP_NUM_THREADS`` threads (default 1). What a training prints goes to ``<run>.log`` beside
its (temporary) run directory; a failure shows the end of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import output_to, run_jobs, train_run  # benchmarks/ is on sys.path when run as a script

DEFAULT = ["loss_ce", "loss_label_smoothing", "loss_hinge", "loss_center", "loss_asoftmax", "loss_ce_triplet",
           "loss_triplet_batch_hard", "loss_triplet_batch_all"]


def run_one(recipe: str, overrides: list[str], work: Path, plot_dir: Path | None, seed: int | None = None) -> dict:
    """Train ``recipe`` into ``work`` and evaluate its last weights: one row of the table."""
    from convrecipes.recipe import load_recipe
    from convrecipes.run import evaluate_run

    run_dir = work / (recipe if seed is None else f"{recipe}_seed{seed}")
    if seed is not None:
        overrides = [*overrides, f"seed={seed}"]
    with output_to(run_dir.with_suffix(".log")):
        t0 = time.perf_counter()
        history = train_run(recipe, overrides, run_dir).history
        wall = time.perf_counter() - t0
        # evaluate refuses --plot for a model without 2-D embeddings; the other recipes get no plot
        two_d = plot_dir is not None and load_recipe(recipe, overrides).model.embedding_dim == 2
        plot = plot_dir / f"{recipe}_features.png" if two_d else None
        metrics = evaluate_run(run_dir, "last", plot=plot)
    diverged = any(not (h["train_loss"] == h["train_loss"]) or h["train_loss"] > 1e3 for h in history)
    shown = {k: v for k, v in metrics.items() if k not in ("checkpoint", "epoch", "dataset", "weights",
                                                             "unseen_test_classes")}
    return {"recipe": recipe, "seed": seed, "wall_s": round(wall, 1), "train_loss_by_epoch": [h["train_loss"] for h in history],
            "diverged": diverged, **shown}


def report(row: dict) -> None:
    seed_text = "" if row["seed"] is None else f" seed {row['seed']}"
    print(f"{row['recipe']}{seed_text}: top-1 {row.get('test_top1', float('nan')):.2f}%  "
          f"R@1 {row.get('test_recall_at_1', float('nan')):.2f}%  ({row['wall_s']:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--plots", help="folder for 2-D feature plots (recipes with model.embedding_dim=2)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run every recipe once per seed (default: its own seed)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings at once, in processes of OMP_NUM_THREADS threads (default 1)")
    parser.add_argument("--out", default="benchmarks/results/loss_zoo.json")
    args = parser.parse_args()
    plot_dir = Path(args.plots) if args.plots else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    runs = [(recipe, seed) for recipe in args.recipes for seed in (args.seeds or [None])]
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_jobs(run_one, [(recipe, args.overrides, Path(tmp), plot_dir, seed) for recipe, seed in runs],
                        args.jobs, on_done=report)
    print(f"\n{'recipe':<26} {'seed':>4} {'top-1 %':>8} {'R@1 %':>7} {'spread':>7} {'angle ratio':>11} {'max within°':>11} "
          f"{'min between°':>12}")
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['recipe']:<26} {'-' if r['seed'] is None else r['seed']:>4} {f('test_top1', '8.2f')} {f('test_recall_at_1', '7.2f')} "
              f"{f('test_spread_ratio', '7.3f')} {f('test_angle_ratio', '11.3f')} {f('test_angle_max_within_deg', '11.1f')} "
              f"{f('test_angle_min_between_deg', '12.1f')}")
    summary = {}
    if args.seeds and len(args.seeds) > 1:
        print(f"\nmean over seeds {args.seeds}:")
        for recipe in args.recipes:
            mine = [r for r in rows if r["recipe"] == recipe]
            summary[recipe] = {key: {"mean": statistics.mean(r[key] for r in mine),
                                     "min": min(r[key] for r in mine), "max": max(r[key] for r in mine)}
                               for key in ("test_top1", "test_recall_at_1", "test_spread_ratio") if key in mine[0]}
            print(f"  {recipe:<26} " + "  ".join(f"{k} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                                                   for k, v in summary[recipe].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"overrides": args.overrides, "seeds": args.seeds, "rows": rows,
                                          "mean_over_seeds": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
