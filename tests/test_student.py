import numpy as np
import pytest

from dudch.similarity import SimilarityGraph, joint_embedding
from dudch.student import StudentConfig, dcc_sweep, fit, objective


def dcc_problem(seed, n=60, m=20, k=8, gamma=3.0):
    rng = np.random.default_rng(seed)
    half = np.where(rng.random((n, n)) < 0.3, 1, -1)
    s_full = np.triu(half) + np.triu(half, 1).T
    omega = np.sort(rng.choice(n, m, replace=False))
    u, v = np.tanh(rng.standard_normal((m, k))), np.tanh(rng.standard_normal((m, k)))
    codes = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    return codes, u, v, s_full[omega].astype(np.int8), omega, gamma


@pytest.mark.parametrize("seed", range(10))
def test_each_dcc_sweep_does_not_increase_the_objective_and_keeps_codes_binary(seed):
    codes, u, v, s, omega, gamma = dcc_problem(seed)
    before = objective(u, v, codes, s, omega, gamma)
    for _ in range(3):
        codes = dcc_sweep(codes, u, v, s, omega, gamma)
        after = objective(u, v, codes, s, omega, gamma)
        assert after <= before + 1e-9
        assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
        before = after


def test_the_last_column_updated_is_an_exact_minimiser():
    codes, u, v, s, omega, gamma = dcc_problem(42)
    codes = dcc_sweep(codes, u, v, s, omega, gamma)
    best = objective(u, v, codes, s, omega, gamma)
    for row in range(len(codes)):  # J is linear in column k-1 given the rest: no single flip helps
        flipped = codes.copy()
        flipped[row, -1] *= -1
        assert objective(u, v, flipped, s, omega, gamma) >= best - 1e-9


def small_database(seed=0, n=80):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, 12)).astype(np.float32)
    text = (rng.random((n, 9)) < 0.3).astype(np.float32)
    graph = SimilarityGraph(joint_embedding(image[:, :8], image[:, 4:]), "union_knn", 8)
    return image, text, graph


def test_fit_returns_exactly_binary_codes_deterministically():
    image, text, graph = small_database()
    config = StudentConfig(bits=8, outer_iterations=3, inner_epochs=1, omega_size=40,
                           batch_size=16, image_hidden=16, text_hidden=16)
    objectives = []
    _, codes = fit(image, text, np.arange(50), graph, config,
                   on_iteration=lambda i, loss, value, s: objectives.append(value))
    _, again = fit(image, text, np.arange(50), graph, config)
    assert codes.shape == (80, 8) and codes.dtype == np.int8
    assert set(np.unique(codes)) <= {-1, 1}
    np.testing.assert_array_equal(codes, again)
    assert len(objectives) == 3 and all(np.isfinite(objectives))
