"""Recipes: YAML + overrides, typed validation, clear errors, every shipped recipe valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from convrecipes.errors import RecipeError
from convrecipes.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_overrides_are_typed_and_nested():
    r = load_recipe("quickstart", ["optimizer.lr=0.2", "trainer.epochs=3", "model.kwargs.width=8",
                                   "trainer.grad_clip=null", "augment.mean=[0.5]", "data.pk=[4, 2]"])
    assert r.optimizer.lr == 0.2 and isinstance(r.optimizer.lr, float)
    assert r.trainer.epochs == 3 and r.model.kwargs == {"width": 8}
    assert r.trainer.grad_clip is None and r.augment.mean == [0.5] and r.data.pk == [4, 2]
    assert r.name == "quickstart"


def test_integer_and_exponent_forms_are_accepted_for_numbers():
    assert load_recipe("quickstart", ["optimizer.lr=1"]).optimizer.lr == 1.0
    # YAML 1.1 reads 1e-3 as a string; a number field must still take it
    assert load_recipe("quickstart", ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    assert load_recipe("quickstart", ["trainer.ema_decay=9.99e-1"]).trainer.ema_decay == 0.999


def test_loss_list_overrides_by_index():
    raw = {"loss": [{"name": "cross_entropy"}, {"name": "center", "weight": 0.01}]}
    apply_overrides(raw, ["loss.1.weight=0.003", "loss.1.params.alpha=0.4"])
    r = recipe_from_dict(raw)
    assert r.loss[1] == {"name": "center", "weight": 0.003, "params": {"alpha": 0.4}}


@pytest.mark.parametrize("override, message", [
    ("data.batchsize=3", "unknown recipe key 'data.batchsize' (did you mean 'batch_size'?); valid keys in section 'data': batch_size"),
    ("optimizer.lr=fast", "recipe key 'optimizer.lr' must be a number"),
    ("trainer.epochs=2.5", "recipe key 'trainer.epochs' must be an integer"),
    ("trainer.ema_decay=yes please", "recipe key 'trainer.ema_decay' must be a number (or null), got 'yes please'"),
    ("model=resnet", "recipe key 'model' is a section"),
    ("trainer.mixed_precision=fp8", "must be one of null, no, fp16, bf16"),
    ("epochs=3", "unknown recipe key 'epochs'; valid keys at the top level"),
    ("loss.weights=1", "unknown recipe key 'loss.weights'; valid keys in a loss: name, weight, params"),
    ("optimizer.lr", "is not key=value"),
])
def test_bad_overrides_name_the_key_and_the_fix(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert message in str(info.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(RecipeError, match="quickstart"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_is_valid(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.description, "every recipe says what it is"
    assert recipe_from_dict(recipe_to_dict(r)) == r  # the resolved form round-trips


def test_base_recipes_merge_sections_and_replace_the_loss(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "description: parent\ndata: {name: digits, batch_size: 32}\noptimizer: {lr: 0.2, momentum: 0.5}\n"
        "loss: {name: label_smoothing_ce, params: {eps: 0.2}}\n")
    (tmp_path / "child.yaml").write_text(
        "base: parent\ndescription: child\noptimizer: {lr: 0.01}\nloss: {name: hinge}\n")
    r = load_recipe(tmp_path / "child.yaml", ["data.batch_size=16"])
    assert r.name == "child" and r.description == "child"
    assert r.optimizer.lr == 0.01 and r.optimizer.momentum == 0.5  # merged key by key
    assert r.data.name == "digits" and r.data.batch_size == 16
    assert r.loss == {"name": "hinge"}  # replaced, not merged with eps
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    with pytest.raises(RecipeError, match="inherits from itself"):
        load_recipe(tmp_path / "loop.yaml")
