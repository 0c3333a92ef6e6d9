"""A longer fuzz run of the .qpk reader than the test suite's: only QpkError may come out.

    python tests/benchmarks/fuzz_long.py --seconds 300             # atheris if installed
    python tests/benchmarks/fuzz_long.py --seconds 300 --engine random

Each case is a file: a mutated copy of a small valid file (several tensors of every
encoding). It is opened with QpkReader and every tensor is read. A QpkError is the expected
way to fail; any other exception, a case slower than --slow seconds, or a MemoryError is a
failure: the input is saved under --out and counted. Because checksums stop most random
changes at R5 or R18, a share of the cases get their checksums recomputed after mutating,
so the checks behind them (R6-R21 and the decoders) see the mutations too.

Engines: ``atheris`` (coverage-guided, libFuzzer; ``pip install atheris``) and ``random``
(a seeded loop of structured mutations; no extra packages).

With the random engine, half the cases are header-field mutations in named classes
(``CLASSES``: a dtype, shape, bits, params, compression, stats, name, zstd frame or rANS
table changed, one field at a time or several consistently), after which the file is laid
out again and every checksum recomputed, so the reader rules themselves (R6-R23) decide.
The report counts each class's cases, loads, rejections by rule and failures.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this checkout's qpack (not an installed one), and the crafting helpers in tests/test_reader_rules.py
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import msgpack
import torch

PREAMBLE = struct.Struct("<8sIIII")


class Run:
    """Counts cases and failures; writes failing inputs to ``out``."""

    def __init__(self, out: Path, slow: float) -> None:
        self.out = out
        self.slow = slow
        self.cases = 0
        self.rejected = 0
        self.loaded = 0
        self.failures: dict[str, int] = {}
        self.rules: dict[str, int] = {}
        self.classes: dict[str, dict] = {}
        fd, name = tempfile.mkstemp(suffix=".qpk", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        self.scratch = Path(name)

    def check(self, data: bytes, kind: str = "bytes") -> None:
        from qpack import QpkError, QpkReader

        self.cases += 1
        counts = self.classes.setdefault(kind, {"cases": 0, "loaded": 0, "failures": 0, "rules": {}})
        counts["cases"] += 1
        failures_before = sum(self.failures.values())
        fd = os.open(self.scratch, os.O_RDWR)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, max(self.slow * 5, 1.0))
        try:
            with QpkReader(self.scratch) as reader:
                for name in reader:
                    reader.tensor(name)
            self.loaded += 1
            counts["loaded"] += 1
        except QpkError as exc:
            self.rejected += 1
            rule = getattr(exc, "rule", None) or type(exc).__name__
            self.rules[rule] = self.rules.get(rule, 0) + 1
            counts["rules"][rule] = counts["rules"].get(rule, 0) + 1
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.fail(f"{type(exc).__name__}: {str(exc)[:120]}", data, traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - started
        if elapsed > self.slow + len(data) * 20e-9:  # big files may take 20 ns per byte more
            self.fail(f"slow: {elapsed:.2f} s ({kind})", data, "")
        counts["failures"] += sum(self.failures.values()) - failures_before

    def fail(self, what: str, data: bytes, trace: str) -> None:
        first = what not in self.failures
        self.failures[what] = self.failures.get(what, 0) + 1
        if first:
            self.out.mkdir(parents=True, exist_ok=True)
            name = self.out / f"crash-{hashlib.sha1(data).hexdigest()[:12]}.qpk"
            name.write_bytes(data)
            print(f"FAILURE {what}\n  input saved as {name}\n{trace}", file=sys.stderr, flush=True)

    def report(self, seconds: float, engine: str) -> str:
        summary = (f"engine {engine}: {self.cases} cases in {seconds:.0f} s "
                   f"({self.cases / max(seconds, 1e-9):.0f}/s); {self.rejected} rejected with QpkError, "
                   f"{self.loaded} loaded, {sum(self.failures.values())} failures "
                   f"({len(self.failures)} distinct)")
        lines = [summary]
        lines.append("rejections by rule: " + ", ".join(
            f"{rule} {count}" for rule, count in sorted(self.rules.items(), key=lambda kv: -kv[1])))
        for what, count in self.failures.items():
            lines.append(f"  {count} x {what}")
        if len(self.classes) > 1:
            lines.append(f"{'class':<22} {'cases':>6} {'loaded':>6} {'fail':>4}  rejections by rule")
            for kind, counts in sorted(self.classes.items()):
                rules = ", ".join(f"{r} {n}" for r, n in sorted(counts["rules"].items(), key=lambda kv: -kv[1]))
                lines.append(f"{kind:<22} {counts['cases']:>6} {counts['loaded']:>6} {counts['failures']:>4}  {rules}")
        return "\n".join(lines)

    def close(self) -> None:
        self.scratch.unlink(missing_ok=True)


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeoutError("case took too long (hang?)")


# -- seeds ----------------------------------------------------------------------------------------


def seed_files(folder: Path) -> list[bytes]:
    """Small valid files: the rule tests' sample (every encoding), and packed state dicts."""
    from test_reader_rules import write_sample

    import qpack

    write_sample(folder / "sample.qpk")
    seeds = [(folder / "sample.qpk").read_bytes()]
    gen = torch.Generator().manual_seed(3)
    state = {"conv.weight": torch.randn(4, 2, 3, 3, generator=gen), "conv.bias": torch.randn(4, generator=gen),
             "fc.weight": torch.randn(5, 16, generator=gen).half(), "steps": torch.tensor(9),
             "mask": torch.rand(3, 3, generator=gen) > 0.5, "zeros": torch.zeros(300)}
    choices = [{"bits": 3, "min_numel": 8}, {"bits": 7, "granularity": "channel", "min_numel": 8},
               {"bits": 2, "method": "kmeans", "min_numel": 8, "bias_bits": 4}]
    # version 4: masks beside an already-pruned weight, stored as derived from it (spec 3.5)
    weight = torch.randn(12, 16, generator=gen)
    weight[weight.abs() < 1.0] = 0
    masked = {"fc.weight": weight, "fc.weight_mask": (weight != 0).float(), "fc.flags": weight != 0,
              "fc.bias": torch.randn(12, generator=gen)}
    qpack.pack(masked, folder / "seed-v4.qpk", bits=6, force=True)
    seeds.append((folder / "seed-v4.qpk").read_bytes())
    for i, options in enumerate(choices):
        try:
            qpack.pack(state, folder / f"seed{i}.qpk", force=True, **options)
        except qpack.QpkError as exc:  # e.g. kmeans missing while it is being written
            print(f"seed {i} skipped: {exc}", file=sys.stderr)
            continue
        seeds.append((folder / f"seed{i}.qpk").read_bytes())
    return seeds


