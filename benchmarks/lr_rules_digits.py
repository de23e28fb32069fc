"""Which LR-finder rule should `optimizer.lr=auto` use? A check on a second problem.

The Fashion-MNIST benchmark (`lr_range_test_fashion_mnist.py`) is the acceptance test; this
script looks at the rules on the bundled digits data first, so the rule is not chosen on
the benchmark it is judged by. It sweeps the quickstart recipe with 3 seeds, trains at each
rule's suggestion and on a wide LR grid (factors of 2), 2 seeds each with the recipe's own
budget and schedule, and prints how far each rule lands from the grid's best mean accuracy.

    OMP_NUM_THREADS=1 python benchmarks/lr_rules_digits.py       # about 10 min on one core
    python benchmarks/lr_rules_digits.py --seeds 1 --grid 0.05 --out /tmp/lr_rules.json \
        --overrides trainer.epochs=2 model.kwargs.width=4            # a smoke test (about 2 minutes)

The sweep and the trainings (``convrecipes.run.train_recipe``) run in this process;
``--overrides`` apply to the sweep and to every training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lr_sweep  # noqa: E402
from lr_range_test_fashion_mnist import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per LR")
    parser.add_argument("--grid", type=float, nargs="*", default=[0.0125 * 2 ** k for k in range(8)])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="key=value overrides for the sweep and every run, e.g. trainer.epochs=2 for a smoke test")
    parser.add_argument("--out", default="benchmarks/results/lr_rules_digits.json")
    args = parser.parse_args()
    report: dict = {"recipe": args.recipe, **({"overrides": args.overrides} if args.overrides else {})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        finder, _ = lr_sweep(args.recipe, args.overrides, repeat=3)
        # consensus is the finder's own geometric mean of the three rules (reported as
        # "geomean_of_rules" in results written before it existed)
        s = {k: v for k, v in finder.suggestions.items() if k in ("steepest", "valley", "min_div_10", "consensus")}
        report["suggestions"] = s
        report["spread"] = {k: finder.spread[k]["ratio"] for k in ("steepest", "valley", "min_div_10")}
        report["finder_wall_s"] = round(time.perf_counter() - t0, 1)
        print("suggestions: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()), flush=True)

        def mean_acc(lr: float, tag: str) -> dict:
            accs = [train(args.recipe, [*args.overrides, f"optimizer.lr={lr}", f"seed={seed}"],
                          tmp / f"{tag}_{seed}")["test_top1"]
                    for seed in range(args.seeds)]
            print(f"{tag:<20} lr {lr:<9.4g} test top-1 {statistics.fmean(accs):.2f} {accs}", flush=True)
            return {"lr": lr, "test_top1": accs, "mean": statistics.fmean(accs)}

        grid = {f"grid {lr:.4g}": mean_acc(lr, f"grid {lr:.4g}") for lr in args.grid}
        rules = {f"rule {k}": mean_acc(v, f"rule {k}") for k, v in s.items()}
        best = max(r["mean"] for r in grid.values())
        report.update(grid=grid, rules=rules, grid_best_mean=best,
                      gap_points={k: round(best - r["mean"], 2) for k, r in rules.items()})
    print(f"\ngrid best mean test top-1 {best:.2f}")
    for k, gap in report["gap_points"].items():
        print(f"{k:<22} gap to grid best {gap:+.2f} points")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
