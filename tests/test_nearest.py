"""The one nearest-row search (featurekit.heads.nearest) of the kNN head, neighbors and the audit,
against brute force on rows read from several parts (splits joined end to end, blocks across their borders)."""

import numpy as np
import pytest

from featurekit.auditing.approximate import faiss_available, ivf_pairs
from featurekit.heads.nearest import Rows, all_pairs, rescore, top_k, unit_rows


def brute(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    U = unit_rows(X).astype(np.float64)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, idx, 1), idx


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1100, 24)).astype(np.float16)  # float16 rows, as stores hold them
    X[1000:1050] = X[:50] + (0.03 * rng.standard_normal((50, 24))).astype(np.float16)  # 50 planted copies
    return X


@pytest.mark.parametrize("block, panel", [(128, 256), (256, None), (100, 300), (2048, None)])
def test_blockwise_all_pairs_equals_brute_force(data, block, panel):
    sim, idx = brute(data, 6)
    found = all_pairs(Rows([data[:333], data[333:800], data[800:]]), 6, block=block, panel_rows=panel,
                      precision="fp32")
    assert np.abs(found.sim - sim).max() < 1e-5
    assert (found.idx == idx).mean() > 0.999  # ties aside
    assert (found.idx != np.arange(len(data))[:, None]).all()  # never a row with itself


def test_bf16_products_keep_clear_neighbours_and_rescoring_is_exact(data):
    sim, _ = brute(data, 3)
    found = all_pairs(Rows(data), 3, block=256, precision="bf16")
    assert np.abs(found.sim - sim).max() < 5e-3
    assert (found.idx[1000:1050, 0] == np.arange(50)).all() and (found.idx[:50, 0] == np.arange(1000, 1050)).all()
    pairs = np.array([[0, 1000], [3, 7]])
    U = unit_rows(data)
    np.testing.assert_allclose(rescore(Rows(data), pairs), [U[0] @ U[1000], U[3] @ U[7]], atol=1e-6)


def test_a_threshold_keeps_every_pair_above_it(data):
    sim, idx = brute(data, 5)
    found = all_pairs(Rows(data), 5, block=200, threshold=0.95)
    want = {(min(i, j), max(i, j)) for i in range(len(data)) for s, j in zip(sim[i], idx[i]) if s >= 0.95}
    got = {(min(i, j), max(i, j)) for i in range(len(data)) for s, j in zip(found.sim[i], found.idx[i])
           if j >= 0 and s >= 0.95}
    assert want == got and len(want) == 50


def test_queries_exclude_themselves_and_keep_to_the_allowed_rows(data):
    rows = Rows(data)
    found = top_k(rows.take([1000, 5]), rows, 2, exclude=np.array([1000, 5]), allowed=(0, 900), block=128)
    assert found.idx[0, 0] == 0 and (found.idx < 900).all() and 5 not in found.idx[1]
    exact = top_k(data[:7].astype(np.float32), data, 4, precision="fp64", block=97, query_block=3)
    assert exact.sim.dtype == np.float64 and (exact.idx[:, 0] == np.arange(7)).all()  # each query's own row first


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_the_approximate_inverted_file_finds_the_planted_copies(data):
    found = ivf_pairs(Rows(data), 3, unit_rows, nprobe=4)
    assert (found.idx[1000:1050, 0] == np.arange(50)).mean() >= 0.9
