"""The demo's MNIST reader: IDX files, the real test set, sources and the digits fallback."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from qpack.demo import mnist
from qpack.demo.mnist import (
    MNIST_FILES,
    DemoData,
    MnistFile,
    download_mnist,
    find_mnist_files,
    load_demo_data,
    load_digits_data,
    load_mnist_folder,
    read_idx,
    read_mnist,
    verify_mnist_file,
    write_idx,
)
from qpack.errors import InputError

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared/data/mnist"

#: images per digit in the published MNIST test set
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def real_dir() -> Path:
    if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST test set is not at {REAL_MNIST} (see the task's shared data)")
    return REAL_MNIST


# --- IDX -----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "dtype, shape",
    [("u1", (3, 4, 5)), ("i1", (7,)), ("i2", (2, 3)), ("i4", (4, 1)), ("f4", (2, 2, 2)), ("f8", (5,))],
)
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_bytes_are_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    write_idx(path, np.array([1, 258], dtype=np.int32))
    assert path.read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2])


def _idx(tmp_path: Path, blob: bytes, compress: bool = False) -> Path:
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00", "no 4-byte magic"),
        (b"PK\x03\x04rest", "not an IDX file: magic 504b0304"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]), "not an IDX file"),
        (bytes([0, 0, 8, 0]), "declares 0 dimensions"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "header ends inside its 2 sizes"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3]), "needs 4 data bytes, found 3"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "data after the 2 bytes"),
        (bytes([0, 0, 8, 2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), "over the limit"),
    ],
)
def test_bad_idx_raises_input_error(tmp_path: Path, compress: bool, blob: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        read_idx(_idx(tmp_path, blob, compress))
    assert "\n" not in str(info.value)


def test_truncated_gzip_raises_input_error(tmp_path: Path) -> None:
    blob = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 100]) + bytes(range(100)))
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="cut.idx.gz"):
        read_idx(path)


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such IDX file"):
        read_idx(tmp_path / "nothing.gz")


# --- the real test set ---------------------------------------------------------------


def test_real_files_match_published_checksums(real_dir: Path) -> None:
    found = find_mnist_files(real_dir)
    assert set(found) <= {"train", "test"} and "test" in found
    for split, paths in found.items():
        for kind, spec in MNIST_FILES[split].items():
            path = paths[kind]
            verify_mnist_file(path, spec)
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            assert digest == (spec.gz_md5 if path.name.endswith(".gz") else spec.raw_md5)


def test_real_training_set(real_dir: Path) -> None:
    found = find_mnist_files(real_dir)
    if "train" not in found:
        pytest.skip(f"the MNIST training set is not at {real_dir}")
    images, labels = read_mnist(found["train"], "train")
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    data = load_mnist_folder(real_dir)
    assert data.info["train"] == {"file": found["train"]["images"].name, "start": 0, "stop": 60_000, "count": 60_000}
    assert data.info["eval"] == {"file": "t10k-images-idx3-ubyte.gz", "start": 0, "stop": 10_000, "count": 10_000}


def test_uncompressed_file_with_wrong_md5_is_rejected(tmp_path: Path) -> None:
    spec = MNIST_FILES["test"]["labels"]
    path = tmp_path / spec.name
    path.write_bytes(bytes(spec.raw_bytes))
    with pytest.raises(InputError, match=f"expected {spec.raw_md5}"):
        verify_mnist_file(path, spec)


def test_read_real_test_set(real_dir: Path) -> None:
    images, labels = read_mnist(find_mnist_files(real_dir)["test"], "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS
    assert images.max() == 255 and images.min() == 0
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def _test_set_only(real_dir: Path, folder: Path) -> Path:
    """A folder holding the real test set and no training set."""
    folder.mkdir()
    for spec in MNIST_FILES["test"].values():
        (folder / f"{spec.name}.gz").symlink_to(real_dir / f"{spec.name}.gz")
    return folder


def test_folder_without_training_set_splits_test_set(real_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    folder = _test_set_only(real_dir, tmp_path / "test-only")
    assert set(find_mnist_files(folder)) == {"test"}
    data = load_mnist_folder(folder, log=lines.append)
    assert data.train_x.shape == (8000, 1, 28, 28) and data.eval_x.shape == (2000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and 0 <= data.train_x.min() and data.train_x.max() == 1
    assert data.info["train"] == {"file": "t10k-images-idx3-ubyte.gz", "start": 0, "stop": 8000, "count": 8000}
    assert data.info["eval"] == {"file": "t10k-images-idx3-ubyte.gz", "start": 8000, "stop": 10000, "count": 2000}
    assert "first 8000 test images" in lines[0] and "--split-test" in lines[0]
    assert "[8000:10000]" in data.info["description"]

    data = load_mnist_folder(folder, split_test=9500, log=lines.append)
    assert len(data.train_y) == 9500 and len(data.eval_y) == 500 and len(lines) == 1
    # with the training set there, --split-test still splits the test set, and says nothing
    data = load_mnist_folder(real_dir, split_test=9500, log=lines.append)
    assert data.info["train"]["file"] == "t10k-images-idx3-ubyte.gz" and len(data.train_y) == 9500 and len(lines) == 1


def test_torchvision_layout_and_uncompressed_files(real_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for spec in MNIST_FILES["test"].values():
        (raw / spec.name).write_bytes(gzip.decompress((real_dir / f"{spec.name}.gz").read_bytes()))
    found = find_mnist_files(tmp_path)
    assert found["test"]["images"] == raw / "t10k-images-idx3-ubyte"
    data = load_mnist_folder(tmp_path, split_test=100)
    reference = load_mnist_folder(real_dir, split_test=100)
    assert torch.equal(data.eval_x, reference.eval_x) and torch.equal(data.train_y, reference.train_y)


def test_split_out_of_range(real_dir: Path) -> None:
    with pytest.raises(InputError, match="--split-test 10000"):
        load_mnist_folder(real_dir, split_test=10_000)


def test_wrong_size_file_is_rejected(tmp_path: Path) -> None:
    for spec in MNIST_FILES["test"].values():
        write_idx(tmp_path / f"{spec.name}.gz", np.zeros((spec.count,), np.uint8), compress=True)
    with pytest.raises(InputError, match="expected 1648877 for t10k-images-idx3-ubyte.gz"):
        load_mnist_folder(tmp_path)


def test_wrong_md5_is_rejected(tmp_path: Path) -> None:
    spec = MNIST_FILES["test"]["labels"]
    path = tmp_path / f"{spec.name}.gz"
    path.write_bytes(bytes(spec.gz_bytes))
    with pytest.raises(InputError, match=f"expected {spec.gz_md5}"):
        verify_mnist_file(path, spec)


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        load_demo_data(tmp_path / "absent")
    with pytest.raises(InputError, match="no MNIST test set"):
        load_demo_data(tmp_path)


# --- cache, download, fallback ---------------------------------------------------------


def test_cache_folder_is_used(real_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "mnist"
    cache.mkdir()
    for spec in MNIST_FILES["test"].values():
        os.symlink(real_dir / f"{spec.name}.gz", cache / f"{spec.name}.gz")
    monkeypatch.setenv("QPACK_CACHE", str(tmp_path))
    assert mnist.default_cache_dir() == cache
    lines: list[str] = []
    data = load_demo_data(split_test=9000, log=lines.append)
    assert data.info["source"] == "mnist" and len(data.eval_y) == 1000
    assert any("cache" in line for line in lines)


def test_digits_fallback(tmp_path: Path) -> None:
    lines: list[str] = []
    data = load_demo_data(cache_dir=tmp_path / "empty", log=lines.append)
    assert data.info["source"] == "sklearn-digits"
    assert "scikit-learn" in lines[0]
    assert data.train_x.shape == (1437, 1, 28, 28) and data.eval_x.shape == (360, 1, 28, 28)
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    assert set(data.train_y.tolist()) == set(range(10))
    assert load_digits_data(split_test=1000).info["eval"]["count"] == 797


class _Response(io.BytesIO):
    def __enter__(self) -> _Response:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fake_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Replace the published files by tiny ones; return their gzip bytes by name."""
    blobs, files = {}, {}
    for split, count in (("train", 6), ("test", 4)):
        files[split] = {}
        for kind in ("images", "labels"):
            name = MNIST_FILES[split][kind].name
            array = np.full((count, 28, 28) if kind == "images" else (count,), 3, np.uint8)
            raw = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
            blob = gzip.compress(raw, mtime=0)
            blobs[f"{name}.gz"] = blob
            files[split][kind] = MnistFile(
                name, len(blob), hashlib.md5(blob).hexdigest(), count, kind, hashlib.md5(raw).hexdigest()
            )
    monkeypatch.setattr(mnist, "MNIST_FILES", files)
    return blobs


