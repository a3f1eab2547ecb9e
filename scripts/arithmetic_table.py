"""One Markdown table of neuron-fault campaigns of the same model run in different arithmetic.

    .venv/bin/python scripts/arithmetic_table.py runs/fm_fp32 runs/fm_tf32 runs/fm_amp_bf16

Per layer: mean ΔLoss and mismatch rate of each campaign; per bit: the share of faults whose ΔLoss is
exactly 0 (the logits' loss unchanged: the flip was absorbed) and the mismatch share. Columns are
labelled with each campaign's recorded arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resilience.arithmetic import from_record  # noqa: E402
from resilience.weights.report import markdown_table  # noqa: E402


def load(folder: Path) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(arithmetic label, layers.csv, faults.parquet) of a finished campaign."""
    summary = json.loads((folder / "summary.json").read_text())
    label = from_record(summary["config"].get("arithmetic")).label
    return label, pd.read_csv(folder / "layers.csv"), pd.read_parquet(folder / "faults.parquet")


def tables(folders: list[Path]) -> str:
    """The per-layer and per-bit Markdown tables."""
    runs = [load(f) for f in folders]
    by_layer = pd.DataFrame({"layer": runs[0][1]["layer"]})
    for label, layers, _ in runs:
        by_layer[f"ΔLoss {label}"] = layers["mean_delta_loss"].map("{:.4g}".format)
        by_layer[f"mismatch {label}"] = (100 * layers["mismatch_rate"]).map("{:.2f}%".format)
    bits = []
    for label, _, faults in runs:
        grouped = faults.assign(absorbed=faults["delta_loss"] == 0).groupby("bit")
        bits.append(pd.DataFrame({f"ΔLoss=0 {label}": (100 * grouped["absorbed"].mean()).map("{:.1f}%".format),
                                  f"mismatch {label}": (100 * grouped["mismatch"].mean()).map("{:.1f}%".format)}))
    by_bit = pd.concat(bits, axis=1).fillna("").reset_index()
    return markdown_table(by_layer) + "\n\n" + markdown_table(by_bit) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the campaign folders given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="finished campaign folders")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not (f / "summary.json").is_file()]
    if missing:
        print(f"error: {missing[0]} is not a finished campaign (no summary.json)", file=sys.stderr)
        return 2
    print(tables(args.folders), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
