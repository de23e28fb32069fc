"""`convrecipes predict` and `convrecipes export` on a tiny image folder run.

The folder mixes what a user's folder holds: RGB, RGBA and grayscale PNGs, a file name
with spaces and non-ASCII letters, and one broken file. The run trains one epoch of a
width-4 tiny CNN on 8x8 images (a few seconds). Every prediction and every exported
logit is checked against an independent path: PIL decoding and the normalisation formula
written out here, the checkpoint's weights loaded straight into the recipe's model.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import convrecipes.data.datasets as datasets_mod
from convrecipes.build import build_for_evaluation, build_model
from convrecipes.checkpoint import load_checkpoint, save_checkpoint
from convrecipes.cli import main
from convrecipes.recipe import load_recipe, recipe_from_dict
from convrecipes.run import train_recipe

CLASSES = ["cat", "dog", "fox"]
SIZE = 8
#: the exported graph's logits vs the run's model: max |diff| <= TOLERANCE * max(1, max |logit|)
TOLERANCE = 1e-4
ODD_NAME = "ünïcode name with spaces.png"


def _make_folder(root):
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(7):
            pixels = (torch.rand(12, 12, 3, generator=g) * 60 + c * 90).byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    rgba = np.concatenate([np.full((12, 12, 3), 20, np.uint8), np.full((12, 12, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(root / "cat" / "rgba.png")
    Image.fromarray(np.full((10, 14), 200, np.uint8), mode="L").save(root / "fox" / "gray.png")
    Image.fromarray((torch.rand(12, 12, 3, generator=g) * 60 + 90).byte().numpy()).save(root / "dog" / ODD_NAME)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, image folder, recipe): one epoch on the folder, with EMA weights."""
    tmp = tmp_path_factory.mktemp("predict_export")
    # the decoded-image cache stays in the test's folder for every test of this module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets_mod, "DEFAULT_CACHE_DIR", tmp / "cache")
        root = _make_folder(tmp / "images")
        recipe = load_recipe("quickstart", ["data.name=image_folder", f"data.data_dir={root}",
                                            f"data.image_size={SIZE}", "data.channels=3", "data.batch_size=4",
                                            "data.val_fraction=0", "trainer.epochs=1", "schedule.warmup_epochs=0",
                                            "model.kwargs.width=4", "trainer.progress=false",
                                            "trainer.ema_decay=0.5"])
        run = train_recipe(recipe, tmp / "run")
        yield run.run_dir, root, run.recipe


def _readable_files(root):
    return sorted(p for p in root.rglob("*.png") if p.name != "broken.png")


