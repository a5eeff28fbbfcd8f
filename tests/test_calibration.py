"""lbcc.calibration: streaming observers, feeds, tokenizers and the ORT statistics runner."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import models as M
from conftest import make_text
from lbcc.calibration import (ActivationObserver, NpzFeed, RandomFeed, TextFeed,
                              collect_activation_stats, load_tokenizer, model_vocab_size)
from lbcc.errors import BadInputError


def _batches(seed: int = 0, n: int = 5, shape=(3, 7, 16)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (i + 1) + 0.3 * i).astype(np.float32) for i in range(n)]


# ----------------------------------------------------------------------------- observer

def test_observer_moments_exact_over_several_updates():
    obs = ActivationObserver()
    batches = _batches()
    for b in batches:
        obs.update(b)
    allv = np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64)
    assert obs.count == allv.size
    assert obs.min == pytest.approx(allv.min(), abs=0) and obs.max == pytest.approx(allv.max(),
                                                                                     abs=0)
    # squares are formed in float32 (summed in float64): float32 rounding of each square
    assert obs.mean_square == pytest.approx(np.mean(allv.astype(np.float64) ** 2), rel=1e-6)
    assert obs.sum == pytest.approx(allv.sum(), rel=1e-9, abs=1e-9)
    # per channel (last axis)
    rows = np.concatenate([b.reshape(-1, 16) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(obs.channel_absmax, np.abs(rows).max(0), rtol=0)
    np.testing.assert_allclose(obs.channel_mean_square(), (rows ** 2).mean(0), rtol=1e-6)
    assert obs.channel_count == rows.shape[0]


def test_observer_ignores_empty_and_sanitizes_nonfinite():
    obs = ActivationObserver()
    obs.update(np.zeros((0, 4), np.float32))
    assert obs.count == 0 and obs.mean_square == 0.0
    obs.update(np.array([[1.0, np.nan, -2.0, 0.5]], np.float32))
    assert obs.count == 4 and np.isfinite(obs.mean_square) and obs.max == 1.0


def test_histogram_counts_every_value():
    obs = ActivationObserver()
    total = 0
    for b in _batches(seed=1):
        obs.update(b)
        total += b.size
        assert int(obs.hist.sum()) == total
    assert obs.radius >= max(abs(obs.min), abs(obs.max))


def test_histogram_range_doubling_keeps_counts():
    rng = np.random.default_rng(2)
    small = rng.uniform(-0.9, 0.9, (4, 1000)).astype(np.float32)
    small[0, 0] = 0.95
    large = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    large[0, 0] = 10.0  # radius 1 -> 16 (four doublings)
    grown = ActivationObserver()
    grown.update(small)
    assert grown.radius == 1.0
    before = grown.hist.copy()
    grown.update(large)
    assert grown.radius == 16.0
    assert int(grown.hist.sum()) == small.size + large.size
    # the merged histogram equals one built at the final range from all values at once
    direct = ActivationObserver()
    direct.update(np.concatenate([large, small]))
    assert direct.radius == 16.0
    assert int(np.abs(grown.hist - direct.hist).sum()) <= 2  # float rounding at bin edges only
    # the first batch's counts moved into the centre half, merged pairwise and not lost
    assert int(before.sum()) == small.size
    lo, hi = (int((v + 16.0) / 32.0 * grown.bins) for v in (-1.0, 1.0))  # bins of [-1, 1)
    inner = grown.hist[lo:hi].sum()
    large_inner = int((np.abs(large) < 1).sum())
    assert abs(int(inner) - (small.size + large_inner)) <= 2


@pytest.mark.parametrize("dist", ["student_t2", "laplace", "normal"])
def test_mse_range_noise_not_above_minmax(dist):
    rng = np.random.default_rng(3)
    obs = ActivationObserver()
    for _ in range(4):
        x = rng.standard_t(2, (256, 64)) if dist == "student_t2" else getattr(rng, dist)(
            size=(256, 64))
        obs.update(x.astype(np.float32))
    lo_mm, hi_mm = obs.choose_range("minmax")
    lo, hi = obs.choose_range("mse")
    assert lo_mm <= lo <= 0 <= hi <= hi_mm
    assert obs.quant_noise(lo, hi) <= obs.quant_noise(lo_mm, hi_mm)
    assert obs.sqnr_db(lo, hi) >= obs.sqnr_db(lo_mm, hi_mm)
    if dist == "laplace":  # clipping the sparse tails of a Laplacian pays off (~10% less noise)
        assert obs.quant_noise(lo, hi) < 0.95 * obs.quant_noise(lo_mm, hi_mm)
        assert hi < hi_mm and lo > lo_mm


def test_quant_noise_matches_uniform_step_squared_over_12():
    obs = ActivationObserver()
    obs.update(np.random.default_rng(4).uniform(-1, 1, (100, 100)).astype(np.float32))
    step = 2.0 / 255
    assert obs.quant_noise(-1.0, 1.0) == pytest.approx(step ** 2 / 12, rel=0.05)
    # a range that clips half of the values is much worse
    assert obs.quant_noise(-1.0, 0.0) > 100 * obs.quant_noise(-1.0, 1.0)


def test_percentile_range():
    rng = np.random.default_rng(5)
    obs = ActivationObserver()
    obs.update(rng.uniform(-1, 1, 200_000).astype(np.float32))
    width = 2 * obs.radius / obs.bins
    lo, hi = obs.percentile_range(99.0)
    assert lo == pytest.approx(-0.99, abs=2 * width + 0.005)
    assert hi == pytest.approx(0.99, abs=2 * width + 0.005)
    lo100, hi100 = obs.percentile_range(100.0)
    assert lo100 >= obs.min and hi100 <= obs.max
    assert hi100 == pytest.approx(obs.max, abs=2 * width)
    # an outlier barely moves a percentile range, but sets the min/max one
    obs.update(np.array([1000.0], np.float32))
    lo, hi = obs.choose_range("percentile", 99.9)
    assert hi < 2.0 and obs.choose_range("minmax")[1] == 1000.0


def test_choose_range_contains_zero_and_rejects_unknown_method():
    obs = ActivationObserver()
    obs.update(np.random.default_rng(6).uniform(2, 3, (10, 10)).astype(np.float32))
    for method in ("minmax", "mse", "percentile"):
        lo, hi = obs.choose_range(method)
        assert lo <= 0.0 <= hi
    with pytest.raises(BadInputError, match="unknown calibration method"):
        obs.choose_range("entropy")


def test_outlier_summary():
    obs = ActivationObserver()
    x = np.ones((10, 8), np.float32)
    x[:, 3] = 50.0
    obs.update(x)
    s = obs.outlier_summary()
    assert s["absmax"] == 50.0 and s["channels_over_6"] == 1 and s["channels"] == 8
    assert s["max_over_median"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------- feeds

@pytest.fixture
def lm() -> ir.Model:
    return ir.from_proto(M.tied_lm_model(dynamic_seq=True))


def test_random_feed_is_seeded_and_in_range(lm):
    feed = RandomFeed(vocab_size=50, seq_len=12, n=3, seed=7)
    a = list(feed.samples(lm))
    b = list(RandomFeed(vocab_size=50, seq_len=12, n=3, seed=7).samples(lm))
    c = list(RandomFeed(vocab_size=50, seq_len=12, n=3, seed=8).samples(lm))
    assert len(a) == len(feed) == 3
    for s in a:
        assert list(s) == ["input_ids"]
        assert s["input_ids"].shape == (1, 12) and s["input_ids"].dtype == np.int64
        assert s["input_ids"].min() >= 0 and s["input_ids"].max() < 50
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))
    assert feed.describe()["kind"] == "random"


def test_token_feeds_need_a_single_input_model():
    two_inputs = ir.from_proto(M.mlp_model())
    two_inputs.graph.inputs.append(ir.Value(name="extra", type=ir.TensorType(ir.DataType.FLOAT),
                                            shape=ir.Shape([1])))
    with pytest.raises(BadInputError, match="one input"):
        next(iter(RandomFeed(10).samples(two_inputs)))


def test_npz_feed(tmp_path, lm):
    ids = np.arange(3 * 10, dtype=np.int64).reshape(3, 10)
    np.savez(tmp_path / "c.npz", input_ids=ids)
    feed = NpzFeed(tmp_path / "c.npz")
    samples = list(feed.samples(lm))
    assert len(feed) == 3 and len(samples) == 3
    for i, s in enumerate(samples):
        assert s["input_ids"].shape == (1, 10)
        assert (s["input_ids"][0] == ids[i]).all()
    assert feed.describe() == {"kind": "npz", "path": str(tmp_path / "c.npz"), "samples": 3}


def test_npz_feed_errors(tmp_path, lm):
    with pytest.raises(BadInputError, match="does not exist"):
        NpzFeed(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(BadInputError, match="not a readable .npz"):
        NpzFeed(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(BadInputError, match="holds no arrays"):
        NpzFeed(tmp_path / "empty.npz")
    np.savez(tmp_path / "ragged.npz", a=np.zeros((3, 4)), b=np.zeros((2, 4)))
    with pytest.raises(BadInputError, match="disagree"):
        NpzFeed(tmp_path / "ragged.npz")
    np.savez(tmp_path / "zero.npz", input_ids=np.zeros((0, 4), np.int64))
    with pytest.raises(BadInputError):
        NpzFeed(tmp_path / "zero.npz")
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((2, 4), np.int64))
    with pytest.raises(BadInputError, match="input_ids"):
        list(NpzFeed(tmp_path / "wrong.npz").samples(lm))


def test_text_feed_windows(tmp_path, tokenizer_json, lm):
    tok = load_tokenizer(tokenizer_json)
    text = make_text(tmp_path / "t.txt", 300)
    expected = np.asarray(tok.encode(text.read_text(), add_special_tokens=False).ids)
    assert len(expected) == 300
    feed = TextFeed(text, tok, seq_len=64, max_samples=16)
    samples = list(feed.samples(lm))
    assert len(feed) == len(samples) == 300 // 64
    for i, s in enumerate(samples):
        assert s["input_ids"].shape == (1, 64) and s["input_ids"].dtype == np.int64
        assert (s["input_ids"][0] == expected[i * 64:(i + 1) * 64]).all()
    assert feed.describe()["tokens"] == 4 * 64
    assert len(TextFeed(text, tok, seq_len=64, max_samples=2)) == 2
    # fewer tokens than one window: one (short) sample
    assert len(TextFeed(text, tok, seq_len=1024)) == 1


def test_text_feed_errors(tmp_path, tokenizer_json, big_tokenizer_json, lm):
    tok = load_tokenizer(tokenizer_json)
    with pytest.raises(BadInputError, match="does not exist"):
        TextFeed(tmp_path / "missing.txt", tok)
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="empty"):
        TextFeed(tmp_path / "empty.txt", tok)
    short = make_text(tmp_path / "short.txt", 20)
    with pytest.raises(BadInputError, match="only 20 tokens"):
        TextFeed(short, tok)
    big = load_tokenizer(big_tokenizer_json)
    feed = TextFeed(make_text(tmp_path / "ok.txt", 200), big, seq_len=32)
    with pytest.raises(BadInputError, match="301 tokens but the model's vocabulary has 256"):
        list(feed.samples(lm))


def test_load_tokenizer(tmp_path, tokenizer_json):
    assert load_tokenizer(tokenizer_json).get_vocab_size() == 191
    assert load_tokenizer(tokenizer_json.parent).get_vocab_size() == 191  # a directory
    with pytest.raises(BadInputError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BadInputError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


def test_model_vocab_size(lm):
    assert model_vocab_size(lm) == 256


# ----------------------------------------------------------------------------- runner

def test_collect_activation_stats_matches_numpy(tmp_path):
    model = ir.from_proto(M.mlp_model())
    xs = M.mlp_inputs(samples=3)
    np.savez(tmp_path / "c.npz", x=xs)
    n_outputs = len(model.graph.outputs)
    stats = collect_activation_stats(model, NpzFeed(tmp_path / "c.npz"), ["x0", "r"],
                                     progress=False)
    assert set(stats) == {"x0", "r"}
    # the model is left as it was
    assert len(model.graph.outputs) == n_outputs
    # reference: run the float model pieces in numpy
    w1 = model.graph.initializers["w1"].const_value.numpy()
    b0 = model.graph.initializers["b0"].const_value.numpy()
    x0 = xs + b0
    r = np.maximum(x0 @ w1, 0)
    assert stats["x0"].count == x0.size
    assert stats["x0"].max == pytest.approx(float(x0.max()), rel=1e-6)
    assert stats["r"].mean_square == pytest.approx(float((r.astype(np.float64) ** 2).mean()),
                                                   rel=1e-4)
    assert stats["r"].min == 0.0
    with pytest.raises(BadInputError, match="no node produces"):
        collect_activation_stats(model, NpzFeed(tmp_path / "c.npz"), ["nope"], progress=False)


def test_collect_activation_stats_on_a_graph_input(tmp_path):
    model = ir.from_proto(M.mlp_model(input_bias=False))
    np.savez(tmp_path / "c.npz", x=M.mlp_inputs(samples=2))
    stats = collect_activation_stats(model, NpzFeed(tmp_path / "c.npz"), ["x"], progress=False)
    assert stats["x"].count == M.mlp_inputs(samples=2).size


def test_observed_tensors_are_not_left_flagged_as_graph_outputs(tmp_path):
    """Calibration adds the observed tensors as outputs for one ONNX Runtime session; afterwards
    no value may still claim to be a graph output (passes read that flag)."""
    from lbcc.calibration import collect_activation_stats
    from lbcc.capture import capture

    model = capture(M.mlp_model())
    inner = [v for n in model.graph for v in n.outputs if not v.is_graph_output()]
    np.savez(tmp_path / "c.npz", x=M.mlp_inputs())
    collect_activation_stats(model, NpzFeed(tmp_path / "c.npz"), [v.name for v in inner],
                             progress=False)
    assert inner and not any(v.is_graph_output() for v in inner)
