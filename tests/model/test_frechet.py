import numpy as np
import pytest

from nit_model.frechet import frechet_distance, frechet_distance_features, gaussian_stats


def test_identical_gaussians_have_zero_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    mu, s = gaussian_stats(a)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + (1 + 1 + 0.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-12)


def test_rotated_gaussians_closed_form():
    # S2 = R S1 R^T: same eigenvalues, different axes; for 2x2 the distance has a closed form via
    # tr((S1^1/2 S2 S1^1/2)^1/2) computed independently with an explicit 2x2 formula
    th = 0.7
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    s1 = np.diag([3.0, 0.5])
    s2 = r @ s1 @ r.T
    m = np.sqrt(s1) @ s2 @ np.sqrt(s1)
    # sqrt of a 2x2 SPD matrix M: (M + sqrt(det M) I) / sqrt(tr M + 2 sqrt(det M))
    sd = np.sqrt(np.linalg.det(m))
    tr_sqrt = (np.trace(m) + 2 * sd) / np.sqrt(np.trace(m) + 2 * sd)
    expect = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expect, rel=1e-10)


def test_sample_estimate_converges_to_the_population_distance():
    rng = np.random.default_rng(1)
    d = 4
    a = rng.normal(size=(200000, d))
    b = rng.normal(loc=0.5, scale=2.0, size=(200000, d))
    expect = d * 0.25 + d * (1 - 2) ** 2  # |dmu|^2 + sum (sqrt(1) - sqrt(4))^2
    assert frechet_distance_features(a, b) == pytest.approx(expect, rel=0.02)


def test_bad_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
