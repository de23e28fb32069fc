"""Own images in one command: the image_folder template recipe, `convrecipes show`, `train --dry-run`,
the run named after the data, `train --help`, and the message when model.kwargs does not fit the model."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

import convrecipes.data.datasets as datasets_mod
from convrecipes.cli import main
from convrecipes.recipe import LOSS_TERM_HELP, Recipe, load_recipe, schema_keys
from convrecipes.run import run_name
from convrecipes.schedulers import SCHEDULES
from convrecipes.show import format_value, param_docs

CLASSES = ("daisy", "rose", "tulip")
PER_CLASS = 8
# tiny and fast: 8 px images, a 4-wide ResNet-8, one epoch
TINY = ["data.image_size=8", "data.batch_size=8", "model.kwargs.width=4", "trainer.epochs=1",
        "schedule.warmup_epochs=0"]


@pytest.fixture
def flowers(tmp_path, monkeypatch):
    """A user's folder of images: 3 classes x 8 PNGs, mixed RGB / grayscale / RGBA, odd names;
    the working directory is an empty folder next to it, the decode cache a temporary one."""
    monkeypatch.setattr(datasets_mod, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    root = tmp_path / "flowers"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, size=(10, 12, 3), dtype=np.uint8) + 90 * c
            image = Image.fromarray(pixels.astype(np.uint8))
            image = image.convert(("RGB", "L", "RGBA")[i % 3])
            image.save(root / name / f"photo {i} (copy).png")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def test_the_template_trains_from_an_empty_directory_and_names_the_run_after_the_data(flowers, capsys):
    assert main(["train", "image_folder", f"data.data_dir={flowers}", *TINY]) == 0
    runs = list(Path("runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"flowers-\d{8}-\d{6}", runs[0].name), runs
    assert (runs[0] / "results.json").is_file() and (runs[0] / "best.safetensors").is_file()
    out = capsys.readouterr().out
    assert "image_folder train" in out and "3 classes" in out and "test results" in out


def test_run_names_come_from_the_data_folder_only_for_image_folder_data(tmp_path):
    data = f"data.data_dir={tmp_path / 'my photos'}"
    assert run_name(load_recipe("image_folder", [data])) == "my photos"
    # another recipe on the user's images keeps its own name after the data's
    assert run_name(load_recipe("quickstart", ["data.name=image_folder", data])) == "my photos-quickstart"
    assert run_name(load_recipe("quickstart")) == "quickstart"
    assert run_name(load_recipe("fashion_mnist", [f"data.data_dir={tmp_path}"])) == "fashion_mnist"
    assert run_name(load_recipe("image_folder")) == "image_folder"  # no folder set yet


def test_the_template_recipe_says_what_to_edit():
    text = (Path(__file__).parent.parent / "recipes" / "image_folder.yaml").read_text()
    recipe = load_recipe("image_folder")
    assert recipe.data.name == "image_folder" and recipe.data.data_dir is None
    assert recipe.data.image_size and recipe.data.channels == 3 and recipe.augment.hflip
    edited = {line.split(":")[0].strip() for line in text.splitlines() if "# EDIT" in line}
    assert {"data_dir", "image_size", "channels", "hflip", "epochs"} <= edited


def test_every_schema_key_has_a_one_line_help():
    keys = schema_keys()
    assert {"data.image_size", "model.kwargs", "trainer.params", "data.label_noise.rate", "loss"} <= set(keys)
    missing = [key for key, text in keys.items() if not text.strip()]
    assert not missing, f"recipe keys without help (add doc=... to their _key in convrecipes/recipe.py): {missing}"
    assert all("\n" not in text for text in keys.values())

    # the check sees a key without help: a schema field declared the plain way has none
    @dataclasses.dataclass
    class Section:
        plain: int = 0

    assert schema_keys(Section) == {"plain": ""}


def test_the_schema_module_imports_no_torch():
    tree = ast.parse((Path(__file__).parent.parent / "convrecipes" / "recipe.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "timm", "kornia", "accelerate", "torchvision"}, imported


def _settings(out: str) -> dict[str, tuple[str, str]]:
    """``key -> (value, help)`` of the ``key=value  # help`` lines of `show`."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"^\s*([\w.]+)=(.*?)\s+# (.*)$", line)
        if match:
            found[match.group(1)] = (match.group(2), match.group(3))
    return found


def test_show_prints_every_key_its_value_and_its_help(flowers, capsys):
    assert main(["show", "image_folder", f"data.data_dir={flowers}", "trainer.epochs=7",
                 "loss.params.ignore_index=-1"]) == 0
    out = capsys.readouterr().out
    shown = _settings(out)
    recipe = load_recipe("image_folder", [f"data.data_dir={flowers}", "trainer.epochs=7"])
    for key, text in schema_keys().items():
        if key in ("data", "model", "optimizer", "schedule", "augment", "trainer", "loss"):
            assert f"# {key}: {text}" in out, key  # a section: its heading
        else:
            assert key in shown, key
            assert shown[key][1].endswith(text), (key, shown[key])
    assert shown["data.data_dir"][0] == str(flowers) and shown["trainer.epochs"][0] == "7"
    assert shown["model.kwargs"][0] == "{width: 32}" and shown["optimizer.betas"][0] == "[0.9, 0.999]"
    assert shown["data.label_noise"][0] == "null" and shown["data.label_noise.rate"][1].startswith("(off until set)")
    for part, text in LOSS_TERM_HELP.items():
        assert shown[f"loss.{part}"][1] == text
    # the registries' parameters: the loss's given value and the schedule's default, with their docstring help
    assert shown["loss.params.ignore_index"][0] == "-1" and shown["loss.params.ignore_index"][1].startswith("(set)")
    cosine_doc = param_docs(SCHEDULES.get("cosine"))["min_lr_ratio"]
    assert shown["schedule.params.min_lr_ratio"] == ("0.0", f"(default) {cosine_doc}")
    # every printed value reads back as the recipe's own value
    for key in ("data.image_size", "optimizer.lr", "augment.hflip", "trainer.grad_clip", "model.kwargs"):
        section, name = key.split(".")
        read_back = load_recipe("image_folder", [f"{key}={shown[key][0]}"])
        assert getattr(getattr(read_back, section), name) == getattr(getattr(recipe, section), name), key
    assert not Path("runs").exists()


