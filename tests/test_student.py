import numpy as np
import pytest

from dudch import DudchError

from dudch.similarity import SimilarityGraph, joint_embedding
from dudch.student import StudentConfig, balance, dcc_sweep, fit, initial_codes, objective


def dcc_problem(seed, n=60, m=20, k=8, gamma=3.0, max_level=1, soft_constraint=False):
    """A random symmetric affinity (levels 0..max_level, mostly 0), Omega, outputs and codes."""
    rng = np.random.default_rng(seed)
    half = np.minimum(rng.geometric(0.7, (n, n)) - 1, max_level)
    levels = np.triu(half) + np.triu(half, 1).T
    omega = np.sort(rng.choice(n, m, replace=False))
    u, v = np.tanh(rng.standard_normal((m, k))), np.tanh(rng.standard_normal((m, k)))
    codes = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    s = levels[omega].astype(np.int8)
    return codes, u, v, s, omega, gamma, balance(s, max_level, soft_constraint)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("max_level,soft_constraint", [(1, False), (1, True), (2, True)])
def test_each_dcc_sweep_does_not_increase_the_objective_and_keeps_codes_binary(seed, max_level, soft_constraint):
    codes, u, v, s, omega, gamma, (scale, offset) = dcc_problem(seed, max_level=max_level,
                                                                soft_constraint=soft_constraint)
    before = objective(u, v, codes, s, omega, gamma, scale, offset)
    for _ in range(3):
        codes = dcc_sweep(codes, u, v, s, omega, gamma, scale, offset)
        after = objective(u, v, codes, s, omega, gamma, scale, offset)
        assert after <= before + 1e-9
        assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
        before = after


@pytest.mark.parametrize("max_level,soft_constraint", [(1, False), (2, True)])
def test_the_last_column_updated_is_an_exact_minimiser(max_level, soft_constraint):
    codes, u, v, s, omega, gamma, (scale, offset) = dcc_problem(42, max_level=max_level,
                                                                soft_constraint=soft_constraint)
    codes = dcc_sweep(codes, u, v, s, omega, gamma, scale, offset)
    best = objective(u, v, codes, s, omega, gamma, scale, offset)
    for row in range(len(codes)):  # J is linear in column k-1 given the rest: no single flip helps
        flipped = codes.copy()
        flipped[row, -1] *= -1
        assert objective(u, v, flipped, s, omega, gamma, scale, offset) >= best - 1e-9


@pytest.mark.parametrize("start", ["random", "zeros"])
def test_dcc_sweep_equals_the_column_update_written_out(start):
    """dcc_sweep reads U^_c^T U_c from one Gram matrix; the same codes as the formula in the
    module docstring, evaluated with B^_c, U^_c, V^_c (column c left out) for every column."""
    codes, u, v, s, omega, gamma, (scale, offset) = dcc_problem(7, max_level=2, soft_constraint=True)
    if start == "zeros":
        codes = np.zeros_like(codes)
    k = codes.shape[1]
    b = codes.astype(np.float64)
    q = -2.0 * k * (scale * s.T.astype(np.float64) + offset) @ (u + v)
    q[omega] -= 2.0 * gamma * (u + v)
    for c in range(k):
        rest = np.arange(k) != c
        argument = 2.0 * b[:, rest] @ (u[:, rest].T @ u[:, c] + v[:, rest].T @ v[:, c]) + q[:, c]
        b[:, c] = np.where(argument > 0, -1, np.where(argument < 0, 1, np.where(b[:, c] == 0, 1, b[:, c])))
    np.testing.assert_array_equal(dcc_sweep(codes, u, v, s, omega, gamma, scale, offset), b)


def test_dcc_from_zero_codes_decides_every_bit():
    codes, u, v, s, omega, gamma, (scale, offset) = dcc_problem(3, soft_constraint=True)
    codes = dcc_sweep(np.zeros_like(codes), u, v, s, omega, gamma, scale, offset)
    assert set(np.unique(codes)) <= {-1, 1}


def test_soft_constraint_balances_similar_and_dissimilar_mass():
    levels = np.array([[2, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=np.int8)  # affinity 1, 1/2, 0
    scale, offset = balance(levels, 2)
    s = scale * levels + offset
    assert s.max() == pytest.approx(1.0) and abs(s.sum()) < 1e-12  # similar +1, total mass 0
    assert balance(levels, 2, soft_constraint=False) == (1.0, -1.0)  # affinity 0..1 -> -1..+1


def test_initial_codes():
    rng = np.random.default_rng(0)
    teacher = np.where(rng.random((5, 4)) < 0.5, -1, 1).astype(np.int8)
    np.testing.assert_array_equal(initial_codes("teacher", 5, 4, rng, teacher), teacher)
    assert not initial_codes("zeros", 5, 4, rng).any()
    assert set(np.unique(initial_codes("random", 5, 4, rng))) == {-1, 1}
    for init, codes in (("teacher", None), ("teacher", teacher[:, :2]), ("best", None)):
        with pytest.raises(DudchError):
            initial_codes(init, 5, 4, rng, codes)


def small_database(seed=0, n=80):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, 12)).astype(np.float32)
    text = (rng.random((n, 9)) < 0.3).astype(np.float32)
    z = joint_embedding(image[:, :8], image[:, 4:])
    graph = SimilarityGraph(z, "graded", 8, teacher_codes=np.where(z >= 0, 1, -1).astype(np.int8))
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
