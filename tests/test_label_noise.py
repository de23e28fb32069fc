"""Injected label noise: the flip matrices (requested against an independent construction,
realised against the request within sampling error), seeding, errors at every level
(function, recipe, CLI, build), the datasets a noisy recipe loads and the memorisation curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convrecipes.data.label_noise import (
    LabelNoise,
    apply_label_noise,
    pair_targets,
    random_derangement,
    sample_noisy_labels,
)
from convrecipes.data.loader import ImageTensorDataset
from convrecipes.errors import RecipeError
from convrecipes.trainers.memorisation import flipped_subset, memorisation_rates

torch.set_num_threads(1)

K = 10
PER_CLASS = 20_000
FASHION = ["t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
DIGITS = [str(i) for i in range(10)]


def _many_labels(k: int = K, per_class: int = PER_CLASS) -> torch.Tensor:
    return torch.arange(k).repeat_interleave(per_class)


def _empirical(clean: torch.Tensor, noisy: torch.Tensor, k: int) -> np.ndarray:
    """Row-normalised counts of (clean, noisy) pairs, counted with bincount."""
    counts = np.bincount(clean.numpy() * k + noisy.numpy(), minlength=k * k).reshape(k, k).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def _assert_within_sampling_error(emp: np.ndarray, t: np.ndarray, n_row: int) -> None:
    """Every entry within 5 binomial standard errors (+1e-3); zero entries must be exactly zero."""
    bound = 5 * np.sqrt(t * (1 - t) / n_row) + 1e-3
    assert np.all(np.abs(emp - t) <= bound), np.max(np.abs(emp - t) - bound)
    assert np.all(emp[t == 0] == 0)


def _check_draw(noise: LabelNoise, expected: np.ndarray, classes=DIGITS, seed: int = 0):
    """Draw many labels under ``noise``; compare the request, the realisation and the report."""
    labels = _many_labels(len(classes))
    noisy, report = apply_label_noise(labels, classes, noise, seed=seed)
    assert noisy.dtype == torch.int64 and noisy.shape == labels.shape
    np.testing.assert_allclose(np.asarray(report.matrix), expected, atol=1e-6, rtol=0)
    emp = _empirical(labels, noisy, len(classes))
    _assert_within_sampling_error(emp, expected, PER_CLASS)
    np.testing.assert_allclose(np.asarray(report.realised_matrix), emp, atol=1e-6, rtol=0)
    changed = (noisy != labels).nonzero().squeeze(1).tolist()
    assert report.flipped == changed
    assert report.flip_fraction == pytest.approx(len(changed) / labels.numel())
    return noisy, report


# --------------------------------------------------------------------------- the flip matrices


def test_symmetric_noise_matrix_and_realised_flips():
    """Symmetric K=10 rate 0.6: diagonal 0.4, every off-diagonal 0.6/9, realised within error."""
    rate = 0.6
    expected = np.full((K, K), rate / (K - 1))
    np.fill_diagonal(expected, 1 - rate)
    assert np.allclose(expected.sum(1), 1.0)
    _, report = _check_draw(LabelNoise("symmetric", rate), expected)
    t = np.asarray(report.matrix)
    assert np.allclose(np.diag(t), 1 - rate, atol=1e-6)
    off = t[~np.eye(K, dtype=bool)]
    assert np.allclose(off, rate / (K - 1), atol=1e-6)
    assert report.permutation is None


def _pair_expected(rate: float, pairs: dict[int, int], k: int = K) -> np.ndarray:
    t = np.eye(k)
    for a, b in pairs.items():
        t[a, a], t[a, b] = 1 - rate, rate
    return t


def test_pair_noise_with_named_classes_mapping():
    """{shirt: t_shirt, pullover: coat}: only those two rows flip (one way), at the rate."""
    rate = 0.45
    noise = LabelNoise("pair", rate, pairs={"shirt": "t_shirt", "pullover": "coat"})
    expected = _pair_expected(rate, {FASHION.index("shirt"): FASHION.index("t_shirt"),
                                     FASHION.index("pullover"): FASHION.index("coat")})
    _check_draw(noise, expected, classes=FASHION)


def test_pair_noise_with_both_way_strings():
    """["sandal<->sneaker", "bag->trouser"]: sandal and sneaker swap both ways, bag one way."""
    rate = 0.3
    noise = LabelNoise("pair", rate, pairs=["sandal<->sneaker", "bag->trouser"])
    s, n, b, t = (FASHION.index(c) for c in ("sandal", "sneaker", "bag", "trouser"))
    expected = _pair_expected(rate, {s: n, n: s, b: t})
    _check_draw(noise, expected, classes=FASHION)
    assert pair_targets(["sandal<->sneaker"], FASHION) == {s: n, n: s}


def test_pair_noise_without_pairs_flips_each_class_to_the_next():
    """No pairs: class i -> i + 1 mod K (Han et al.'s pair flipping)."""
    rate = 0.4
    expected = _pair_expected(rate, {i: (i + 1) % K for i in range(K)})
    _check_draw(LabelNoise("pair", rate), expected)


def test_permutation_noise_matrix_and_realised_flips():
    """Permutation 0.44: T[i, i] = 0.56, T[i, pi(i)] = 0.44, exactly one off-diagonal per row."""
    rate = 0.44
    noise = LabelNoise("permutation", rate)
    _, pi = noise.matrix(DIGITS, 0)
    expected = np.zeros((K, K))
    for i in range(K):
        expected[i, i], expected[i, pi[i]] = 1 - rate, rate
    _, report = _check_draw(noise, expected)
    assert report.permutation == pi
    t = np.asarray(report.matrix)
    off = t * (1 - np.eye(K))
    assert np.all((off > 0).sum(axis=1) == 1)
    assert np.allclose(off.sum(axis=1), rate, atol=1e-6)


def test_given_permutation_is_used():
    """An explicit derangement is used as given, whatever the seed."""
    pi = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    for seed in (0, 5):
        t, got = LabelNoise("permutation", 0.3, permutation=pi).matrix(DIGITS, seed)
        assert got == pi
        assert all(t[i, pi[i]] == pytest.approx(0.3) and t[i, i] == pytest.approx(0.7) for i in range(K))


def test_sample_noisy_labels_rejects_non_stochastic_matrices():
    with pytest.raises(ValueError):
        sample_noisy_labels(torch.tensor([0, 1]), np.array([[0.5, 0.4], [0.0, 1.0]]), 0)
    with pytest.raises(ValueError):
        sample_noisy_labels(torch.tensor([0, 2]), np.eye(2), 0)


# --------------------------------------------------------------------------- permutations and seeds


def test_random_derangement_has_no_fixed_point_for_many_seeds():
    """200 seeds x K in 2..12: always a permutation of 0..K-1 with pi[i] != i."""
    for k in range(2, 13):
        for seed in range(200):
            pi = random_derangement(k, seed)
            assert sorted(pi) == list(range(k))
            assert all(pi[i] != i for i in range(k)), (k, seed, pi)


def test_random_derangement_reaches_every_derangement_of_three():
    """K=3 has two derangements (two 3-cycles); both are drawn."""
    seen = {tuple(random_derangement(3, seed)) for seed in range(50)}
    assert seen == {(1, 2, 0), (2, 0, 1)}


def test_permutation_noise_draws_a_derangement_per_seed():
    """LabelNoise draws its derangement from the seed: the same for one seed, not for all."""
    perms = set()
    for seed in range(30):
        _, pi = LabelNoise("permutation", 0.44).matrix(DIGITS, seed)
        assert sorted(pi) == list(range(K)) and all(pi[i] != i for i in range(K))
        assert LabelNoise("permutation", 0.44).matrix(DIGITS, seed)[1] == pi
        perms.add(tuple(pi))
    assert len(perms) > 1


@pytest.mark.parametrize("kind", ["symmetric", "pair", "permutation"])
def test_same_seed_same_flips_other_seed_other_flips(kind):
    """The draw is a function of the seed: repeated it is identical; another seed differs."""
    labels = _many_labels(per_class=500)
    noise = LabelNoise(kind, 0.4)
    a, ra = apply_label_noise(labels, DIGITS, noise, seed=3)
    b, rb = apply_label_noise(labels, DIGITS, noise, seed=3)
    c, rc = apply_label_noise(labels, DIGITS, noise, seed=4)
    assert torch.equal(a, b) and ra.flipped == rb.flipped and ra.permutation == rb.permutation
    assert not torch.equal(a, c) and ra.flipped != rc.flipped
    assert ra.seed == 3 and rc.seed == 4


def test_noise_seed_overrides_the_recipe_seed():
    """LabelNoise.seed, when set, wins over the seed passed in (the recipe's)."""
    labels = _many_labels(per_class=300)
    noise = LabelNoise("permutation", 0.44, seed=11)
    a, ra = apply_label_noise(labels, DIGITS, noise, seed=0)
    b, rb = apply_label_noise(labels, DIGITS, noise, seed=99)
    assert torch.equal(a, b) and ra.permutation == rb.permutation and ra.seed == rb.seed == 11


def test_rate_zero_flips_nothing():
    labels = _many_labels(per_class=100)
    noisy, report = apply_label_noise(labels, DIGITS, LabelNoise("symmetric", 0.0))
    assert torch.equal(noisy, labels) and report.flipped == []


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["symmetric", "pair", "permutation"])
@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_rate_outside_zero_one_is_a_recipe_error(kind, rate):
    with pytest.raises(RecipeError, match="rate"):
        apply_label_noise(torch.tensor([0, 1, 2]), DIGITS, LabelNoise(kind, rate))


