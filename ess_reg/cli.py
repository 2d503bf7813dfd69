"""The ``ess-reg`` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    """Exits with code 2 and a one-line message on bad arguments."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ess-reg", description="Effective state-size of sequence models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    show = commands.add_parser(
        "showcase", help="ESS of random operators of common mixer families, as a table"
    )
    show.add_argument("--seq-len", type=_positive, default=256, help="sequence length L")
    show.add_argument("--state", type=_positive, default=16, help="state size N per channel")
    show.add_argument("--channels", type=_positive, default=8, help="channels per operator")
    show.add_argument("--splits", type=_positive, default=None,
                      help="number of evenly spaced splits (default: all)")
    show.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "showcase":
            from ess_reg.showcase import format_table, run_showcase

            if args.seq_len < 2:
                raise ValueError("--seq-len must be at least 2")
            rows = run_showcase(args.seq_len, args.state, args.channels, args.seed, args.splits)
            print(f"ESS of random operators, L={args.seq_len}, N={args.state}, "
                  f"{args.channels} channels (averages over splits and channels)")
            print(format_table(rows))
    except (ValueError, TypeError) as error:
        print(f"ess-reg: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
