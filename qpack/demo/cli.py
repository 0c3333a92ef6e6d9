"""``qpack demo``: the seed experiment as one command.

The core CLI registers the subcommand with :func:`configure_parser` and :func:`run`;
``python -m qpack.demo`` does the same on its own.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["DEFAULT_OUT", "choose_threads", "configure_parser", "run"]

DEFAULT_OUT = "qpack-demo-out"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _bit_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 1,2,3,4,8, got {text!r}") from None
    if not bits or not all(1 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"expected widths from 1 to 8, got {text!r}")
    return bits


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``.

    Args:
        parser: the ``demo`` subparser (or a parser of its own).
    """
    if parser.description is None:
        parser.description = (
            "Train the seed CNN (or LeNet-300-100, LeNet-5) on MNIST, pack it into .qpk files with "
            "uniform and k-means quantization, pruning and trained quantization, load every file "
            "back and report sizes and accuracies."
        )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="folder with the MNIST IDX files (or MNIST/raw under it)")
    data.add_argument(
        "--download",
        action="store_true",
        help="fetch MNIST into the cache folder ($QPACK_CACHE/mnist or ~/.cache/qpack/mnist) when not there",
    )
    data.add_argument(
        "--split-test",
        metavar="N",
        type=_positive,
        help="train on the first N test images and evaluate on the rest "
        "(the default, with N = 8000, when the training images are absent)",
    )
    parser.add_argument(
        "--model",
        choices=("seed", "lenet300", "lenet5", "all"),
        default="seed",
        help="the network: the seed CNN, LeNet-300-100, LeNet-5, or all three (default seed)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive,
        help="training epochs (default: the network's recipe: seed 5, LeNet-300-100 60, LeNet-5 12 on MNIST, "
        "30 (seed) or 40 on the digits; 1 with --quick)",
    )
    parser.add_argument(
        "--retrain-epochs",
        type=_positive,
        help="epochs of each retraining: after quantization, after each pruning round, of centroid training "
        "(default: seed 1, LeNet-300-100 5, LeNet-5 3)",
    )
    parser.add_argument(
        "--prune-rounds",
        type=_positive,
        help="rounds of iterative pruning, each retrained (default: seed 1, LeNet-300-100 3, LeNet-5 2; 1 with --quick)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast look: one epoch on at most 6,000 training images, bits 1, 2, 3, 4, 8 only",
    )
    parser.add_argument(
        "--bits", type=_bit_list, metavar="LIST", help="widths of the seed network's uniform and k-means sweeps (default 1,...,8)"
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed for numpy, torch and shuffling (default 1337)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")


def choose_threads() -> tuple[int, str]:
    """Torch threads for training on the CPU: the CPUs this process may use, less the busy ones.

    Other jobs' load counts: with more threads than idle CPUs, torch's threads wait on
    each other at every operation and a step takes several times longer than with fewer.

    Returns:
        ``(threads, reason)``: at least 1, at most the usable CPUs.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        return cpus, f"{cpus} CPUs"
    threads = max(1, min(cpus, int(cpus - load + 0.5)))
    return threads, f"{cpus} CPUs, load average {load:.1f}"


def run(args: argparse.Namespace) -> int:
    """Run the demo with the options :func:`configure_parser` added.

    Args:
        args: the parsed options.

    Returns:
        The exit code, 0.

    Raises:
        InputError: the data cannot be found or read, or the device is not available.
    """
    import torch

    from qpack.errors import InputError

    from .mnist import load_demo_data
    from .run import DemoConfig, run_demo

    def log(line: str) -> None:
        print(line, flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # else the user chose
        threads, why = choose_threads()
        torch.set_num_threads(threads)
        log(f"torch threads: {threads} ({why}; set OMP_NUM_THREADS to choose)")

    data = load_demo_data(args.data, download=args.download, split_test=args.split_test, log=log)
    models = ("seed", "lenet300", "lenet5") if args.model == "all" else (args.model,)
    overrides = {
        "models": models,
        "seed": args.seed,
        "device": args.device,
        "plots": not args.no_plots,
        "progress_bar": sys.stdout.isatty(),
    }
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.bits is not None:
        overrides["bits"] = args.bits
    if args.retrain_epochs is not None:
        overrides["retrain_epochs"] = args.retrain_epochs
    if args.prune_rounds is not None:
        overrides["prune_rounds"] = args.prune_rounds
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(data, args.out, config, log=log)
    return 0
