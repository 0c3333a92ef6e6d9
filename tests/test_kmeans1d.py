"""Tests of qpack.kmeans1d: quality against scikit-learn, exactness, determinism, edge cases.

No timing assertions here; speed is measured by tests/benchmarks/bench_kmeans1d.py.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpack import kmeans1d
from qpack.errors import InputError
from qpack.kmeans1d import assign, fit_codebook, sse

KS = [2, 3, 8, 16, 256]


def _data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "laplace":
        return rng.laplace(0.0, 0.02, n).astype(np.float32)
    if kind == "gauss":
        return rng.normal(1.0, 3.0, n).astype(np.float32)
    if kind == "bimodal":
        half = n // 2
        return np.concatenate(
            [rng.normal(-1, 0.1, half), rng.normal(2, 0.3, n - half)]
        ).astype(np.float32)
    if kind == "duplicates":  # 1/8 steps: a few dozen distinct values, many repeats
        return (np.round(rng.normal(0.0, 1.0, n) * 8) / 8).astype(np.float32)
    if kind == "outliers":  # a tight bulk and a few far values
        return np.concatenate(
            [rng.normal(0, 0.01, n - 20), rng.uniform(5, 50, 20)]
        ).astype(np.float32)
    raise AssertionError(kind)


def _sklearn_sse(values: np.ndarray, k: int) -> float:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when distinct values < k
        km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(values.reshape(-1, 1))
    return sse(values, np.sort(km.cluster_centers_.ravel()))


def _heuristic_codebook(values: np.ndarray, k: int) -> np.ndarray:
    """fit_codebook, but forced onto the multi-start Lloyd + polish path."""
    x, w, n_distinct = kmeans1d._sorted_points(values)
    if n_distinct <= k:
        return kmeans1d._distinct_float32(x)
    x, w = kmeans1d._compress(x, w, k)
    bounds = kmeans1d._solve(x, w, k, 300, method="lloyd")
    return kmeans1d._to_codebook(kmeans1d._segment_means(x, w, bounds))


def _brute_optimum(values: np.ndarray, k: int) -> float:
    """Least SSE over all partitions of the sorted values into at most k contiguous runs."""
    x = np.sort(values.astype(np.float64))
    best = np.inf
    for parts in range(1, min(k, x.size) + 1):
        for cuts in itertools.combinations(range(1, x.size), parts - 1):
            err = sum(float(np.sum((r - r.mean()) ** 2)) for r in np.split(x, cuts))
            best = min(best, err)
    return best


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize(
    "kind", ["laplace", "gauss", "bimodal", "duplicates", "outliers"]
)
def test_no_worse_than_sklearn(kind: str, k: int) -> None:
    values = _data(kind, 2000, seed=k)
    book = fit_codebook(values, k)
    assert sse(values, book) <= 1.005 * _sklearn_sse(values, k)


@pytest.mark.parametrize("k", [8, 256])
@pytest.mark.parametrize("kind", ["laplace", "bimodal", "outliers"])
def test_heuristic_path_no_worse_than_sklearn(kind: str, k: int) -> None:
    values = _data(kind, 20000, seed=7)
    book = _heuristic_codebook(values, k)
    assert book.size == k
    assert sse(values, book) <= 1.005 * _sklearn_sse(values, k)


@pytest.mark.parametrize("k", [3, 16, 256])
def test_heuristic_path_close_to_exact_on_small_data(k: int) -> None:
    values = _data("laplace", 1500, seed=3)
    x = np.sort(values).astype(np.float64)
    bounds = kmeans1d._solve(x, None, k, 300, method="dp")
    exact = kmeans1d._to_codebook(kmeans1d._segment_means(x, None, bounds))
    assert sse(values, _heuristic_codebook(values, k)) <= 1.08 * sse(values, exact)


def test_dynamic_program_is_exact() -> None:
    rng = np.random.default_rng(11)
    for trial in range(40):
        n = int(rng.integers(4, 11))
        k = int(rng.integers(2, 5))
        values = np.round(rng.normal(0, 2, n), 1).astype(np.float32)
        if np.unique(values).size <= k:
            continue
        x, w, _ = kmeans1d._sorted_points(values)
        x, w = kmeans1d._compress(x, w, k)
        bounds = kmeans1d._solve(x, w, k, 300, method="dp")
        got = kmeans1d._partition_sse(kmeans1d._Prefix(x, w), bounds)
        assert got <= _brute_optimum(values, k) * (1 + 1e-9) + 1e-12, (trial, values, k)


def test_dynamic_program_matches_quadratic_reference() -> None:
    """Divide-and-conquer and band layers against a plain O(k n^2) dynamic program."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        m = int(rng.integers(5, 70))
        k = int(rng.integers(2, min(m, 14)))
        x = np.unique(rng.laplace(size=m) if trial % 2 else rng.normal(size=m))
        w = rng.integers(1, 6, x.size).astype(np.float64)
        pre = kmeans1d._Prefix(x, w)
        got = kmeans1d._partition_sse(pre, kmeans1d._dp_partition(pre, k))
        table = np.full((k + 1, x.size + 1), np.inf)
        table[0, 0] = 0.0
        for j in range(1, k + 1):
            for i in range(j, x.size + 1):
                t = np.arange(j - 1, i)
                table[j, i] = np.min(table[j - 1, t] + pre.cost(t, np.full(t.size, i)))
        assert got <= table[k, x.size] * (1 + 1e-9) + 1e-12, (trial, m, k)


