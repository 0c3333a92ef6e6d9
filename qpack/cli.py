"""The ``qpack`` command: a thin shell over qpack.api. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "EXIT_CODES"]

#: exit status -> meaning (also printed by ``qpack --help``)
EXIT_CODES = {
    0: "success",
    1: "verify found a problem, or another qpack error",
    2: "bad input or usage (missing file, not a checkpoint, bad option)",
    3: "the output exists (pass --force to replace it)",
    4: "not a valid .qpk file (corrupted, truncated, unsupported version)",
    5: "operating-system error while reading or writing (disk full, permission)",
    130: "interrupted",
}


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qpack`` command (the CLI reference is generated from it)."""
    parser = _OneLineErrors(
        prog="qpack",
        description="Pack PyTorch state dicts into compact .qpk files (uniform or k-means quantization) and back.",
        epilog="exit status: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"qpack {_version()}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("pack", help="quantize a checkpoint into a .qpk file",
                       description="Quantize a checkpoint (.pt/.pth/.bin/.ckpt) into a .qpk file.")
    p.add_argument("input", help="the checkpoint: .pt/.pth/.bin/.ckpt, .safetensors, a sharded "
                   "checkpoint's *.index.json, or a folder holding one")
    p.add_argument("-o", "--output", help="the .qpk file to write (default: INPUT with .qpk)")
    p.add_argument("-b", "--bits", action="append", default=[], metavar="B|GLOB=B",
                   help="index bits, 1-16 (default 8); GLOB=B sets the bits of matching tensors (repeatable)")
    p.add_argument("-m", "--method", default="uniform", choices=["uniform", "kmeans"],
                   help="uniform min/max grid, or k-means codebook (default uniform)")
    p.add_argument("-g", "--granularity", default="tensor", metavar="tensor|channel|group:G",
                   help="one min/max or codebook per tensor, per output channel, or per run of G "
                        "elements, 16 <= G <= 65536 (default tensor)")
    p.add_argument("--bias-bits", type=int, metavar="N",
                   help="also quantize 1-D float tensors (biases, norm weights) at N bits")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep tensors whose names match GLOB lossless (repeatable)")
    p.add_argument("--min-numel", type=int, default=64, metavar="N",
                   help="float tensors with fewer elements stay lossless (default 64)")
    p.add_argument("--prune", type=float, metavar="FRACTION",
                   help="zero this fraction of the smallest weights of each quantized tensor")
    p.add_argument("--exact-zero", action="store_true",
                   help="give every grid or codebook an exact 0 level (zeros stay zeros)")
    p.add_argument("--rans", choices=["auto", "always", "never"], default="auto",
                   help="entropy-code indices with rANS: auto (when it saves 5 %%), always (when smaller), "
                        "never (faster loading)")
    p.add_argument("--param-dtype", choices=["auto", "float32", "float16", "uint8"], default="auto",
                   help="stored min/max and codebooks: float16 halves their bytes (1 bit per weight at "
                        "group:32), uint8 codes them in 8 bits under a float32 base per tensor (0.5 bit, "
                        "uniform only); auto: float16 for group granularity, float32 otherwise")
    p.add_argument("--rounding", choices=["balanced", "nearest"], default="balanced",
                   help="uniform grids: balanced (default; up to 6 bits, each output row's rounding errors "
                        "sum to about 0, which keeps low-bit layers from shifting their outputs) or nearest "
                        "(every value to its nearest level)")
    allocation = p.add_mutually_exclusive_group()
    allocation.add_argument("--target-bpw", type=float, metavar="X",
                            help="choose each tensor's bits (1-8) and granularity so the file has at most X "
                                 "bits per weight, with the least predicted error (relative errors summed per layer)")
    allocation.add_argument("--max-error", type=float, metavar="E",
                            help="choose each tensor's bits (1-8) and granularity for the smallest file whose "
                                 "predicted error (RMS of the per-layer relative errors) is at most E")
    p.add_argument("--allocate-granularity", metavar="LIST",
                   help="with --target-bpw or --max-error: the granularities to choose from, comma-separated, "
                        "e.g. tensor,channel,group:64 (default: --granularity, channel for uniform, and "
                        "tensor; each one adds 8 trial encodes per tensor)")
    p.add_argument("--sensitivity", metavar="FILE.json",
                   help="with --target-bpw or --max-error: weigh each tensor's error by the sensitivity that "
                        "qpack.measure_sensitivity(..., path=FILE.json) measured on data")
    p.add_argument("--min-snr", type=float, metavar="DB",
                   help="with --target-bpw or --max-error: the quality floor, no quantized tensor below DB dB "
                        "SNR (the conv before a global pool: 3 dB lower); a target met only below it is "
                        "refused (default 13)")
    p.add_argument("--allow-below-floor", action="store_true",
                   help="let --target-bpw or --max-error go below the --min-snr floor")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="store a metadata entry in the file (repeatable)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints holding arbitrary pickled objects (runs their code)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = sub.add_parser("unpack", help="write a .qpk file back as a checkpoint",
                       description="Write a .qpk file back as a checkpoint (torch.save): the state dict, "
                                   "nested as it was packed, with the plain data kept beside it.")
    p.add_argument("input", help="the .qpk file")
    p.add_argument("-o", "--output", help="the .pt file to write (default: INPUT with .pt)")
    p.add_argument("--format", choices=["pt", "safetensors"],
                   help="output format (default: from the output's extension, else pt)")
    p.add_argument("--flat", action="store_true",
                   help="write the flat state dict, not the nesting and plain data the file records")
    _add_max_bytes(p)
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = sub.add_parser("info", help="show what a .qpk file holds",
                       description="Show each tensor of a .qpk file and the totals.")
    p.add_argument("input", help="the .qpk file")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("verify", help="check a whole .qpk file (exit 0 or 1)",
                       description="Check every rule and checksum of a .qpk file and decode every tensor.")
    p.add_argument("input", help="the .qpk file")
    _add_max_bytes(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("bench", help="try packing settings on your checkpoint and compare them",
                       description="Pack a checkpoint with each method, width and granularity; "
                                   "print size, bits per weight, SNR and time for each.")
    p.add_argument("input", help="the checkpoint (any input pack accepts)")
    p.add_argument("--methods", default="uniform,kmeans", help="comma-separated (default uniform,kmeans)")
    p.add_argument("--bits", default="2,3,4,8", help="comma-separated widths (default 2,3,4,8)")
    p.add_argument("--granularities", default="tensor,channel", help="comma-separated (default tensor,channel)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled objects (runs their code)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")

    p = sub.add_parser("diff", help="compare two checkpoints tensor by tensor",
                       description="Compare two checkpoints (.qpk, .pt, .safetensors, ...) tensor by tensor.")
    p.add_argument("a", help="the reference checkpoint")
    p.add_argument("b", help="the checkpoint to compare with it")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("demo", help="reproduce the seed MNIST experiment",
                       description="Train an MNIST network (the seed CNN, LeNet-300-100 or LeNet-5), pack it "
                                   "every way, and evaluate each .qpk file.")
    _configure_demo(p)
    return parser


def _add_max_bytes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-bytes", default="auto", metavar="N|unlimited",
                        help="refuse files whose tensors decode to more than N bytes (suffixes K, M, G, T: "
                             "powers of 1024); default 256x the file's size, at least 16 MiB (spec R23)")


