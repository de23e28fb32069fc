"""``find-label-issues``: rank the training images whose given label is probably wrong.

Method (confident learning, Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels", https://arxiv.org/abs/1911.00068, as cleanlab implements it):

1. **Out-of-fold probabilities.** The recipe's training split (its validation share
   included: every training image is scored) is cut into ``k`` stratified, seeded folds;
   for each fold a model is trained with the recipe on the other ``k - 1`` and predicts the
   held-out fold, so every image is scored by a model that never trained on it (a model
   that saw an image has memorised its label, right or wrong). Each fold is its own run
   directory ``fold<i>/`` with checkpoints: an interrupted search resumes the unfinished
   fold exactly and skips the finished ones.
2. **Per-class thresholds.** ``t_j`` = the mean predicted probability of class ``j`` over
   the images labelled ``j`` (the model's typical self-confidence for that class).
3. **Confident joint.** Image ``i`` with given label ``y_i`` is counted as "confidently class
   ``j``" when ``j`` is the most probable of the classes whose probability reaches their
   threshold (``p_ij >= t_j``). Images confidently another class than their label are
   flagged (cleanlab's ``filter_by="confident_learning"``), suggested label ``j``.
4. **Ranking.** Flagged images are ranked by the margin ``score = p_i,suggested - p_i,given``
   (cleanlab's normalised margin, sign flipped: higher = more suspect).

Outputs in the output directory: ``label_issues.csv`` (rank, index, file for image_folder,
given and suggested label, score, both probabilities, and the true label when label noise
was injected), ``label_issues.png`` (a contact sheet of the top suspects with both labels),
``label_issues_summary.json`` (counts, the most confused label pairs, the fold models'
accuracy against the given labels, wall time, and precision/recall against the injected
flips when the true labels are known) and ``out_of_fold_probs.safetensors``.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from convrecipes.errors import RecipeError
from convrecipes.recipe import Recipe

PathLike = Union[str, os.PathLike]
CSV_NAME = "label_issues.csv"
SHEET_NAME = "label_issues.png"
SUMMARY_NAME = "label_issues_summary.json"
PROBS_NAME = "out_of_fold_probs.safetensors"
FOLD_DONE = "out_of_fold.safetensors"


# -- the rule -------------------------------------------------------------------------------
@dataclass
class LabelIssues:
    """The confident-learning verdict for every scored image.

    Attributes:
        flagged: ``(N,)`` bool, the given label is probably wrong.
        suggested: ``(N,)`` the confident class (the argmax where no class is confident).
        score: ``(N,)`` ``p[suggested] - p[given]``; flagged images rank by it, highest first.
        thresholds: ``(K,)`` the per-class thresholds ``t_j``.
        confident_joint: ``(K, K)`` counts, row = given label, column = confident class.
    """

    flagged: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray

    def ranking(self) -> np.ndarray:
        """Positions of the flagged images, most suspect first (ties: lower position first)."""
        idx = np.flatnonzero(self.flagged)
        return idx[np.lexsort((idx, -self.score[idx]))]


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Flag the images confidently predicted as another class than their label (see the
    module docstring).

    Args:
        probs: ``(N, K)`` out-of-fold predicted probabilities (rows sum to 1).
        labels: ``(N,)`` given labels.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {labels.shape}")
    thresholds = np.full(k, np.inf)  # a class nobody carries is never confident
    for j in range(k):
        members = labels == j
        if members.any():
            thresholds[j] = probs[members, j].mean()
    above = probs >= thresholds[None, :] - 1e-12  # the float mean can sit an ulp above its own maximum
    masked = np.where(above, probs, -np.inf)
    confident = masked.argmax(axis=1)
    has_confident = above.any(axis=1)
    suggested = np.where(has_confident, confident, probs.argmax(axis=1))
    flagged = has_confident & (confident != labels)
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (labels[has_confident], confident[has_confident]), 1)
    rows = np.arange(n)
    score = probs[rows, suggested] - probs[rows, labels]
    return LabelIssues(flagged, suggested, score, thresholds, joint)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> np.ndarray:
    """``(N,)`` fold number of each image: each class spread evenly over the folds, seeded."""
    y = torch.as_tensor(labels).long().numpy()
    rng = np.random.RandomState(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        members = members[rng.permutation(len(members))]
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # classes start where the last ended, so small classes do not pile on fold 0
    return fold


# -- the command ----------------------------------------------------------------------------
@dataclass
class LabelIssuesResult:
    """What ``find_label_issues`` found and wrote."""

    out_dir: Path
    summary: dict[str, Any]
    issues: LabelIssues
    rows: list[dict[str, Any]] = field(default_factory=list)


def recipe_for_label_issues(recipe_or_run: PathLike, overrides: Sequence[str] = ()) -> tuple[Recipe, Optional[Path]]:
    """The recipe named by a recipe file/name or recorded by a run (its ``recipe.yaml`` or a
    checkpoint's metadata), with ``overrides``; and the run directory when one was given."""
    from convrecipes.recipe import apply_overrides, load_recipe, recipe_from_dict

    path = Path(recipe_or_run).expanduser()
    if path.is_dir() or path.suffix == ".safetensors":
        run_dir = path if path.is_dir() else path.parent
        raw: Optional[dict[str, Any]] = None
        if (run_dir / "recipe.yaml").is_file():
            import yaml

            raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        else:
            from convrecipes.checkpoint import read_metadata

            for name in ("last.safetensors", "best.safetensors") if path.is_dir() else (path.name,):
                if (run_dir / name).is_file():
                    raw = read_metadata(run_dir / name).get("recipe")
                    if raw:
                        break
        if not raw:
            raise RecipeError(f"{path} is not a run with a recipe (no recipe.yaml, and no checkpoint that records "
                              f"one); pass a recipe (e.g. `convrecipes find-label-issues recipes/quickstart.yaml`) "
                              f"or a run directory written by `convrecipes train`")
        recipe = recipe_from_dict(apply_overrides(raw, overrides))
        # the run's normalisation was computed from its own training split; each fold recomputes its own
        recipe.augment.mean = recipe.augment.std = None
        return recipe, run_dir
    return load_recipe(recipe_or_run, overrides), None


def find_label_issues(
    recipe: Recipe,
    out_dir: PathLike,
    folds: int = 5,
    top: int = 25,
    accelerator: Any = None,
) -> LabelIssuesResult:
    """Score every training image out of fold and rank the probable label errors.

    Args:
        recipe: the recipe whose data and training are used (its validation split is
            scored too; each fold trains without validation, on the final weights).
        out_dir: where the folds' run directories and the outputs go; an existing one is
            resumed (finished folds are skipped, an unfinished one continues exactly).
        folds: k >= 2.
        top: suspects on the contact sheet.
        accelerator: an ``Accelerator`` (default: made from the recipe).

    Returns:
        A ``LabelIssuesResult``; the files are listed in the module docstring.
    """
    from convrecipes.build import Datasets, build, load_datasets, make_accelerator
    from convrecipes.run import RunDirLock
    from convrecipes.trainers import TRAINERS

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise RecipeError(f"find-label-issues needs at least 2 folds (each image is scored by a model trained on the "
                          f"others), got {folds!r}; e.g. --folds 5")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise RecipeError(f"--top must be an integer >= 1, got {top!r}")
    if getattr(TRAINERS.get(recipe.trainer.name), "uses_unlabeled_data", False):
        raise RecipeError(f"find-label-issues trains the recipe on labeled folds, but trainer "
                          f"{recipe.trainer.name!r} needs unlabeled data too; use the recipe's supervised baseline "
                          f"(trainer.name=supervised)")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    recipe = copy.deepcopy(recipe)
    recipe.data.val_fraction = 0.0  # score every training image; each fold trains on final weights
    recipe.trainer.early_stopping_patience = None
    accelerator = accelerator or make_accelerator(recipe)
    main = accelerator.is_main_process
    full = load_datasets(recipe)
    n, k = len(full.train), full.num_classes
    if n < 2 * folds:
        raise RecipeError(f"the training split has {n} images, too few for {folds} folds; lower --folds")
    if isinstance(recipe.optimizer.lr, str):
        from convrecipes.lr_finder.command import resolve_auto_lr

        resolve_auto_lr(recipe, accelerator, out_dir)
    fold_of = stratified_folds(full.train.labels, folds, recipe.seed)
    probs = torch.zeros(n, k, dtype=torch.float64)
    fold_acc: list[float] = []
    for fold in range(folds):
        fold_dir = out_dir / f"fold{fold}"
        held = torch.from_numpy(np.flatnonzero(fold_of == fold))
        kept = torch.from_numpy(np.flatnonzero(fold_of != fold))
        done = fold_dir / FOLD_DONE
        if done.is_file():
            from safetensors.torch import load_file

            probs[held] = load_file(str(done))["probs"].double()
            fold_acc.append(_accuracy(probs[held], full.train.labels[held]))
            _say(accelerator, f"fold {fold + 1}/{folds}: done already ({done})")
            continue
        _say(accelerator, f"fold {fold + 1}/{folds}: training on {len(kept)} images, scoring {len(held)} "
                          f"({fold_dir})")
        fold_recipe = copy.deepcopy(recipe)
        datasets = Datasets(train=full.train.subset(kept), val=None, test=full.train.subset(held))
        lock = RunDirLock(fold_dir)
        if main:
            fold_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            exp = build(fold_recipe, accelerator=accelerator, run_dir=fold_dir, datasets=datasets)
            last = fold_dir / "last.safetensors"
            exp.trainer.fit(exp.train_loader, None, epochs=fold_recipe.trainer.epochs,
                            resume_from=last if last.is_file() else None)
            logits, _, _ = exp.trainer.predict(exp.test_loader)
            fold_probs = logits.double().softmax(dim=1)
            if main:
                from safetensors.torch import save_file

                tmp = fold_dir / f".{FOLD_DONE}.tmp"
                save_file({"probs": fold_probs.contiguous(), "indices": held}, str(tmp))  # float64: a resume ranks alike
                os.replace(tmp, done)
            accelerator.wait_for_everyone()
        finally:
            lock.release()
            accelerator.free_memory()
        probs[held] = fold_probs
        fold_acc.append(_accuracy(fold_probs, full.train.labels[held]))
        _say(accelerator, f"fold {fold + 1}/{folds}: accuracy against the given labels {fold_acc[-1]:.2f}%")
    issues = confident_learning(probs.numpy(), full.train.labels.numpy())
    result = _report(full.train, probs, issues, fold_acc, folds, out_dir, top, time.perf_counter() - t0, main)
    accelerator.wait_for_everyone()
    return result


def _say(accelerator: Any, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((probs.argmax(1) == labels).double().mean())


def _report(train: Any, probs: torch.Tensor, issues: LabelIssues, fold_acc: list[float], folds: int, out_dir: Path,
            top: int, wall: float, main: bool) -> LabelIssuesResult:
    classes = list(train.classes)
    labels = train.labels.numpy()
    order = issues.ranking()
    clean = train.clean_labels.numpy() if train.clean_labels is not None else None
    p = probs.numpy()
    rows = []
    for rank, i in enumerate(order, start=1):
        row: dict[str, Any] = {"rank": rank, "index": int(train.indices[i])}
        if train.files is not None:
            row["file"] = train.files[i]
        row.update({"given_label": classes[labels[i]], "suggested_label": classes[issues.suggested[i]],
                    "score": round(float(issues.score[i]), 6), "p_given": round(float(p[i, labels[i]]), 6),
                    "p_suggested": round(float(p[i, issues.suggested[i]]), 6)})
        if clean is not None:
            row["true_label"] = classes[clean[i]]
        rows.append(row)
    pairs = [(int(a), int(b), int(issues.confident_joint[a, b])) for a in range(len(classes))
             for b in range(len(classes)) if a != b and issues.confident_joint[a, b] > 0]
    pairs.sort(key=lambda x: -x[2])
    summary: dict[str, Any] = {
        "num_images": int(len(labels)), "num_flagged": int(issues.flagged.sum()),
        "flagged_fraction": float(issues.flagged.mean()), "folds": folds,
        "fold_accuracy_vs_given_labels": [round(a, 2) for a in fold_acc],
        "thresholds": {c: round(float(t), 4) for c, t in zip(classes, issues.thresholds)},
        "top_pairs": [{"given": classes[a], "suggested": classes[b], "count": c} for a, b, c in pairs[:10]],
        "wall_time_s": round(wall, 1),
    }
    if clean is not None:
        noisy = labels != clean
        hits = int((issues.flagged & noisy).sum())
        summary["injected_noise"] = {
            "num_flipped": int(noisy.sum()),
            "precision": hits / max(int(issues.flagged.sum()), 1),
            "recall": hits / max(int(noisy.sum()), 1),
            "suggested_is_true_label": float((issues.suggested[issues.flagged & noisy] == clean[issues.flagged & noisy]).mean())
            if hits else 0.0,
        }
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"probs": probs.float().contiguous(), "indices": train.indices.contiguous(),
                   "labels": train.labels.contiguous()}, str(out_dir / PROBS_NAME))
        _write_csv(out_dir / CSV_NAME, rows)
        contact_sheet(train, order[:top], issues.suggested, out_dir / SHEET_NAME, issues.score)
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    return LabelIssuesResult(out_dir, summary, issues, rows)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["rank", "index", "file", "given_label", "suggested_label", "score", "p_given", "p_suggested",
              "true_label"]
    present = [f for f in fields if any(f in r for r in rows)] or ["rank", "index", "given_label",
                                                                   "suggested_label", "score"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=present)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def contact_sheet(train: Any, positions: Sequence[int], suggested: np.ndarray, path: Path,
                  score: Optional[np.ndarray] = None, columns: int = 5) -> Optional[Path]:
    """A PNG grid of the images at ``positions`` titled with their given and suggested labels."""
    if len(positions) == 0:
        return None
    from convrecipes.contact_sheet import draw_contact_sheet

    classes = list(train.classes)
    captions = []
    for i in positions:
        name = train.files[i] if train.files is not None else f"#{int(train.indices[i])}"
        margin = f" ({score[i]:.2f})" if score is not None else ""
        true = f"\ntrue: {classes[int(train.clean_labels[i])]}" if train.clean_labels is not None else ""
        captions.append(f"{name[-22:]}\ngiven: {classes[int(train.labels[i])]}\nsuggested: "
                        f"{classes[int(suggested[i])]}{margin}{true}")
    images = train.images[torch.as_tensor(list(positions), dtype=torch.long)]
    return draw_contact_sheet(images, captions, path, "probable label errors, most suspect first", columns=columns)