def test_compressed_path_close_to_uncompressed(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _data("laplace", 60000, seed=2)
    full = fit_codebook(values, 16)
    monkeypatch.setattr(kmeans1d, "_MAX_POINTS", 4096)  # merge runs of ~15 values
    merged = fit_codebook(values, 16)
    assert merged.size == 16
    assert sse(values, merged) <= 1.001 * sse(values, full)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-50, 50), min_size=1, max_size=9),
    k=st.integers(1, 4),
)
def test_optimal_on_tiny_inputs(values: list[int], k: int) -> None:
    arr = np.array(values, dtype=np.float32) / 4
    book = fit_codebook(arr, k)
    assert 1 <= book.size <= k
    assert sse(arr, book) <= _brute_optimum(arr, k) * (1 + 1e-6) + 1e-9


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("k", [1, 2, 8, 256, 1000])
def test_output_form(k: int) -> None:
    values = _data("gauss", 3000, seed=1).reshape(30, 100)
    book = fit_codebook(values, k)
    assert book.dtype == np.float32 and book.ndim == 1
    assert 1 <= book.size <= k
    assert np.all(np.diff(book) > 0)


def test_deterministic_and_order_free() -> None:
    values = _data("laplace", 50000, seed=4)
    for k in (8, 256):
        first = fit_codebook(values, k)
        assert fit_codebook(values, k).tobytes() == first.tobytes()
        shuffled = np.random.default_rng(0).permutation(values).reshape(250, 200)
        assert fit_codebook(shuffled, k).tobytes() == first.tobytes()


def test_few_distinct_values_come_back_exactly() -> None:
    values = np.array([0.5, -1.25, 3.0, 0.5, 3.0, 3.0, 1e-7], dtype=np.float32)
    book = fit_codebook(values, 4)
    assert (
        book.tobytes() == np.array([-1.25, 1e-7, 0.5, 3.0], dtype=np.float32).tobytes()
    )
    assert sse(values, book) == 0.0
    assert fit_codebook(values, 256).tobytes() == book.tobytes()


def test_duplicates_at_k_distinct() -> None:
    values = _data("duplicates", 5000, seed=0)
    distinct = np.unique(values) + np.float32(0.0)  # rounding made some -0.0
    assert fit_codebook(values, distinct.size).tobytes() == distinct.tobytes()
    smaller = fit_codebook(values, distinct.size - 1)
    assert smaller.size == distinct.size - 1 and sse(values, smaller) > 0