def _parse_max_bytes(value: str) -> int | str | None:
    from .errors import InputError

    text = value.strip().lower()
    if text in ("auto", "unlimited"):
        return None if text == "unlimited" else "auto"
    scale = 1 << 10 * ("kmgt".index(text[-1]) + 1) if text and text[-1] in "kmgt" else 1
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        number = -1.0
    if not 0 <= number < 2 ** 63 / scale:
        raise InputError(f"--max-bytes takes a number of bytes (e.g. 8G) or 'unlimited', got {value!r}")
    return int(number * scale)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    try:
        from .demo.cli import configure_parser
    except ImportError:  # the demo is being written; the core works without it
        return
    configure_parser(parser)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see EXIT_CODES)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="qpack: %(message)s")
    if not args.debug:  # torch's deprecation notices are not the user's problem
        warnings.simplefilter("ignore")
    from .errors import QpkError

    try:
        return _COMMANDS[args.command](args)
    except QpkError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except MemoryError:
        return _fail(args, "out of memory", 5)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}", 5)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        return _fail(args, f"unexpected {type(exc).__name__}: {_first_line(str(exc))} "
                           "(run 'qpack --debug ...' for the traceback, and please report it)", 1)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"qpack: error: {message}", file=sys.stderr)
    return code


def _parse_bits(values: list[str]) -> tuple[int, dict[str, int]]:
    from .errors import InputError

    bits, overrides = 8, {}
    for value in values:
        pattern, _, number = value.rpartition("=")
        try:
            parsed = int(number)
        except ValueError:
            raise InputError(f"bits must be a number or GLOB=NUMBER, got {value!r}") from None
        if pattern:
            overrides[pattern] = parsed
        else:
            bits = parsed
    return bits, overrides