def test_unknown_kind_names_the_valid_kinds():
    with pytest.raises(RecipeError) as info:
        apply_label_noise(torch.tensor([0, 1, 2]), DIGITS, LabelNoise("asymmetric", 0.2))
    message = str(info.value)
    assert "asymmetric" in message
    assert all(kind in message for kind in ("symmetric", "pair", "permutation"))


@pytest.mark.parametrize("pairs", [{"nine": "8"}, {"3": "nine"}, ["nine<->8"], ["3->nine"]])
def test_pair_noise_naming_a_missing_class_names_it(pairs):
    with pytest.raises(RecipeError, match="nine"):
        apply_label_noise(torch.tensor([0, 1, 2]), DIGITS, LabelNoise("pair", 0.2, pairs=pairs))


def test_pair_noise_by_digit_name_and_index():
    """On digits, '3' names class 3 and so does the integer 3 (a YAML key)."""
    assert pair_targets({"3": "8"}, DIGITS) == {3: 8}
    assert pair_targets({3: 8}, DIGITS) == {3: 8}


@pytest.mark.parametrize("pairs", [{"3": "3"}, ["3->5", "3->6"], ["nonsense"], 5])
def test_malformed_pairs_are_recipe_errors(pairs):
    with pytest.raises(RecipeError):
        pair_targets(pairs, DIGITS)


