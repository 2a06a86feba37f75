import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dudch import DudchError, metrics


def reference_average_precision(query, database, query_labels, db_labels, top_k=None):
    """Plain per-query loop: rank by (Hamming distance, database index), precision at each hit."""
    aps = []
    for q, ql in zip(query, query_labels):
        distances = [int((q != b).sum()) for b in database]
        order = sorted(range(len(database)), key=lambda j: (distances[j], j))[:top_k]
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if (ql & db_labels[j]).any():
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions) if precisions else 0.0)
    return float(np.mean(aps))


def random_problem(seed, n_query=17, n_db=53, bits=8, n_labels=5):
    rng = np.random.default_rng(seed)
    codes = lambda n: np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)
    labels = lambda n: (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    return codes(n_query), codes(n_db), labels(n_query), labels(n_db)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k", [None, 1, 10, 50])
def test_map_matches_per_query_reference_with_many_ties(seed, top_k):
    q, b, ql, bl = random_problem(seed)  # 8 bits, 53 items: distances tie heavily
    expected = reference_average_precision(q, b, ql, bl, top_k)
    assert metrics.mean_average_precision(q, b, ql, bl, top_k) == pytest.approx(expected, abs=1e-12)


def test_map_matches_sklearn_on_tie_free_rankings():
    rng = np.random.default_rng(7)
    bits, n_db = 32, 30
    query = np.ones((1, bits), dtype=np.int8)
    database = np.ones((n_db, bits), dtype=np.int8)
    for j, flips in enumerate(rng.permutation(bits + 1)[:n_db]):  # distinct distances
        database[j, :flips] = -1
    db_labels = (rng.random((n_db, 1)) < 0.4).astype(np.uint8)
    query_labels = np.ones((1, 1), dtype=np.uint8)
    distances = (database != query).sum(axis=1)
    expected = average_precision_score(db_labels[:, 0], -distances.astype(float))
    assert metrics.mean_average_precision(query, database, query_labels, db_labels) == pytest.approx(expected)


def test_map_at_k_counts_queries_without_hits_as_zero():
    database = np.array([[1, 1], [-1, -1]], dtype=np.int8)
    queries = np.array([[1, 1], [1, 1]], dtype=np.int8)
    db_labels = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    query_labels = np.array([[1, 0], [0, 1]], dtype=np.uint8)  # the 2nd query's match ranks last
    assert metrics.mean_average_precision(queries, database, query_labels, db_labels, top_k=1) == 0.5
    assert metrics.mean_average_precision(queries, database, query_labels, db_labels) == 0.75


def test_ties_are_broken_by_database_index():
    database = np.ones((3, 4), dtype=np.int8)  # all at distance 0
    query = np.ones((1, 4), dtype=np.int8)
    labels_last_relevant = np.array([[0], [0], [1]], dtype=np.uint8)
    assert metrics.mean_average_precision(query, database, np.ones((1, 1), np.uint8), labels_last_relevant) == pytest.approx(1 / 3)


def test_precision_at_top_and_pr_curve_match_reference():
    q, b, ql, bl = random_problem(3)
    cutoffs = [1, 5, 20, 53]
    relevant = (ql.astype(int) @ bl.T.astype(int)) > 0
    distances = np.array([[int((x != y).sum()) for y in b] for x in q])
    expected_top = []
    for r in cutoffs:
        expected_top.append(np.mean([relevant[i, sorted(range(len(b)), key=lambda j: (distances[i, j], j))[:r]].mean()
                                     for i in range(len(q))]))
    np.testing.assert_allclose(metrics.precision_at_top(q, b, ql, bl, cutoffs), expected_top)
    precision, recall = metrics.precision_recall_curve(q, b, ql, bl)
    for radius in range(q.shape[1] + 1):
        within = distances <= radius
        has = within.sum(1) > 0
        p = np.mean([(relevant[i] & within[i]).sum() / within[i].sum() for i in range(len(q)) if has[i]])
        r = np.mean([(relevant[i] & within[i]).sum() / relevant[i].sum() for i in range(len(q)) if relevant[i].any()])
        assert precision[radius] == pytest.approx(p) and recall[radius] == pytest.approx(r)
    assert recall[-1] == pytest.approx(1.0)


def test_rejects_codes_that_are_not_binary():
    q, b, ql, bl = random_problem(0)
    with pytest.raises(DudchError, match="exactly -1 or \\+1"):
        metrics.mean_average_precision(q * 0.5, b, ql, bl)
    with pytest.raises(DudchError, match="do not match"):
        metrics.mean_average_precision(q[:, :4], b, ql, bl)