def _parse_meta(values: list[str]) -> dict[str, str]:
    from .errors import InputError

    meta = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise InputError(f"--meta takes KEY=VALUE, got {value!r}")
        meta[key] = text
    return meta


def _cmd_pack(args: argparse.Namespace) -> int:
    from . import api

    bits, overrides = _parse_bits(args.bits)
    output = Path(args.output) if args.output else Path(args.input).with_suffix(".qpk")
    sensitivity = None
    if args.sensitivity is not None:
        from .sensitivity import load_sensitivity

        sensitivity = load_sensitivity(args.sensitivity)
    report = api.pack(args.input, output, bits=bits, method=args.method, granularity=args.granularity,
                      bias_bits=args.bias_bits, exclude=args.exclude, bit_overrides=overrides,
                      min_numel=args.min_numel, prune=args.prune, exact_zero=args.exact_zero, rans=args.rans,
                      param_dtype=args.param_dtype, rounding=args.rounding,
                      target_bpw=args.target_bpw, max_error=args.max_error,
                      allocate_granularity=args.allocate_granularity, sensitivity=sensitivity,
                      allow_below_floor=args.allow_below_floor,
                      **({} if args.min_snr is None else {"min_snr_db": args.min_snr}),
                      force=args.force, metadata=_parse_meta(args.meta),
                      trust_pickle=args.trust_pickle, progress=_progress_bar(args, "packing"))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        for note in report.notes:
            print(f"note: {note}")
        print(_pack_summary(report))
    return 0


