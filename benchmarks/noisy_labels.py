"""Cross-entropy against soft and hard bootstrapping under label noise, same model and budget.

Trains ``recipes/fashion_mnist_noisy_ce.yaml``, ``..._soft.yaml`` and ``..._hard.yaml`` (an
MLP on Fashion-MNIST without augmentation) under two noise settings,

- ``perm44``: 44% permutation noise (Reed et al.'s MNIST setting: CE 87% vs hard 96.5%),
- ``sym60``: 60% symmetric noise,

with ``--seeds`` each (default 0 1 2; the seed draws the noise, the split and the
initialisation), and prints one table: clean test top-1 of the final weights, the noisy
validation top-1 (the only number a user would have for model selection), and the
memorisation curve's last point (share of the flipped training labels the model predicts
as the noisy label / as the true one). Writes ``benchmarks/results/noisy_labels_<family>.json``.

    python benchmarks/noisy_labels.py --jobs 2      # about 45 min on 2 CPU cores (18 runs)
    python benchmarks/noisy_labels.py --family digits --jobs 2   # about 3 min

Finished runs are reused and unfinished ones resume (``<runs-dir>/<setting>_<method>_seed<s>``);
``--overrides`` apply to new runs only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import output_to, run_jobs, summary, train_run  # benchmarks/ is on sys.path when run as a script

FAMILIES = {
    "fashion_mnist": {"ce": "fashion_mnist_noisy_ce", "soft": "fashion_mnist_noisy_soft",
                      "hard": "fashion_mnist_noisy_hard"},
    "digits": {"ce": "digits_noisy_ce", "soft": "digits_noisy_ce", "hard": "digits_noisy_hard"},
}
#: the digits family has no soft recipe of its own: the CE one with the trainer switched
DIGITS_SOFT = ["trainer.name=bootstrapping", "trainer.params={bootstrap: soft, beta: 0.95}"]
SETTINGS = {
    "perm44": ["data.label_noise.kind=permutation", "data.label_noise.rate=0.44"],
    "sym60": ["data.label_noise.kind=symmetric", "data.label_noise.rate=0.6"],
}


def train(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``recipe`` into ``run_dir`` (reused if finished, resumed if not); its row."""
    with output_to(run_dir.with_suffix(".log")):
        run = train_run(recipe, overrides, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in records if "val_top1" in r]
    last = validated[-1]
    return {"run_dir": str(run_dir), "recipe": recipe, "overrides": overrides,
            "test_top1": run.results["test_final"]["test_top1"],
            "test_top1_best_by_noisy_val": run.results.get("test_best", {}).get("test_top1"),
            "val_top1": last["val_top1"], "flipped_pred_noisy": last.get("flipped_pred_noisy"),
            "flipped_pred_true": last.get("flipped_pred_true"),
            "memorisation_curve": [{"epoch": r["epoch"], "noisy": r.get("flipped_pred_noisy"),
                                    "true": r.get("flipped_pred_true"), "val_top1": r["val_top1"]}
                                   for r in validated],
            "wall_time_s": run.results["wall_time_s"]}




def plot_memorisation(table: dict, path: Path) -> Path:
    """One panel per setting: the share of flipped training labels predicted as the noisy
    label (solid) and as the true one (dashed) per epoch, seed 0 of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    colors = {"ce": "tab:red", "soft": "tab:orange", "hard": "tab:blue"}
    for ax, (setting, methods) in zip(axes[0], table.items()):
        for method, entry in methods.items():
            curve = entry["rows"][0]["memorisation_curve"]
            epochs = [c["epoch"] for c in curve]
            ax.plot(epochs, [c["noisy"] for c in curve], color=colors.get(method), label=f"{method}: as noisy label")
            ax.plot(epochs, [c["true"] for c in curve], color=colors.get(method), linestyle="--",
                    label=f"{method}: as true label")
        ax.set_title(f"{setting}: flipped training labels, seed {entry['rows'][0]['seed']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("predicted as (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="fashion_mnist")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=("ce", "soft", "hard"), default=["ce", "soft", "hard"])
    parser.add_argument("--runs-dir", default=None, help="default runs/noisy_labels_<family>")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value overrides for every run")
    parser.add_argument("--out", default=None, help="default benchmarks/results/noisy_labels_<family>.json")
    args = parser.parse_args()
    recipes = FAMILIES[args.family]
    root = Path(args.runs_dir or f"runs/noisy_labels_{args.family}")
    calls, keys = [], []
    for setting in args.settings:
        for seed in args.seeds:
            for method in args.methods:
                extra = DIGITS_SOFT if args.family == "digits" and method == "soft" else []
                calls.append((recipes[method], root / f"{setting}_{method}_seed{seed}",
                              [*SETTINGS[setting], *extra, *args.overrides, f"seed={seed}"]))
                keys.append((setting, method, seed))
    rows = run_jobs(train, calls, jobs=args.jobs)
    table: dict[str, dict[str, dict]] = {}
    for (setting, method, seed), row in zip(keys, rows):
        row["seed"] = seed
        table.setdefault(setting, {}).setdefault(method, {"rows": []})["rows"].append(row)
    for setting, methods in table.items():
        for method, entry in methods.items():
            for key in ("test_top1", "test_top1_best_by_noisy_val", "val_top1", "flipped_pred_noisy",
                        "flipped_pred_true"):
                entry[key] = summary(entry["rows"], key)
        if "ce" in methods and "hard" in methods:  # the criterion: hard - CE per seed
            ce = {r["seed"]: r["test_top1"] for r in methods["ce"]["rows"]}
            methods["hard"]["gain_over_ce_per_seed"] = {s: round(r["test_top1"] - ce[r["seed"]], 2)
                                                        for s, r in ((r["seed"], r) for r in methods["hard"]["rows"])
                                                        if r["seed"] in ce}
    report = {"family": args.family, "recipes": recipes, "settings": {s: SETTINGS[s] for s in args.settings},
              "seeds": args.seeds, "overrides": args.overrides, "results": table}
    out = Path(args.out or f"benchmarks/results/noisy_labels_{args.family}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    figure = plot_memorisation(table, out.with_name(out.stem + "_memorisation.png"))
    print(f"\n{args.family}: clean test top-1 % of the final weights, mean [min, max] over seeds; noisy val top-1; "
          f"flipped training labels predicted as noisy / true (last validated epoch)")
    print(f"{'setting':<8}{'method':<7}{'seeds':>6}{'test top-1':>24}{'noisy val':>11}{'as noisy':>10}{'as true':>9}"
          f"{'hard - CE per seed':>22}")
    for setting, methods in table.items():
        for method, e in methods.items():
            t = e["test_top1"]
            gains = e.get("gain_over_ce_per_seed")
            gain_cell = " ".join(f"{g:+.1f}" for g in gains.values()) if gains else ""
            cell = f"{t['mean']:.2f} [{t['min']:.2f}, {t['max']:.2f}]"
            nan = float("nan")
            print(f"{setting:<8}{method:<7}{t['n']:>6}{cell:>24}{e['val_top1'].get('mean', nan):>11.2f}"
                  f"{e['flipped_pred_noisy'].get('mean', nan):>10.1f}{e['flipped_pred_true'].get('mean', nan):>9.1f}"
                  f"{gain_cell:>22}")
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
