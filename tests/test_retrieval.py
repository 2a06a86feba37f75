import hashlib

import numpy as np
import pytest

from dudch import DudchError, nets
from dudch.retrieval import HammingIndex, agreement, hamming_ranking, pack, unpack


def codes(n, bits, seed):
    return np.where(np.random.default_rng(seed).random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def test_pack_round_trip_is_bit_packed():
    c = codes(50, 24, 0)
    assert pack(c).shape == (50, 3) and pack(c).dtype == np.uint8
    np.testing.assert_array_equal(unpack(pack(c), 24), c)


@pytest.mark.parametrize("bits", [8, 16, 64])
def test_exact_index_equals_brute_force_even_with_many_ties(bits):
    database, queries = codes(3000, bits, 1), codes(40, bits, 2)
    distances, rows = HammingIndex(pack(database), bits).search(queries, 25)
    expected_d, expected_r = hamming_ranking(queries, database, 25)
    np.testing.assert_array_equal(distances, expected_d)
    np.testing.assert_array_equal(rows, expected_r)


def test_continuous_queries_order_items_as_near_by_their_agreement_then_by_row():
    database = codes(3000, 16, 7)
    outputs = np.tanh(np.random.default_rng(8).normal(size=(30, 16)))
    distances, rows = HammingIndex(pack(database), 16).search(outputs, 200)
    expected_d, expected_r = hamming_ranking(outputs, database, 200)
    np.testing.assert_array_equal(distances, expected_d)
    np.testing.assert_array_equal(rows, expected_r)
    for query, d, r in zip(outputs, distances, rows):
        assert (np.diff(d) >= 0).all()
        score = agreement(query, database[r])
        same = d[1:] == d[:-1]
        assert (score[1:][same] <= score[:-1][same]).all()
        equal = same & (score[1:] == score[:-1])  # equal codes: by row
        assert (r[1:][equal] > r[:-1][equal]).all()
    # The agreement is what decides between two codes at one distance: the bit where the query
    # is least sure is the one to differ on.
    query = np.array([0.9, 0.1, 0.8, 0.7])
    pair = np.array([[1, 1, -1, 1], [1, -1, 1, 1]], dtype=np.int8)  # both at distance 1
    assert HammingIndex(pack(pair), 4).search(query[None], 2)[1].tolist() == [[1, 0]]
    assert HammingIndex(pack(pair), 4).search(nets.sign(query)[None], 2)[1].tolist() == [[0, 1]]


def test_hnsw_index_finds_near_neighbours():
    database = codes(2000, 64, 3)
    distances, rows = HammingIndex(pack(database), 64, method="hnsw").search(database[:20], 5)
    assert (rows[:, 0] == np.arange(20)).mean() >= 0.9 and (distances[:, 0] == 0).mean() >= 0.9
    with pytest.raises(DudchError, match="unknown index"):
        HammingIndex(pack(database), 64, method="lsh")


def test_count_at_counts_every_item_at_a_distance():
    database, query = codes(500, 16, 4), codes(1, 16, 5)
    index = HammingIndex(pack(database), 16)
    distances = hamming_ranking(query, database, 500)[0][0]
    for d in range(17):
        assert index.count_at(pack(query)[0], d) == (distances == d).sum()


def test_warnings_name_unknown_words_and_ties_at_the_cut_off():
    from dudch.retrieval import Retriever

    database = np.repeat(codes(3, 8, 6), 10, axis=0)  # 30 items, 10 of each code: big ties
    retriever = Retriever(None, {"text": {"kind": "bow", "vocabulary": ["cat", "dog"]}}, pack(database), 8,
                          np.arange(30).astype(str), ["t"] * 30)
    query = database[0]
    distances, _ = retriever.search(query[None], 4)
    note = retriever.warnings(query, distances[0], "cat owl night")
    assert note == ("not in the model's vocabulary of 2 words, ignored: owl, night; 10 items tie at the "
                    "cut-off distance 0; the results keep the 4 of them that agree most with the query before rounding")
    assert retriever.warnings(query, [], "owl").startswith("no query word is in the model's vocabulary")
    assert retriever.warnings(query, distances[0][:0], "cat dog") == ""


def test_exact_matches_come_first_ranked_by_their_codes_with_their_own_distances(tmp_path):
    from dudch.retrieval import Retriever

    database = codes(6, 8, 3)
    drawing = tmp_path / "cat.svg"
    drawing.write_bytes(b"<svg/>")
    digest = hashlib.sha256(b"<svg/>").hexdigest()
    retriever = Retriever(None, {}, pack(database), 8, np.array(list("abcdef")),
                          ["Cat,  sofa", "dog", "cat, sofa", " ", "cat sofa", ""],
                          ["", digest, "", "", "", digest])
    assert [r.tolist() for r in retriever.exact_matches(texts=["cat, SOFA", "fish", ""])] == [[0, 2], [], []]
    assert [r.tolist() for r in retriever.exact_matches(images=[drawing, b"<svg/>", b"other"])] == [[1, 5], [1, 5], []]
    query = -database[4].astype(np.float64)  # the farthest from item e
    plain_d, plain = retriever.search(query[None], 6)
    distances, rows = retriever.search(query[None], 4, first=[np.array([1, 4])])
    assert rows[0].tolist() == [1, 4] + [r for r in plain[0].tolist() if r not in (4, 1)][:2]  # b nearer than e
    assert distances[0].tolist()[:2] == [(8 - int(database[1] @ np.sign(query))) // 2, 8]
    assert distances[0].tolist()[2:] == [d for d, r in zip(plain_d[0].tolist(), plain[0].tolist()) if r not in (4, 1)][:2]
    _, reordered = retriever.search(query[None], 1, first=[np.array([4, 1])])
    assert reordered.tolist() == [[1]]  # the exact matches ranked among themselves, then cut at k
    with pytest.raises(DudchError, match="exactly one of"):
        retriever.exact_matches()
