"""Reports over finished fault-injection campaigns.

    python report.py compare runs/fi_base runs/fi_text --out runs/table1 [--fused runs/fi_fused]
    python report.py collect runs/*/table1/table1.csv --out runs/paper_table1

writes the paper's Table 1 row (accuracy, last-layer and overall ΔLoss improvement, mean golden
Top2Diff) as table1.csv and table1.md, the per-layer comparison layers_compared.csv and the per-layer
ΔLoss plot delta_loss_per_layer.png (log scale, both models); ``collect`` gathers the rows of several
models into one table. See docs/injection.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli_shell import regex, run_cli
from resilience.report import collect, compare, table1_markdown, table1_rows_markdown


def get_args_parser() -> argparse.ArgumentParser:
    """``report.py compare`` options."""
    parser = argparse.ArgumentParser(prog="report.py", description="Reports over fault-injection campaigns.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="Table 1 row: baseline campaign against text-guided campaign")
    p.add_argument("base", metavar="BASE_DIR", help="campaign folder of the baseline model")
    p.add_argument("text", metavar="TEXT_DIR", help="campaign folder of the text-guided model")
    p.add_argument("--fused", default=None, metavar="DIR",
                   help="campaign of the text model run with --fuse-text-head (last layer as one B->C layer)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--layers", type=regex, default=None, metavar="REGEX",
                   help="compare only the layers whose (baseline) name matches, when the campaigns injected "
                        "different layer subsets; the last layers are always compared")
    c = sub.add_parser("collect", help="gather table1.csv files of several models into one table")
    c.add_argument("tables", nargs="+", metavar="TABLE1_CSV")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the report; errors print as one line (exit code 2)."""
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Run the parsed subcommand."""
    if args.command == "collect":
        rows = collect([Path(t) for t in args.tables], Path(args.out))
        print("\n".join(table1_rows_markdown(rows)))
    else:
        row = compare(Path(args.base), Path(args.text), Path(args.out), Path(args.fused) if args.fused else None,
                      layers=args.layers)
        print(table1_markdown(row), end="")
    print(f"outputs in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
