"""``convrecipes compare`` and ``convrecipes.choose``: measurements against hand computations,
the Pareto front, the flattening rule, resumable comparisons, and the checks made before
anything trains."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from convrecipes.choose import (FAMILIES, compare, count_macs, flattening, learning_curve, measure_latency,
                                pareto_front, parse_models, peak_training_memory, prepare_candidates)
from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.recipe import load_recipe

TINY = ["trainer.epochs=1", "data.subset_per_class=30", "model.kwargs.width=4", "trainer.progress=false",
        "schedule.warmup_epochs=0"]
MODELS = "tiny_cnn,small_mlp,small_resnet8"
FAST_LATENCY = {"warmup": 1, "iterations": 4, "repeats": 2, "max_time_s": 0.3}


# -- measurements -------------------------------------------------------------------------
def test_count_macs_matches_the_textbook_formula():
    # MACs of a convolution: C_out * H_out * W_out * (C_in / groups) * k_h * k_w; of a linear layer: in * out
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 2x6x6 -> 4x6x6
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),  # depthwise, 4x6x6 -> 4x3x3
        nn.Flatten(),
        nn.Linear(36, 5),
    )
    expected = 4 * 6 * 6 * 2 * 3 * 3 + 4 * 3 * 3 * 1 * 3 * 3 + 36 * 5
    model.train()
    assert count_macs(model, (2, 6, 6)) == expected == 3096
    assert model.training  # put back in the mode it was in


def test_measure_latency_returns_positive_medians_and_records_threads():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    for batch in (1, 8):
        lat = measure_latency(model, (1, 8, 8), batch, **FAST_LATENCY)
        assert lat["median_ms"] > 0 and lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
        assert lat["min_ms"] <= lat["p10_ms"] and lat["p90_ms"] <= lat["max_ms"]
        assert lat["threads"] == torch.get_num_threads() and lat["device"] == "cpu"
        assert lat["batch_size"] == batch and lat["n"] >= 2 * 3 and len(lat["repeat_medians_ms"]) == 2
        assert lat["images_per_s"] == pytest.approx(batch / (lat["median_ms"] / 1000))
    assert model.training


def test_peak_training_memory_is_measured_in_a_fresh_process():
    recipe = load_recipe("quickstart", ["model.kwargs.width=4"])
    mem = peak_training_memory(recipe, (1, 8, 8), 10, batch_size=16, steps=1)
    assert mem["baseline_rss_mib"] > 50  # Python + torch are in it
    assert mem["peak_rss_mib"] >= mem["baseline_rss_mib"]
    assert mem["training_rss_increase_mib"] == pytest.approx(mem["peak_rss_mib"] - mem["baseline_rss_mib"])
    assert mem["batch_size"] == 16 and mem["threads"] == torch.get_num_threads()


# -- Pareto front and flattening ------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    #        A     B     C (B beats it)  D (A beats it)  E     F (= B)  G (no value)
    acc = [90.0, 85.0, 80.0, 90.0, 95.0, 85.0, None]
    lat = [10.0, 5.0, 6.0, 12.0, 50.0, 5.0, 1.0]
    assert pareto_front(acc, lat) == [True, True, False, False, True, True, False]
    assert pareto_front([1.0], [1.0]) == [True]
    assert pareto_front([1.0, 2.0], [float("nan"), 3.0]) == [False, True]
    with pytest.raises(ValueError):
        pareto_front([1.0], [1.0, 2.0])


def test_flattening_rule_on_synthetic_numbers():
    n = [100, 200, 600, 2000]
    flat = flattening(n, [60.0, 70.0, 80.0, 80.4])
    doublings = math.log2(2000 / 600)
    assert flat["flattened"] is True
    assert flat["gain_per_doubling"] == pytest.approx(0.4 / doublings)  # 0.23 < 0.5
    assert flat["statement"].startswith("flattened") and "600 to 2,000" in flat["statement"]
    rising = flattening(n, [60.0, 70.0, 80.0, 83.0])
    assert rising["flattened"] is False and rising["gain_per_doubling"] == pytest.approx(3.0 / doublings)
    assert rising["statement"].startswith("not flattened")
    # exactly at the threshold is not below it; a drop is flat; order and missing values do not matter
    assert flattening([1000, 500], [80.5, 80.0])["flattened"] is False
    assert flattening([500, 1000], [80.0, 79.0])["flattened"] is True
    assert flattening([500, 1000, 2000], [80.0, 81.0, None])["gain_per_doubling"] == pytest.approx(1.0)
    assert flattening([500], [80.0])["flattened"] is None
    assert flattening([500, 1000], [80.0, 80.4], threshold=0.3)["flattened"] is False


# -- candidates ---------------------------------------------------------------------------
def test_parse_models_expands_families_and_drops_duplicates():
    assert parse_models("tiny_cnn, resnet18,tiny_cnn") == ["tiny_cnn", "resnet18"]
    names = parse_models(["families", "resnet18", "tiny_cnn"])
    assert names == [*FAMILIES, "resnet18"]
    assert {"vgg11_bn", "resnet10t", "xception41", "mobilenetv3_small_050", "efficientnet_b0",
            "densenet121"} <= set(FAMILIES)


def test_a_model_that_cannot_take_the_image_size_is_found_before_training(tmp_path, capsys):
    # inception_next_atto downsamples 32x: an 8x8 digit leaves it nothing; it works at 32 px
    (cand,) = prepare_candidates("quickstart", "inception_next_atto", ["data.subset_per_class=30"])
    assert cand.resized and cand.input_shape == (1, 32, 32) and cand.native_size == 8
    assert "data.image_size=32" in cand.overrides and cand.recipe.data.image_size == 32
    assert "cannot take 8x8 images" in capsys.readouterr().out
    with pytest.raises(RecipeError, match=r"cannot take the 8x8 images of digits \(--image-size native\).*"
                                          r"--image-size 32 \(every model\) or data.image_size=32"):
        prepare_candidates("quickstart", "tiny_cnn,inception_next_atto", image_size="native")
    with pytest.raises(RecipeError, match="cannot take the 16x16 images.*data.image_size=32"):
        prepare_candidates("quickstart", "inception_next_atto", ["data.image_size=16"])
    cands = prepare_candidates("quickstart", "tiny_cnn,inception_next_atto", image_size=32)
    assert [c.input_shape for c in cands] == [(1, 32, 32)] * 2 and not any(c.resized for c in cands)


def test_model_kwargs_reach_every_candidate_and_a_misfit_is_named():
    cands = prepare_candidates("quickstart", MODELS, ["model.kwargs.width=4"])
    assert [c.recipe.model.kwargs for c in cands] == [{"width": 4}] * 3
    own, other = prepare_candidates("quickstart", "tiny_cnn,small_mlp")
    assert own.recipe.model.kwargs == {"width": 16} and other.recipe.model.kwargs == {}  # the recipe's own kept
    with pytest.raises(RecipeError, match="candidate 'resnet10t'.*no parameter 'width'.*applies the overrides "
                                          "model.kwargs.width=4 to every model"):
        prepare_candidates("quickstart", "tiny_cnn,resnet10t", ["model.kwargs.width=4"])
    with pytest.raises(RecipeError, match="--models, not model.name"):
        prepare_candidates("quickstart", "tiny_cnn", ["model.name=small_mlp"])


def test_init_from_weights_of_one_model_is_refused_for_other_candidates(tmp_path):
    weights = tmp_path / "own.safetensors"
    weights.write_bytes(b"")  # never read: the refusal comes first
    with pytest.raises(RecipeError, match=r"model.init_from=null") as err:
        prepare_candidates("quickstart", "tiny_cnn,small_mlp", [f"model.init_from={weights}"])
    assert "small_mlp" in str(err.value) and "tiny_cnn" in str(err.value)


def test_unknown_model_fails_with_did_you_mean_and_creates_no_run_dir(tmp_path, capsys):
    from convrecipes.cli import main

    out = tmp_path / "cmp"
    with pytest.raises(UnknownNameError, match="unknown model 'resnet81'; close matches: resnet18"):
        compare("quickstart", "tiny_cnn,resnet81", overrides=TINY, out_dir=out)
    assert main(["compare", "quickstart", "--models", "tiny_cnn,resnet81", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "resnet81" in lines[0] and "resnet18" in lines[0] and "--models" in lines[0]
    assert not out.exists()


# -- a comparison end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = compare("quickstart", MODELS, overrides=TINY, out_dir=out, memory=False, latency_batch=8,
                     latency_options=FAST_LATENCY, say=lambda *_: None)
    return out, result


def test_compare_writes_agreeing_md_csv_json_and_png(compared):
    out, result = compared
    models = MODELS.split(",")
    assert [r["model"] for r in result.rows] == models
    data = json.loads((out / "compare.json").read_text())
    with open(out / "compare.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    md = (out / "compare.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["model"] for r in data["models"]] == [r["model"] for r in table] == models
    assert data["threads"] == torch.get_num_threads() and data["seeds"] == [0]
    for row, stored, line in zip(result.rows, data["models"], table):
        assert stored == row
        for key in ("num_parameters", "macs", "image_size", "latency_batch"):
            assert int(line[key]) == row[key]
        for key in ("val_top1", "test_top1", "latency_b1_ms", "train_images_per_s"):
            assert float(line[key]) == pytest.approx(row[key])
        assert line["pareto"] == str(row["pareto"])
        assert f"| {row['model']} | 8 |" in md
        run_dir = out / "runs" / f"{row['model']}_seed0"
        results = json.loads((run_dir / "results.json").read_text())
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert row["test_top1"] == results["test_final"]["test_top1"]
        assert row["val_top1"] == history[-1]["val_top1"]
        assert row["num_parameters"] == results["num_parameters"]  # the measured model is the trained one
        assert row["latency_b1_ms"] > 0 and row["macs"] > 0 and row["latency_batch"] == 8
    assert any(r["pareto"] for r in result.rows)
    acc, lat = [r["val_top1"] for r in result.rows], [r["latency_b1_ms"] for r in result.rows]
    assert [r["pareto"] for r in result.rows] == pareto_front(acc, lat)
    assert sum(line.count("|") > 10 for line in md.splitlines()) == 2 + len(models)  # header, rule, rows


def test_a_second_compare_reads_the_runs_and_resumes_an_unfinished_one(compared, monkeypatch):
    import convrecipes.choose.comparison as compare_module
    import convrecipes.choose.runs as runs_module

    out, first = compared
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    assert len(stamps) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    def no_measuring(*args, **kwargs):
        raise AssertionError("a stored measurement was taken again")

    monkeypatch.setattr(runs_module, "train_recipe", no_training)
    monkeypatch.setattr(compare_module, "measure_candidate", no_measuring)
    again = compare("quickstart", MODELS, overrides=TINY, out_dir=out, memory=False, latency_batch=8,
                    latency_options=FAST_LATENCY, say=lambda *_: None)
    assert again.rows == first.rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")} == stamps

    # an unfinished run (a checkpoint, no results.json) resumes from its checkpoint
    calls = []
    from convrecipes.run import train_recipe as real_train

    def counting(recipe, run_dir=None, **kwargs):
        calls.append(kwargs.get("resume_from"))
        return real_train(recipe, run_dir, **kwargs)

    monkeypatch.setattr(runs_module, "train_recipe", counting)
    (out / "runs" / "small_mlp_seed0" / "results.json").unlink()
    compare("quickstart", MODELS, overrides=TINY, out_dir=out, memory=False, latency_batch=8,
            latency_options=FAST_LATENCY, say=lambda *_: None)
    assert len(calls) == 1 and Path(calls[0]).name == "last.safetensors"
    assert (out / "runs" / "small_mlp_seed0" / "results.json").is_file()


def test_a_run_dir_of_other_settings_is_refused_before_training(compared, monkeypatch):
    import convrecipes.choose.runs as runs_module
    from convrecipes.run import RunDirError

    out, _ = compared
    monkeypatch.setattr(runs_module, "train_recipe", lambda *a, **k: pytest.fail("trained"))
    other = [o if o != "trainer.epochs=1" else "trainer.epochs=2" for o in TINY]
    with pytest.raises(RunDirError, match="tiny_cnn_seed0 holds a finished run of another recipe "
                                          r"\(trainer.epochs: run has 1, asked 2\).*another --out"):
        compare("quickstart", MODELS, overrides=other, out_dir=out, memory=False, say=lambda *_: None)


def test_cli_compare_prints_the_table(compared, capsys):
    from convrecipes.cli import main

    out, result = compared
    # --seeds takes what follows it; the overrides after it still reach the recipe
    code = main(["compare", "quickstart", "--models", MODELS, "--out", str(out), "--no-memory", "--latency-batch", "8",
                 "--seeds", "0", *TINY])
    assert code == 0
    text = capsys.readouterr().out
    assert "finished run" in text and "measured before" in text
    assert "b1 ms [p10-p90]" in text and all(m in text for m in MODELS.split(","))
    assert main(["compare", "quickstart", "--seeds", "x", "--out", str(out)]) == 2


# -- learning curves ----------------------------------------------------------------------
def test_learning_curve_writes_points_and_a_verdict(tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("base: quickstart\ndata:\n  subset_per_class: 30\n")
    tiny = [o for o in TINY if not o.startswith("data.subset_per_class")]
    out = tmp_path / "lc"
    with pytest.raises(RecipeError, match="fractions 0.01 leaves .* fewer than one batch of 64"):
        learning_curve(recipe, "tiny_cnn", "0.01,0.5", overrides=tiny, out_dir=out)
    assert not out.exists()
    result = learning_curve(recipe, "tiny_cnn", "0.4,0.2", overrides=tiny, out_dir=out)
    text = capsys.readouterr().out
    assert "data.subset_per_class=30 is cleared: the fractions apply to the full training set" in text
    points = result.curves["tiny_cnn"]
    assert [p["fraction"] for p in points] == [0.2, 0.4]
    # digits has 1,438 training images; 20% and 40% of each class, less the 10% validation split
    assert 250 < points[0]["train_images"] < 270 and 510 < points[1]["train_images"] < 530
    verdict = flattening([p["train_images"] for p in points], [p["val_top1"] for p in points])
    assert result.verdicts["tiny_cnn"] == verdict and verdict["statement"] in text
    stored = json.loads((out / "learning_curve.json").read_text())
    assert stored["models"]["tiny_cnn"]["points"] == points and "per doubling" in stored["rule"]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["tiny_cnn_frac0.2_seed0", "tiny_cnn_frac0.4_seed0"]
    with pytest.raises(RecipeError, match="not in \\(0, 1\\]"):
        learning_curve(recipe, "tiny_cnn", "0.5,1.5", overrides=tiny, out_dir=out)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed here")
def test_the_families_build_and_take_fashion_mnist():
    cands = {c.model: c for c in prepare_candidates("fashion_mnist", "families", say=lambda *_: None)}
    assert list(cands) == list(FAMILIES)
    # five max-pools (VGG) and DenseNet's transitions leave nothing of 28 px; the others take it as it is
    assert {m for m, c in cands.items() if c.resized} == {"vgg11_bn", "densenet121"}
    assert all(c.input_shape == ((1, 32, 32) if c.resized else (1, 28, 28)) for c in cands.values())


def test_a_candidate_that_diverges_is_reported_and_the_comparison_goes_on(tmp_path, monkeypatch):
    from convrecipes.choose import runs as runs_module
    from convrecipes.errors import NonFiniteLossError

    real = runs_module.train_or_resume

    def fake(recipe, overrides, run_dir):
        if "model.name=small_mlp" in overrides:
            raise NonFiniteLossError("the training loss became nan at epoch 1 (test)")
        return real(recipe, overrides, run_dir)

    monkeypatch.setattr(runs_module, "train_or_resume", fake)
    tiny = ["trainer.epochs=1", "data.subset_per_class=20", "trainer.progress=false", "data.batch_size=16",
            "schedule.warmup_epochs=0"]
    said: list[str] = []
    result = compare("quickstart", "tiny_cnn,small_mlp", overrides=tiny, out_dir=tmp_path / "cmp", memory=False,
                     latency_options=FAST_LATENCY, say=said.append)
    mlp = result.row("small_mlp")
    assert mlp["val_top1"] is None and mlp["diverged_seeds"] == 1 and not mlp["pareto"]
    assert result.row("tiny_cnn")["val_top1"] is not None
    assert any("diverged" in line for line in said)
    assert (tmp_path / "cmp" / "runs" / "small_mlp_seed0" / runs_module.DIVERGED).is_file()
    # a second call does not retrain it
    monkeypatch.setattr(runs_module, "train_or_resume", real)
    again = compare("quickstart", "tiny_cnn,small_mlp", overrides=tiny, out_dir=tmp_path / "cmp", memory=False,
                    latency_options=FAST_LATENCY, say=said.append)
    assert again.row("small_mlp")["diverged_seeds"] == 1
