"""The nearest-neighbour index: exact where it says so, close to exact where not."""
import numpy as np
import pytest

from zoolib import ann

faiss = pytest.importorskip("faiss")


def _vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _brute(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = ann.normalise(queries) @ ann.normalise(base).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_small_sets_get_the_exact_nearest_neighbours():
    base, queries = _vectors(500), _vectors(20, seed=1)
    index = ann.Index.build(lambda: np.array_split(base, 7), len(base), base.shape[1])
    sims, ids = index.search(queries, 5)
    assert index.exact and index.ntotal == 500
    np.testing.assert_array_equal(ids, _brute(base, queries, 5))
    expect = np.take_along_axis(ann.normalise(queries) @ ann.normalise(base).T, ids, axis=1)
    np.testing.assert_allclose(sims, expect, atol=1e-5)


def test_large_sets_use_an_inverted_file_that_finds_most_true_neighbours():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32))
    base = (centres[rng.integers(0, 40, 6000)] + 0.3 * rng.normal(size=(6000, 32)))
    base = base.astype(np.float32)
    queries = base[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    for compressed in (False, True):
        index = ann.Index.build(lambda: np.array_split(base, 4), len(base), 32,
                                compressed=compressed, exact_max=1000)
        assert not index.exact and index.ntotal == 6000
        _, ids = index.search(queries, 10)
        truth = _brute(base, queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall > (0.9 if not compressed else 0.8), (compressed, recall)


def test_near_pairs_equal_a_full_scan():
    base = _vectors(300)
    base[150:160] = base[:10] + 0.01  # ten near copies
    a, b, s = ann.near_pairs(base, 0.97)
    sims = ann.normalise(base) @ ann.normalise(base).T
    want = {(i, j) for i, j in zip(*np.nonzero(sims >= 0.97)) if i < j}
    assert set(zip(a.tolist(), b.tolist())) == want and len(want) == 10
    np.testing.assert_allclose(s, sims[a, b], atol=1e-5)
    # the inverted file finds the same near copies
    a2, b2, _ = ann.near_pairs(base, 0.97, exact_max=100)
    assert set(zip(a2.tolist(), b2.tolist())) == want


def test_an_index_saved_and_loaded_answers_the_same(tmp_path):
    base = _vectors(200)
    index = ann.Index.build(lambda: [base], 200, 32)
    index.save(tmp_path / "i.faiss")
    again = ann.Index.load(tmp_path / "i.faiss")
    np.testing.assert_array_equal(again.search(base[:3], 4)[1], index.search(base[:3], 4)[1])


def test_fewer_vectors_than_asked_for():
    index = ann.Index.build(lambda: [_vectors(3)], 3, 32)
    sims, ids = index.search(_vectors(1), 10)
    assert ids.shape == (1, 3)
    assert ann.near_pairs(_vectors(1), 0.5)[0].size == 0