def _pack_summary(report: Any) -> str:
    groups: Counter[tuple[str, int, str]] = Counter()
    params: Counter[tuple[str, int, str]] = Counter()
    for row in report.tensors:
        key = (row.encoding, row.bits, row.reason)
        groups[key] += 1
        params[key] += _numel(row.shape)
    lines = []
    for (encoding, bits, reason), count in sorted(groups.items(), key=lambda kv: (kv[0][0] == "raw", kv[0])):
        what = {"raw": "kept lossless", "derived": "derived mask"}.get(encoding, f"{encoding} {bits}-bit")
        lines.append(f"  {what:<16} {count:>5} tensor(s) {params[(encoding, bits, reason)]:>13,} values  ({reason})")
    lines.append(f"{report.path}: {human_bytes(report.file_bytes)} from {human_bytes(report.original_bytes)} "
                 f"of tensors ({100 * report.ratio:.1f} %) in {report.seconds:.2f} s")
    return "\n".join(lines)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _cmd_unpack(args: argparse.Namespace) -> int:
    from . import api

    output = Path(args.output) if args.output else Path(args.input).with_suffix(".pt")
    if args.output is None and args.format == "safetensors":
        output = output.with_suffix(".safetensors")
    api.unpack(args.input, output, force=args.force, format=args.format, flat=args.flat,
               progress=_progress_bar(args, "decoding"), max_bytes=_parse_max_bytes(args.max_bytes))
    if not args.quiet:
        print(f"wrote {output}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import api

    report = api.info(args.input)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    header = ["name", "shape", "dtype", "encoding", "bits", "unique", "stored", "as", "rel rms", "SNR dB"]
    rows = []
    for t in report.tensors:
        unique = ("-" if t.unique_before is None else
                  f"{t.unique_before} -> {'-' if t.unique_after is None else t.unique_after}")
        rows.append([t.name, "x".join(map(str, t.shape)) or "()", t.dtype,
                     t.encoding if t.granularity == "tensor" else f"{t.encoding}/{t.granularity}",
                     str(t.bits) if t.bits else "-", unique, human_bytes(t.stored_bytes), t.storage,
                     _stat(t.rel_rms, ".4f"), _stat(t.snr_db, ".1f")])
    print(format_table(header, rows, right={4, 6, 8, 9}))
    for key, value in sorted(report.metadata.items()):
        if key == "qpack.structure" and len(value) > 160:  # up to 64 KiB of vocabularies: --json has it all
            value = f"{value[:120]}... ({len(value):,} bytes of JSON: the nesting and plain data unpack rebuilds)"
        print(f"{key}: {value}")
    if report.allocation is not None:
        print(_allocation_line(report.allocation))
    print(f"container: .qpk version {report.format_version}, {report.container_bytes:,} bytes besides the "
          f"payloads (preamble, header, padding)")
    print(f"total: {human_bytes(report.file_bytes)} file for {human_bytes(report.original_bytes)} of tensors "
          f"({100 * report.ratio:.1f} %, {report.original_bytes / max(report.file_bytes, 1):.2f}x smaller)")
    return 0


def _stat(value: float | None, spec: str) -> str:
    """A stats value for the table; huge ones (a file may store any number) in exponent form."""
    if value is None:
        return "-"
    return f"{value:{spec}}" if abs(value) < 1e9 else f"{value:.3g}"
def _allocation_line(summary: dict[str, Any]) -> str:
    """One line on what an allocation chose against: its limit, floor and predicted error."""
    from .allocate import describe_floors

    limit = (f"--target-bpw {summary['target_bpw']:g}" if summary.get("target_bpw") is not None
             else f"--max-error {summary.get('max_error')}")
    floor = summary.get("min_snr_db")
    lowest = summary.get("lowest_snr_db")
    below = summary.get("below_floor") or []
    own = "" if floor is None else describe_floors(summary.get("tensor_floors") or {})
    return (f"allocation: {limit}, {summary.get('objective')} objective, predicted error "
            f"{summary.get('predicted_error')}, floor {'none' if floor is None else f'{floor:g} dB SNR'}{own}"
            f"{'' if lowest is None else f', lowest {lowest:.1f} dB'}"
            f"{f', below the floor: {len(below)} tensor(s)' if below else ''}")


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import api
    from .errors import FormatError

    try:
        count = api.verify(args.input, progress=_progress_bar(args, "verifying"),
                           max_bytes=_parse_max_bytes(args.max_bytes))
    except FormatError as exc:
        if args.json:
            print(json.dumps({"path": args.input, "ok": False, "error": str(exc), "rule": exc.rule}))
        else:
            print(f"{args.input}: FAILED: {exc}")
        return 1
    if args.json:
        print(json.dumps({"path": args.input, "ok": True, "tensors": count}))
    else:
        print(f"{args.input}: OK ({count} tensors, every checksum and rule checked)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import api
    from .errors import InputError

    try:
        widths = [int(b) for b in args.bits.split(",") if b]
    except ValueError:
        raise InputError(f"--bits takes comma-separated numbers, got {args.bits!r}") from None
    show = None if args.quiet or args.json or not sys.stderr.isatty() else (
        lambda what: print(f"  trying {what} ...", file=sys.stderr))
    rows = api.sweep(args.input, methods=[m for m in args.methods.split(",") if m], bits=widths,
                     granularities=[g for g in args.granularities.split(",") if g],
                     trust_pickle=args.trust_pickle, progress=show)
    if args.json:
        print(json.dumps({"input": args.input, "rows": [_json_row(r) for r in rows]}, indent=2))
        return 0
    table = [[r.method, str(r.bits), r.granularity, human_bytes(r.file_bytes), f"{r.bits_per_weight:.3f}",
              "-" if r.snr_db is None else f"{r.snr_db:.1f}", f"{r.pack_seconds:.2f}", f"{r.load_seconds:.3f}"]
             for r in rows]
    print(format_table(["method", "bits", "granularity", "file", "bits/weight", "SNR dB", "pack s", "load s"],
                       table, right={1, 3, 4, 5, 6, 7}))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from . import api

    rows, only_a, only_b = api.diff(args.a, args.b)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "tensors": [_json_row(r) for r in rows],
                          "only_in_a": only_a, "only_in_b": only_b}, indent=2))
        return 0
    table = [[r.name, "x".join(map(str, r.shape)) or "()", "equal" if r.equal else f"{r.max_abs:.3g}",
              f"{r.rms:.3g}", "-" if r.snr_db is None else f"{r.snr_db:.1f}"] for r in rows]
    print(format_table(["name", "shape", "max abs", "rms", "SNR dB"], table, right={2, 3, 4}))
    for name in only_a:
        print(f"only in {args.a}: {name}")
    for name in only_b:
        print(f"only in {args.b}: {name}")
    return 0


def _json_row(row: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from .api import json_safe

    return json_safe(asdict(row))


def _progress_bar(args: argparse.Namespace, label: str) -> Any:
    """A progress callback drawing a bar on a terminal; None in a pipe or with --quiet."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    state: dict[str, Any] = {}

    def update(name: str, done: int, total: int) -> None:
        if tqdm is not None:
            bar = state.get("bar")
            if bar is None:
                bar = state["bar"] = tqdm(total=total, desc=label, unit="tensor", leave=False, file=sys.stderr)
            bar.update(done - bar.n)
            if done == total:
                bar.close()
            return
        width = 30
        filled = width * done // max(total, 1)
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return update


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.cli import run

    return run(args)


_COMMANDS = {"pack": _cmd_pack, "unpack": _cmd_unpack, "info": _cmd_info, "verify": _cmd_verify,
             "bench": _cmd_bench, "diff": _cmd_diff, "demo": _cmd_demo}


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Aligned columns; the columns in ``right`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