def cmd_find_label_issues(args: Any) -> int:
    """``convrecipes find-label-issues RECIPE_OR_RUN [--folds K] [--out DIR] [--top N] [key=value ...]``."""
    recipe, run_dir = recipe_for_label_issues(args.recipe_or_run, args.overrides)
    out = Path(args.out) if args.out else (run_dir / "label_issues" if run_dir is not None else
                                           Path(recipe.output_dir) / f"label-issues-{recipe.name}")
    result = find_label_issues(recipe, out, folds=args.folds, top=args.top)
    s = result.summary
    from convrecipes.run import process_state

    if not process_state().is_main_process:
        return 0
    print(f"{s['num_flagged']} of {s['num_images']} training images ({100 * s['flagged_fraction']:.1f}%) probably "
          f"have a wrong label; fold models' accuracy against the given labels: "
          f"{', '.join(f'{a:.1f}' for a in s['fold_accuracy_vs_given_labels'])}%")
    for pair in s["top_pairs"][:5]:
        print(f"  labelled {pair['given']!r} but looks like {pair['suggested']!r}: {pair['count']}")
    if "injected_noise" in s:
        q = s["injected_noise"]
        print(f"against the injected noise ({q['num_flipped']} flipped labels): precision {q['precision']:.3f}, "
              f"recall {q['recall']:.3f}")
    for row in result.rows[:10]:
        where = row.get("file", f"#{row['index']}")
        print(f"  {row['rank']:>3}. {where}: given {row['given_label']!r}, suggested {row['suggested_label']!r} "
              f"(score {row['score']:.3f})")
    print(f"wrote {out / CSV_NAME}, {out / SHEET_NAME} and {out / SUMMARY_NAME} in {s['wall_time_s']:.0f} s")
    return 0


def add_arguments(parser: Any) -> None:
    """The command's arguments."""
    parser.add_argument("recipe_or_run", help="recipe YAML path or name, or a run directory written by `convrecipes train`")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. trainer.epochs=5")
    parser.add_argument("--folds", type=int, default=5, help="cross-training folds (>= 2; default 5)")
    parser.add_argument("--out", help="output directory (default: <run dir>/label_issues or "
                                      "<output_dir>/label-issues-<recipe name>); an existing one is resumed")
    parser.add_argument("--top", type=int, default=25, help="suspects on the contact sheet (default 25)")


__all__ = ["LabelIssues", "LabelIssuesResult", "confident_learning", "contact_sheet", "find_label_issues",
           "recipe_for_label_issues", "stratified_folds"]
