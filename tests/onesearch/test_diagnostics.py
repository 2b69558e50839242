"""Relapse guards (issue 21): embedding anisotropy and the spread of first-token logits across requests."""

import math

import numpy as np

from jax_hd.onesearch import diagnostics as D


def test_embedding_anisotropy_random_vs_collapsed():
    rng = np.random.default_rng(0)
    random = rng.normal(size=(1000, 64)).astype(np.float32)
    m = D.embedding_anisotropy(random)
    assert float(m["top_variance_share"]) < 3 / 64
    assert abs(float(m["mean_abs_cos"]) - math.sqrt(2 / (math.pi * 64))) < 0.01
    direction = rng.normal(size=(1, 64))
    collapsed = (rng.normal(size=(1000, 1)) * direction + 0.05 * random).astype(np.float32)
    m = D.embedding_anisotropy(collapsed)
    assert float(m["top_variance_share"]) > 0.9 and float(m["mean_abs_cos"]) > 0.9
    # Hand example: two orthogonal rows and their negatives.
    m = D.embedding_anisotropy(np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -2.0]], np.float32))
    np.testing.assert_allclose(float(m["top_variance_share"]), 0.8, rtol=1e-6)  # eigenvalues 8 and 2
    np.testing.assert_allclose(float(m["mean_abs_cos"]), 4 / 12, rtol=1e-6)  # 4 of 12 ordered pairs have |cos| 1


def test_logit_spread():
    same = np.tile(np.arange(5, dtype=np.float32), (4, 1))
    m = D.logit_spread(same)
    assert float(m["logit_std_across_requests"]) == 0 and float(m["distinct_top1_share"]) == 0.25
    varied = np.eye(4, 5, dtype=np.float32) * 3
    m = D.logit_spread(varied)
    assert float(m["distinct_top1_share"]) == 1.0
    np.testing.assert_allclose(float(m["logit_std_across_requests"]), (4 * np.std([3, 0, 0, 0])) / 5, rtol=1e-6)