def test_negative_zero_is_zero() -> None:
    book = fit_codebook(np.array([-0.0, 0.0, 1.0], dtype=np.float32), 2)
    assert book.tobytes() == np.array([0.0, 1.0], dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, np.int8, np.int64]
)
def test_constant_input(dtype: type) -> None:
    values = np.full((7, 3), 3, dtype=dtype)
    assert (
        fit_codebook(values, 8).tobytes() == np.array([3.0], dtype=np.float32).tobytes()
    )
    assert (
        fit_codebook(values, 1).tobytes() == np.array([3.0], dtype=np.float32).tobytes()
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_k1_is_the_mean(dtype: type) -> None:
    values = (np.random.default_rng(3).normal(0.3, 1.0, 10001)).astype(dtype)
    book = fit_codebook(values, 1)
    mean = np.float32(np.mean(values.astype(np.float64)))
    assert book.shape == (1,)
    assert (
        abs(int(book.view(np.int32)[0]) - int(np.array([mean]).view(np.int32)[0])) <= 1
    )


def test_float64_and_integer_inputs() -> None:
    values = np.random.default_rng(8).normal(size=4000)
    book = fit_codebook(values, 8)
    assert sse(values, book) <= 1.005 * _sklearn_sse(values, 8)
    ints = np.random.default_rng(8).integers(-100, 100, 4000)
    assert (
        fit_codebook(ints, 256).tobytes()
        == np.unique(ints).astype(np.float32).tobytes()
    )


def test_max_iter_is_respected_and_checked() -> None:
    values = _data("laplace", 20000, seed=9)
    assert fit_codebook(values, 16, max_iter=1).size == 16
    with pytest.raises(ValueError):
        fit_codebook(values, 16, max_iter=0)


@pytest.mark.parametrize(
    "values",
    [
        np.array([], dtype=np.float32),
        np.array([1.0, np.nan, 2.0]),
        np.array([np.nan]),
        np.array([1.0, np.inf]),
        np.array([-np.inf, 0.0]),
        np.array([1e300, 0.0]),
        np.array([1 + 2j, 0]),
        np.array(["a", "b"]),
        np.array([True, False]),
    ],
)
def test_bad_values_raise(values: np.ndarray) -> None:
    with pytest.raises(ValueError):
        fit_codebook(values, 4)
    with pytest.raises(InputError):
        fit_codebook(values, 4)


@pytest.mark.parametrize("k", [0, -1, 2.0, True, "8", None])
def test_bad_k_raises(k: object) -> None:
    with pytest.raises(ValueError):
        fit_codebook(np.arange(10.0), k)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- assign / sse


def _brute_assign(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    v = values.reshape(-1).astype(np.float64)
    return np.argmin(np.abs(v[:, None] - book.astype(np.float64)[None, :]), axis=1)


def test_assign_matches_brute_force() -> None:
    rng = np.random.default_rng(21)
    for k in (1, 2, 3, 8, 256):
        book = np.sort(rng.normal(size=k)).astype(np.float32)
        values = rng.normal(scale=1.5, size=(50, 40)).astype(np.float32)
        idx = assign(values, book)
        assert idx.dtype == np.int64 and idx.shape == (2000,)
        assert np.array_equal(idx, _brute_assign(values, book))


def test_assign_exact_ties_go_to_lower_index() -> None:
    book = np.array([-1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    mids = np.array([-0.5, 0.25, 1.25], dtype=np.float32)  # exact midpoints in float32
    assert assign(mids, book).tolist() == [0, 1, 2]
    rng = np.random.default_rng(2)
    book = np.sort(np.unique(rng.integers(-40, 40, 12))).astype(np.float32) / 8
    values = np.concatenate(
        [(book[:-1] + book[1:]) / 2, book, rng.integers(-400, 400, 500) / 64]
    )
    values = values.astype(np.float32)
    assert np.array_equal(assign(values, book), _brute_assign(values, book))


def test_assign_float64_ties_and_repeated_centroids() -> None:
    # repeated centroids (a padded codebook): the first copy wins
    book = np.array([0.0, 1.0, 1.0, 1.0, 5.0])
    values = np.array([1.0, 0.9, 1.2, 3.0, 6.0, 100.0, -3.0])
    assert np.array_equal(assign(values, book), _brute_assign(values, book))
    # gaps hidden by float64 rounding of the distance: argmin picks the first
    book = np.array([0.0, 1e-17, 2e-17, 1.0])
    values = np.array([0.4, 1e20, -1e20, 0.5, 0.6, 1e-17])
    assert np.array_equal(assign(values, book), _brute_assign(values, book))
    rng = np.random.default_rng(4)
    book = np.sort(rng.choice(np.array([0.0, 0.25, 0.5, 3.0, 1e-300, -1e-300]), 9))
    values = rng.choice(
        np.concatenate([book, (book[:-1] + book[1:]) / 2, [1e300, -7.0]]), 300
    )
    assert np.array_equal(assign(values, book), _brute_assign(values, book))


@settings(max_examples=80, deadline=None)
@given(
    book=st.lists(st.integers(-20, 20), min_size=1, max_size=8),
    values=st.lists(st.integers(-100, 100), min_size=1, max_size=40),
)
def test_assign_property(book: list[int], values: list[int]) -> None:
    b = np.sort(np.array(book, dtype=np.float32) / 4)  # may repeat
    v = np.array(values, dtype=np.float32) / 8  # hits midpoints often
    assert np.array_equal(assign(v, b), _brute_assign(v, b))


def test_assign_on_fitted_codebook_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmeans1d, "_CHUNK", 1000)
    values = _data("laplace", 10_500, seed=6)
    book = fit_codebook(values, 16)
    idx = assign(values, book)
    assert np.array_equal(idx, _brute_assign(values, book))
    expected = float(
        np.sum((values.astype(np.float64) - book.astype(np.float64)[idx]) ** 2)
    )
    assert sse(values, book) == pytest.approx(expected, rel=1e-12)


def test_assign_and_sse_errors() -> None:
    book = np.array([0.0, 1.0], dtype=np.float32)
    for bad in (
        np.array([]),
        np.array([1.0, 0.0]),
        np.array([[0.0, 1.0]]),
        np.array([0.0, np.nan]),
    ):
        with pytest.raises(ValueError):
            assign(np.zeros(3), bad)
        with pytest.raises(ValueError):
            sse(np.zeros(3), bad)
    with pytest.raises(ValueError):
        assign(np.array([0.0, np.nan]), book)
    with pytest.raises(ValueError):
        sse(np.array([np.inf]), book)
    assert assign(np.array([], dtype=np.float32), book).shape == (0,)
    assert sse(np.array([], dtype=np.float32), book) == 0.0


def test_the_compiled_assignment_gives_the_same_indices() -> None:
    # float arrays of _CHUNK values or more take kmeans1d_jit's one pass: the same answers on
    # the hard cases (float64 ties, gaps hidden by rounding, repeated centroids, values far
    # outside the codebook, a range too narrow for its bin table), and NaN still refused
    pytest.importorskip("numba")
    rng = np.random.default_rng(9)
    cases = [
        (np.array([0.0, 1.0, 1.0, 1.0, 5.0]), np.array([1.0, 0.9, 1.2, 3.0, 6.0, 100.0, -3.0])),
        (np.array([0.0, 1e-17, 2e-17, 1.0]), np.array([0.4, 1e20, -1e20, 0.5, 0.6, 1e-17])),
        (np.array([-1e-300, 0.0, 1e-300]), np.array([0.0, 1e-300, -5e-301, 1.0, -1.0])),
        (np.sort(rng.standard_t(2, 256)) * 0.02, rng.standard_t(2, 1000) * 0.02),
        (np.sort(np.round(rng.normal(size=64), 1)), np.round(rng.normal(size=500), 2)),
    ]
    for book, values in cases:
        tiled = np.resize(values, kmeans1d._CHUNK + 7)
        assert np.array_equal(assign(tiled, book), _brute_assign(tiled, book))
        assert np.array_equal(assign(tiled.astype(np.float32), book.astype(np.float32)),
                              _brute_assign(tiled.astype(np.float32), book.astype(np.float32)))
    bad = np.zeros(kmeans1d._CHUNK + 1)
    bad[-1] = np.nan
    with pytest.raises(ValueError):
        assign(bad, np.array([0.0, 1.0]))
