"""Hinton's omitted-class experiment on Fashion-MNIST: can a distilled student recognise a
class it never saw?

Hinton, Vinyals & Dean (2015), section 3: a student distilled on an MNIST transfer set with
every 3 removed still classified most test 3s correctly once the bias of class 3 was raised;
the teacher's soft targets on the other digits carry what a 3 looks like.

Here: a teacher (tiny CNN, width 16) trains on all 10 classes of a Fashion-MNIST subset. Two
identical students (tiny CNN, width 8) then train on the same subset with every image of one
class removed: one distilled from the teacher (soft + hard targets), one on hard labels only.
Both keep all 10 outputs. We report their test accuracy on the omitted class and overall,
as trained and after shifting the omitted class's logit bias by ``b``.

How ``b`` is chosen (no label of the omitted class is used): on held-out *unlabeled* images
of all classes (the teacher's validation split, never trained on), ``b`` is set so that the
student predicts the omitted class for 1/K of them, the class's known prior share of a
balanced dataset. With ``d_i = max_{j != k} z_ij - z_ik`` (the shift image i needs to be
called class k), that is the 1/K quantile of ``d``. Hinton instead picked the shift that
maximised test accuracy (3.5 on MNIST); the shift maximising accuracy on the labeled
validation split is printed too, for comparison.

    OMP_NUM_THREADS=1 python benchmarks/distill_omitted_class.py            # a few minutes on a CPU
    python benchmarks/distill_omitted_class.py --omit 1 --per-class 2000

Writes benchmarks/results/distill_omitted_class.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from convrecipes.build import Datasets, build
from convrecipes.data import InMemoryLoader, load_dataset, stratified_split, subset_indices
from convrecipes.recipe import recipe_from_dict


def recipe(name: str, width: int, epochs: int, trainer: dict, batch_size: int = 128) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"name": "fashion_mnist", "batch_size": batch_size, "val_fraction": 0.0},
        "model": {"name": "tiny_cnn", "kwargs": {"width": width}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"name": "cosine"},
        "augment": {"preset": "none"},  # no augmentation: the transfer set is exactly the data
        "trainer": {"epochs": epochs, "progress": False, **trainer},
        "loss": {"name": "cross_entropy"},
    }


def run(spec: dict, datasets: Datasets, run_dir: Path):
    exp = build(recipe_from_dict(spec), run_dir=run_dir, datasets=datasets)
    t0 = time.perf_counter()
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=spec["trainer"]["epochs"])
    return exp, time.perf_counter() - t0


def logits_on(exp, ds) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets, _ = exp.trainer.predict(InMemoryLoader(ds, 1000, shuffle=False, drop_last=False))
    return logits, targets


def prior_matching_shift(logits: torch.Tensor, k: int) -> float:
    """The bias shift after which class k is predicted for 1/K of these (unlabeled) images."""
    others = logits.clone()
    others[:, k] = float("-inf")
    needed = others.max(dim=1).values - logits[:, k]
    return round(float(torch.quantile(needed, 1.0 / logits.shape[1])), 3)


def best_accuracy_shift(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Hinton's choice, on labeled validation images: the shift with the best overall accuracy."""
    grid = torch.arange(-5.0, 30.01, 0.25)
    accs = [accuracy(logits, targets, k, float(b))[1] for b in grid]
    return float(grid[int(torch.tensor(accs).argmax())])


def accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int, shift: float = 0.0) -> tuple[float, float]:
    """(accuracy on class k, overall accuracy) in percent after adding ``shift`` to logit k."""
    z = logits.clone()
    z[:, k] += shift
    correct = z.argmax(dim=1) == targets
    return (round(100.0 * float(correct[targets == k].float().mean()), 2),
            round(100.0 * float(correct.float().mean()), 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omit", type=int, default=3, help="the class removed from the transfer set (3: Dress)")
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_omitted_class.json"))
    args = parser.parse_args()
    k = args.omit
    t_start = time.perf_counter()

    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    train = train.subset(subset_indices(train.labels, per_class=args.per_class, seed=0))
    keep, held = stratified_split(train.labels, 0.1, seed=0)
    train, heldout = train.subset(keep), train.subset(held)
    transfer = train.subset(torch.nonzero(train.labels != k).flatten())
    name = train.classes[k]
    print(f"omitting class {k} ({name}): teacher trains on {len(train)} images, the students on a transfer set "
          f"of {len(transfer)} with no {name}; {len(heldout)} held-out images; {len(test)} test images")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher, teacher_s = run(recipe("teacher", 16, args.teacher_epochs, {}),
                                 Datasets(train, heldout, test), tmp / "teacher")
        kd_params = {"teacher": str(tmp / "teacher"), "temperature": args.temperature, "alpha": args.alpha}
        distilled, distilled_s = run(recipe("distilled", 8, args.student_epochs,
                                            {"name": "distillation", "params": kd_params}),
                                     Datasets(transfer, None, test), tmp / "distilled")
        hard, hard_s = run(recipe("hard_labels", 8, args.student_epochs, {}), Datasets(transfer, None, test),
                           tmp / "hard")

    results = {"omitted_class": k, "omitted_class_name": name, "per_class": args.per_class,
               "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs,
               "temperature": args.temperature, "alpha": args.alpha, "runs": {}}
    t_logits, t_targets = logits_on(teacher, test)
    results["runs"]["teacher"] = {"params": teacher.num_parameters, "train_s": round(teacher_s, 1),
                                  "class_acc": accuracy(t_logits, t_targets, k)[0],
                                  "overall_acc": accuracy(t_logits, t_targets, k)[1]}
    for label, exp, seconds in (("distilled", distilled, distilled_s), ("hard_labels", hard, hard_s)):
        logits, targets = logits_on(exp, test)
        h_logits, h_targets = logits_on(exp, heldout)
        shift = prior_matching_shift(h_logits, k)
        oracle = best_accuracy_shift(h_logits, h_targets, k)
        results["runs"][label] = {
            "params": exp.num_parameters, "train_s": round(seconds, 1),
            "class_acc": accuracy(logits, targets, k)[0], "overall_acc": accuracy(logits, targets, k)[1],
            "bias_shift": shift,
            "class_acc_shifted": accuracy(logits, targets, k, shift)[0],
            "overall_acc_shifted": accuracy(logits, targets, k, shift)[1],
            "bias_shift_best_val_acc": oracle,
            "class_acc_best_val_shift": accuracy(logits, targets, k, oracle)[0],
            "overall_acc_best_val_shift": accuracy(logits, targets, k, oracle)[1],
        }
    results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, " \
                         f"{torch.get_num_threads()} thread(s)"

    r = results["runs"]
    print(f"\nTest accuracy (%) on the omitted class {k} ({name}) and overall; chance on the class: 10%")
    print(f"{'':<34} {'':>7} {'--- as trained ---':>18}  {'----- after bias shift -----':>28}")
    print(f"{'model':<34} {'params':>7} {'on class':>9} {'overall':>8}  {'shift b':>8} {'on class':>9} {'overall':>8}")
    print(f"{'teacher (all classes)':<34} {r['teacher']['params']:>7,} {r['teacher']['class_acc']:>9.1f} "
          f"{r['teacher']['overall_acc']:>8.1f}")
    for label, title in (("distilled", f"student distilled (T={args.temperature:g}, a={args.alpha:g})"),
                         ("hard_labels", "student on hard labels")):
        x = r[label]
        print(f"{title:<34} {x['params']:>7,} {x['class_acc']:>9.1f} {x['overall_acc']:>8.1f}  {x['bias_shift']:>8.2f} "
              f"{x['class_acc_shifted']:>9.1f} {x['overall_acc_shifted']:>8.1f}")
    for label in ("distilled", "hard_labels"):
        x = r[label]
        print(f"  {label}: shift maximising held-out accuracy (Hinton's choice) b={x['bias_shift_best_val_acc']:.2f}: "
              f"on class {x['class_acc_best_val_shift']:.1f}%, overall {x['overall_acc_best_val_shift']:.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
