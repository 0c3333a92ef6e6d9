"""Quantizer properties for every width, both methods, through the file format."""

import numpy as np
import pytest
import torch

import qpack
from qpack.codecs import uniform

SHAPES = [(64, 9), (3, 5, 7)]


def laplace(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.empty(shape).exponential_(generator=gen) * torch.sign(torch.rand(shape, generator=gen) - 0.5) * 0.05).to(dtype)


def pack_one(tmp_path, tensor, **options):
    path = tmp_path / "t.qpk"
    report = qpack.pack({"w": tensor}, path, min_numel=1, force=True, **options)
    with qpack.QpkReader(path) as reader:
        entry = reader.entry("w")
        payload = reader.read_payload("w")
        restored = reader.tensor("w")
    return report, entry, payload, restored


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "balanced"])
def test_uniform_every_width(tmp_path, bits, granularity, rounding):
    w = laplace((40, 12), seed=bits)
    _, entry, payload, restored = pack_one(tmp_path, w, bits=bits, granularity=granularity, rounding=rounding)
    assert entry.encoding == "uniform" and entry.bits == bits
    channels = 40 if granularity == "channel" else 1
    lo = torch.from_numpy(np.frombuffer(entry.params["min"], "<f4").copy())
    hi = torch.from_numpy(np.frombuffer(entry.params["max"], "<f4").copy())
    assert lo.numel() == channels
    rows = w.reshape(channels, -1)
    plain = {"min": rows.amin(1), "max": rows.amax(1)}
    if not (torch.equal(lo, plain["min"]) and torch.equal(hi, plain["max"])):
        # most values (of the tensor, or of a row) within half a step of 0, and a grid
        # holding an exact 0 has less error: widened to hold it, every row or only such rows
        # (each end within half a step of the values, checked below)
        heavy = uniform.zero_heavy_rows(w.reshape(-1), plain, bits, channels, None)
        changed = (lo != plain["min"]) | (hi != plain["max"])
        assert uniform.zero_heavy(w.reshape(-1), plain, bits, channels, None) or (
            bool(heavy.any()) and not bool((changed & ~heavy).any()))
        assert bits >= 2 and bool((lo <= plain["min"]).all()) and bool((restored == 0).any())
    step = uniform.step_of(lo, hi, bits)[:, None]
    # every value on the grid: some integer index in range reproduces it exactly
    idx = torch.round((restored.reshape(channels, -1) - lo[:, None]) / step)
    assert idx.min() >= 0 and idx.max() <= (1 << bits) - 1
    assert torch.equal(lo[:, None] + idx * step, restored.reshape(channels, -1))
    err = (restored.reshape(channels, -1) - rows).abs()
    if rounding == "nearest" or bits > uniform.BALANCED_MAX_BITS:
        # error at most half a step (plus float32 rounding of the grid itself)
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    else:
        # under one step, and each output row's errors sum to at most half a step, leaving
        # out the values rounded to an exact 0 level (a zero-heavy grid's), which do not count;
        # nothing moves onto that level either, so there a row may stay as nearest left it
        assert bool((err < step * (1 + 1e-5)).all())
        counted = restored != 0
        signed = torch.where(counted, restored - w, 0).reshape(40, -1).to(torch.float64).sum(dim=1)
        nearest = lo[:, None] + torch.round((rows - lo[:, None]) / step).clamp(0, (1 << bits) - 1) * step
        left = torch.where(counted, nearest.reshape(w.shape) - w, 0).reshape(40, -1).to(torch.float64).sum(dim=1)
        row_step = step.reshape(-1).expand(40).to(torch.float64)
        bound = row_step / 2 if not bool((restored == 0).any()) else torch.maximum(row_step / 2, left.abs())
        assert bool((signed.abs() <= bound * (1 + 1e-4) + 1e-6).all())
    for row in restored.reshape(channels, -1):
        assert torch.unique(row).numel() <= 1 << bits