@pytest.mark.parametrize("perm", [[0, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8, 0, 9]])
def test_permutation_with_a_fixed_point_is_a_recipe_error(perm):
    classes = [str(i) for i in range(len(perm))]
    with pytest.raises(RecipeError, match="itself"):
        LabelNoise("permutation", 0.3, permutation=perm).matrix(classes)


@pytest.mark.parametrize("perm", [[1, 1, 0], [1, 2], [1, 2, 3]])
def test_permutation_that_is_not_one_is_a_recipe_error(perm):
    with pytest.raises(RecipeError, match="permutation"):
        LabelNoise("permutation", 0.3, permutation=perm).matrix(["a", "b", "c"])


# --------------------------------------------------------------------------- recipe and CLI


def test_recipe_with_permutation_noise_loads():
    from convrecipes.recipe import load_recipe

    recipe = load_recipe("quickstart", ["data.label_noise.kind=permutation", "data.label_noise.rate=0.44"])
    noise = recipe.data.label_noise
    assert noise.kind == "permutation" and noise.rate == pytest.approx(0.44)
    assert noise.clean_val is False and noise.seed is None and noise.permutation is None


@pytest.mark.parametrize("override", ["data.label_noise.rate=1.0", "data.label_noise.rate=-0.1",
                                      "data.label_noise.kind=bogus"])
def test_recipe_rejects_bad_noise(override):
    from convrecipes.recipe import load_recipe

    with pytest.raises(RecipeError, match="label_noise"):
        load_recipe("quickstart", [override])


def test_recipe_rejects_pairs_for_another_kind():
    from convrecipes.recipe import load_recipe

    with pytest.raises(RecipeError, match="pairs"):
        load_recipe("quickstart", ["data.label_noise.kind=symmetric", 'data.label_noise.pairs={"3": "8"}'])


