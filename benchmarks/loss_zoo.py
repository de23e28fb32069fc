"""The loss zoo on Fashion-MNIST: same model (tiny_cnn, 72K parameters) and budget for each loss.

Trains each `recipes/loss_*.yaml` with `convrecipes train`, evaluates the final weights with
`convrecipes evaluate --json` (test accuracy, Recall@1 of test embeddings, within/between
spread ratio, largest within-class angle / smallest between-class angle), prints one table
and writes JSON. Optionally draws the 2-D feature plots of the center-loss and SphereFace papers.

    python benchmarks/loss_zoo.py                       # all losses, about 15 minutes on 2 CPU cores
    python benchmarks/loss_zoo.py --recipes loss_ce loss_hinge --overrides trainer.epochs=2
    python benchmarks/loss_zoo.py --recipes loss_center_2d loss_asoftmax_2d --plots benchmarks/results
    python benchmarks/loss_zoo.py --recipes glyphs_triplet_batch_hard glyphs_triplet_batch_all \
        --seeds 0 1 2 --jobs 2 --out benchmarks/results/triplet_mining_glyphs.json   # with OMP_NUM_THREADS=1

With ``--seeds`` every recipe runs once per seed and the table ends with each recipe's mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT = ["loss_ce", "loss_label_smoothing", "loss_hinge", "loss_center", "loss_asoftmax", "loss_ce_triplet",
           "loss_triplet_batch_hard", "loss_triplet_batch_all"]
CLI = [sys.executable, "-m", "convrecipes.cli"]


def run_one(recipe: str, overrides: list[str], work: Path, plot_dir: Path | None, seed: int | None = None) -> dict:
    run_dir = work / (recipe if seed is None else f"{recipe}_seed{seed}")
    if seed is not None:
        overrides = [*overrides, f"seed={seed}"]
    t0 = time.perf_counter()
    train = subprocess.run(CLI + ["train", recipe, "trainer.progress=false", *overrides, "--run-dir", str(run_dir)],
                           capture_output=True, text=True)
    if train.returncode != 0:
        raise RuntimeError(f"{recipe} failed:\n{train.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    cmd = CLI + ["evaluate", str(run_dir), "--weights", "last", "--json"]
    if plot_dir is not None:
        cmd += ["--plot", str(plot_dir / f"{recipe}_features.png")]
    ev = subprocess.run(cmd, capture_output=True, text=True, check=True)
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    diverged = any(not (h["train_loss"] == h["train_loss"]) or h["train_loss"] > 1e3 for h in history)
    return {"recipe": recipe, "seed": seed, "wall_s": round(wall, 1), "train_loss_by_epoch": [h["train_loss"] for h in history],
            "diverged": diverged, **{k: v for k, v in metrics.items() if k != "checkpoint"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--plots", help="folder for 2-D feature plots (recipes with model.embedding_dim=2)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run every recipe once per seed (default: its own seed)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (set OMP_NUM_THREADS to cores / jobs)")
    parser.add_argument("--out", default="benchmarks/results/loss_zoo.json")
    args = parser.parse_args()
    plot_dir = Path(args.plots) if args.plots else None
    if plot_dir:
        plot_dir.mkdir(parents=True, exist_ok=True)
    runs = [(recipe, seed) for recipe in args.recipes for seed in (args.seeds or [None])]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        def job(run: tuple[str, int | None]) -> dict:
            row = run_one(run[0], args.overrides, Path(tmp), plot_dir, run[1])
            seed_text = "" if run[1] is None else f" seed {run[1]}"
            print(f"{run[0]}{seed_text}: top-1 {row.get('test_top1', float('nan')):.2f}%  R@1 {row.get('test_recall_at_1', float('nan')):.2f}%"
                  f"  ({row['wall_s']:.0f} s)", flush=True)
            return row

        rows = list(pool.map(job, runs))
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