@pytest.mark.parametrize("bits", range(1, 17))
def test_kmeans_every_width(tmp_path, bits):
    w = laplace((50, 40), seed=100 + bits)
    report, entry, payload, restored = pack_one(tmp_path, w, bits=bits, method="kmeans")
    assert entry.encoding == "kmeans" and entry.bits == bits
    book = np.frombuffer(entry.params["codebook"], "<f4")
    assert 1 <= entry.params["codebook_size"] == book.size <= 1 << bits
    assert np.all(np.diff(book) > 0)  # sorted, distinct
    values = restored.numpy().reshape(-1)
    assert np.isin(values, book).all()
    assert np.unique(values).size <= 1 << bits
    # every value snapped to its nearest centroid
    nearest = book[np.abs(w.numpy().reshape(-1, 1) - book[None, :]).argmin(1)]
    assert np.allclose(values, nearest, rtol=0, atol=1e-7)


def test_kmeans_beats_uniform_at_three_bits(tmp_path):
    # the seed experiment's claim: k-means puts its levels where the weights are
    w = laplace((200, 50), seed=3)
    _, _, _, uni = pack_one(tmp_path, w, bits=3)
    _, _, _, km = pack_one(tmp_path, w, bits=3, method="kmeans")
    assert float(((km - w) ** 2).sum()) < 0.5 * float(((uni - w) ** 2).sum())


def test_kmeans_exact_when_few_distinct_values(tmp_path):
    w = torch.tensor([0.5, -0.25, 0.125, 0.5, 3.0] * 20).reshape(10, 10)
    _, entry, _, restored = pack_one(tmp_path, w, bits=3, method="kmeans")
    assert torch.equal(restored, w)
    assert entry.params["codebook_size"] == 4


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_constant_tensor(tmp_path, method):
    w = torch.full((10, 10), 0.75)
    # the codec's own handling of a constant (step 0), not the exact codebook qpack would choose
    _, entry, _, restored = pack_one(tmp_path, w, bits=4, method=method, exact_values=False)
    assert entry.encoding == method
    assert torch.equal(restored, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_other_float_dtypes_come_back_in_their_dtype(tmp_path, dtype, method):
    w = laplace((30, 20), seed=7, dtype=dtype)
    _, entry, _, restored = pack_one(tmp_path, w, bits=8, method=method)
    assert entry.dtype == str(dtype).removeprefix("torch.")
    assert restored.dtype == dtype and restored.shape == w.shape
    rel = float((restored.double() - w.double()).norm() / w.double().norm())
    assert rel < 0.02


def test_uniform_spec_worked_example():
    # specs/qpk-format.md 3.2: min -1, max 1, bits 2
    params = {"min": torch.tensor([-1.0]), "max": torch.tensor([1.0])}
    out = uniform.dequantize(torch.tensor([0, 1, 2, 3], dtype=torch.int32), params, 2, (4,), torch.float32)
    assert uniform.step_of(params["min"], params["max"], 2).view(torch.int32).item() == 0x3F2AAAAB
    assert out.tolist() == [-1.0, -0.333333313465118408203125, 0.33333337306976318359375, 1.0]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9),
                         elements=st.floats(-1e6, 1e6, width=32)),
       bits=st.integers(1, 16), method=st.sampled_from(["uniform", "kmeans"]),
       rounding=st.sampled_from(["nearest", "balanced"]))
def test_any_finite_tensor_round_trips_within_bounds(tmp_path, values, bits, method, rounding):
    w = torch.from_numpy(values)
    _, entry, _, restored = pack_one(tmp_path, w, bits=bits, method=method, rounding=rounding)
    assert restored.shape == w.shape and restored.dtype == w.dtype
    assert torch.unique(restored).numel() <= 1 << bits
    if method == "kmeans":  # centroids are means of their members
        assert bool((restored >= w.min()).all()) and bool((restored <= w.max()).all())
    err = float((restored.double() - w.double()).abs().max())
    if method == "uniform" and entry.encoding == "kmeans":  # few distinct values: stored exactly as a codebook
        assert torch.equal(restored, w)
    elif method == "uniform":  # at most half a step of the stored grid (widened to hold 0 where most values are near it)
        span = float(np.frombuffer(entry.params["max"], "<f4")[0]) - float(np.frombuffer(entry.params["min"], "<f4")[0])
        assert span >= float(w.max()) - float(w.min())
        steps = 0.5 if rounding == "nearest" else 1.0  # balanced: a value may take its other neighbour
        assert err <= span / ((1 << bits) - 1) * steps * (1 + 1e-4) + 1e-30 + 1e-6 * max(abs(float(w.max())), abs(float(w.min())))
    if torch.unique(w).numel() <= 1 << bits and method == "kmeans":
        assert torch.equal(restored, w)  # few distinct values: k-means is exact


