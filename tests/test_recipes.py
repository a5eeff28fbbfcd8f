"""lbcc.recipes (presets, TOML, per-layer overrides, strict keys) and lbcc.target.check_recipe."""

from __future__ import annotations

import textwrap

import pytest

from lbcc.errors import BadInputError, TargetError
from lbcc.recipes import PRESETS, LayerOverride, load_recipe, preset, recipe_from_dict
from lbcc.target import available_targets, check_recipe, get_target


def _toml(tmp_path, text: str, name: str = "r.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- presets

def test_presets():
    assert set(PRESETS) >= {"w8a8", "w8a8-dynamic", "w4a16"}
    w8a8 = preset("w8a8")
    assert (w8a8.weights.bits, w8a8.weights.group_size, w8a8.weights.symmetric) == (8, None, True)
    assert w8a8.activations.mode == "static" and w8a8.needs_calibration
    dyn = preset("w8a8-dynamic")
    assert dyn.weights.bits == 8 and dyn.weights.symmetric
    assert dyn.activations.mode in ("dynamic", "dynamic-block") and not dyn.needs_calibration
    w4 = preset("w4a16")
    assert (w4.weights.bits, w4.weights.group_size) == (4, 128)
    assert w4.activations.mode == "none" and not w4.needs_calibration


def test_preset_is_a_copy_and_group_size_override():
    n_rules = len(PRESETS["w4a16"].layers)
    a = preset("w4a16", group_size=32)
    assert a.weights.group_size == 32
    assert PRESETS["w4a16"].weights.group_size == 128  # the registry is not mutated
    a.layers.append(LayerOverride(match="x", skip=True))
    a.weights.bits = 8
    assert len(preset("w4a16").layers) == n_rules and preset("w4a16").weights.bits == 4
    with pytest.raises(BadInputError, match="--group-size applies to 4-bit"):
        preset("w8a8", group_size=32)


def test_unknown_preset_lists_choices():
    with pytest.raises(BadInputError) as exc:
        preset("w3a16")
    assert "w3a16" in exc.value.message
    assert "w8a8" in exc.value.hint and "w4a16" in exc.value.hint
    assert exc.value.exit_code == 1


# ----------------------------------------------------------------------------- TOML

def test_toml_recipe_full(tmp_path):
    path = _toml(tmp_path, """
        base = "w4a16"
        [weights]
        group_size = 32
        clip = "none"
        [calibration]
        samples = 4
        seq_len = 64
        [[layers]]
        match = "model.layers.*.mlp.down_proj"
        bits = 8
        group_size = "channel"
        [[layers]]
        match = "lm_head"
        skip = true
        """, name="my_recipe.toml")
    r = load_recipe(path)
    assert r.name == "my_recipe"
    assert (r.weights.bits, r.weights.group_size, r.weights.clip) == (4, 32, "none")
    assert r.weights.symmetric is False  # inherited from the w4a16 base
    assert (r.calibration.samples, r.calibration.seq_len) == (4, 64)
    # the recipe's rules come after the base preset's own, so they win
    base_rules = len(PRESETS["w4a16"].layers)
    assert len(r.layers) == base_rules + 2
    assert r.layers[-2].group_size is None and r.layers[-1].skip
    w, _, _ = r.spec_for("model.layers.0.mlp.down_proj")
    assert (w.bits, w.group_size, w.clip) == (8, None, "none")
    assert r.spec_for("lm_head")[2] is not None


def test_per_layer_overrides_fnmatch(tmp_path):
    r = recipe_from_dict({
        "base": "w8a8",
        "weights": {"clip": "mse"},
        "layers": [
            {"match": "model.layers.*.mlp.down_proj", "activations": "dynamic"},
            {"match": "model.layers.1?.*", "clip": "none"},
            {"match": "lm_head", "skip": True},
        ]})
    w, act, skip = r.spec_for("model.layers.3.mlp.down_proj")
    assert (w.bits, act, skip, w.clip) == (8, "dynamic", None, "mse")
    w, act, skip = r.spec_for("model.layers.12.mlp.down_proj")  # both rules apply, in order
    assert (act, w.clip) == ("dynamic", "none")
    w, act, skip = r.spec_for("model.layers.3.self_attn.q_proj")
    assert (act, skip, w.clip) == ("static", None, "mse")
    _, _, skip = r.spec_for("lm_head")
    assert skip is not None and "lm_head" in skip
    # patterns are case-sensitive and anchored
    assert r.spec_for("LM_HEAD")[2] is None
    assert r.spec_for("model.lm_head")[2] is None
    # spec_for never mutates the recipe's own weights
    assert r.weights.clip == "mse"


def test_override_bits_and_group_size():
    r = recipe_from_dict({"layers": [
        {"match": "*.down_proj", "bits": 8, "group_size": "channel"},
        {"match": "*.q_proj", "group_size": 32}]}, default_base="w4a16")
    w, _, _ = r.spec_for("model.layers.0.mlp.down_proj")
    assert (w.bits, w.group_size) == (8, None)
    w, _, _ = r.spec_for("model.layers.0.self_attn.q_proj")
    assert (w.bits, w.group_size) == (4, 32)
    w, _, _ = r.spec_for("model.layers.0.self_attn.k_proj")
    assert (w.bits, w.group_size) == (4, 128)


def test_default_base_is_used_when_recipe_has_none(tmp_path):
    path = _toml(tmp_path, """
        [weights]
        group_size = 64
        """)
    r = load_recipe(path, default_base="w4a16")
    assert (r.weights.bits, r.weights.group_size, r.activations.mode) == (4, 64, "none")


@pytest.mark.parametrize("text,key,suggestion", [
    ("[weights]\ngrup_size = 32\n", "grup_size", "group_size"),
    ("[activations]\nmethd = 'mse'\n", "methd", "method"),
    ("bse = 'w4a16'\n", "bse", "base"),
    ("[[layers]]\nmatch = 'x'\nbitz = 8\n", "bitz", "bits"),
])
def test_unknown_key_is_an_error_with_did_you_mean(tmp_path, text, key, suggestion):
    with pytest.raises(BadInputError) as exc:
        load_recipe(_toml(tmp_path, text))
    msg = str(exc.value)
    assert repr(key) in msg and f"did you mean {suggestion!r}" in msg


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(BadInputError, match="zzzzzz"):
        load_recipe(_toml(tmp_path, "[weights]\nzzzzzz = 1\n"))


@pytest.mark.parametrize("text,match", [
    ("[weights]\nclip = 'percentile'\n", "weights.clip"),
    ("[activations]\nmode = 'sometimes'\n", "activations.mode"),
    ("[activations]\nmethod = 'kl'\n", "activations.method"),
    ("[activations]\nfallback = 'fp16'\n", "activations.fallback"),
    ("[calibration]\nsamples = 0\n", "samples"),
    ("weights = 3\n", r"\[weights\] must be a table"),
    ("[[layers]]\nbits = 8\n", "no 'match'"),
    ("base = 'w2a2'\n", "unknown preset"),
    ("[weights\nbits = 4\n", "not valid TOML"),
    ("[weights]\nformat = 'e5m2'\n", "weights.format"),
    ("base = 'w8a8-fp8'\n[weights]\ngroup_size = 64\n", "per channel"),
    ("base = 'w8a8-fp8'\n[activations]\nmode = 'static'\n", "FP8 per token"),
    ("base = 'w8a8-fp8'\n[smoothing]\nmethod = 'smoothquant'\n", "not implemented for e4m3"),
    ("base = 'w8a8-fp8'\nquantize_embedding = true\n", "embedding table in float"),
    ("base = 'w8a8-fp8'\n[[layers]]\nmatch = 'lm_head'\nbits = 4\n", "not 4-bit"),
])
def test_invalid_recipes(tmp_path, text, match):
    with pytest.raises(BadInputError, match=match):
        load_recipe(_toml(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_to_json_roundtrips_the_fields():
    data = preset("w4a16", group_size=64).to_json()
    assert data["name"] == "w4a16" and data["weights"]["group_size"] == 64
    assert data["activations"]["mode"] == "none"


# ----------------------------------------------------------------------------- check_recipe

def test_targets_registry():
    assert "ort-int8" in available_targets()
    with pytest.raises(BadInputError, match="unknown target"):
        get_target("tpu-v9")


@pytest.mark.parametrize("name", ["w8a8", "w8a8-dynamic", "w4a16", "w4a16-e4"])
def test_presets_pass_the_target_check(name):
    check_recipe(preset(name), get_target("ort-int8"))
    check_recipe(preset("w4a16", group_size=16), get_target("ort-int8"))


def test_fp8_target_check():
    """w8a8-fp8 passes on the targets that run FP8 and is refused, with a hint, on c."""
    for t in ("ort-int8", "triton"):
        check_recipe(preset("w8a8-fp8"), get_target(t))
    with pytest.raises(TargetError, match="FP8") as exc:
        check_recipe(preset("w8a8-fp8"), get_target("c"))
    assert "--target triton" in exc.value.hint
    weight_only = recipe_from_dict({"base": "w8a8-fp8", "activations": {"mode": "none"}})
    check_recipe(weight_only, get_target("ort-int8"))
    with pytest.raises(TargetError, match="activation mode 'none'"):
        check_recipe(weight_only, get_target("triton"))


def test_check_recipe_rejects_3bit_weights():
    r = recipe_from_dict({"base": "w4a16", "weights": {"bits": 3}})
    with pytest.raises(TargetError, match="3-bit") as exc:
        check_recipe(r, get_target("ort-int8"))
    assert exc.value.exit_code == 2
    assert "4" in exc.value.hint and "8" in exc.value.hint


def test_check_recipe_rejects_4bit_with_static_activations():
    r = recipe_from_dict({"base": "w4a16", "activations": {"mode": "static"}})
    with pytest.raises(TargetError, match="activation mode 'static'"):
        check_recipe(r, get_target("ort-int8"))


def test_check_recipe_rejects_4bit_per_channel_and_odd_groups():
    tgt = get_target("ort-int8")
    with pytest.raises(TargetError, match="per-channel"):
        check_recipe(recipe_from_dict({"base": "w4a16", "weights": {"group_size": "channel"}}),
                     tgt)
    with pytest.raises(TargetError, match="group size 48"):
        check_recipe(recipe_from_dict({"base": "w4a16", "weights": {"group_size": 48}}), tgt)


def test_check_recipe_weight_layout_per_activation_mode():
    tgt = get_target("ort-int8")
    # per-tensor activations (static or dynamic) pair with per-channel weights ...
    with pytest.raises(TargetError, match="per-channel"):
        check_recipe(recipe_from_dict({"weights": {"group_size": 32},
                                       "activations": {"mode": "dynamic"}},
                                      default_base="w8a8"), tgt)
    check_recipe(recipe_from_dict({"weights": {"group_size": "channel"},
                                   "activations": {"mode": "dynamic"}}, default_base="w8a8"), tgt)
    # ... per-block activations with grouped weights
    with pytest.raises(TargetError, match="group"):
        check_recipe(recipe_from_dict({"weights": {"group_size": "channel"},
                                       "activations": {"mode": "dynamic-block"}},
                                      default_base="w8a8"), tgt)
    check_recipe(recipe_from_dict({"activations": {"mode": "dynamic-block"}},
                                  default_base="w4a16"), tgt)


def test_check_recipe_looks_at_layer_overrides():
    tgt = get_target("ort-int8")
    bad = recipe_from_dict({"base": "w8a8", "layers": [{"match": "*.down_proj", "bits": 4,
                                                         "group_size": 32}]})
    with pytest.raises(TargetError, match="down_proj"):  # 4-bit with the base's static act.
        check_recipe(bad, tgt)
    bad3 = recipe_from_dict({"base": "w4a16", "layers": [{"match": "lm_head", "bits": 3}]})
    with pytest.raises(TargetError, match="lm_head"):
        check_recipe(bad3, tgt)
    # a skipped layer asks nothing of the target
    ok = recipe_from_dict({"base": "w4a16", "layers": [{"match": "lm_head", "bits": 3,
                                                        "skip": True}]})
    check_recipe(ok, tgt)
    ok8 = recipe_from_dict({"base": "w4a16", "layers": [{"match": "*.down_proj", "bits": 8,
                                                         "group_size": "channel"}]})
    check_recipe(ok8, tgt)
