"""MNIST for the demo: an IDX reader, the places MNIST can come from, and a fallback.

The IDX format (LeCun et al.) is a 4-byte magic ``00 00 <dtype> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values in row-major order, big-endian. The files may be
gzip-compressed. :func:`read_idx` checks the magic, the sizes and the data length before it
returns anything.

Where the demo finds its images, in order (:func:`load_demo_data`):

1. ``--data DIR``: a folder with the IDX files, directly or in torchvision's
   ``MNIST/raw`` layout;
2. the cache folder, ``$QPACK_CACHE/mnist`` or ``~/.cache/qpack/mnist``;
3. with ``--download``: MNIST fetched into the cache folder from the usual mirrors;
4. otherwise scikit-learn's handwritten digits (1,797 images, 8x8, resized to 28x28).

Known MNIST files are checked against their published sizes and md5 sums. When a folder
holds the test set but not the training set, the first ``split_test`` test images are used
for training and the rest for evaluation; :attr:`DemoData.info` always records which
images were used for what.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpack.errors import InputError

__all__ = [
    "DEFAULT_SPLIT_TEST",
    "IDX_DTYPES",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "DemoData",
    "MnistFile",
    "default_cache_dir",
    "download_mnist",
    "find_mnist_files",
    "load_demo_data",
    "load_digits_data",
    "load_mnist_folder",
    "read_idx",
    "read_mnist",
    "verify_mnist_file",
    "write_idx",
]

#: IDX type byte -> numpy dtype of the stored (big-endian) values
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: largest number of dimensions and of data bytes :func:`read_idx` accepts
MAX_IDX_DIMS = 8
MAX_IDX_BYTES = 1 << 31

#: images used for training when a folder has only the MNIST test set
DEFAULT_SPLIT_TEST = 8000

#: share of scikit-learn's digits used for training when no split is given
DIGITS_TRAIN_SHARE = 0.8

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class MnistFile:
    """One of the four published MNIST files.

    Attributes:
        name: file name without ``.gz``.
        gz_bytes: size of the published ``.gz`` file.
        gz_md5: md5 of the published ``.gz`` file.
        count: number of images or labels in it.
        kind: ``"images"`` or ``"labels"``.
        raw_md5: md5 of the uncompressed IDX file.
    """

    name: str
    gz_bytes: int
    gz_md5: str
    count: int
    kind: str
    raw_md5: str

    @property
    def raw_bytes(self) -> int:
        """Size of the uncompressed IDX file."""
        if self.kind == "images":
            return 16 + self.count * 28 * 28
        return 8 + self.count


#: the published files, keyed by split then kind
MNIST_FILES: dict[str, dict[str, MnistFile]] = {
    "train": {
        "images": MnistFile(
            "train-images-idx3-ubyte",
            9_912_422,
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            60_000,
            "images",
            "6bbc9ace898e44ae57da46a324031adb",
        ),
        "labels": MnistFile(
            "train-labels-idx1-ubyte",
            28_881,
            "d53e105ee54ea40749a09fcbcd1e9432",
            60_000,
            "labels",
            "a25bea736e30d166cdddb491f175f624",
        ),
    },
    "test": {
        "images": MnistFile(
            "t10k-images-idx3-ubyte",
            1_648_877,
            "9fb629c4189551a2d022fa330f9573f3",
            10_000,
            "images",
            "2646ac647ad5339dbf082846283269ea",
        ),
        "labels": MnistFile(
            "t10k-labels-idx1-ubyte",
            4_542,
            "ec29112dd5afa0611ce80d1b7f02629c",
            10_000,
            "labels",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    },
}

#: where ``--download`` looks, in order (the mirrors torchvision and TensorFlow use)
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


# --------------------------------------------------------------------------------------
# IDX


def _open_idx(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not.

    Args:
        path: the file.

    Returns:
        The values, in native byte order, with the shape the file declares.

    Raises:
        InputError: the file is missing, has a bad magic, a bad gzip stream, more than
            :data:`MAX_IDX_DIMS` dimensions, more data than :data:`MAX_IDX_BYTES`, or
            fewer or more data bytes than its sizes declare.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such IDX file")
    try:
        with _open_idx(path) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise InputError(f"{path}: truncated IDX file: {len(magic)} bytes, no 4-byte magic")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
                raise InputError(
                    f"{path}: not an IDX file: magic {magic.hex()} "
                    "(expected 0000 then a type byte 08/09/0b/0c/0d/0e and a dimension count)"
                )
            ndim = magic[3]
            if not 1 <= ndim <= MAX_IDX_DIMS:
                raise InputError(f"{path}: IDX file declares {ndim} dimensions, expected 1..{MAX_IDX_DIMS}")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise InputError(f"{path}: truncated IDX file: header ends inside its {ndim} sizes")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = IDX_DTYPES[magic[2]]
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > MAX_IDX_BYTES:
                raise InputError(
                    f"{path}: IDX file declares shape {shape}: {nbytes} data bytes, over the "
                    f"limit of {MAX_IDX_BYTES}"
                )
            data = f.read(nbytes)
            if len(data) < nbytes:
                raise InputError(
                    f"{path}: truncated IDX file: shape {shape} needs {nbytes} data bytes, found {len(data)}"
                )
            if f.read(1):
                raise InputError(f"{path}: IDX file has data after the {nbytes} bytes its shape {shape} needs")
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read it as (gzip-compressed) IDX: {e}") from e
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (the inverse of :func:`read_idx`; used by tests).

    Args:
        path: where to write.
        array: values of one of the dtypes in :data:`IDX_DTYPES` (any byte order).
        compress: gzip the file.

    Raises:
        InputError: the dtype or the number of dimensions has no IDX form.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str: code for code, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise InputError(f"dtype {array.dtype} has no IDX type code")
    if not 1 <= array.ndim <= MAX_IDX_DIMS:
        raise InputError(f"IDX holds 1..{MAX_IDX_DIMS} dimensions, not {array.ndim}")
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress:
        blob = gzip.compress(blob, mtime=0)
    Path(path).write_bytes(blob)


# --------------------------------------------------------------------------------------
# MNIST files


def find_mnist_files(folder: str | os.PathLike[str]) -> dict[str, dict[str, Path]]:
    """Find the MNIST IDX files in ``folder``.

    Looks in ``folder``, ``folder/MNIST/raw`` (torchvision's layout) and ``folder/raw``,
    for each file first ``NAME.gz`` then ``NAME``.

    Args:
        folder: where to look.

    Returns:
        ``{split: {kind: path}}`` for the splits whose images and labels were both found
        (``"train"``, ``"test"``); empty when none was.
    """
    folder = Path(folder)
    places = [folder, folder / "MNIST" / "raw", folder / "raw"]
    found: dict[str, dict[str, Path]] = {}
    for split, files in MNIST_FILES.items():
        for place in places:
            paths: dict[str, Path] = {}
            for kind, spec in files.items():
                for candidate in (place / f"{spec.name}.gz", place / spec.name):
                    if candidate.is_file():
                        paths[kind] = candidate
                        break
            if len(paths) == len(files):
                found[split] = paths
                break
    return found


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_mnist_file(path: str | os.PathLike[str], spec: MnistFile) -> None:
    """Check a MNIST file's size and md5 against the published ones (``.gz`` or uncompressed).

    Args:
        path: the file (``NAME.gz`` or the uncompressed ``NAME``).
        spec: what it should be.

    Raises:
        InputError: the size or the md5 differs.
    """
    path = Path(path)
    gz = path.name.endswith(".gz")
    expected = spec.gz_bytes if gz else spec.raw_bytes
    size = path.stat().st_size
    if size != expected:
        raise InputError(
            f"{path}: {size} bytes, expected {expected} for {spec.name}{'.gz' if gz else ''}; "
            "the file is incomplete or not the published MNIST file"
        )
    md5 = _md5(path)
    expected_md5 = spec.gz_md5 if gz else spec.raw_md5
    if md5 != expected_md5:
        raise InputError(
            f"{path}: md5 {md5}, expected {expected_md5}; the file is damaged or not the published MNIST file"
        )


def read_mnist(paths: dict[str, Path], split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read one MNIST split.

    Args:
        paths: ``{"images": path, "labels": path}`` as :func:`find_mnist_files` gives.
        split: ``"train"`` or ``"test"``.
        verify: check sizes and md5s first (:func:`verify_mnist_file`).

    Returns:
        ``(images, labels)``: uint8 arrays of shapes ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        InputError: a file fails its checks, or holds the wrong shape, dtype or labels.
    """
    specs = MNIST_FILES[split]
    if verify:
        for kind, spec in specs.items():
            verify_mnist_file(paths[kind], spec)
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    count = specs["images"].count
    if images.dtype != np.uint8 or images.shape != (count, 28, 28):
        raise InputError(f"{paths['images']}: {images.dtype} {images.shape}, expected uint8 ({count}, 28, 28)")
    if labels.dtype != np.uint8 or labels.shape != (count,):
        raise InputError(f"{paths['labels']}: {labels.dtype} {labels.shape}, expected uint8 ({count},)")
    if labels.max(initial=0) > 9:
        raise InputError(f"{paths['labels']}: label {int(labels.max())} found, expected 0..9")
    return images, labels


# --------------------------------------------------------------------------------------
# What the demo trains and evaluates on


@dataclass
class DemoData:
    """Images and labels for training and evaluation, and where they came from.

    Attributes:
        train_x: float32 ``(N, 1, 28, 28)`` in [0, 1].
        train_y: int64 ``(N,)``.
        eval_x: float32 ``(M, 1, 28, 28)`` in [0, 1].
        eval_y: int64 ``(M,)``.
        info: JSON-ready description: ``source``, ``folder``, ``description`` and, for
            ``train`` and ``eval``, the ``file``, the index range ``[start, stop)`` and
            the ``count``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def subset(self, n_train: int, n_eval: int) -> DemoData:
        """The first ``n_train`` training and first ``n_eval`` evaluation images.

        Args:
            n_train: how many training images to keep.
            n_eval: how many evaluation images to keep.

        Returns:
            A new :class:`DemoData` whose ``info`` names the narrower ranges.
        """
        info = {**self.info}
        for part, n in (("train", n_train), ("eval", n_eval)):
            rng = dict(info[part])
            rng["stop"] = rng["start"] + min(n, rng["count"])
            rng["count"] = rng["stop"] - rng["start"]
            info[part] = rng
        info["description"] = _describe(info)
        return DemoData(
            self.train_x[:n_train], self.train_y[:n_train], self.eval_x[:n_eval], self.eval_y[:n_eval], info
        )


def _describe(info: dict[str, Any]) -> str:
    def part(p: dict[str, Any]) -> str:
        return f"{p['file']}[{p['start']}:{p['stop']}] ({p['count']} images)"

    return f"{info['source']}: trained on {part(info['train'])}, evaluated on {part(info['eval'])}"


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)


def _split_point(split_test: int | None, default: int, total: int, what: str) -> int:
    n = default if split_test is None else split_test
    if not 0 < n < total:
        raise InputError(f"--split-test {n}: {what} has {total} images; give 1..{total - 1}")
    return n


def load_mnist_folder(
    folder: str | os.PathLike[str],
    *,
    split_test: int | None = None,
    source: str = "mnist",
    log: Callable[[str], None] | None = None,
) -> DemoData:
    """Load MNIST from a folder, splitting the test set when there is no training set.

    Args:
        folder: a folder with the IDX files (or torchvision's ``MNIST/raw`` under it).
        split_test: train on the first ``split_test`` test images and evaluate on the
            rest. ``None``: use the training set when present, else
            :data:`DEFAULT_SPLIT_TEST`.
        source: the ``source`` recorded in :attr:`DemoData.info`.
        log: where to say what was chosen.

    Returns:
        The data.

    Raises:
        InputError: the folder is missing, holds no MNIST test set, or a file fails its checks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (expected MNIST IDX files in it)")
    found = find_mnist_files(folder)
    if "test" not in found:
        names = " and ".join(f"{s.name}[.gz]" for s in MNIST_FILES["test"].values())
        raise InputError(f"{folder}: no MNIST test set ({names}) in it or under MNIST/raw")
    test_x, test_y = read_mnist(found["test"], "test")
    test_file = found["test"]["images"].name
    info: dict[str, Any] = {"source": source, "folder": str(folder.resolve())}
    if "train" in found and split_test is None:
        train_x, train_y = read_mnist(found["train"], "train")
        info["train"] = {"file": found["train"]["images"].name, "start": 0, "stop": len(train_y), "count": len(train_y)}
        info["eval"] = {"file": test_file, "start": 0, "stop": len(test_y), "count": len(test_y)}
        data = DemoData(
            _to_float(train_x),
            torch.from_numpy(train_y).long(),
            _to_float(test_x),
            torch.from_numpy(test_y).long(),
            info,
        )
    else:
        n = _split_point(split_test, DEFAULT_SPLIT_TEST, len(test_y), "the MNIST test set")
        if "train" not in found and split_test is None and log is not None:
            log(
                f"no MNIST training images in {folder}: training on the first {n} test images, "
                f"evaluating on the other {len(test_y) - n} (choose with --split-test N)"
            )
        info["train"] = {"file": test_file, "start": 0, "stop": n, "count": n}
        info["eval"] = {"file": test_file, "start": n, "stop": len(test_y), "count": len(test_y) - n}
        x = _to_float(test_x)
        y = torch.from_numpy(test_y).long()
        data = DemoData(x[:n].clone(), y[:n].clone(), x[n:].clone(), y[n:].clone(), info)
    info["description"] = _describe(info)
    return data


def load_digits_data(*, split_test: int | None = None) -> DemoData:
    """scikit-learn's handwritten digits, resized to MNIST's 28x28 and scaled to [0, 1].

    1,797 images of 8x8 values 0..16, divided by 16 and resized with torch's bilinear
    interpolation. Needs no file and no network.

    Args:
        split_test: train on the first ``split_test`` images and evaluate on the rest;
            ``None``: the first 80 %.

    Returns:
        The data.

    Raises:
        InputError: ``split_test`` is out of range.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(digits.target).long()
    total = len(y)
    n = _split_point(split_test, int(total * DIGITS_TRAIN_SHARE), total, "sklearn's digits set")
    name = "sklearn.datasets.load_digits"
    info: dict[str, Any] = {
        "source": "sklearn-digits",
        "folder": None,
        "train": {"file": name, "start": 0, "stop": n, "count": n},
        "eval": {"file": name, "start": n, "stop": total, "count": total - n},
    }
    info["description"] = _describe(info)
    return DemoData(x[:n].clone(), y[:n].clone(), x[n:].clone(), y[n:].clone(), info)


# --------------------------------------------------------------------------------------
# Cache and download


def default_cache_dir() -> Path:
    """The MNIST cache folder: ``$QPACK_CACHE/mnist``, else ``~/.cache/qpack/mnist``."""
    root = os.environ.get("QPACK_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "qpack"
    return base / "mnist"


def _fetch(url: str, spec: MnistFile, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        blob = response.read(spec.gz_bytes + 1)
    if len(blob) != spec.gz_bytes:
        raise ValueError(f"got {len(blob)} bytes, expected {spec.gz_bytes}")
    md5 = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if md5 != spec.gz_md5:
        raise ValueError(f"md5 {md5}, expected {spec.gz_md5}")
    return blob


def download_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    timeout: float = 30.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Fetch the four MNIST ``.gz`` files into the cache folder, checking size and md5.

    Files already there with the right md5 are kept. Each file is written to a temporary
    file in the same folder and renamed into place once it checks out.

    Args:
        cache_dir: where to put them; default :func:`default_cache_dir`.
        mirrors: base URLs tried in order.
        timeout: seconds per connection attempt.
        log: where to report progress.

    Returns:
        The cache folder.

    Raises:
        InputError: a file could be fetched from no mirror (offline, or bad data).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for files in MNIST_FILES.values():
        for spec in files.values():
            dest = folder / f"{spec.name}.gz"
            if dest.is_file():
                try:
                    verify_mnist_file(dest, spec)
                    continue
                except InputError:
                    pass
            errors = []
            for base in mirrors:
                url = base + dest.name
                try:
                    blob = _fetch(url, spec, timeout)
                except (urllib.error.URLError, OSError, ValueError) as e:
                    reason = getattr(e, "reason", e)
                    errors.append(f"{url}: {reason}")
                    continue
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(blob)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                if log is not None:
                    log(f"downloaded {url} -> {dest}")
                break
            else:
                raise InputError(
                    f"cannot download {dest.name} from {len(mirrors)} mirrors (no network?); "
                    f"last error: {errors[-1] if errors else 'no mirror given'}; "
                    "put the IDX files in a folder and pass --data DIR"
                )
    return folder


def load_demo_data(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    split_test: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoData:
    """Find the demo's images: ``data_dir``, the cache, a download, or sklearn's digits.

    Args:
        data_dir: a folder with MNIST (``--data``); when given, nothing else is tried.
        download: fetch MNIST into the cache when it is not complete there.
        split_test: see :func:`load_mnist_folder`; also splits the digits fallback.
        cache_dir: the cache folder; default :func:`default_cache_dir`.
        log: where to say which source was chosen.

    Returns:
        The data; ``info["source"]`` is ``"mnist"`` or ``"sklearn-digits"``.

    Raises:
        InputError: ``data_dir`` is not usable, or ``download`` failed.
    """
    if data_dir is not None:
        return load_mnist_folder(data_dir, split_test=split_test, log=log)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = find_mnist_files(cache) if cache.is_dir() else {}
    if download and len(found) < len(MNIST_FILES):
        download_mnist(cache, log=log)
        found = find_mnist_files(cache)
    if "test" in found:
        if log is not None:
            log(f"using MNIST from the cache folder {cache}")
        return load_mnist_folder(cache, split_test=split_test, log=log)
    if log is not None:
        log(
            f"no MNIST found (no --data DIR, nothing in {cache}, no --download): "
            "using scikit-learn's 8x8 handwritten digits resized to 28x28 instead"
        )
    return load_digits_data(split_test=split_test)
