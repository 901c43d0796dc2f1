import numpy as np
import pytest
import torch

from nit_model.shapes_eval import (ClassifierConfig, ShapesClassifier, evaluate_resolution, load_or_train_classifier,
                                   real_shapes)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return load_or_train_classifier(str(tmp_path_factory.mktemp("cache")), ClassifierConfig(steps=200), progress=False)


def test_classifier_recognises_real_shapes_at_unseen_sizes(classifier):
    labels = np.arange(60) % 6
    for h, w in [(32, 96), (96, 32), (80, 80), (40, 160)]:
        r = evaluate_resolution(classifier, real_shapes(labels, h, w, seed=5), labels, num_real=64)
        assert r["accuracy"] >= 0.9, r
        assert (r["height"], r["width"], r["n"]) == (h, w, 60)


def test_frechet_separates_real_from_noise(classifier):
    labels = np.arange(60) % 6
    real = evaluate_resolution(classifier, real_shapes(labels, 64, 64, seed=6), labels, num_real=128)
    noise = evaluate_resolution(classifier, torch.rand(60, 3, 64, 64) * 2 - 1, labels, num_real=128)
    blurred = torch.nn.functional.avg_pool2d(real_shapes(labels, 64, 64, seed=6), 9, 1, 4)
    blur = evaluate_resolution(classifier, blurred, labels, num_real=128)
    assert real["frechet"] < blur["frechet"] < noise["frechet"]
    assert noise["frechet"] > 5 * real["frechet"]
    assert noise["accuracy"] < 0.5


def test_cache_round_trip(tmp_path):
    cfg = ClassifierConfig(steps=3)
    a = load_or_train_classifier(str(tmp_path), cfg)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    b = load_or_train_classifier(str(tmp_path), cfg)
    x = torch.rand(2, 3, 40, 72) * 2 - 1
    assert torch.equal(a(x), b(x))


def test_any_size_and_bad_input():
    m = ShapesClassifier()
    assert m(torch.zeros(2, 3, 8, 40)).shape == (2, 6)
    with pytest.raises(ValueError, match="n = len"):
        evaluate_resolution(m, torch.zeros(3, 3, 16, 16), [0, 1])


def test_quadrant_correlation_detects_a_2x2_repetition():
    from nit_model.shapes_eval import quadrant_correlation
    real = real_shapes([0, 1, 2, 3, 4, 5], 32, 32, seed=3, palette="mono")
    tiled = real.repeat(1, 1, 2, 2)  # every quadrant the same 32x32 drawing
    assert quadrant_correlation(tiled) == pytest.approx(1.0, abs=1e-5)
    single = real_shapes([0, 1, 2, 3, 4, 5] * 2, 64, 64, seed=4, palette="mono")
    assert abs(quadrant_correlation(single)) < 0.3
    assert quadrant_correlation(torch.zeros(2, 3, 8, 8)) == 0.0  # flat images: no repetition, no NaN
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        quadrant_correlation(torch.zeros(3, 8, 8))
