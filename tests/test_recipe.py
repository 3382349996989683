import pytest

from lowbit import PRESETS, InvalidRecipeError, Recipe, make_recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_recipe_that_round_trips_through_json(name):
    recipe = make_recipe(name)
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_required_presets_exist():
    assert {"w8a8-dynamic", "w8a8-static", "w8", "w4", "fp16", "bf16"} <= set(PRESETS)
    assert make_recipe("w4").granularity == "group:128"


def test_overrides_and_skip_round_trip():
    recipe = make_recipe("w4", skip=["pooler*"], overrides={"encoder.layer.0.*": "w8"})
    restored = Recipe.from_json(recipe.to_json())
    assert restored.overrides["encoder.layer.0.*"].weights == "int8"
    assert restored.skip == ("pooler*",)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weights": "int4"}, "needs symmetric int8"),
        ({"granularity": "group:48"}, "group size 48"),
        ({"calibrator": "magic"}, "unknown calibrator"),
        ({"percentile": 20.0}, "greater than 50"),
        ({"overrides": {"x": "w3"}}, "unknown preset 'w3'"),
        ({"color": "blue"}, "Extra inputs"),
    ],
)
def test_inconsistent_recipes_are_refused_with_a_reason(changes, message):
    with pytest.raises(InvalidRecipeError, match=message):
        make_recipe("w8a8-dynamic", **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"symmetric": True}, "asymmetric int4 groups"),
    ({"weights": "int5"}, "asymmetric int4 groups"),
    ({"algorithm": "hqq"}, "optimises its own float zero points"),
])
def test_a_grid_with_a_minimum_is_refused_where_it_cannot_apply(changes, message):
    with pytest.raises(InvalidRecipeError, match=message):
        make_recipe("q4_1", **changes)


def test_q4_1_gives_specs_with_a_minimum():
    assert make_recipe("q4_1").layer_spec().zero_point == "minimum"
    assert make_recipe("q4_1").layer_spec("embedding").zero_point == "minimum"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(InvalidRecipeError, match="w8a8-dynamic"):
        make_recipe("w3")


def test_bad_recipe_json_is_an_error():
    with pytest.raises(InvalidRecipeError):
        Recipe.from_json("{not json")


def test_dynamic_activation_bits_follow_the_cpu_unless_asked(monkeypatch):
    """8-bit activations where VNNI keeps fbgemm from saturating, 7-bit elsewhere; either on
    request; the choice is in each spec, so a reload runs the same numerics anywhere."""
    from lowbit.transform import recipe as recipe_module

    for vnni, expected in ((True, "uint8-full"), (False, "uint8")):
        monkeypatch.setattr(recipe_module, "has_vnni", lambda vnni=vnni: vnni)
        assert make_recipe("w8a8-dynamic").layer_spec().activation == expected
    assert make_recipe("w8a8-dynamic", activation_bits=7).layer_spec().activation == "uint8"
    assert make_recipe("w8a8-dynamic", activation_bits=8).layer_spec().activation == "uint8-full"
    assert make_recipe("w8a8-static", activation_bits=8).layer_spec().activation == "uint8"
    assert make_recipe("w8a8-dynamic").layer_spec("conv").activation is None  # weight-only convs