def _normalised_by_hand(path, recipe):
    """PIL decoding and (x / 255 - mean) / std written out: independent of convrecipes."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(recipe.augment.mean).view(3, 1, 1)
    std = torch.tensor(recipe.augment.std).view(3, 1, 1)
    return (x - mean) / std


def _model_from_checkpoint(run_dir, key="model"):
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    recipe = recipe_from_dict(meta["recipe"])
    model = build_model(recipe, in_chans=3, num_classes=len(meta["classes"]), pretrained=False)
    model.load_state_dict(state[key])
    return model.eval(), recipe, meta


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_writes_every_class_probability_and_lists_the_broken_file(trained, tmp_path, capsys):
    run_dir, root, _ = trained
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(root), "--top-k", "3", "--out", str(out), "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    rows = _read_csv(out)
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
    assert len(rows) == len(list(root.rglob("*.png")))  # every file once, the broken one included
    by_path = {row["path"]: row for row in rows}
    broken = by_path[str(root / "dog" / "broken.png")]
    assert broken["error"] and broken["class_1"] == "" and broken["prob_1"] == ""
    assert "broken.png" in captured.err and "could not read 1 file" in captured.err
    assert str(out) in captured.out
    for path in _readable_files(root):
        row = by_path[str(path)]
        probs = [float(row[f"prob_{i}"]) for i in (1, 2, 3)]
        assert row["error"] == ""
        assert sorted(row[f"class_{i}"] for i in (1, 2, 3)) == CLASSES  # top-3 of 3 classes: all of them
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
    assert str(root / "dog" / ODD_NAME) in by_path


def test_predict_equals_the_checkpoint_model_on_hand_preprocessed_images(trained, tmp_path):
    run_dir, root, _ = trained
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(root / "cat"), str(root / "dog"), str(root / "fox" / "gray.png"),
                 "--top-k", "3", "--out", str(out), "--weights", "last", "--workers", "2"]) == 0
    rows = {row["path"]: row for row in _read_csv(out)}
    model, recipe, meta = _model_from_checkpoint(run_dir)
    files = [p for p in _readable_files(root) if p.parent.name != "fox" or p.name == "gray.png"]
    assert set(rows) == {str(p) for p in files} | {str(root / "dog" / "broken.png")}
    with torch.no_grad():
        probs = model(torch.stack([_normalised_by_hand(p, recipe) for p in files])).softmax(dim=1)
    for path, p in zip(files, probs):
        row = rows[str(path)]
        got = {row[f"class_{i}"]: float(row[f"prob_{i}"]) for i in (1, 2, 3)}
        assert got == pytest.approx({name: float(p[i]) for i, name in enumerate(meta["classes"])}, abs=2e-6)


def test_predict_equals_what_evaluate_computes_on_the_test_split(trained, tmp_path):
    run_dir, root, _ = trained
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(root), "--top-k", "3", "--out", str(out), "--weights", "last"]) == 0
    rows = {row["path"]: row for row in _read_csv(out)}
    # evaluate's path: the recorded recipe rebuilt for evaluation, its test loader, trainer.predict
    model, recipe, meta = _model_from_checkpoint(run_dir)
    exp = build_for_evaluation(recipe)
    exp.trainer.unwrapped_model.load_state_dict(model.state_dict())
    logits, _, _ = exp.trainer.predict(exp.test_loader)
    test_files = exp.test_loader.dataset.files
    assert len(test_files) == logits.shape[0] >= 3
    for rel, p in zip(test_files, logits.softmax(dim=1)):
        row = rows[str(root / rel)]
        got = {row[f"class_{i}"]: float(row[f"prob_{i}"]) for i in (1, 2, 3)}
        assert got == pytest.approx({name: float(p[i]) for i, name in enumerate(meta["classes"])}, abs=2e-6)


def test_predict_ema_uses_the_ema_weights(trained, tmp_path):
    from convrecipes.predict import predict

    run_dir, root, _ = trained
    path = root / "cat" / "0.png"
    ema = predict(run_dir, [path], top_k=3, ema=True, weights="last", out=None, progress=False).predictions[0]
    raw = predict(run_dir, [path], top_k=3, weights="last", out=None, progress=False).predictions[0]
    model, recipe, meta = _model_from_checkpoint(run_dir, key="ema")
    with torch.no_grad():
        want = model(_normalised_by_hand(path, recipe)[None]).softmax(dim=1)[0]
    assert dict(zip(ema.classes, ema.probabilities)) == pytest.approx(
        {name: float(want[i]) for i, name in enumerate(meta["classes"])}, abs=1e-6)
    assert dict(zip(raw.classes, raw.probabilities)) != pytest.approx(dict(zip(ema.classes, ema.probabilities)),
                                                                      abs=1e-6)


def _assert_user_error(code, capsys, *fragments):
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_predict_user_errors_exit_2_with_the_fix(trained, tmp_path, capsys):
    run_dir, root, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _assert_user_error(main(["predict", str(run_dir), str(tmp_path / "empty")]), capsys, "no image files",
                       str(tmp_path / "empty"))
    _assert_user_error(main(["predict", str(run_dir), str(tmp_path / "nope.png")]), capsys,
                       "no such file or folder", "nope.png")
    (tmp_path / "not_a_run").mkdir()
    _assert_user_error(main(["predict", str(tmp_path / "not_a_run"), str(root)]), capsys,
                       "no best.safetensors or last.safetensors", "convrecipes train")
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    del state["ema"]
    save_checkpoint(tmp_path / "no_ema.safetensors", state, meta)
    _assert_user_error(main(["predict", str(tmp_path / "no_ema.safetensors"), str(root), "--ema"]), capsys,
                       "no EMA weights", "drop --ema")
    _assert_user_error(main(["predict", str(run_dir), str(root), "--top-k", "0"]), capsys, "--top-k")


def _real_images(root, recipe, n):
    return torch.stack([_normalised_by_hand(p, recipe) for p in _readable_files(root)[:n]])


def test_export_onnx_matches_the_run_at_batch_1_and_5(trained, tmp_path, capsys):
    import onnxruntime

    run_dir, root, _ = trained
    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "--weights", "last"]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "test split" in printed
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, returned.name) == ("images", "logits")
    assert isinstance(given.shape[0], str) and given.shape[1:] == [3, SIZE, SIZE]  # symbolic batch dimension
    model, recipe, meta = _model_from_checkpoint(run_dir)
    images = _real_images(root, recipe, 5)
    for batch in (images[:1], images):
        with torch.no_grad():
            want = model(batch)
        got = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
        assert got.shape == (batch.shape[0], len(CLASSES))
        assert (got - want).abs().max() <= TOLERANCE * max(1.0, float(want.abs().max()))
    pre = json.loads((out / "preprocess.json").read_text(encoding="utf-8"))
    assert pre["classes"] == meta["classes"] == CLASSES
    assert pre["mean"] == recipe.augment.mean and pre["std"] == recipe.augment.std
    assert pre["image_size"] == [SIZE, SIZE] and pre["channels"] == 3 and pre["input_layout"] == "NCHW"
    assert pre["model_file"] == "model.onnx" and pre["weights_file"] == "model.safetensors"
    assert pre["check"]["max_abs_diff"] <= pre["check"]["bound"] and pre["check"]["batch_sizes"][-1] == 1
    assert "test split" in pre["check"]["source"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_export_torchscript_and_plain_weights(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir, root, _ = trained
    out = tmp_path / "ts"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out), "--weights", "last"]) == 0
    scripted = torch.jit.load(str(out / "model.pt"))
    model, recipe, meta = _model_from_checkpoint(run_dir)
    images = _real_images(root, recipe, 5)
    for batch in (images[:1], images):
        with torch.no_grad():
            want, got = model(batch), scripted(batch)
        assert (got - want).abs().max() <= TOLERANCE * max(1.0, float(want.abs().max()))
    weights = load_file(str(out / "model.safetensors"))
    state, _ = load_checkpoint(run_dir / "last.safetensors")
    assert set(weights) == set(state["model"])
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["classes"]) == CLASSES
    assert json.loads((out / "preprocess.json").read_text(encoding="utf-8"))["format"] == "torchscript"


def test_export_refuses_an_export_whose_logits_differ(trained, tmp_path, monkeypatch):
    import convrecipes.export as export_mod
    from convrecipes.export import ExportError, export_run

    run_dir, _, _ = trained
    real = export_mod.load_exported
    monkeypatch.setattr(export_mod, "load_exported", lambda path, fmt: (lambda x: real(path, fmt)(x) + 1e-2))
    with pytest.raises(ExportError, match="differ from the run's"):
        export_run(run_dir, "torchscript", out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.pt").exists() and not (tmp_path / "bad" / "preprocess.json").exists()


def test_export_onnx_without_the_packages_names_the_extra(trained, tmp_path, capsys, monkeypatch):
    import importlib.util

    run_dir, _, _ = trained
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    _assert_user_error(main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]), capsys,
                       "onnxscript", "pip install 'convrecipes[export]'")


def test_export_of_a_model_returning_model_output_gives_its_logits(trained, tmp_path):
    import onnxruntime

    from convrecipes.export import export_run
    from convrecipes.models import Classifier

    run_dir, root, _ = trained
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    meta["recipe"]["model"].update(with_embeddings=True, embedding_dim=2)
    recipe = recipe_from_dict(meta["recipe"])
    torch.manual_seed(1)
    model = build_model(recipe, in_chans=3, num_classes=len(CLASSES), pretrained=False).eval()
    assert isinstance(model, Classifier)
    state["model"] = model.state_dict()
    save_checkpoint(tmp_path / "embeddings.safetensors", state, meta)
    result = export_run(tmp_path / "embeddings.safetensors", "onnx", out_dir=tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]  # the embeddings stay out of the graph
    images = _real_images(root, recipe, 5)
    with torch.no_grad():
        want = model(images).logits
    got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    assert (got - want).abs().max() <= TOLERANCE * max(1.0, float(want.abs().max()))


def test_an_older_checkpoint_without_image_shape_reads_it_off_the_test_data(trained, tmp_path):
    from convrecipes.predict import load_trained_model

    run_dir, root, _ = trained
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    del meta["image_shape"]
    save_checkpoint(tmp_path / "old.safetensors", state, meta)
    pre = load_trained_model(tmp_path / "old.safetensors").preprocessing
    assert (pre.channels, pre.height, pre.width) == (3, SIZE, SIZE)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_export_checks_on_random_images_when_the_test_data_is_gone(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    meta["recipe"]["data"]["data_dir"] = str(tmp_path / "moved_away")
    save_checkpoint(tmp_path / "moved.safetensors", state, meta)
    assert main(["export", str(tmp_path / "moved.safetensors"), "--format", "torchscript"]) == 0
    assert "random images" in capsys.readouterr().out
    pre = json.loads((tmp_path / "export_torchscript" / "preprocess.json").read_text(encoding="utf-8"))
    assert "random images" in pre["check"]["source"] and str(tmp_path / "moved_away") in pre["check"]["source"]
    assert pre["check"]["max_abs_diff"] <= pre["check"]["bound"]