def _cli_error(capsys, tmp_path, *overrides) -> str:
    from convrecipes.cli import main

    capsys.readouterr()
    rc = main(["train", "quickstart", *overrides, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    return error_lines[0]


def test_cli_rate_out_of_range_exits_2(capsys, tmp_path):
    line = _cli_error(capsys, tmp_path, "data.label_noise.rate=1.5")
    assert "data.label_noise.rate" in line and "1.5" in line


def test_cli_unknown_kind_exits_2(capsys, tmp_path):
    line = _cli_error(capsys, tmp_path, "data.label_noise.kind=bogus")
    assert "bogus" in line and "permutation" in line


def test_cli_pair_noise_missing_class_exits_2(capsys, tmp_path):
    """The class names are only known once the data is loaded: still one error line, exit 2."""
    line = _cli_error(capsys, tmp_path, "data.label_noise.kind=pair", 'data.label_noise.pairs={nine: "8"}')
    assert "nine" in line


# --------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def quickstart_sets():
    """quickstart's datasets without noise, with 44% permutation noise, and with clean_val."""
    from convrecipes.build import load_datasets
    from convrecipes.recipe import load_recipe

    noisy = ["data.label_noise.kind=permutation", "data.label_noise.rate=0.44"]
    return {"clean": load_datasets(load_recipe("quickstart")),
            "noisy": load_datasets(load_recipe("quickstart", noisy)),
            "clean_val": load_datasets(load_recipe("quickstart", [*noisy, "data.label_noise.clean_val=true"]))}


def test_build_flips_about_44_percent_of_training_labels(quickstart_sets):
    d = quickstart_sets["noisy"]
    assert d.train.clean_labels is not None and d.val.clean_labels is not None
    frac = float((d.train.labels != d.train.clean_labels).float().mean())
    assert abs(frac - 0.44) < 0.05, frac
    val_frac = float((d.val.labels != d.val.clean_labels).float().mean())
    assert 0.25 < val_frac < 0.65, val_frac  # the validation split is noisy too (small: wide bound)
    # every flip follows the permutation
    pi = torch.tensor(d.label_noise.permutation)
    changed = d.train.labels != d.train.clean_labels
    assert torch.equal(d.train.labels[changed], pi[d.train.clean_labels[changed]])


def test_build_clean_labels_are_the_true_labels(quickstart_sets):
    """clean_labels equal the labels the same recipe loads without noise (same images)."""
    clean, noisy = quickstart_sets["clean"], quickstart_sets["noisy"]
    for split in ("train", "val"):
        a, b = getattr(clean, split), getattr(noisy, split)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.labels, b.clean_labels)
        assert torch.equal(a.images, b.images)


def test_build_test_split_stays_clean(quickstart_sets):
    clean, noisy = quickstart_sets["clean"], quickstart_sets["noisy"]
    assert noisy.test.clean_labels is None
    assert torch.equal(noisy.test.labels, clean.test.labels)
    assert clean.label_noise is None and clean.train.clean_labels is None


def test_build_partition_is_the_same_with_and_without_noise(quickstart_sets):
    for split in ("train", "val"):
        sets = [set(getattr(quickstart_sets[name], split).indices.tolist()) for name in quickstart_sets]
        assert sets[0] == sets[1] == sets[2]
    noisy = quickstart_sets["noisy"]
    assert not set(noisy.train.indices.tolist()) & set(noisy.val.indices.tolist())


def test_build_clean_val_keeps_val_clean_and_train_noisy(quickstart_sets):
    d, noisy = quickstart_sets["clean_val"], quickstart_sets["noisy"]
    assert torch.equal(d.val.labels, d.val.clean_labels)
    assert torch.equal(d.train.labels, noisy.train.labels)  # the same draw for the training images
    assert float((d.train.labels != d.train.clean_labels).float().mean()) > 0.35


def test_build_report_flipped_are_the_changed_dataset_indices(quickstart_sets):
    d = quickstart_sets["noisy"]
    changed = set()
    for split in (d.train, d.val):
        changed |= set(split.indices[split.labels != split.clean_labels].tolist())
    assert sorted(d.label_noise.flipped) == sorted(changed)
    assert len(d.label_noise.flipped) == len(set(d.label_noise.flipped))
    assert d.label_noise.extra["num_labels"] == len(d.train) + len(d.val)
    assert d.label_noise.extra["flipped_in_val"] == int((d.val.labels != d.val.clean_labels).sum())


# --------------------------------------------------------------------------- memorisation


def test_memorisation_rates_on_a_hand_made_example():
    """codes = true * K + noisy; 4 examples: predicted noisy once (25%), true twice (50%)."""
    k = 3
    true = torch.tensor([0, 1, 2, 0])
    noisy = torch.tensor([1, 2, 0, 2])
    predicted = torch.tensor([1, 1, 1, 0])
    rates = memorisation_rates(predicted, true * k + noisy, k)
    assert rates["flipped_pred_noisy"] == pytest.approx(25.0)
    assert rates["flipped_pred_true"] == pytest.approx(50.0)
    all_noisy = memorisation_rates(noisy, true * k + noisy, k)
    assert all_noisy == {"flipped_pred_noisy": pytest.approx(100.0), "flipped_pred_true": pytest.approx(0.0)}


def _tiny(labels, clean):
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(labels), ["a", "b", "c"],
                              clean_labels=None if clean is None else torch.tensor(clean))


