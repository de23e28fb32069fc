"""Models: our timm-registered small-image models and create_model's argument checks."""

from __future__ import annotations

import pytest
import timm
import torch

from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.models import Classifier, ModelOutput, count_parameters, create_model
from convrecipes.models import fractalnet, sbn, small_image

OURS = list(small_image.MODELS)


def test_all_our_models_are_registered_with_timm():
    # every name @register_model added, in the modules that define them
    registered = [n for module in (small_image, fractalnet, sbn) for n in module.__all__ if n in small_image.MODELS]
    assert OURS == registered == ["tiny_cnn", "small_resnet8", "small_resnet14", "small_resnet20", "small_resnet32",
                                  "small_mlp", "fractalnet", "sbn"]
    assert all(timm.is_model(name) for name in OURS)


@pytest.mark.parametrize("name", OURS)
def test_every_registered_model_builds_and_runs_at_28px(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, num_classes=3, width=4).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    features = create_model(name, in_chans=3, num_classes=3, width=4, embedding_dim=2).eval()
    out = features(torch.randn(2, 3, 28, 28))
    assert isinstance(features, Classifier) and isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 3) and out.embeddings.shape == (2, 2)


def test_timm_create_model_still_builds_ours():
    model = timm.create_model("tiny_cnn", num_classes=3, in_chans=1)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    resnet = timm.create_model("small_resnet8", num_classes=0, in_chans=3, width=4, drop_path_rate=0.1)
    assert resnet(torch.randn(1, 3, 16, 16)).shape == (1, resnet.num_features)


def test_timm_create_model_refuses_a_typo_for_ours():  # no more silently swallowed kwargs
    with pytest.raises(TypeError, match="widht"):
        timm.create_model("tiny_cnn", widht=4)


def test_kwarg_typo_names_the_closest_and_all_valid_params():
    with pytest.raises(RecipeError) as info:
        create_model("tiny_cnn", 1, 3, widht=4)
    message = str(info.value)
    assert "model 'tiny_cnn' has no parameter 'widht' (did you mean 'width'?) (model.kwargs); valid params: width" \
        in message
    assert "switching model.name may need model.kwargs={}" in message


def test_the_depth_a_name_fixes_is_refused_naming_the_other_depths():
    with pytest.raises(RecipeError, match="fixes depth=1.*small_resnet20"):
        create_model("small_resnet8", 1, 3, depth=3)


def test_drop_path_rate_on_tiny_cnn_is_refused_when_positive():
    assert create_model("tiny_cnn", 1, 3, drop_path_rate=0.0) is not None  # create_model always passes it
    with pytest.raises(RecipeError, match=r"no residual paths.*small_resnet.*\(model\.drop_path_rate\)"):
        create_model("tiny_cnn", 1, 3, drop_path_rate=0.1)


@pytest.mark.parametrize("width", [0, -2, 2.5, True])
def test_bad_width_is_a_recipe_error_naming_the_key(width):
    with pytest.raises(RecipeError, match=r"width must be a positive integer.*\(model\.kwargs\.width\)"):
        create_model("tiny_cnn", 1, 3, width=width)
    with pytest.raises(RecipeError, match=r"model\.kwargs\.width"):
        create_model("small_resnet8", 1, 3, width=width)


@pytest.mark.parametrize("key, value", [("drop_rate", 1.0), ("drop_path_rate", -0.1)])
def test_bad_rates_name_their_key(key, value):
    with pytest.raises(RecipeError, match=rf"{key}.*\(model\.{key}\)"):
        create_model("small_resnet8", 1, 3, **{key: value})


def test_ours_have_no_pretrained_weights():
    with pytest.raises(RecipeError, match="no pretrained weights.*model.pretrained=false"):
        create_model("tiny_cnn", 1, 3, pretrained=True)


def test_timm_model_with_a_bogus_kwarg_names_it_and_the_fix():
    with pytest.raises(RecipeError) as info:
        create_model("resnet18", 3, 2, pretrained=False, drop_blok_rate=0.1)
    message = str(info.value)
    assert "model 'resnet18' has no parameter 'drop_blok_rate' (did you mean 'drop_block_rate'?)" in message
    assert "valid params of ResNet:" in message and "stem_width" in message
    assert "check model.kwargs; switching model.name may need model.kwargs={}" in message


def test_timm_model_builds_with_real_kwargs():
    model = create_model("resnet18", 3, 2, pretrained=False, stem_width=16).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match="tiny_cnn"):
        create_model("tiny_cn", 1, 3)


def test_small_mlp_is_pool_flatten_and_relu_layers():
    """Parameter count against the layer sizes (784-512-512-10), and the forward equals the
    layers applied by hand; other image sizes are pooled/repeated to pool_size."""
    model = create_model("small_mlp", in_chans=1, num_classes=10).eval()
    assert count_parameters(model) == (784 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    x = torch.randn(3, 1, 28, 28)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h = x.flatten(1)
    for layer in linears[:-1]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    expected = h @ linears[-1].weight.T + linears[-1].bias
    torch.testing.assert_close(model(x), expected)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("small_mlp", in_chans=1, num_classes=10, drop_path_rate=0.1)
