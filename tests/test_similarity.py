import numpy as np
import pytest

from dudch import DudchError
from dudch.similarity import RULES, SimilarityGraph, joint_embedding


def teacher_like_outputs(n=97, k=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_joint_embedding_reproduces_the_mean_of_four_cosines():
    h_i, h_t = teacher_like_outputs()
    z = joint_embedding(h_i, h_t)
    expected = (cosine(h_i, h_i) + cosine(h_t, h_t) + cosine(h_i, h_t) + cosine(h_t, h_i)) / 4
    np.testing.assert_allclose(z @ z.T, expected, atol=1e-5)


@pytest.mark.parametrize("rule,parameter", [("mutual_knn", 10), ("union_knn", 10), ("quantile", 0.1),
                                            ("graded", 10)])
def test_similarity_is_symmetric_and_independent_of_chunking(rule, parameter):
    z = joint_embedding(*teacher_like_outputs())
    graph = SimilarityGraph(z, rule, parameter, chunk_rows=7)
    s = graph.rows(np.arange(len(z)))
    assert s.dtype == np.int8 and set(np.unique(s)) == set(range(graph.levels + 1))
    np.testing.assert_array_equal(s, s.T)
    whole = SimilarityGraph(z, rule, parameter, chunk_rows=10_000).rows(np.arange(len(z)))
    np.testing.assert_array_equal(s, whole)


def test_knn_rules_bound_each_row_by_k():
    z = joint_embedding(*teacher_like_outputs())
    mutual = SimilarityGraph(z, "mutual_knn", 10).rows(np.arange(len(z))) > 0
    union = SimilarityGraph(z, "union_knn", 10).rows(np.arange(len(z))) > 0
    assert (mutual.sum(1) <= 10).all() and (union.sum(1) >= 10).all()
    assert (mutual <= union).all()


def test_graded_levels_are_neighbours_over_the_related_quantile():
    z = joint_embedding(*teacher_like_outputs())
    everything = np.arange(len(z))
    graded = SimilarityGraph(z, "graded", 10, related_fraction=0.3).rows(everything)
    union = SimilarityGraph(z, "union_knn", 10).rows(everything)
    related = SimilarityGraph(z, "quantile", 0.3).rows(everything)
    np.testing.assert_array_equal(graded, union + related)
    assert 0.25 < (graded >= 1).mean() < 0.45  # the quantile's 30%, plus neighbours below it


def test_rows_of_a_subset_equal_the_full_matrix_rows():
    z = joint_embedding(*teacher_like_outputs())
    graph = SimilarityGraph(z, "mutual_knn", 10, chunk_rows=5)
    subset = np.array([3, 50, 96, 0])
    np.testing.assert_array_equal(graph.rows(subset), graph.rows(np.arange(len(z)))[subset])


def test_save_and_load_round_trip(tmp_path):
    z = joint_embedding(*teacher_like_outputs())
    codes = np.where(z >= 0, 1, -1).astype(np.int8)
    graph = SimilarityGraph(z, "graded", 7, related_fraction=0.25, teacher_codes=codes)
    graph.save(tmp_path / "graph.npz")
    loaded = SimilarityGraph.load(tmp_path / "graph.npz")
    np.testing.assert_array_equal(loaded.rows(np.arange(20)), graph.rows(np.arange(20)))
    np.testing.assert_array_equal(loaded.teacher_codes, codes)
    assert loaded.levels == 2 and loaded.density() == graph.density()


def test_bad_parameters_are_refused():
    z = joint_embedding(*teacher_like_outputs())
    for rule, parameter, related in (("nearest", 5, 0.2), ("mutual_knn", 0, 0.2), ("quantile", 1.5, 0.2),
                                     ("graded", 5, 0.0), ("graded", 5, 1.0)):
        with pytest.raises(DudchError):
            SimilarityGraph(z, rule, parameter, related_fraction=related)
    assert set(RULES) == {"mutual_knn", "union_knn", "quantile", "graded"}