def test_flipped_subset_none_without_flips_or_true_labels():
    assert flipped_subset(_tiny([0, 1, 2], [0, 1, 2])) is None
    assert flipped_subset(_tiny([0, 1, 2], None)) is None


def test_flipped_subset_encodes_true_and_noisy():
    ds = _tiny([0, 2, 2, 1, 0], [0, 1, 2, 0, 2])  # flipped: 1 (1->2), 3 (0->1), 4 (2->0)
    sub = flipped_subset(ds)
    assert sub.labels.tolist() == [1 * 3 + 2, 0 * 3 + 1, 2 * 3 + 0]
    assert torch.equal(sub.images[:, 0, 0, 0], torch.tensor([1, 3, 4], dtype=torch.uint8))
    small = flipped_subset(ds, max_images=2, seed=0)
    assert len(small) == 2 and set(small.labels.tolist()) <= set(sub.labels.tolist())


def test_a_noisy_run_records_the_noise_and_logs_the_memorisation_curve(tmp_path):
    """label_noise.json names the flipped dataset indices; each validated epoch logs what the
    model predicts for a sample of them, recomputed here from the run's final weights."""
    import json

    from convrecipes.cli import main as cli_main

    run = tmp_path / "run"
    args = ["train", "quickstart", "--run-dir", str(run), "trainer.epochs=2", "trainer.progress=false",
            "data.label_noise.kind=permutation", "data.label_noise.rate=0.44"]
    assert cli_main(args) == 0
    noise = json.loads((run / "label_noise.json").read_text())
    assert noise["kind"] == "permutation" and noise["num_flipped"] == len(noise["flipped"]) > 0
    pi = noise["permutation"]
    assert sorted(pi) == list(range(10)) and all(pi[i] != i for i in range(10))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("flipped_pred_noisy" in r and "flipped_pred_true" in r for r in records)
    # recompute the last epoch's curve from the final weights on the same flipped training images
    from convrecipes.build import build, load_datasets
    from convrecipes.checkpoint import load_checkpoint, load_model_weights, model_weights_of
    from convrecipes.recipe import load_recipe

    recipe = load_recipe("quickstart", args[4:])
    exp = build(recipe, datasets=load_datasets(recipe))
    state, _ = load_checkpoint(run / "last.safetensors")
    load_model_weights(exp.trainer.unwrapped_model, model_weights_of(state, run), run)
    train = exp.datasets.train
    flipped = (train.labels != train.clean_labels).nonzero().squeeze(1)
    model = exp.trainer.unwrapped_model.eval()
    with torch.no_grad():
        images = exp.trainer.eval_transform(train.images[flipped].float() / 255, train.labels[flipped])[0]
        predicted = model(images).argmax(1)
    assert records[-1]["flipped_pred_noisy"] == pytest.approx(
        100 * float((predicted == train.labels[flipped]).double().mean()), abs=1e-6)  # exact share: float64
    assert records[-1]["flipped_pred_true"] == pytest.approx(
        100 * float((predicted == train.clean_labels[flipped]).double().mean()), abs=1e-6)


def test_a_data_error_leaves_no_empty_run_directory(tmp_path, capsys):
    """Pair noise naming a missing class fails at data load: exit 2, and the run directory the
    command created is gone again (nothing was written into it)."""
    from convrecipes.cli import main as cli_main

    run = tmp_path / "runs" / "r"
    code = cli_main(["train", "quickstart", "--run-dir", str(run), "data.label_noise.kind=pair",
                     "data.label_noise.pairs={nine: '8'}"])
    assert code == 2 and "nine" in capsys.readouterr().err
    assert not run.exists()
