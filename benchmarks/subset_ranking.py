"""Does a small-subset comparison rank architectures as the full training set does?

Runs ``convrecipes compare`` twice with one recipe budget - on ``--per-class`` images per
class and on the whole training set - for the same models, then reports each model's
validation and test top-1 on both, the two rankings and their Spearman rank correlation
(computed here from the ranks; ties get their mean rank). Both comparisons are resumable.
Writes ``benchmarks/results/subset_ranking.json``.

    python benchmarks/subset_ranking.py      # about 35 min on 2 CPU cores

A comparison already written in ``--subset-out`` with these models (e.g. the README's
9-model one) is read, not rerun; only the models named here are used from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ["tiny_cnn", "small_resnet8", "small_mlp", "resnet10t", "mobilenetv3_small_050", "efficientnet_b0"]
BUDGET = ["trainer.epochs=4", "data.val_fraction=0.2"]


def ranks(values: list[float]) -> list[float]:
    """Rank 1 = highest; ties share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks of ``a`` and ``b``."""
    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def _rows(path: Path) -> dict[str, dict]:
    """``{model: row}`` of a written comparison (empty when there is none)."""
    if not path.is_file():
        return {}
    return {r["model"]: r for r in json.loads(path.read_text())["models"]}


def main() -> None:
    from convrecipes.choose import compare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--subset-out", default="runs/compare_fm500")
    parser.add_argument("--full-out", default="runs/compare_fm_full")
    parser.add_argument("--out", default="benchmarks/results/subset_ranking.json")
    args = parser.parse_args()
    models = args.models.split(",")
    subset_rows = _rows(Path(args.subset_out) / "compare.json")
    if not set(models) <= set(subset_rows):  # not compared there yet (the call resumes or reuses runs)
        subset_rows = {r["model"]: r for r in compare(
            args.recipe, models, overrides=[*BUDGET, f"data.subset_per_class={args.per_class}"],
            out_dir=args.subset_out).rows}
    full_rows = {r["model"]: r for r in compare(args.recipe, models, overrides=BUDGET, out_dir=args.full_out).rows}
    report: dict = {"recipe": args.recipe, "budget": BUDGET, "per_class": args.per_class, "models": models}
    for metric in ("val_top1", "test_top1"):
        a = [subset_rows[m][metric] for m in models]
        b = [full_rows[m][metric] for m in models]
        report[metric] = {"subset": dict(zip(models, a)), "full": dict(zip(models, b)),
                          "subset_rank": dict(zip(models, ranks(a))), "full_rank": dict(zip(models, ranks(b))),
                          "spearman": round(spearman(a, b), 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.recipe}: {args.per_class} images per class vs the full training set, same budget ({' '.join(BUDGET)})")
    print(f"{'model':<24}{'val subset':>11}{'rank':>6}{'val full':>10}{'rank':>6}{'test subset':>13}{'test full':>11}")
    v, t = report["val_top1"], report["test_top1"]
    for m in models:
        print(f"{m:<24}{v['subset'][m]:>11.2f}{v['subset_rank'][m]:>6.1f}{v['full'][m]:>10.2f}{v['full_rank'][m]:>6.1f}"
              f"{t['subset'][m]:>13.2f}{t['full'][m]:>11.2f}")
    print(f"Spearman rank correlation, subset vs full: val {v['spearman']:+.3f}, test {t['spearman']:+.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