def test_download_tries_mirrors_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = _fake_mnist(monkeypatch)
    asked = []

    def urlopen(url: str, timeout: float) -> _Response:
        asked.append(url)
        if url.startswith("https://down/"):
            raise urllib.error.URLError("Name or service not known")
        if url.startswith("https://damaged/"):
            return _Response(b"x" + blobs[url.rsplit("/", 1)[1]][1:])
        return _Response(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    folder = download_mnist(tmp_path / "c", mirrors=("https://down/", "https://damaged/", "https://good/"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(blobs)
    assert len(asked) == 3 * len(blobs)
    data = load_demo_data(cache_dir=folder)
    assert data.info["train"]["count"] == 6 and data.info["eval"]["count"] == 4
    asked.clear()
    download_mnist(folder, mirrors=("https://good/",))  # all there and verified: nothing fetched
    assert asked == []


def test_download_offline_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def urlopen(url: str, timeout: float) -> _Response:
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    with pytest.raises(InputError, match=r"cannot download .* \(no network\?\).*--data DIR") as info:
        load_demo_data(download=True, cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_subset_narrows_the_recorded_ranges(tmp_path: Path) -> None:
    data = load_digits_data()
    small = data.subset(100, 50)
    assert isinstance(small, DemoData)
    assert len(small.train_y) == 100 and len(small.eval_y) == 50
    assert small.info["eval"] == {"file": "sklearn.datasets.load_digits", "start": 1437, "stop": 1487, "count": 50}
    assert data.info["eval"]["count"] == 360
