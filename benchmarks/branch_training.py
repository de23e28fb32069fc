"""Multi-branch networks on Fashion-MNIST: SBN with freeze-drop-path against the same SBN
trained normally, FractalNet with drop-path against FractalNet without, same budget.

Trains ``recipes/fashion_mnist_sbn_fdp.yaml``, ``fashion_mnist_sbn.yaml``,
``fashion_mnist_fractalnet_droppath.yaml`` and ``fashion_mnist_fractalnet.yaml`` with
``--seeds`` each and prints one table: final test top-1, validation top-1 at a quarter of
the budget (where Smith & Topin expect freeze-drop-path's faster start), the test top-1 of
the deepest column / branch evaluated alone (Larsson et al.: with drop-path FractalNet's
deepest column alone nearly matches the whole network), parameters and wall time. Writes
``benchmarks/results/branch_training.json``.

    python benchmarks/branch_training.py --jobs 2     # 12 runs, about 25 min on 2 CPU cores

Finished runs are reused and unfinished ones resume (``<runs-dir>/<method>_seed<s>``);
``--overrides`` apply to new runs only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import output_to, run_jobs, summary, train_run  # benchmarks/ is on sys.path when run as a script

#: method -> (recipe, the model.kwargs key that evaluates one column / branch alone)
METHODS = {
    "sbn_fdp": ("fashion_mnist_sbn_fdp", "branch"),
    "sbn": ("fashion_mnist_sbn", "branch"),
    "fractalnet_droppath": ("fashion_mnist_fractalnet_droppath", "column"),
    "fractalnet": ("fashion_mnist_fractalnet", "column"),
}


def deepest_alone(run_dir: Path, key: str) -> float:
    """Test top-1 of the run's final weights with only the deepest column / branch."""
    from convrecipes.checkpoint import read_metadata
    from convrecipes.run import evaluate_run

    meta = read_metadata(run_dir / "last.safetensors")
    kwargs = meta["recipe"]["model"].get("kwargs") or {}
    count = kwargs.get("columns" if key == "column" else "branches", 3)
    return evaluate_run(run_dir, "last", model_kwargs={key: count - 1})["test_top1"]


def train(method: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train one method into ``run_dir`` (reused if finished, resumed if not); its row."""
    recipe, key = METHODS[method]
    with output_to(run_dir.with_suffix(".log")):
        run = train_run(recipe, overrides, run_dir)
        alone = deepest_alone(run_dir, key)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = records[-1]["epoch"]
    quarter = next(r for r in records if r["epoch"] >= max(1, epochs // 4) and "val_top1" in r)
    return {"run_dir": str(run_dir), "recipe": recipe, "overrides": overrides, "epochs": epochs,
            "test_top1": run.results["test_final"]["test_top1"], "val_top1_quarter": quarter["val_top1"],
            "quarter_epoch": quarter["epoch"], "val_top1_final": records[-1].get("val_top1"),
            "deepest_alone_test_top1": alone, "num_parameters": run.results.get("num_parameters"),
            "wall_time_s": run.results["wall_time_s"],
            "val_curve": [(r["epoch"], r["val_top1"]) for r in records if "val_top1" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--runs-dir", default="runs/branch_training")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--out", default="benchmarks/results/branch_training.json")
    args = parser.parse_args()
    root = Path(args.runs_dir)
    calls = [(m, root / f"{m}_seed{s}", [*args.overrides, f"seed={s}"]) for s in args.seeds for m in args.methods]
    rows = run_jobs(train, calls, jobs=args.jobs)
    table: dict[str, dict] = {}
    for (method, _, _), seed, row in zip(calls, [s for s in args.seeds for _ in args.methods], rows):
        row["seed"] = seed
        table.setdefault(method, {"rows": []})["rows"].append(row)
    for entry in table.values():
        for key in ("test_top1", "val_top1_quarter", "deepest_alone_test_top1", "wall_time_s"):
            entry[key] = summary(entry["rows"], key)
        entry["num_parameters"] = entry["rows"][0]["num_parameters"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, "overrides": args.overrides, "results": table}, indent=2))
    print(f"\nFashion-MNIST multi-branch networks, mean [min, max] over seeds {args.seeds} (top-1 %)")
    print(f"{'method':<21}{'params':>9}{'test (final)':>22}{'val at 1/4 budget':>22}{'deepest alone (test)':>24}"
          f"{'wall s':>8}")
    for method, e in table.items():
        cells = [f"{e[k]['mean']:.2f} [{e[k]['min']:.2f}, {e[k]['max']:.2f}]"
                 for k in ("test_top1", "val_top1_quarter", "deepest_alone_test_top1")]
        print(f"{method:<21}{e['num_parameters'] or 0:>9,}{cells[0]:>22}{cells[1]:>22}{cells[2]:>24}"
              f"{e['wall_time_s']['mean']:>8.0f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
