"""``find-label-issues``: the confident-learning rule against a loop written out here, the folds,
and the command end to end (outputs, resume, image_folder paths, bad input)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convrecipes.cli import main
from convrecipes.label_issues import confident_learning, stratified_folds


def _reference_confident_learning(probs: np.ndarray, labels: np.ndarray):
    """Northcutt et al.'s rule, one image at a time."""
    n, k = probs.shape
    thresholds = []
    for j in range(k):
        members = [probs[i, j] for i in range(n) if labels[i] == j]
        thresholds.append(sum(members) / len(members) if members else float("inf"))
    flagged, suggested = [], []
    for i in range(n):
        confident = [j for j in range(k) if probs[i, j] >= thresholds[j]]
        if confident:
            best = max(confident, key=lambda j: probs[i, j])
            flagged.append(best != labels[i])
            suggested.append(best)
        else:
            flagged.append(False)
            suggested.append(int(np.argmax(probs[i])))
    return np.array(thresholds), np.array(flagged), np.array(suggested)


def test_confident_learning_matches_the_rule_written_out_per_image():
    rng = np.random.RandomState(0)
    logits = rng.randn(300, 4) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.randint(0, 4, 300)
    issues = confident_learning(probs, labels)
    thresholds, flagged, suggested = _reference_confident_learning(probs, labels)
    np.testing.assert_allclose(issues.thresholds, thresholds)
    np.testing.assert_array_equal(issues.flagged, flagged)
    np.testing.assert_array_equal(issues.suggested, suggested)
    assert 0 < flagged.sum() < 300
    # ranking: flagged only, by p[suggested] - p[given], highest first
    order = issues.ranking()
    assert set(order) == set(np.flatnonzero(flagged))
    margins = probs[order, suggested[order]] - probs[order, labels[order]]
    assert np.all(np.diff(margins) <= 1e-12)
    # confident joint: row = given label, column = confident class, over images with a confident class
    assert issues.confident_joint.sum() == sum(1 for i in range(300) if (probs[i] >= thresholds).any())


def test_a_confidently_other_class_image_is_flagged_and_an_unsure_one_is_not():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.95, 0.05], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1, 1, 1])  # image 4 looks like class 0; image 5 is unsure
    issues = confident_learning(probs, labels)
    # t_0 = mean(0.9, 0.8) = 0.85, t_1 = mean(0.8, 0.9, 0.05, 0.45) = 0.55
    np.testing.assert_allclose(issues.thresholds, [0.85, 0.55])
    assert issues.flagged.tolist() == [False, False, False, False, True, False]
    assert issues.suggested[4] == 0


def test_folds_are_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=1)
    assert folds.shape == (20,) and set(folds.tolist()) == {0, 1, 2}
    for c in range(3):
        counts = np.bincount(folds[labels.numpy() == c], minlength=3)
        assert counts.max() - counts.min() <= 1  # each class spread evenly
    np.testing.assert_array_equal(folds, stratified_folds(labels, 3, seed=1))
    assert not np.array_equal(folds, stratified_folds(labels, 3, seed=2))


QUICK = ["trainer.epochs=2", "trainer.progress=false", "data.label_noise.kind=symmetric",
         "data.label_noise.rate=0.2"]