@pytest.mark.parametrize("group", [16, 64, 100])
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_group_granularity(tmp_path, group, method):
    w = laplace((37, 29), seed=group)  # 1073 elements: the last group is short
    # float32 parameters: each group's own min and max (float16, the default for groups, is
    # tested in test_format_v3)
    _, entry, _, restored = pack_one(tmp_path, w, bits=3, method=method, granularity=f"group:{group}",
                                     param_dtype="float32")
    assert entry.granularity == "group" and entry.group_size == group
    rows = -(-w.numel() // group)
    flat_w, flat_r = w.reshape(-1), restored.reshape(-1)
    if method == "uniform":
        lo = np.frombuffer(entry.params["min"], "<f4")
        hi = np.frombuffer(entry.params["max"], "<f4")
        assert lo.size == rows
        for r in [0, rows // 2, rows - 1]:
            chunk = flat_w[r * group:(r + 1) * group]
            assert lo[r] == float(chunk.min()) and hi[r] == float(chunk.max())
    for r in [0, rows - 1]:
        assert torch.unique(flat_r[r * group:(r + 1) * group]).numel() <= 8
    # finer parameters, smaller error than one set per tensor
    _, _, _, coarse = pack_one(tmp_path, w, bits=3, method=method)
    assert float(((restored - w) ** 2).sum()) < float(((coarse - w) ** 2).sum())


def test_group_granularity_is_validated(tmp_path):
    for bad in ["group:8", "group:70000", "group:x", "rows"]:
        with pytest.raises(qpack.InputError):
            qpack.pack({"w": torch.randn(8, 8)}, tmp_path / "g.qpk", granularity=bad, force=True)


@pytest.mark.parametrize("bits,container", [(3, 4), (5, 8), (6, 8), (7, 8), (12, 16)])
def test_odd_widths_may_use_a_byte_friendly_container(tmp_path, bits, container):
    # skewed indices, as trained weights give: the container form compresses better
    w = laplace((400, 250), seed=bits)
    _, entry, payload, restored = pack_one(tmp_path, w, bits=bits, method="kmeans")
    assert entry.width in (bits, container)
    assert payload.numel() == (w.numel() * entry.width + 7) // 8
    # whatever the writer chose, the stored size is the smaller of the two forms
    from qpack.encoder import _pack, compress

    indices = qpack.codecs.kmeans.quantize(w.reshape(-1), {"codebook": torch.from_numpy(
        np.frombuffer(entry.params["codebook"], "<f4").copy()).reshape(1, -1)}, bits)
    sizes = {width: len(compress(memoryview(_pack(indices, width)))[1]) for width in (bits, container)}
    assert entry.length == min(sizes.values())
    assert torch.unique(restored).numel() <= 1 << bits


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:64"])
def test_pruned_weights_stay_exactly_zero(tmp_path, method, bits, granularity):
    w = laplace((48, 40), seed=bits) + 0.01  # skewed, so the range is not symmetric around 0
    report, entry, _, restored = pack_one(tmp_path, w, bits=bits, method=method,
                                          granularity=granularity, prune=0.75)
    pruned = w.abs() <= w.abs().reshape(-1).kthvalue(int(0.75 * w.numel())).values
    assert int(pruned.sum()) == int(0.75 * w.numel())
    assert bool((restored[pruned] == 0).all())  # exactly zero, not merely small
    assert "pruned" in report.tensors[0].reason
    assert torch.unique(restored).numel() <= (1 << bits) * entry.channels


def test_pruning_makes_files_smaller(tmp_path):
    w = laplace((300, 200), seed=5)
    dense, _, _, _ = pack_one(tmp_path, w, bits=4, method="kmeans")
    sparse, _, _, _ = pack_one(tmp_path, w, bits=4, method="kmeans", prune=0.9)
    assert sparse.file_bytes < 0.5 * dense.file_bytes


def test_prune_fraction_is_validated(tmp_path):
    for bad in [-0.1, 1.0, 2, "half"]:
        with pytest.raises(qpack.InputError):
            qpack.pack({"w": torch.randn(16, 16)}, tmp_path / "p.qpk", prune=bad, force=True)


# -- the table-lookup fast path (qpack.codecs.lookup) against the torch reference ---------------

@pytest.mark.parametrize("bits, rows, row_length, dtype", [
    (8, 1, None, torch.float32), (3, 1, None, torch.float32), (8, 96, None, torch.float32),
    (5, 0, 1000, torch.float32), (12, 1, None, torch.float32), (16, 1, None, torch.bfloat16),
    (8, 1, None, torch.float16), (8, 0, 24, torch.float32), (6, 0, 512, torch.float32),
])
def test_lookup_dequantization_matches_the_torch_path_bit_for_bit(monkeypatch, bits, rows, row_length, dtype):
    pytest.importorskip("numba", reason="the lookup kernel needs numba (the torch path is the fallback)")
    # (importorskip imported numba: the lookup runs only once numba is loaded)
    from qpack.codecs import kmeans, lookup
    from qpack.bitpack import unpack_bits, pack_bits

    gen = torch.Generator().manual_seed(bits * 1000 + rows)
    count = 96 * 1024 - 7 if row_length else 96 * 1024
    rows = rows or -(-count // row_length)  # groups: the last one short
    raw = torch.randint(0, 1 << bits, (count,), generator=gen)
    indices = unpack_bits(pack_bits(raw, bits), bits, count)  # the dtype the reader hands over
    lo = torch.randn(rows, generator=gen)
    params = {"min": lo, "max": lo + torch.rand(rows, generator=gen) * 3}
    codebook = {"codebook": torch.randn(rows, 1 << bits, generator=gen)}
    shape = (count,)
    assert lookup.worth_a_table(indices, rows, 1 << bits) == (rows << bits <= count // 2)
    assert lookup.worth_a_kernel(indices)  # uniform grids: computed in one pass, any row count
    fast = [uniform.dequantize(indices, params, bits, shape, dtype, row_length),
            kmeans.dequantize(indices, codebook, bits, shape, dtype, row_length)]
    monkeypatch.setenv("QPACK_NO_JIT", "1")
    assert not lookup.worth_a_table(indices, rows, 1 << bits) and not lookup.worth_a_kernel(indices)
    reference = [uniform.dequantize(indices, params, bits, shape, dtype, row_length),
                 kmeans.dequantize(indices, codebook, bits, shape, dtype, row_length)]
    for a, b in zip(fast, reference):
        assert a.dtype == b.dtype == dtype and torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                            b.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("share_zero", [0.0, 0.6])
def test_indices_are_zstd_coded_at_the_smaller_of_the_levels_tried(share_zero):
    """Dense indices: level 1, close to their entropy (level 3's chance matches cost more);
    indices with long runs (most of them one value): never larger than level 3's frame."""
    import zstandard

    from qpack import encoder

    gen = np.random.default_rng(3)
    # 5-bit indices of Gaussian weights on a grid 1.19x their range, as the allocation tries
    indices = np.clip(np.rint(gen.normal(15.5, 4.0, size=1 << 18)), 0, 31).astype(np.uint8)
    indices[gen.random(indices.size) < share_zero] = 0
    histogram = np.bincount(indices, minlength=32)
    width, compression, stored = encoder._store_indices(torch.from_numpy(indices), 5, histogram, "never")
    assert (width, compression) == (8, "zstd")
    level3 = len(zstandard.ZstdCompressor(level=3).compress(indices.tobytes()))
    assert len(stored) <= level3
    if share_zero == 0:
        p = histogram[histogram > 0] / indices.size
        entropy_bytes = -(p * np.log2(p)).sum() * indices.size / 8
        assert len(stored) <= 1.02 * entropy_bytes < level3
    assert zstandard.ZstdDecompressor().decompress(bytes(stored)) == indices.tobytes()
