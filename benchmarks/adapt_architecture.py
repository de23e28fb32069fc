"""Adapting a trained network: resolution stages on Fashion-MNIST and fine-tuning to digits.

1. Resolution stages: the tiny CNN trained on Fashion-MNIST at 28 px, then fine-tuned 2
   epochs at 40 px from those weights (``convrecipes train ... --then data.image_size=40
   ...``); reports the 28 px model at 28 px, the same model at 40 px without fine-tuning,
   and after the 40 px fine-tuning (test top-1).
2. Fine-tuning: that 28 px Fashion-MNIST network fine-tuned on digits (resized to 28 px)
   with 10 labeled images per class, its first 2 stages frozen for the first 9 epochs and
   the backbone at 0.1x LR (``recipes/digits_finetune.yaml``), the same with the scratch
   run's LR everywhere, and the same network trained from scratch on those images
   (``recipes/quickstart.yaml``), ``--seeds`` each.

    python benchmarks/adapt_architecture.py     # about 15 min on one CPU core

Finished runs are reused and unfinished ones resume. Writes
``benchmarks/results/adapt_architecture.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import output_to, summary, train_run  # benchmarks/ is on sys.path when run as a script

MODEL = ["model.name=tiny_cnn", "model.kwargs={width: 16}"]
STAGE1 = ["trainer.epochs=4", *MODEL]
STAGE2 = ["data.image_size=40", "trainer.epochs=2", "optimizer.lr=0.01", "schedule.warmup_epochs=0"]
#: 10 labeled digits per class, upsampled to the pretraining resolution; 5 steps per epoch
DIGITS = ["data.image_size=28", "data.labels_per_class=10", "data.batch_size=20", "trainer.epochs=30",
          "trainer.progress=false"]
FINETUNE = ["model.unfreeze_epoch=10"]
#: the second fine-tuning variant, tried after the first one lost to training from scratch:
#: the scratch run's LR for every layer (the recipe's default is 0.02 with the backbone at 0.1x)
FULL_LR = ["optimizer.lr=0.05", "optimizer.backbone_lr_mult=1.0"]


def resolution_stages(root: Path) -> dict:
    """Stage 1 at 28 px and stage 2 at 40 px (resumable: a finished stage is read)."""
    from convrecipes.recipe import load_recipe
    from convrecipes.run import train_stages

    parent = root / "fm_resolution"
    summary_file = parent / "results.json"
    if not summary_file.is_file():
        recipes = [load_recipe("fashion_mnist", ["trainer.progress=false", *STAGE1]),
                   load_recipe("fashion_mnist", ["trainer.progress=false", *STAGE1, *STAGE2])]
        with output_to(root / "fm_resolution.log"):
            train_stages(recipes, parent, stage_overrides=[STAGE1, STAGE2])
    stages = json.loads(summary_file.read_text())["stages"]
    return {"stage1_at_28px": stages[0]["test_final"]["test_top1"] if "test_final" in stages[0] else None,
            "stage1_at_40px_no_finetune": stages[1]["test_init"]["test_top1"],
            "stage2_at_40px_after_2_epochs": stages[1]["test_final"]["test_top1"] if "test_final" in stages[1] else None,
            "stages": stages, "run_dir": str(parent)}


def digits(root: Path, pretrained: Path, seeds: list[int]) -> dict:
    rows: dict[str, list[dict]] = {"finetuned": [], "finetuned_full_lr": [], "scratch": []}
    init = [f"model.init_from={pretrained}", *FINETUNE]
    for seed in seeds:
        for method, recipe, extra in (("finetuned", "digits_finetune", init),
                                      ("finetuned_full_lr", "digits_finetune", [*init, *FULL_LR]),
                                      ("scratch", "quickstart", [])):
            run_dir = root / f"digits_{method}_seed{seed}"
            with output_to(run_dir.with_suffix(".log")):
                run = train_run(recipe, [*DIGITS, *MODEL, *extra, f"seed={seed}"], run_dir)
            rows[method].append({"seed": seed, "test_top1": run.results["test_final"]["test_top1"],
                                 "wall_time_s": run.results["wall_time_s"], "run_dir": str(run_dir)})
    return {m: {"rows": r, "test_top1": summary(r)} for m, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="runs/adapt_architecture")
    parser.add_argument("--out", default="benchmarks/results/adapt_architecture.json")
    args = parser.parse_args()
    root = Path(args.runs_dir)
    resolution = resolution_stages(root)
    stage1 = Path(resolution["run_dir"]) / "stage1"
    finetune = digits(root, stage1, args.seeds)
    report = {"resolution": resolution, "digits_10_per_class": finetune, "stage1": STAGE1, "stage2": STAGE2,
              "digits": DIGITS, "finetune": FINETUNE}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\nResolution stages, Fashion-MNIST test top-1 %:")
    print(f"  28 px model at 28 px:                {resolution['stage1_at_28px']}")
    print(f"  28 px model at 40 px, no fine-tuning: {resolution['stage1_at_40px_no_finetune']}")
    print(f"  after 2 epochs at 40 px:              {resolution['stage2_at_40px_after_2_epochs']}")
    print(f"\nDigits, 10 labeled images per class, test top-1 % (seeds {args.seeds}):")
    for method, entry in finetune.items():
        values = " / ".join(f"{r['test_top1']:.2f}" for r in entry["rows"])
        print(f"  {method:<18} {values}   mean {entry['test_top1']['mean']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
