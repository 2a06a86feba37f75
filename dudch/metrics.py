"""Stage 5: retrieval metrics over binary codes.

Conventions (identical in every function here):
- codes are {-1, +1} arrays (n, k); Hamming distance d = (k - q . b) / 2;
- the database is ranked by d ascending, ties broken by database index (a stable sort), so
  results never depend on the sort algorithm;
- a database item is relevant to a query when their multi-hot label rows share a label;
- AP of a query = mean, over the relevant items retrieved, of the precision at their ranks;
  mAP@K averages over ALL queries, a query with no relevant item in its top K adding 0
  (DJSRH's calc_map_k); mAP@all is mAP@K with K = the database size.
Queries are processed in blocks, and distances are small integers (uint8 for k <= 255), for
which numpy's stable argsort is a radix sort: linear in the database size.
"""

import numpy as np

from dudch import DudchError


def _check(query_codes, db_codes, query_labels, db_labels):
    q, b = np.asarray(query_codes), np.asarray(db_codes)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1]:
        raise DudchError(f"code shapes {q.shape} and {b.shape} do not match (queries x bits, "
                         f"database x bits); evaluate codes of the same length")
    if not (np.isin(q, (-1, 1)).all() and np.isin(b, (-1, 1)).all()):
        raise DudchError("codes must be exactly -1 or +1; binarise them with sign() first")
    if len(query_labels) != len(q) or len(db_labels) != len(b):
        raise DudchError(f"{len(query_labels)} query label rows for {len(q)} queries, "
                         f"{len(db_labels)} for {len(b)} database items; pass matching labels")
    return q.astype(np.float32), b.astype(np.float32)


def hamming_distances(query_codes, db_codes):
    """uint8 (or uint16 beyond 255 bits) array (n_query, n_db) of Hamming distances."""
    k = query_codes.shape[1]
    d = (k - np.asarray(query_codes, np.float32) @ np.asarray(db_codes, np.float32).T) / 2
    return np.rint(d).astype(np.uint8 if k <= 255 else np.uint16)


def _ranked_blocks(query_codes, db_codes, query_labels, db_labels, block=256):
    """Yield (distances sorted, relevance in rank order) for blocks of queries."""
    q, b = _check(query_codes, db_codes, query_labels, db_labels)
    ql, dl = np.asarray(query_labels, np.float32), np.asarray(db_labels, np.float32)
    for start in range(0, len(q), block):
        d = hamming_distances(q[start:start + block], b)
        order = np.argsort(d, axis=1, kind="stable")
        relevant = (ql[start:start + block] @ dl.T) > 0
        yield np.take_along_axis(d, order, axis=1), np.take_along_axis(relevant, order, axis=1)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=None):
    """mAP@top_k (top_k None: the whole database). Returns a float in [0, 1]."""
    total, count = 0.0, 0
    for _, relevant in _ranked_blocks(query_codes, db_codes, query_labels, db_labels):
        relevant = relevant[:, :top_k] if top_k else relevant
        hits = np.cumsum(relevant, axis=1)
        precision = hits / np.arange(1, relevant.shape[1] + 1)
        n_relevant = relevant.sum(axis=1)
        ap = np.where(n_relevant > 0, (precision * relevant).sum(axis=1) / np.maximum(n_relevant, 1), 0.0)
        total += ap.sum()
        count += len(ap)
    return total / count


def precision_at_top(query_codes, db_codes, query_labels, db_labels, cutoffs):
    """Mean precision of the top R items for each R in `cutoffs`; float64 array (len(cutoffs),)."""
    cutoffs = np.asarray(cutoffs)
    sums, count = np.zeros(len(cutoffs)), 0
    for _, relevant in _ranked_blocks(query_codes, db_codes, query_labels, db_labels):
        hits = np.cumsum(relevant, axis=1)
        sums += (hits[:, np.minimum(cutoffs, relevant.shape[1]) - 1] / np.minimum(cutoffs, relevant.shape[1])).sum(axis=0)
        count += len(relevant)
    return sums / count


def precision_recall_curve(query_codes, db_codes, query_labels, db_labels):
    """Precision and recall of retrieving all items within Hamming radius r, r = 0..k.

    Returns (precision, recall), float64 arrays (k + 1,), each averaged over the queries for
    which it is defined (precision: at least one item retrieved; recall: at least one relevant).
    """
    k = np.shape(query_codes)[1]
    p_sum, p_n, r_sum, r_n = np.zeros(k + 1), np.zeros(k + 1), np.zeros(k + 1), 0
    for distances, relevant in _ranked_blocks(query_codes, db_codes, query_labels, db_labels):
        for row_d, row_rel in zip(distances, relevant):
            retrieved = np.cumsum(np.bincount(row_d, minlength=k + 1))
            hits = np.cumsum(np.bincount(row_d, weights=row_rel, minlength=k + 1))
            defined = retrieved > 0
            p_sum[defined] += hits[defined] / retrieved[defined]
            p_n += defined
            if row_rel.any():
                r_sum += hits / row_rel.sum()
                r_n += 1
    return p_sum / np.maximum(p_n, 1), r_sum / max(r_n, 1)
