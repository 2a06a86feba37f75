"""Stage 5: retrieval metrics over binary codes.

Conventions (identical in every function here):
- codes are {-1, +1} arrays (n, k); Hamming distance d = (k - q . b) / 2;
- the database is ranked by d ascending, ties broken by database index (a stable order), so
  results never depend on a sort algorithm;
- a database item is relevant to a query when their multi-hot label rows share a label;
- AP of a query = mean, over the relevant items retrieved, of the precision at their ranks;
  mAP@K averages over ALL queries, a query with no relevant item in its top K adding 0
  (DJSRH's `calculate_top_map`, whose AP@K divides by the relevant items found in the top K);
  mAP@all is mAP@K with K = the database size.

How: codes and labels are packed into 64-bit words; a compiled kernel (numba) takes each query
in two linear passes over the database, with no sort. Pass 1 computes every distance (XOR and
popcount), relevance (AND of label masks) and the number of items and of relevant items at
each distance. Pass 2 walks the database in index order keeping, per distance, how many items
have been seen: item j at distance d then has rank (items closer than d) + (items at d up to
j), which is exactly its rank in the stable order. So the cost per query is O(n), against
O(n log n) for sorting each query's distances.
"""

import numba
import numpy as np

from dudch import DudchError


def _pack(rows):
    """Boolean rows (n, b) -> uint64 words (n, ceil(b / 64)), bit i of row r at word i // 64."""
    rows = np.ascontiguousarray(rows, dtype=bool)
    packed = np.packbits(rows, axis=1, bitorder="little")
    padded = np.zeros((len(rows), -(-packed.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view(np.uint64)


@numba.njit(inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(parallel=True, cache=True)
def _rank_statistics(query_bits, db_bits, query_masks, db_masks, bits, top_k, cutoffs):
    n_query, n = len(query_bits), len(db_bits)
    ap_all, ap_top = np.zeros(n_query), np.zeros(n_query)
    hits_at = np.zeros((n_query, len(cutoffs)), dtype=np.int64)
    at_distance = np.zeros((n_query, bits + 1), dtype=np.int64)
    relevant_at_distance = np.zeros((n_query, bits + 1), dtype=np.int64)
    for i in numba.prange(n_query):
        q_bits, q_mask = query_bits[i].copy(), query_masks[i].copy()
        distance = np.empty(n, dtype=np.int16)  # small: a query's state stays in cache
        relevant = np.empty(n, dtype=np.bool_)
        count = np.zeros(bits + 1, dtype=np.int64)
        count_relevant = np.zeros(bits + 1, dtype=np.int64)
        for j in range(n):
            d = 0
            for w in range(len(q_bits)):
                d += _popcount(q_bits[w] ^ db_bits[j, w])
            r = False
            for w in range(len(q_mask)):
                r = r or (q_mask[w] & db_masks[j, w]) != 0
            distance[j] = d
            relevant[j] = r
            count[d] += 1
            count_relevant[d] += r
        seen = np.zeros(bits + 1, dtype=np.int64)  # items ranked before distance d, then running
        seen_relevant = np.zeros(bits + 1, dtype=np.int64)
        for d in range(1, bits + 1):
            seen[d] = seen[d - 1] + count[d - 1]
            seen_relevant[d] = seen_relevant[d - 1] + count_relevant[d - 1]
        total_all, total_top, count_top = 0.0, 0.0, 0
        for j in range(n):
            d = distance[j]
            seen[d] += 1
            if relevant[j]:
                seen_relevant[d] += 1
                rank, hits = seen[d], seen_relevant[d]
                total_all += hits / rank
                if rank <= top_k:
                    total_top += hits / rank
                    count_top += 1
                for c in range(len(cutoffs)):
                    if rank <= cutoffs[c]:
                        hits_at[i, c] += 1
        n_relevant = count_relevant.sum()
        ap_all[i] = total_all / n_relevant if n_relevant else 0.0
        ap_top[i] = total_top / count_top if count_top else 0.0
        at_distance[i] = count
        relevant_at_distance[i] = count_relevant
    return ap_all, ap_top, hits_at, at_distance, relevant_at_distance


def rank_statistics(query_codes, db_codes, query_labels, db_labels, top_k=None, cutoffs=()):
    """Per-query statistics of the ranking, from one pass of the kernel.

    Returns a dict: ap_all, ap_top (AP over the top_k, float64 (n_query,)); hits_at (relevant
    items within the first R ranks, int64 (n_query, len(cutoffs))); at_distance and
    relevant_at_distance (items and relevant items at each Hamming distance 0..k, int64
    (n_query, k + 1)).
    """
    q, b = np.asarray(query_codes), np.asarray(db_codes)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1]:
        raise DudchError(f"code shapes {q.shape} and {b.shape} do not match (queries x bits, "
                         f"database x bits); evaluate codes of the same length")
    if not (np.isin(q, (-1, 1)).all() and np.isin(b, (-1, 1)).all()):
        raise DudchError("codes must be exactly -1 or +1; binarise them with sign() first")
    if len(query_labels) != len(q) or len(db_labels) != len(b):
        raise DudchError(f"{len(query_labels)} query label rows for {len(q)} queries, "
                         f"{len(db_labels)} for {len(b)} database items; pass matching labels")
    ap_all, ap_top, hits_at, at_d, rel_at_d = _rank_statistics(
        _pack(q > 0), _pack(b > 0), _pack(np.asarray(query_labels) > 0), _pack(np.asarray(db_labels) > 0),
        q.shape[1], top_k or len(b), np.asarray(cutoffs, dtype=np.int64))
    return dict(ap_all=ap_all, ap_top=ap_top, hits_at=hits_at, at_distance=at_d, relevant_at_distance=rel_at_d)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=None):
    """mAP@top_k (top_k None: the whole database). Returns a float in [0, 1]."""
    stats = rank_statistics(query_codes, db_codes, query_labels, db_labels, top_k)
    return float((stats["ap_top"] if top_k else stats["ap_all"]).mean())


def precision_at_top(query_codes, db_codes, query_labels, db_labels, cutoffs):
    """Mean precision of the top R items for each R in `cutoffs`; float64 array (len(cutoffs),)."""
    stats = rank_statistics(query_codes, db_codes, query_labels, db_labels, cutoffs=cutoffs)
    return precision_at(stats, cutoffs, len(db_codes))


def precision_at(stats, cutoffs, n_db):
    return (stats["hits_at"] / np.minimum(np.asarray(cutoffs), n_db)).mean(axis=0)


def precision_recall_curve(query_codes, db_codes, query_labels, db_labels):
    """Precision and recall of retrieving all items within Hamming radius r, r = 0..k.

    Returns (precision, recall), float64 arrays (k + 1,), each averaged over the queries for
    which it is defined (precision: at least one item retrieved; recall: at least one relevant).
    """
    return precision_recall(rank_statistics(query_codes, db_codes, query_labels, db_labels))


def precision_recall(stats):
    retrieved = np.cumsum(stats["at_distance"], axis=1)
    hits = np.cumsum(stats["relevant_at_distance"], axis=1)
    relevant = hits[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(retrieved > 0, hits / retrieved, np.nan)
        recall = np.where(relevant > 0, hits / relevant, np.nan)
    return np.nan_to_num(np.nanmean(precision, axis=0)), np.nan_to_num(np.nanmean(recall, axis=0))
