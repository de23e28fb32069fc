"""`convrecipes evaluate` explains mistakes: per-class metrics, confusion matrix, top losses,
and `--plot` refused for a model without 2-D embeddings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from convrecipes.contact_sheet import draw_contact_sheet
from convrecipes.errors import RecipeError
from convrecipes.evaluation_report import (
    confusion_matrix,
    evaluation_report,
    per_class_metrics,
    per_class_table,
    plot_confusion_matrix,
    require_2d_embeddings,
    select_top_losses,
)
from convrecipes.models import Classifier

TINY = ["trainer.epochs=1", "schedule.warmup_epochs=0", "model.kwargs.width=4", "trainer.progress=false"]


# -- metrics against sklearn ------------------------------------------------------------------
def test_confusion_matrix_and_per_class_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    k = 7
    targets = rng.integers(0, k - 1, size=400)  # class 6 never occurs in the targets
    predictions = np.where(rng.random(400) < 0.6, targets, rng.integers(0, k, size=400))
    predictions[predictions == 3] = 4  # class 3 is never predicted
    matrix = confusion_matrix(targets, predictions, k)
    np.testing.assert_array_equal(matrix, sk_confusion_matrix(targets, predictions, labels=list(range(k))))
    ours = per_class_metrics(matrix)
    p, r, f, support = precision_recall_fscore_support(targets, predictions, labels=list(range(k)),
                                                       zero_division=np.nan)
    np.testing.assert_allclose(ours["precision"], 100 * p, equal_nan=True)
    np.testing.assert_allclose(ours["recall"], 100 * r, equal_nan=True)
    np.testing.assert_allclose(ours["f1"], 100 * f, equal_nan=True)
    np.testing.assert_array_equal(ours["support"], support)
    assert math.isnan(ours["precision"][3]) and math.isnan(ours["recall"][6])  # the undefined ones
    # the report on logits: names, macro averages (sklearn leaves the undefined classes out) and top-1
    logits = torch.nn.functional.one_hot(torch.as_tensor(predictions), k).double() * 5
    report = evaluation_report(logits, torch.as_tensor(targets), [f"c{i}" for i in range(k)])
    macro = precision_recall_fscore_support(targets, predictions, labels=list(range(k)), average="macro",
                                            zero_division=np.nan)
    for name, expected in zip(("precision", "recall", "f1"), macro[:3]):
        assert report.macro_average()[name] == pytest.approx(100 * expected)
    assert report.top1 == pytest.approx(100 * np.mean(targets == predictions))
    per_class = report.per_class()
    assert list(per_class) == [f"c{i}" for i in range(k)]
    assert per_class["c3"]["precision"] is None and per_class["c6"]["recall"] is None
    off = matrix[0].copy()
    off[0] = 0
    assert per_class["c0"]["mistaken_for"] == {"class": f"c{off.argmax()}", "count": int(off.max())}
    table = per_class_table(per_class, report.macro_average())
    assert len(table.splitlines()) == k + 2 and "recall (= accuracy)" in table
    assert f"{100 * r[0]:.1f}" in table.splitlines()[1]


# -- top losses ---------------------------------------------------------------------------------
def test_top_losses_are_exactly_the_most_confident_mistakes():
    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # 0: right (class 0)
        [0.10, 0.80, 0.10],  # 1: wrong, 0.80 sure of class 1
        [0.30, 0.30, 0.40],  # 2: wrong, 0.40 sure of class 2
        [0.05, 0.05, 0.90],  # 3: wrong, 0.90 sure of class 2
        [0.20, 0.70, 0.10],  # 4: right (class 1)
        [0.60, 0.20, 0.20],  # 5: wrong, 0.60 sure of class 0
        [0.10, 0.80, 0.10],  # 6: wrong, tied with 1: the lower position goes first
        [0.34, 0.33, 0.33],  # 7: right but barely: a high loss, yet no mistake
    ], dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 0, 1, 2, 2, 0])
    logits = probs.log() + 3.0  # softmax is shift-invariant: these logits give exactly probs
    top = select_top_losses(logits, targets, 3)
    assert top.indices.tolist() == [3, 1, 6]
    assert top.predicted.tolist() == [2, 1, 1] and top.targets.tolist() == [0, 0, 2]
    np.testing.assert_allclose(top.confidence, [0.90, 0.80, 0.80])
    np.testing.assert_allclose(top.p_true, [0.05, 0.10, 0.10])
    np.testing.assert_allclose(top.loss, -np.log([0.05, 0.10, 0.10]))
    everything = select_top_losses(logits, targets, 100)
    assert everything.indices.tolist() == [3, 1, 6, 5, 2]  # every mistake, none of the right ones
    assert len(select_top_losses(logits, targets, 0)) == 0
    assert len(select_top_losses(logits, torch.tensor([0, 1, 2, 2, 1, 0, 1, 0]), 5)) == 0  # no mistakes


# -- the pictures ---------------------------------------------------------------------------------
def _pixels(path):
    image = Image.open(path)
    image.verify()  # a complete, valid PNG
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_contact_sheet_draws_gray_as_gray_and_rgb_as_rgb(tmp_path):
    gray = torch.full((1, 1, 8, 8), 128, dtype=torch.uint8)
    red = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    red[:, 0] = 255
    for images, color in ((gray, (128, 128, 128)), (red, (255, 0, 0))):
        path = draw_contact_sheet(images, ["caption"], tmp_path / "sheet.png", "title")
        pixels = _pixels(path)
        exact = (np.abs(pixels - np.array(color)).max(axis=2) <= 2).sum()
        assert exact > 100 * 100, f"the 8x8 image fills a large square of exactly {color}"  # nearest scaling
    with pytest.raises(ValueError, match="one caption per image"):
        draw_contact_sheet(gray, ["a", "b"], tmp_path / "bad.png", "title")


@pytest.mark.parametrize("k", [3, 30])
def test_confusion_matrix_png_is_a_readable_size(tmp_path, k):
    matrix = np.random.default_rng(k).integers(0, 50, size=(k, k))
    path = plot_confusion_matrix(matrix, [f"class {i}" for i in range(k)], tmp_path / "cm.png", title="t")
    width, height = Image.open(path).size
    assert 400 <= width <= 2500 and 400 <= height <= 2500
    pixels = _pixels(path)
    assert pixels.std() > 10  # something is drawn


# -- --plot ----------------------------------------------------------------------------------------
class _Backbone(nn.Module):
    num_features = 12

    def forward(self, x):
        return x.flatten(1)[:, :12]


def test_plot_needs_a_model_with_2d_embeddings():
    require_2d_embeddings(Classifier(_Backbone(), nn.Linear(2, 3), nn.Linear(12, 2)), (1, 4, 4), "mine")
    with pytest.raises(RecipeError, match=r"\(mine\) has 12-dimensional embeddings.*model.embedding_dim=2"):
        require_2d_embeddings(Classifier(_Backbone(), nn.Linear(12, 3)), (1, 4, 4), "mine")
    with pytest.raises(RecipeError, match="returns no embeddings.*Nothing was evaluated or written; drop --plot"):
        require_2d_embeddings(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (1, 4, 4), "mlp")


# -- the command on a trained run ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from convrecipes.recipe import load_recipe
    from convrecipes.run import train_recipe

    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    train_recipe(load_recipe("quickstart", TINY), run_dir)
    return run_dir


def test_evaluate_writes_the_report_and_prints_per_class_metrics(tiny_run, tmp_path, monkeypatch, capsys):
    from convrecipes.cli import main
    from convrecipes.data.datasets import load_dataset
    from convrecipes.trainers.base import Trainer

    seen = {}
    predict = Trainer.predict

    def spy(self, loader, model=None):  # keep what the report was computed from
        seen["logits"], seen["targets"], embeddings = predict(self, loader, model)
        return seen["logits"], seen["targets"], embeddings

    monkeypatch.setattr(Trainer, "predict", spy)
    out = tmp_path / "report"
    assert main(["evaluate", str(tiny_run), "--weights", "last", "--out", str(out), "--top-losses", "6"]) == 0
    printed = capsys.readouterr().out
    assert "per class (overall top-1" in printed and "recall (= accuracy)" in printed
    for name in ("confusion_matrix.png", "top_losses.png", "evaluation.json"):
        assert str(out / name) in printed
    record = json.loads((out / "evaluation.json").read_text())
    logits, targets = seen["logits"], seen["targets"]
    # the targets come in dataset order, so the positions name the right images
    test = load_dataset("digits", "test")
    assert torch.equal(targets, test.labels)
    predictions = logits.argmax(1).numpy()
    counts = np.array(record["confusion_matrix"]["counts"])
    np.testing.assert_array_equal(counts, sk_confusion_matrix(targets.numpy(), predictions, labels=list(range(10))))
    assert record["classes"] == [str(i) for i in range(10)] and record["num_images"] == 359
    results = json.loads((tiny_run / "results.json").read_text())
    assert record["top1"] == pytest.approx(results["test_final"]["test_top1"])
    p, r, _, _ = precision_recall_fscore_support(targets.numpy(), predictions, labels=list(range(10)),
                                                 zero_division=np.nan)
    for c in range(10):
        row = record["per_class"][str(c)]
        assert row["recall"] == pytest.approx(100 * r[c])
        assert (row["precision"] is None) if np.isnan(p[c]) else row["precision"] == pytest.approx(100 * p[c])
    # the sheet: the 6 mistakes the model was surest of, brute force
    probs = logits.double().softmax(1).numpy()
    wrong = np.flatnonzero(predictions != targets.numpy())
    surest = wrong[np.argsort(-probs[wrong].max(1), kind="stable")][:6]
    assert [t["index"] for t in record["top_losses"]] == test.indices[surest].tolist()  # index in the split
    assert all(t["true"] != t["predicted"] for t in record["top_losses"])
    assert record["num_wrong"] == len(wrong)
    sheet = Image.open(out / "top_losses.png")
    assert sheet.size[0] >= 600 and sheet.size[1] >= 400  # 4 columns x 2 rows of tiles
    grid = Image.open(out / "confusion_matrix.png")
    assert 400 <= grid.size[0] <= 2500 and 400 <= grid.size[1] <= 2500
    # the default folder, and --json carrying the per-class metrics
    assert main(["evaluate", str(tiny_run), "--weights", "last", "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert as_json["per_class"] == record["per_class"]
    assert (tiny_run / "evaluation" / "evaluation.json").is_file()
    assert as_json["report_files"][0] == str(tiny_run / "evaluation" / "confusion_matrix.png")


def test_plot_on_a_model_without_2d_embeddings_exits_2_before_evaluating(tiny_run, tmp_path, monkeypatch, capsys):
    from convrecipes.cli import main
    from convrecipes.trainers.base import Trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although --plot could not be drawn")

    monkeypatch.setattr(Trainer, "evaluate", must_not_run)
    plot, out = tmp_path / "emb.png", tmp_path / "report"
    assert main(["evaluate", str(tiny_run), "--plot", str(plot), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--plot draws 2-D embeddings" in err and "tiny_cnn" in err and "returns no embeddings" in err
    assert "model.embedding_dim=2" in err and "Nothing was evaluated or written" in err
    assert not plot.exists() and not out.exists()


def test_no_report_when_the_test_classes_are_unseen(tiny_run, tmp_path, monkeypatch, capsys):
    import convrecipes.data.datasets as datasets
    from convrecipes.cli import main

    monkeypatch.setattr(datasets, "UNSEEN_TEST_CLASSES", frozenset({"digits"}))
    out = tmp_path / "report"
    assert main(["evaluate", str(tiny_run), "--out", str(out)]) == 0
    assert "per class" not in capsys.readouterr().out and not out.exists()


def test_top_losses_must_not_be_negative(tiny_run, capsys):
    from convrecipes.cli import main

    assert main(["evaluate", str(tiny_run), "--top-losses", "-1"]) == 2
    assert "--top-losses" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_same_report_as_one(tiny_run, tmp_path):
    """Under `accelerate launch` (2 CPU processes) the gathered predictions cover each test
    image once, in order, and only the main process prints and writes."""
    import os
    import sys
    from pathlib import Path

    from convrecipes.cli import main
    from tests.conftest import run_launched

    root = Path(__file__).parent.parent
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = run_launched(launch + ["-m", "convrecipes.cli", "evaluate", str(tiny_run), "--weights", "last", "--json",
                                    "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "only the main process prints"
    assert main(["evaluate", str(tiny_run), "--weights", "last", "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    assert two["num_images"] == one["num_images"] == 359
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert [t["index"] for t in two["top_losses"]] == [t["index"] for t in one["top_losses"]]
    for a, b in zip(two["top_losses"], one["top_losses"]):
        assert a["p_predicted"] == pytest.approx(b["p_predicted"], abs=1e-5)
    for name, row in one["per_class"].items():
        assert two["per_class"][name]["images"] == row["images"]
        assert two["per_class"][name]["recall"] == pytest.approx(row["recall"])


def test_image_folder_report_names_the_files(tmp_path):
    """A folder of the user's own images (RGB and grayscale files): the top losses name the
    files, each under the folder of its true class."""
    from convrecipes.recipe import load_recipe
    from convrecipes.run import evaluate_run, train_recipe

    rng = np.random.default_rng(0)
    root = tmp_path / "my images"
    for split, count in (("train", 8), ("test", 4)):
        for c, name in enumerate(("cats", "dogs", "owls")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).convert("L" if i % 2 else "RGB").save(folder / f"img {i}.png")
    recipe = load_recipe("image_folder", [f"data.data_dir={root}", "data.image_size=8", "data.batch_size=8",
                                          "data.val_fraction=0", "model.kwargs.width=4", *TINY])
    run = train_recipe(recipe, tmp_path / "run")
    result = evaluate_run(run.run_dir, "last", report_dir=tmp_path / "report", top_losses=5)
    record = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert record["classes"] == ["cats", "dogs", "owls"] and record["num_images"] == 12
    assert set(result["per_class"]) == {"cats", "dogs", "owls"}
    assert 1 <= len(record["top_losses"]) <= 5 and record["num_wrong"] >= len(record["top_losses"])
    for entry in record["top_losses"]:
        assert (root / entry["file"]).is_file() and entry["file"].split("/")[-2] == entry["true"]
    assert Image.open(tmp_path / "report" / "top_losses.png").size[0] >= 200


def test_a_test_split_smaller_than_the_training_batch_is_evaluated(tiny_run):
    # the digits test split has 359 images; a training batch of 512 (or a P x K batch) must not
    # stop the evaluation, which never builds batches of the training size
    from convrecipes.build import build_for_evaluation
    from convrecipes.checkpoint import load_checkpoint
    from convrecipes.loading import find_checkpoint
    from convrecipes.recipe import recipe_from_dict

    _, meta = load_checkpoint(find_checkpoint(tiny_run, prefer="best"))
    raw = dict(meta["recipe"])
    raw["data"] = {**raw["data"], "batch_size": 512, "pk": [10, 60]}
    exp = build_for_evaluation(recipe_from_dict(raw))
    assert sum(len(y) for _, y in ((b[0], b[1]) for b in exp.test_loader)) == 359
