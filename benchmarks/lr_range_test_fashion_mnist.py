"""Does the LR range test's suggestion hold up on Fashion-MNIST?

1. `lr-find` on the recipe with 3 seeds: the spread of every rule's suggestion.
2. Train with each rule's suggestion and with a 5-point grid (x1/4 .. x4) around the
   `optimizer.lr=auto` rule's suggestion, same budget: is the suggestion within 0.5 points of
   the grid's best?
3. Cyclical LR (triangular2) with the range test's bounds against a fixed LR at the
   suggestion `optimizer.lr=auto` gives a constant schedule (the consensus rule), both for
   --clr-epochs (8): how many iterations until CLR reaches the fixed-LR run's final accuracy?

    OMP_NUM_THREADS=1 python benchmarks/lr_range_test_fashion_mnist.py   # about 20 min on one CPU core
    python benchmarks/lr_range_test_fashion_mnist.py --epochs 2      # a quicker look
    python benchmarks/lr_range_test_fashion_mnist.py --clr-only      # redo part 3 only, keep 1-2 from --out
    python benchmarks/lr_range_test_fashion_mnist.py --no-clr --runs-dir runs/lrt   # parts 1-2; resumable
    python benchmarks/lr_range_test_fashion_mnist.py --epochs 1 --clr-epochs 2 --seeds 1 --out /tmp/lrt.json \
        --model model.name=tiny_cnn model.kwargs.width=4 data.subset_per_class=20 schedule.warmup_epochs=0
                                                                     # a smoke test (a few minutes)

The sweep (``find_lr_repeated``, as ``convrecipes lr-find``) and the trainings
(``convrecipes.run.train_recipe``) run in this process, one after the other. With
``--runs-dir`` the run directories are kept there, and a second call skips finished runs
and resumes an interrupted one (``_common.train_run``); the sweep is repeated (it is
deterministic under its seeds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import lr_sweep, output_to, train_run  # benchmarks/ is on sys.path when run as a script


def train(recipe: str, overrides: list[str], run_dir: Path) -> dict:
    """Train ``recipe`` with ``overrides`` into ``run_dir`` (what it prints: ``<run_dir>.log``):
    test top-1 and val top-1 by epoch."""
    t0 = time.perf_counter()
    with output_to(run_dir.with_suffix(".log")):
        run = train_run(recipe, overrides, run_dir)
    return {"test_top1": run.test_top1, "val_top1_by_epoch": [h["val_top1"] for h in run.history],
            "steps_per_epoch": None, "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist")
    parser.add_argument("--model", nargs="*", default=["model.name=tiny_cnn", "model.kwargs.width=16"],
                        help="overrides choosing the model (default: the 72K tiny_cnn, to fit a CPU budget)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/lr_range_test_fashion_mnist.json")
    parser.add_argument("--clr-only", action="store_true", help="rerun only part 3; parts 1-2 are read from --out")
    parser.add_argument("--no-clr", action="store_true", help="parts 1-2 only (the suggestion against the grid)")
    parser.add_argument("--rules", nargs="*", default=["steepest", "valley", "min_div_10", "consensus"],
                        help="rules trained at their own suggestion in part 2 (default all four; none: the grid only)")
    parser.add_argument("--runs-dir", help="keep the run directories here (resumable); default: a temporary one")
    parser.add_argument("--clr-epochs", type=int, default=8,
                        help="epochs of the fixed-LR and CLR runs (part 3); long enough that one epoch is a fine "
                             "resolution for 'how many iterations until' (default 8)")
    args = parser.parse_args()
    from convrecipes.lr_finder.command import auto_lr_rule
    base = [*args.model, f"trainer.epochs={args.epochs}", "loss.name=cross_entropy", "loss.params={}"]
    report: dict = {"recipe": args.recipe, "overrides": base}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.runs_dir) if args.runs_dir else Path(scratch)
        # 1. the sweep, several seeds
        t0 = time.perf_counter()
        sweep, auto_rule = lr_sweep(args.recipe, base, repeat=args.seeds)
        finder = {**sweep.to_dict(), "auto_lr_rule": auto_rule}
        report["finder"] = {k: finder[k] for k in ("suggestions", "spread", "agreement", "warnings", "auto_lr_rule",
                                                   "global_batch_size")}
        report["finder"]["wall_s"] = round(time.perf_counter() - t0, 1)
        # what the suggestions were read off (absent in results from before the zero-lag reading:
        # those were read off the online EMA)
        report["finder"]["smooth_window_decades"] = sweep.runs[0].settings.get("smooth_window_decades")
        s = finder["suggestions"]
        auto = s[finder["auto_lr_rule"]]
        print(f"suggestions (geometric mean over {args.seeds} seeds): "
              + ", ".join(f"{k} {v:.3g} (x{finder['spread'][k]['ratio']:.2f})" for k, v in s.items()), flush=True)

        # 2. grid around the auto suggestion, and each rule's own suggestion, same budget
        runs = {}
        if args.clr_only:
            previous = json.loads(Path(args.out).read_text())
            runs = previous["runs"]
            report.update({k: previous[k] for k in ("grid_best_top1", "suggestion_top1", "suggestion_gap_points")})
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0) if not args.clr_only else ():
            lr = auto * factor
            runs[f"grid x{factor:g}"] = {"lr": lr, **train(args.recipe, base + [f"optimizer.lr={lr}"], tmp / f"g{factor}")}
            print(f"grid x{factor:<5g} lr {lr:<10.4g} test top-1 {runs[f'grid x{factor:g}']['test_top1']:.2f}", flush=True)
        rules = [] if args.clr_only else list(args.rules)
        report["rules_trained"] = rules
        for rule in [r for r in rules if r != finder["auto_lr_rule"]]:
            runs[f"rule {rule}"] = {"lr": s[rule], **train(args.recipe, base + [f"optimizer.lr={s[rule]}"], tmp / rule)}
            print(f"rule {rule:<11} lr {s[rule]:<10.4g} test top-1 {runs[f'rule {rule}']['test_top1']:.2f}", flush=True)
        grid = {k: v for k, v in runs.items() if k.startswith("grid")}
        best = max(grid.values(), key=lambda r: r["test_top1"])
        report["runs"] = runs
        report["grid_best_top1"] = best["test_top1"]
        report["suggestion_top1"] = runs["grid x1"]["test_top1"]
        report["suggestion_gap_points"] = round(best["test_top1"] - runs["grid x1"]["test_top1"], 2)

        # 3. CLR with the range-test bounds vs a fixed LR at what auto gives a constant schedule
        if args.no_clr:
            _report(args, report, runs, s)
            return
        fixed_rule = auto_lr_rule("constant")
        fixed_lr = s[fixed_rule]
        clr_base = [o for o in base if not o.startswith("trainer.epochs=")] + [f"trainer.epochs={args.clr_epochs}"]
        fixed = train(args.recipe, clr_base + [f"optimizer.lr={fixed_lr}", "schedule.name=constant",
                                           "schedule.warmup_epochs=0"], tmp / "fixed")
        # Smith: a half cycle of 2-10 epochs' worth; here 1 epoch, so cycles end (LR back at
        # base, where CLR is evaluated) at every even epoch
        clr = train(args.recipe, clr_base + ["schedule.name=cyclic", "schedule.warmup_epochs=0",
                                             f"schedule.params={{base_lr: {s['cyclic_base']}, max_lr: "
                                             f"{s['cyclic_max']}, step_size_epochs: 1, mode: triangular2}}",
                                             f"optimizer.lr={s['cyclic_base']}"], tmp / "clr")
        target = fixed["val_top1_by_epoch"][-1] - 0.3
        reached = next((i + 1 for i, a in enumerate(clr["val_top1_by_epoch"]) if a >= target), None)
        report["clr"] = {"fixed_rule": fixed_rule, "fixed_lr": fixed_lr, "fixed": fixed, "clr": clr,
                         "target_val_top1": target, "clr_epochs_to_target": reached, "fixed_epochs": args.clr_epochs,
                         "iteration_ratio": (args.clr_epochs / reached) if reached else None}

    _report(args, report, runs, s)


def _report(args: argparse.Namespace, report: dict, runs: dict, s: dict) -> None:
    """Print the table and write ``--out``."""
    print(f"\n{'run':<18} {'lr':>10} {'test top-1':>10}")
    for name, r in runs.items():
        print(f"{name:<18} {r['lr']:>10.4g} {r['test_top1']:>10.2f}")
    print(f"suggestion ({report['finder']['auto_lr_rule']}) vs grid best: {report['suggestion_gap_points']:.2f} points "
          f"(target <= 0.5)")
    c = report.get("clr")
    if c is None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out} (no CLR part: --no-clr)")
        return
    print(f"fixed LR {c['fixed_lr']:.3g} ({c['fixed_rule']}): final val top-1 {c['fixed']['val_top1_by_epoch'][-1]:.2f}, "
          f"test {c['fixed']['test_top1']:.2f}")
    print(f"cyclic [{s['cyclic_base']:.3g}, {s['cyclic_max']:.3g}]: val top-1 by epoch {c['clr']['val_top1_by_epoch']}, "
          f"test {c['clr']['test_top1']:.2f}; reached the fixed-LR accuracy - 0.3 at epoch {c['clr_epochs_to_target']} "
          f"of {args.clr_epochs} (iteration ratio {c['iteration_ratio']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
