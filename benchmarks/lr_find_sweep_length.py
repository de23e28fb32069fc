"""Do the LR range test's suggestions move when only the sweep length changes?

Sweeps the quickstart recipe as ``lr-find quickstart --num-iters N`` does (1e-7 -> 10, exp)
for N = 100 and 300, with several seeds, and prints each rule's suggestion (geometric mean
over the seeds) at both lengths and their ratio, plus where the online EMA (beta 0.98) and
a centred running median (0.5 decades) of the raw losses put the loss minimum.

Two things move a suggestion between the lengths: the reading (an online EMA lags by ~49
steps: 4 decades of LR at 100 steps, 1.3 at 300) and the curve itself (a 300-step sweep
trains 3x as many steps per decade of LR, so on a real model the loss falls earlier and
deeper). ``tests/test_truthful_plots.py`` isolates the first on a synthetic curve; this
script measures both together on the real quickstart.

``--label`` names the code being measured; run the script once per checkout, e.g. the code
before the zero-lag reading from an unpacked older commit:

    OMP_NUM_THREADS=1 python benchmarks/lr_find_sweep_length.py --label after        # about 2 min
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before python benchmarks/lr_find_sweep_length.py --label before

Resumable: the JSON (``--out``) keeps every finished sweep (label, length, seed), and a
second call only runs what is missing and prints the table of everything stored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

RULES = ("steepest", "valley", "min_div_10", "consensus", "cyclic_max")


def centred_median_min_lr(lrs: list[float], losses: list[float], window_decades: float = 0.5) -> float:
    """The LR where a centred running median (window in decades) of the raw losses is lowest:
    the lag-free reference for the loss minimum, computed here so that both code versions
    are measured against the same thing."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    x = np.log10(np.asarray(lrs[: len(finite)], dtype=np.float64))
    loss = np.asarray(finite, dtype=np.float64)
    med = [np.median(loss[np.abs(x - xi) <= window_decades / 2 + 1e-12]) for xi in x]
    return float(lrs[int(np.argmin(med))])


def sweep(recipe_name: str, num_iters: int, seed: int) -> dict[str, Any]:
    """One ``lr-find`` sweep of ``recipe_name`` (the CLI's defaults but ``--num-iters``)."""
    from convrecipes.build import build, load_datasets, make_accelerator
    from convrecipes.lr_finder import find_lr
    from convrecipes.lr_finder.command import finder_recipe
    from convrecipes.recipe import load_recipe

    recipe = load_recipe(recipe_name, ["trainer.progress=false"])
    accelerator = make_accelerator(recipe)
    exp = build(finder_recipe(recipe, seed), accelerator=accelerator, datasets=load_datasets(recipe))
    t0 = time.perf_counter()
    result = find_lr(exp.trainer, exp.train_loader, seed=seed, num_iters=num_iters, progress=False)
    smoothed = np.asarray(result.smoothed, dtype=np.float64)
    return {
        "suggestions": {k: result.suggestions.get(k) for k in RULES},
        "stop_reason": result.stop_reason,
        "steps_recorded": len(result.lrs),
        "ema_min_lr": float(result.lrs[int(np.nanargmin(smoothed))]),
        "centred_median_min_lr": centred_median_min_lr(result.lrs, result.losses),
        "smooth_window_decades": result.settings.get("smooth_window_decades"),  # None: read off the online EMA
        "warnings": list(result.warnings),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def geomean(values: list[float]) -> float | None:
    vals = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def table(data: dict[str, Any], lengths: list[int]) -> str:
    """Per label and rule: the geometric mean over seeds at each length and max/min of the two."""
    a, b = lengths[0], lengths[-1]
    lines = [f"{'code':<8} {'rule':<22} {f'{a} steps':>10} {f'{b} steps':>10} {'ratio':>7}   per seed ({a} | {b})"]
    for label, by_len in data["sweeps"].items():
        if str(a) not in by_len or str(b) not in by_len:
            continue
        for rule in (*RULES, "ema_min_lr", "centred_median_min_lr"):
            def get(n: int) -> list[float]:
                runs = by_len[str(n)].values()
                return [r[rule] if rule.endswith("_lr") else r["suggestions"][rule] for r in runs]
            va, vb = geomean(get(a)), geomean(get(b))
            ratio = f"{max(va, vb) / min(va, vb):.2f}" if va and vb else "-"
            seeds_a = " ".join(f"{v:.3g}" if v else "-" for v in get(a))
            seeds_b = " ".join(f"{v:.3g}" if v else "-" for v in get(b))
            fmt = (lambda v: f"{v:.3g}" if v else "-")
            lines.append(f"{label:<8} {rule:<22} {fmt(va):>10} {fmt(vb):>10} {ratio:>7}   {seeds_a} | {seeds_b}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of the code measured, e.g. before or after")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/lr_find_sweep_length.json")
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"recipe": args.recipe, "sweeps": {}}
    for n in args.lengths:
        for seed in args.seeds:
            done = data["sweeps"].setdefault(args.label, {}).setdefault(str(n), {})
            if str(seed) in done:
                continue
            done[str(seed)] = sweep(args.recipe, n, seed)
            print(f"{args.label}: {n} steps, seed {seed}: "
                  + ", ".join(f"{k} {v:.3g}" if v else f"{k} -" for k, v in done[str(seed)]["suggestions"].items()),
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(out)
    print(table(data, args.lengths))


if __name__ == "__main__":
    main()
