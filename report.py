"""Reports over finished fault-injection campaigns.

    python report.py compare runs/fi_base runs/fi_text --out runs/table1 [--fused runs/fi_fused]

writes the paper's Table 1 row (accuracy, last-layer and overall ΔLoss improvement, mean golden
Top2Diff) as table1.csv and table1.md, the per-layer comparison layers_compared.csv and the per-layer
ΔLoss plot delta_loss_per_layer.png (log scale, both models). See docs/injection.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from resilience.report import ReportError, compare, table1_markdown


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the report; errors print as one line (exit code 2)."""
    args = get_args_parser().parse_args(argv)
    try:
        row = compare(Path(args.base), Path(args.text), Path(args.out), Path(args.fused) if args.fused else None)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table1_markdown(row), end="")
    print(f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