# -- checksum repair, so mutations get past R5 and R18 ----------------------------------------------


def fix_checksums(data: bytes, payloads_too: bool) -> bytes:
    """Recompute the header checksum (and, when the header parses, each payload's)."""
    if len(data) < PREAMBLE.size:
        return data
    magic, version, length, _, reserved = PREAMBLE.unpack_from(data)
    header = data[PREAMBLE.size: PREAMBLE.size + length]
    if payloads_too:
        try:
            doc = msgpack.unpackb(header, raw=False, strict_map_key=False)
            start = -(-(PREAMBLE.size + length) // 64) * 64
            for entry in doc["tensors"]:
                lo = start + entry["offset"]
                entry["crc32"] = zlib.crc32(data[lo: lo + entry["length"]])
            new_header = msgpack.packb(doc, use_bin_type=True)
            if len(new_header) == len(header):  # same size: the layout is unchanged
                header = new_header
                data = data[:PREAMBLE.size] + header + data[PREAMBLE.size + length:]
        except Exception:  # noqa: BLE001, S110 - a header this cannot repair is used as it is
            pass
    return PREAMBLE.pack(magic, version, length, zlib.crc32(header), reserved) + data[PREAMBLE.size:]


# -- the random engine ---------------------------------------------------------------------------------


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        kind = rng.randrange(9)
        pos = rng.randrange(len(data)) if data else 0
        if kind == 0 and data:  # bit flip
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # byte set
            data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == 2:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif kind == 3:  # extend
            data += rng.randbytes(rng.randrange(1, 100))
        elif kind == 4:  # insert
            data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 5:  # delete
            del data[pos: pos + rng.randrange(1, 16)]
        elif kind == 6 and data:  # copy a run from elsewhere
            src = rng.randrange(len(data))
            run = data[src: src + rng.randrange(1, 32)]
            data[pos: pos + len(run)] = run
        elif kind == 7 and len(data) >= 4:  # an interesting integer, little- or big-endian
            value = rng.choice([0, 1, 16, 17, 63, 64, 255, 256, 0xFFFF, 2 ** 31 - 1, 2 ** 32 - 1])
            width = rng.choice([1, 2, 4])
            order = rng.choice(["little", "big"])
            data[pos: pos + width] = (value % (1 << (8 * width))).to_bytes(width, order)
        elif kind == 8:  # a msgpack header value with the checksums repaired below
            data = bytearray(edit_header(rng, bytes(data)))
    mode = rng.random()
    if mode < 0.4:
        return fix_checksums(bytes(data), payloads_too=mode < 0.25)
    return bytes(data)


INTERESTING = [0, 1, 3, 8, 16, 17, 64, 2 ** 32, 2 ** 48, 2 ** 48 + 1, 2 ** 63, 2 ** 64 - 1, -1, -(2 ** 63),
               1.5, float("nan"), True, None, "", "raw", "uniform", "kmeans", "zstd", "none", "channel",
               "float32", "bool", [], [2 ** 32, 2 ** 32], [1] * 33, {}, b"", b"\x00\x00\x80\x7f"]


def edit_header(rng: random.Random, data: bytes) -> bytes:
    """Replace one field of one entry (or the metadata) and re-lay the file out."""
    try:
        version, doc, payloads = take_apart(data)
        if rng.random() < 0.1:
            doc["metadata"] = rng.choice([{"k": rng.choice(INTERESTING)}, rng.choice(INTERESTING)])
        else:
            entry = rng.choice(doc["tensors"])
            key = rng.choice(sorted(entry))
            entry[key] = rng.choice(INTERESTING)
        return put_together(version, doc, payloads, relayout=rng.random() < 0.7,
                            reserved=PREAMBLE.unpack_from(data)[4], magic=data[:8])
    except Exception:  # noqa: BLE001 - not a file this can take apart: leave it
        return data


def run_random(run: Run, seeds: list[bytes], seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            if rng.random() < 0.5:
                kind, data = structured(rng, rng.choice(seeds))
                run.check(data, kind)
            else:
                run.check(mutate(rng, rng.choice(seeds)))


# -- header-field mutations in classes, with the layout and every checksum repaired -----------------


#: version 3 and later (spec 2.4): the keys a compact entry leaves out at these values
_COMPACT_DEFAULTS = {"encoding": "raw", "bits": 0, "granularity": "tensor", "group_size": 0,
                     "param_dtype": "float32", "params": {}, "compression": "none", "stats": {}}


def take_apart(data: bytes) -> tuple[int, dict, list[bytes]]:
    """(version, header document with every entry in full form, payloads); a version-3 or -4
    header is decompressed and its compact entries given their defaults, offsets and raw
    lengths, so that the classes edit one form."""
    _, version, length, _, field = PREAMBLE.unpack_from(data)
    header = data[PREAMBLE.size: PREAMBLE.size + length]
    if version >= 3 and field:
        import zstandard

        header = zstandard.ZstdDecompressor().decompress(header, max_output_size=field)
    doc = msgpack.unpackb(header, raw=False)
    start = -(-(PREAMBLE.size + length) // 64) * 64
    if version >= 3:
        from qpack.format import expected_raw_length

        end = 0
        for i, entry in enumerate(doc["tensors"]):
            full = {**_COMPACT_DEFAULTS, "width": entry.get("bits", 0), **entry}
            full["offset"] = -(-end // 64) * 64
            full["raw_length"] = expected_raw_length(full["dtype"], tuple(full["shape"]), full["encoding"], full["width"])
            end = full["offset"] + full["length"]
            doc["tensors"][i] = full
    return version, doc, [data[start + t["offset"]: start + t["offset"] + t["length"]] for t in doc["tensors"]]


def _compact(entry: object) -> object:
    """A full entry in version 3's form: offset and raw_length dropped, defaults left out."""
    if not isinstance(entry, dict):
        return entry
    out = {}
    for key, value in entry.items():
        default = entry.get("bits") if key == "width" else _COMPACT_DEFAULTS.get(key, object())
        if key in ("offset", "raw_length") or (type(value) is type(default) and value == default):
            continue
        out[key] = value
    return out


def put_together(version: int, doc: dict, payloads: list[bytes], *, relayout: bool = True,
                 header: bytes | None = None, reserved: int = 0, magic: bytes = b"\x89QPK\r\n\x1a\n") -> bytes:
    """The file, each entry's offset, length and crc32 recomputed (unless ``relayout`` is off);
    ``header`` replaces msgpack's encoding of ``doc``."""
    body = bytearray()
    for entry, payload in zip(doc["tensors"], payloads):
        body += bytes(-len(body) % 64)
        if relayout and isinstance(entry, dict):
            entry["offset"], entry["length"], entry["crc32"] = len(body), len(payload), zlib.crc32(payload)
        body += payload
    if header is None and version >= 3 and isinstance(doc, dict) and isinstance(doc.get("tensors"), list):
        doc = {**doc, "tensors": [_compact(e) for e in doc["tensors"]]}
        reserved = 0  # the header stored as it is (U = 0)
    header = msgpack.packb(doc, use_bin_type=True) if header is None else header
    head = PREAMBLE.pack(magic, version, len(header), zlib.crc32(header), reserved) + header
    return head + bytes(-len(head) % 64) + bytes(body)


DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
          "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]
ODD_FLOATS = [0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, float("nan"), float("inf"), 65504.0, 65520.0]


def _f32(values: list[float]) -> bytes:
    import numpy as np

    return np.asarray(values, dtype="<f4").tobytes()


def _numel(shape: object) -> int:
    count = 1
    for dim in shape if isinstance(shape, list) else []:
        count *= dim if isinstance(dim, int) else 1
    return count


def _refit(entry: dict, payload: bytes) -> bytes:
    """raw_length made consistent with dtype, shape and width; payload padded or cut to it when
    stored uncompressed, so that the later rules are the ones that decide."""
    from qpack.format import expected_raw_length

    try:
        raw_length = expected_raw_length(entry["dtype"], tuple(entry["shape"]), entry["encoding"], entry["width"])
    except Exception:  # noqa: BLE001 - a field this cannot interpret: leave it
        return payload
    entry["raw_length"] = raw_length
    if entry.get("compression") == "none" and raw_length < 1 << 20:
        payload = (payload + bytes(raw_length))[:raw_length]
    return payload


def _zstd_zeros(count: int) -> bytes:
    sizes = [1 << 17] * (count // (1 << 17)) + ([count % (1 << 17)] if count % (1 << 17) else [])
    out = bytearray(struct.pack("<IBQ", 0xFD2FB528, 0xE0, count))
    for i, size in enumerate(sizes):
        out += ((size << 3) | 2 | int(i == len(sizes) - 1)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def _quantized(doc: dict) -> list[int]:
    return [i for i, t in enumerate(doc["tensors"]) if t["encoding"] != "raw"]


def _mutate_class(kind: str, rng: random.Random, doc: dict, payloads: list[bytes]) -> None:
    """Change ``doc`` / ``payloads`` in place as class ``kind`` says."""
    tensors = doc["tensors"]
    i = rng.randrange(len(tensors))
    quantized = _quantized(doc)
    if kind in ("bits", "width", "params", "codebook", "granularity", "unused-bits", "index-past-limit",
                "rans-table") and quantized:
        i = rng.choice(quantized)
    entry, payload = tensors[i], payloads[i]
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
        payloads[i] = _refit(entry, payload)
    elif kind == "shape-same-numel":
        numel = _numel(entry["shape"])
        entry["shape"] = rng.choice([[numel], [1, numel], [numel, 1], [1] * rng.randrange(33) + [numel]])
    elif kind == "shape-other-numel":
        entry["shape"] = [max(0, _numel(entry["shape"]) + rng.choice([-1, 1, 7, -8]))]
        payloads[i] = _refit(entry, payload)
    elif kind == "shape-huge":
        entry["shape"] = rng.choice([[2 ** 48], [2 ** 24, 2 ** 24], [2 ** 32, 2 ** 32], [2 ** 30], [2 ** 31]])
        payloads[i] = _refit(entry, payload)
    elif kind == "bits":
        entry["bits"] = rng.choice([0, 1, 2, 7, 8, 15, 16, 17, entry["bits"] - 1, entry["bits"] + 1])
        entry["width"] = max(entry["width"], entry["bits"])
        payloads[i] = _refit(entry, payload)
    elif kind == "width":
        entry["width"] = rng.randrange(entry["bits"], 17)
        payloads[i] = _refit(entry, payload)
    elif kind == "encoding":
        entry["encoding"] = rng.choice(["raw", "uniform", "kmeans"])
        if entry["encoding"] == "raw":
            entry.update(bits=0, width=0, granularity="tensor", group_size=0, params={})
        elif entry["bits"] == 0:
            entry.update(bits=8, width=8)
        payloads[i] = _refit(entry, payload)
    elif kind == "granularity":
        entry["granularity"] = rng.choice(["tensor", "channel", "group"])
        entry["group_size"] = rng.choice([16, 32, 64, 65536]) if entry["granularity"] == "group" else 0
    elif kind == "group-size":
        entry["group_size"] = rng.choice([0, 1, 15, 16, 17, 64, 65536, 65537])
    elif kind == "params" and not entry["params"]:  # an earlier mutation made it raw
        entry["params"] = {rng.choice(["min", "codebook", "source"]): rng.choice([0, b"", "w"])}
    elif kind == "params":
        key = rng.choice(sorted(entry["params"]))
        value = entry["params"][key]
        if isinstance(value, bytes) and value:
            count = len(value) // 4
            entry["params"][key] = _f32([rng.choice(ODD_FLOATS) for _ in range(count + rng.choice([0, 0, 0, -1, 1]))])
        else:
            entry["params"][key] = rng.choice([0, 1, 2, 3, 2 ** 16, 2 ** 16 + 1, True, -1])
    elif kind == "codebook":
        if entry["encoding"] == "kmeans":
            size = rng.choice([1, 2, 1 << entry["bits"], (1 << entry["bits"]) + 1])
            rows = len(entry["params"]["codebook"]) // 4 // max(entry["params"]["codebook_size"], 1)
            entry["params"] = {"codebook": _f32([rng.choice(ODD_FLOATS[:7]) for _ in range(rows * size)]),
                               "codebook_size": size}
    elif kind == "raw-length":
        entry["raw_length"] += rng.choice([-1, 1, 64])
    elif kind == "compression":
        entry["compression"] = rng.choice(["none", "zstd", "rans", "gzip"])
    elif kind == "zstd-frame":
        import zstandard

        raw = bytes(entry["raw_length"]) if entry["raw_length"] < 1 << 20 else b""
        frame = bytearray(zstandard.ZstdCompressor(level=3, write_checksum=rng.random() < 0.5).compress(raw))
        choice = rng.randrange(4)
        if choice == 0 and len(frame) > 5:
            frame[4] ^= 1 << rng.randrange(8)  # frame header descriptor: sizes, dictionary, checksum
        elif choice == 1:
            frame = bytearray(struct.pack("<II", 0x184D2A50, 3) + b"qpk") + frame
        elif choice == 2 and frame:
            frame[-1] ^= 1
        payloads[i] = bytes(frame)
        entry["compression"] = "zstd"
    elif kind == "zstd-bomb":
        entry.update(dtype="float16", shape=[rng.choice([1 << 24, 1 << 27, 1 << 30])], encoding="kmeans", bits=1,
                     width=1, granularity="tensor", group_size=0, compression="zstd",
                     params={"codebook": _f32([0.5]), "codebook_size": 1})
        entry["raw_length"] = (entry["shape"][0] + 7) // 8
        payloads[i] = _zstd_zeros(entry["raw_length"])
    elif kind == "rans-table":
        from qpack import rans
        from qpack.bitpack import unpack_bits

        import numpy as np

        # a tensor large and skewed enough that rANS is smaller than its packed indices (R15)
        numel = rng.choice([4096, 10_000, 70_000])
        indices = np.minimum(np.random.default_rng(rng.randrange(1 << 30)).geometric(0.6, numel) - 1,
                             (1 << entry["bits"]) - 1)
        if entry["encoding"] == "kmeans":
            indices = np.minimum(indices, entry["params"]["codebook_size"] - 1)
        entry.update(shape=[numel], granularity="tensor", group_size=0)
        if entry["encoding"] == "uniform":
            entry["params"] = {"min": _f32([-1.0]), "max": _f32([1.0])}
        else:
            size = entry["params"]["codebook_size"]
            entry["params"] = {"codebook": _f32([0.25 * k for k in range(size)]), "codebook_size": size}
        coded = bytearray(rans.encode(indices))
        field = rng.randrange(5)
        if field == 0:
            coded[0:4] = struct.pack("<I", rng.choice([1, 2, 3, 8192, 2 ** 31]))
        elif field == 1:
            coded[4:8] = struct.pack("<I", rng.choice([1, 2, 1 << entry["bits"], (1 << entry["bits"]) + 1]))
        elif field == 2 and len(coded) > 10:
            at = 8 + 2 * rng.randrange((len(coded) - 8) // 2)
            coded[at:at + 2] = struct.pack("<H", rng.choice([0, 1, 32768, 65535]))
        payloads[i] = bytes(coded)
        entry["compression"], entry["width"] = "rans", entry["bits"]
        _refit(entry, b"")
        del unpack_bits
    elif kind in ("unused-bits", "index-past-limit"):
        from qpack.bitpack import pack_bits

        try:
            indices = _indices(entry, payload)
        except Exception:  # noqa: BLE001 - not a payload this can take apart
            return
        if indices.size > 1 << 22:  # keep the files small
            return
        import torch

        if kind == "index-past-limit":  # the largest index the width holds, somewhere
            indices[rng.randrange(indices.size)] = (1 << entry["width"]) - 1
        packed = bytearray(pack_bits(torch.from_numpy(indices), entry["width"]).numpy().tobytes())
        if kind == "unused-bits" and packed:
            packed[-1] |= 0x80
        payloads[i] = bytes(packed)
        entry["compression"] = "none"
    elif kind == "stats":
        entry["stats"] = rng.choice([
            {"unique_before": float("nan"), "unique_after": float("inf")}, {"rel_rms": 1e300, "snr_db": -1e300},
            {"unique_before": -1, "unique_after": 2 ** 64 - 1}, {"k": True}, {"k": [1]}, {"k" * 65: 1},
            {str(n): n for n in range(17)}, {"": 0.5}, {"k": None}])
    elif kind == "name":
        other = tensors[rng.randrange(len(tensors))]["name"]
        entry["name"] = rng.choice([other, "", "n" * 1024, "n" * 1025, "caf\u00e9", "cafe\u0301", "\x00"])
    elif kind == "metadata":
        doc["metadata"] = rng.choice([{"": ""}, {"k" * 257: "v"}, {"k": 1}, {"k": "v" * 65536},
                                      {str(n): "" for n in range(4097)}, [], {"qpack.options": "{"}])
    elif kind == "keys":
        if rng.random() < 0.5:
            entry[rng.choice(sorted(entry))] = None
        else:
            entry.pop(rng.choice(sorted(entry)))
    elif kind == "derived-fields":  # an entry made derived, one of its fields then changed (R12, R24)
        entry.update(encoding="derived", bits=0, width=0, granularity="tensor", group_size=0, compression="none",
                     params={"source": tensors[rng.randrange(len(tensors))]["name"], "rule": "nonzero"})
        payloads[i] = b""
        field = rng.randrange(7)
        if field == 0:
            entry["params"]["rule"] = rng.choice(["", "zero", "nonzero ", 1, None])
        elif field == 1:
            entry["params"]["source"] = rng.choice(["", "n" * 1025, 7, b"w", None, "\udcff"])
        elif field == 2:
            entry["params"] = rng.choice([{}, {"source": "x"}, {"source": "x", "rule": "nonzero", "k": 1}, []])
        elif field == 3:
            entry[rng.choice(["bits", "width", "group_size"])] = rng.choice([1, 8, 16])
        elif field == 4:
            entry["compression"] = rng.choice(["zstd", "rans", "zstd_planes"])
        elif field == 5:
            payloads[i] = rng.randbytes(rng.randrange(1, 9))
        else:
            entry["param_dtype"] = "float16"
    elif kind == "derived-source":  # a derived entry whose source is the right one or not (R25)
        names = [t["name"] for t in tensors if isinstance(t, dict) and isinstance(t.get("name"), str)]
        others = [t for t in tensors if t is not entry and t.get("encoding") != "derived"]
        source = rng.choice(others) if others else entry
        entry.update(encoding="derived", bits=0, width=0, granularity="tensor", group_size=0, compression="none",
                     param_dtype="float32", params={"source": source["name"], "rule": "nonzero"})
        payloads[i] = b""
        choice = rng.randrange(5)
        if choice == 0:
            entry["shape"] = list(source["shape"])  # valid
            entry["dtype"] = rng.choice(DTYPES)
        elif choice == 1:
            entry["params"]["source"] = entry["name"]  # itself
        elif choice == 2:
            entry["params"]["source"] = "no such tensor" if "no such tensor" not in names else "x"
        elif choice == 3:
            entry["shape"] = list(source["shape"]) + [1]
        elif others:  # a chain: the source made derived too
            other = rng.choice([t for t in tensors if t is not entry])
            other.update(encoding="derived", bits=0, width=0, granularity="tensor", group_size=0,
                         compression="none", param_dtype="float32",
                         params={"source": entry["name"], "rule": "nonzero"}, shape=list(entry["shape"]))
            payloads[tensors.index(other)] = b""
    elif kind == "booleans":
        key = rng.choice(["bits", "width", "group_size", "crc32", "offset", "length", "raw_length"])
        entry[key] = bool(entry[key]) if isinstance(entry[key], int) else True


def _indices(entry: dict, payload: bytes):
    """The indices a quantized entry's payload holds (numpy), for re-coding."""
    import torch
    import zstandard

    from qpack import rans
    from qpack.bitpack import unpack_bits

    numel = _numel(entry["shape"])
    if entry["compression"] == "rans":
        return rans.decode(payload, numel, entry["bits"]).astype("int64")
    raw = payload if entry["compression"] == "none" else zstandard.ZstdDecompressor().decompress(payload)
    return unpack_bits(torch.frombuffer(bytearray(raw), dtype=torch.uint8), entry["width"], numel).numpy().astype("int64")


CLASSES = ["dtype", "shape-same-numel", "shape-other-numel", "shape-huge", "bits", "width", "encoding",
           "granularity", "group-size", "params", "codebook", "raw-length", "compression", "zstd-frame",
           "zstd-bomb", "rans-table", "unused-bits", "index-past-limit", "stats", "name", "metadata", "keys",
           "booleans", "derived-fields", "derived-source", "version", "no-relayout", "non-canonical", "several"]


def structured(rng: random.Random, seed: bytes) -> tuple[str, bytes]:
    """(class, file): one header-field mutation of a valid file, laid out and checksummed again."""
    for _ in range(100):
        try:
            return _structured(rng, seed)
        except (OverflowError, ValueError, TypeError, KeyError):  # e.g. a value msgpack cannot encode: another draw
            continue
    return "bytes", mutate(rng, seed)  # a seed this cannot take apart (it used to loop here forever)


def _structured(rng: random.Random, seed: bytes) -> tuple[str, bytes]:
    kind = rng.choice(CLASSES)
    version, doc, payloads = take_apart(seed)
    if kind == "version":
        return kind, put_together(rng.choice([0, 1, 2, 3, 4, 5]), doc, payloads)
    if kind == "non-canonical":  # the same values in other msgpack forms: must read the same
        from test_spec_points import _wide

        if version >= 3:  # compact entries, the header stored as it is
            doc = {**doc, "tensors": [_compact(e) for e in doc["tensors"]]}
        return kind, put_together(version, doc, payloads, relayout=False, header=_wide(doc))
    kinds = [rng.choice(CLASSES[:25]) for _ in range(rng.randrange(2, 5))] if kind == "several" else [kind]
    for one in kinds:
        _mutate_class("dtype" if one == "no-relayout" else one, rng, doc, payloads)
    tensors = [e for e in doc["tensors"] if isinstance(e, dict)]
    if any(e.get("encoding") == "derived" for e in tensors) and rng.random() < 0.9:
        version = 4
    elif version >= 3:
        version = 3 if rng.random() < 0.9 else version
    elif any(e.get("compression") == "rans" for e in tensors):
        version = 2
    elif version == 2 and rng.random() < 0.8:
        version = 1
    return kind, put_together(version, doc, payloads, relayout=kind != "no-relayout")


# -- the atheris engine ----------------------------------------------------------------------------------


def run_atheris(run: Run, seeds: list[bytes], seconds: float, seed: int, started: float) -> None:
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix="qpk-corpus-"))
    for i, data in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(data)
        (corpus / f"seed{i}-fixed").write_bytes(b"\x01" + data)
    deadline = time.monotonic() + seconds

    def one_input(data: bytes) -> None:
        # the first byte picks a checksum repair, so coverage can grow past R5 and R18
        mode, body = (data[0] % 3, data[1:]) if data else (0, data)
        if mode:
            body = fix_checksums(body, payloads_too=mode == 2)
        run.check(body)
        if time.monotonic() > deadline:
            print(run.report(time.perf_counter() - started, "atheris"), flush=True)
            run.close()
            os._exit(1 if run.failures else 0)

    args = [sys.argv[0], str(corpus), f"-seed={seed}", "-max_len=8192", "-rss_limit_mb=4096",
            "-print_final_stats=1"]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to run (default 60)")
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slow", type=float, default=1.0,
                        help="a case slower than this (plus 20 ns per byte of file) is a failure")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="where failing inputs go")
    args = parser.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris
            engine = "atheris"
        except ImportError:
            engine = "random"
    signal.signal(signal.SIGALRM, _on_alarm)
    started = time.perf_counter()
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports():
            import qpack
            import qpack.format
            import qpack.reader  # noqa: F401
    seeds = seed_files(Path(tempfile.mkdtemp(prefix="qpk-seeds-")))
    run = Run(args.out, args.slow)
    try:
        if engine == "atheris":
            run_atheris(run, seeds, args.seconds, args.seed, started)
        run_random(run, seeds, args.seconds, args.seed)
    finally:
        run.close()
    print(run.report(time.perf_counter() - started, engine))
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
