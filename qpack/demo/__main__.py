"""``python -m qpack.demo``: the demo without the core CLI (same options as ``qpack demo``)."""

from __future__ import annotations

import argparse
import sys

from qpack.errors import QpkError

from .cli import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the demo, print a one-line error for bad input.

    Args:
        argv: the arguments; default ``sys.argv[1:]``.

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m qpack.demo")
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QpkError as e:
        print(f"qpack demo: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
