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
sys.path.insert(0, str(HERE.parent))  # the crafting helpers live in tests/test_reader_rules.py

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
        fd, name = tempfile.mkstemp(suffix=".qpk", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        self.scratch = Path(name)

    def check(self, data: bytes) -> None:
        from qpack import QpkError, QpkReader

        self.cases += 1
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
        except QpkError as exc:
            self.rejected += 1
            rule = getattr(exc, "rule", type(exc).__name__)
            self.rules[rule] = self.rules.get(rule, 0) + 1
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.fail(f"{type(exc).__name__}: {str(exc)[:120]}", data, traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - started
        if elapsed > self.slow:
            self.fail(f"slow: {elapsed:.2f} s", data, "")

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
        _, version, length, _, reserved = PREAMBLE.unpack_from(data)
        doc = msgpack.unpackb(data[PREAMBLE.size: PREAMBLE.size + length], raw=False)
        start = -(-(PREAMBLE.size + length) // 64) * 64
        payloads = [data[start + t["offset"]: start + t["offset"] + t["length"]] for t in doc["tensors"]]
        if rng.random() < 0.1:
            doc["metadata"] = rng.choice([{"k": rng.choice(INTERESTING)}, rng.choice(INTERESTING)])
        else:
            entry = rng.choice(doc["tensors"])
            key = rng.choice(sorted(entry))
            entry[key] = rng.choice(INTERESTING)
        relayout = rng.random() < 0.7
        body = bytearray()
        for entry, payload in zip(doc["tensors"], payloads):
            body += bytes(-len(body) % 64)
            if relayout and isinstance(entry, dict):
                entry["offset"], entry["length"], entry["crc32"] = len(body), len(payload), zlib.crc32(payload)
            body += payload
        header = msgpack.packb(doc, use_bin_type=True)
    except Exception:  # noqa: BLE001 - not a file this can take apart: leave it
        return data
    head = PREAMBLE.pack(data[:8], version, len(header), zlib.crc32(header), reserved) + header
    return head + bytes(-len(head) % 64) + bytes(body)


def run_random(run: Run, seeds: list[bytes], seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            run.check(mutate(rng, rng.choice(seeds)))


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
    parser.add_argument("--slow", type=float, default=1.0, help="a case slower than this is a failure")
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