def test_show_lists_a_trainers_params_from_its_docstring(capsys):
    assert main(["show", "quickstart", "trainer.name=distillation", "trainer.params.temperature=2"]) == 0
    shown = _settings(capsys.readouterr().out)
    assert shown["trainer.params.temperature"][0] == "2"
    assert shown["trainer.params.temperature"][1] == "(set) T of the soft targets."
    assert shown["trainer.params.alpha"] == ("0.9", "(default) weight of the soft term; 1 - alpha weighs the task "
                                                   "loss.")
    assert shown["trainer.params.teacher"][0] == "(required)"


def test_param_docs_reads_google_style_args():
    def f(a, b, c):
        """Summary.

        Args:
            a: first line
                continued.
            b, c (int): shared.

        Returns:
            nothing: not a parameter.
        """

    assert param_docs(f) == {"a": "first line continued.", "b": "shared.", "c": "shared."}


@pytest.mark.parametrize("value, text", [(None, "null"), (True, "true"), (0.05, "0.05"), ({"width": 16}, "{width: 16}"),
                                         ([0.9, 0.999], "[0.9, 0.999]"), ("a: b", "'a: b'"), ("auto", "auto")])
def test_values_are_shown_as_overrides_read_them(value, text):
    assert format_value(value) == text


def test_dry_run_summarises_data_and_model_and_writes_no_run(flowers, capsys, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert main(["train", "image_folder", f"data.data_dir={flowers}", *TINY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert before == after  # no run directory, no file anywhere outside the decode cache
    assert "data.image_size=8" in out  # what `show` prints comes first
    split = re.search(r"train (\d+) / val (\d+) / test (\d+) images of shape \(3, 8, 8\)", out)
    assert split, out
    assert sum(map(int, split.groups())) == len(CLASSES) * PER_CLASS  # every image in exactly one split
    assert "classes: 3 (daisy, rose, tulip)" in out
    # the parameter count, against timm building the same network independently
    expected = sum(p.numel() for p in timm.create_model("small_resnet8", in_chans=3, num_classes=3, width=4)
                   .parameters())
    assert f"with {expected:,} parameters" in out
    assert "run directory: runs/flowers-<YYYYmmdd-HHMMSS>" in out and "nothing trained" in out


def test_dry_run_counts_labeled_and_unlabeled_images(flowers, capsys):
    assert main(["train", "image_folder", f"data.data_dir={flowers}", *TINY, "--dry-run"]) == 0
    train = int(re.search(r"train (\d+) /", capsys.readouterr().out).group(1))
    assert main(["train", "image_folder", f"data.data_dir={flowers}", *TINY, "data.labels_per_class=2",
                 "trainer.name=uda", "data.batch_size=2", "data.unlabeled_batch_size=4", "--dry-run"]) == 0
    counts = re.search(r"semi-supervised: (\d+) labeled \+ (\d+) unlabeled", capsys.readouterr().out)
    assert counts and int(counts.group(1)) == 2 * len(CLASSES)
    assert int(counts.group(1)) + int(counts.group(2)) == train


def test_dry_run_stops_where_training_would(flowers, capsys):
    assert main(["train", "image_folder", f"data.data_dir={flowers}", "data.image_size=8", "data.batch_size=64",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one batch of 64; lower data.batch_size" in err and not Path("runs").exists()


def test_train_help_points_at_show_and_dry_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "convrecipes show RECIPE" in out and "--dry-run" in out
    assert "convrecipes train RECIPE --dry-run" in out


def test_a_model_that_does_not_take_the_recipes_kwargs_names_the_fix(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert load_recipe("quickstart").model.kwargs == {"width": 16}  # the premise: quickstart sets a kwarg
    assert main(["train", "quickstart", "model.name=resnet18", "--run-dir", str(run_dir)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'width'" in errors[0] and "model.kwargs={}" in errors[0], errors
    assert not run_dir.exists()
    # and the fix works: a dry run with it builds the model
    assert main(["train", "quickstart", "model.name=resnet18", "model.kwargs={}", "--dry-run"]) == 0
    assert "model: resnet18 (ResNet)" in capsys.readouterr().out


def test_recipe_is_a_plain_dataclass_still():
    # the help lives in field metadata; defaults and equality are unchanged
    assert Recipe() == Recipe() and Recipe().model.kwargs == {} and Recipe().optimizer.betas == [0.9, 0.999]
    assert Recipe().model.kwargs is not Recipe().model.kwargs  # a fresh mapping per recipe