def test_find_label_issues_end_to_end_on_digits_and_resume(tmp_path, capsys):
    out = tmp_path / "issues"
    assert main(["find-label-issues", "quickstart", "--folds", "2", "--out", str(out), "--top", "6", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "fold 2/2" in printed
    summary = json.loads((out / "label_issues_summary.json").read_text())
    noise = json.loads((out / "label_issues_summary.json").read_text())["injected_noise"]
    rows = list(csv.DictReader(open(out / "label_issues.csv")))
    assert summary["num_flagged"] == len(rows) > 0
    assert summary["num_images"] == 1438  # the whole digits training split: validation share included
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["given_label"] != r["suggested_label"] for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # precision/recall recomputed from the CSV and the injected flips of the same recipe
    from convrecipes.build import load_datasets
    from convrecipes.recipe import load_recipe

    recipe = load_recipe("quickstart", QUICK + ["data.val_fraction=0"])
    train = load_datasets(recipe).train
    flipped = set(train.indices[train.labels != train.clean_labels].tolist())
    flagged = {int(r["index"]) for r in rows}
    assert noise["num_flipped"] == len(flipped)
    assert noise["precision"] == pytest.approx(len(flagged & flipped) / len(flagged))
    assert noise["recall"] == pytest.approx(len(flagged & flipped) / len(flipped))
    assert noise["recall"] > 0.3  # two epochs already find a share of the flips
    assert all(r["true_label"] for r in rows)
    assert Image.open(out / "label_issues.png").size[0] > 100
    # out of fold: the two folds' scored images are disjoint and cover every image
    from safetensors.torch import load_file

    held = [set(load_file(str(out / f"fold{i}" / "out_of_fold.safetensors"))["indices"].tolist()) for i in range(2)]
    assert not held[0] & held[1] and len(held[0] | held[1]) == 1438
    # a second call skips the finished folds and writes the same ranking
    assert main(["find-label-issues", "quickstart", "--folds", "2", "--out", str(out), "--top", "6", *QUICK]) == 0
    assert capsys.readouterr().out.count("done already") == 2
    assert list(csv.DictReader(open(out / "label_issues.csv"))) == rows


def test_an_interrupted_fold_resumes_from_its_checkpoint(tmp_path, capsys):
    """A fold with last.safetensors but no scores continues training (and ends like a fresh one)."""
    out = tmp_path / "issues"
    args = ["find-label-issues", "quickstart", "--folds", "2", "--out", str(out), *QUICK]
    assert main(args) == 0
    first = (out / "label_issues.csv").read_text()
    (out / "fold1" / "out_of_fold.safetensors").unlink()
    # the fold's final checkpoint is there: the resumed fit has nothing left to train, so it
    # scores the same weights again
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "label_issues.csv").read_text() == first


def test_image_folder_rows_name_the_files(tmp_path):
    root = tmp_path / "shapes"
    rng = np.random.RandomState(0)

    def image(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rng.randn(8, 8) * 10 + value, 0, 255).astype(np.uint8)).save(path)

    for split, n in (("train", 16), ("test", 4)):
        for c, name in enumerate(["dark", "light"]):
            for i in range(n):
                image(root / split / name / f"{i:02d}.png", 40 + 160 * c)
    for i in (0, 1):  # two light images filed as dark: the mistakes to find
        image(root / "train" / "dark" / f"wrong{i}.png", 200)
    out = tmp_path / "issues"
    code = main(["find-label-issues", "quickstart", "--folds", "2", "--out", str(out), "data.name=image_folder",
                 f"data.data_dir={root}", "data.image_size=8", "data.channels=1", "trainer.epochs=10",
                 "data.batch_size=4", "trainer.progress=false", "model.kwargs.width=4"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "label_issues.csv")))
    assert rows and all(r["file"].startswith("train/") and r["file"].endswith(".png") for r in rows)
    assert rows[0]["file"] in {"train/dark/wrong0.png", "train/dark/wrong1.png"}  # the top suspect is a mistake
    assert rows[0]["suggested_label"] == "light"


def test_bad_input_exits_2_with_one_message(tmp_path, capsys):
    assert main(["find-label-issues", "quickstart", "--folds", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 folds" in err and err.count("error:") == 1
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["find-label-issues", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not a run with a recipe" in err and err.count("error:") == 1
    assert main(["find-label-issues", "mpl_digits", "--out", str(tmp_path / "b")]) == 2
    assert "unlabeled" in capsys.readouterr().err


def test_a_run_directory_gives_its_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "quickstart", "--run-dir", str(run), "trainer.epochs=1", "schedule.warmup_epochs=0",
                 "trainer.progress=false"]) == 0
    capsys.readouterr()
    out = tmp_path / "issues"
    assert main(["find-label-issues", str(run), "--folds", "2", "--out", str(out), "trainer.epochs=1"]) == 0
    summary = json.loads((out / "label_issues_summary.json").read_text())
    assert summary["num_images"] == 1438 and "injected_noise" not in summary
