"""Replay dnn-benchmarks' ResNet20 weight fault list on the first 932 CIFAR-10 test images, in a chosen
arithmetic, and compare the outcome counts with the published ones fault by fault.

    .venv/bin/python scripts/replay_dnn_benchmarks.py --every 41 --out runs/replay_fp32
    .venv/bin/python scripts/replay_dnn_benchmarks.py --layers '^layer3\\.' --max-bit 12 \\
        --math tf32 --tf32-layers '^layer3\\.' --out runs/replay_tf32_layer3

Their counts are over all 10,000 test images, ours over 932 of them, so per fault ours <= theirs for
every outcome class (the subset implication), and summed over many faults the critical count should
match theirs x 932/10,000. Also reported: the masked share by bit (layer3 apart from the other layers),
and whether the faults they report masked on all their images are the ones masked on all of ours —
with, for each fault, whether rounding the weight to TF32 removes the flip. Writes ``faults.csv`` and
``report.json`` into --out; prints the same figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import models  # noqa: E402
from resilience import arithmetic  # noqa: E402
from resilience.bitflip import FORMATS  # noqa: E402
from resilience.golden import EvaluatedImages, evaluated_ids  # noqa: E402
from resilience.weights.fault_list import FaultList, read_fault_list  # noqa: E402
from resilience.weights.faults import fault_values  # noqa: E402
from resilience.weights.runner import METHODS, run_weight_faults, weight_golden  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
THEIR_IMAGES = 10_000


class ReplayError(Exception):
    """Bad input, reported as one ``error:`` line."""


def get_args_parser() -> argparse.ArgumentParser:
    """Options of the replay."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--reference", default=str(REFERENCE), help="the shared reference folder")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="replay every K-th selected row")
    parser.add_argument("--layers", default=None, metavar="REGEX", help="only rows whose Layer matches")
    parser.add_argument("--max-bit", type=int, default=None, metavar="B", help="only rows with Bit <= B")
    parser.add_argument("--limit", type=int, default=None, metavar="F", help="at most F rows (after the filters)")
    parser.add_argument("--max-images", type=int, default=None, metavar="K",
                        help="K of the 932 images: a fixed random subset (resilience.golden.evaluated_ids)")
    parser.add_argument("--method", choices=METHODS, default="delta")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, metavar="DIR", help="write faults.csv and report.json here")
    arithmetic.add_arguments(parser)
    return parser


def load_images(reference: Path, limit: int | None = None) -> EvaluatedImages:
    """The 932 genuine CIFAR-10 test images, normalised as dnn-benchmarks evaluates ResNet20."""
    path = reference / "cifar10-test-first932" / "cifar10_test_first932.npz"
    if not path.is_file():
        raise ReplayError(f"{path} not found (see ../shared/reference/README.md)")
    npz = np.load(path)
    pixels = torch.from_numpy(npz["images_first932_hwc"]).permute(0, 3, 1, 2).float() / 255.0
    preset = data.eval_preset("cifar10", "resnet20")
    mean = torch.tensor(preset["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preset["std"]).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    labels = torch.from_numpy(npz["labels"][: len(images)])
    ids = evaluated_ids(len(images), limit)
    return EvaluatedImages.from_tensors(images[ids].contiguous(), labels[ids])


def select_rows(fault_list: FaultList, layers: str | None, max_bit: int | None, every: int,
                limit: int | None) -> FaultList:
    """Rows matching the filters, then every ``every``-th of them, then the first ``limit``."""
    keep = [i for i, f in enumerate(fault_list.faults)
            if (layers is None or re.search(layers, f.layer)) and (max_bit is None or f.bit <= max_bit)]
    keep = keep[::every][:limit]
    if not keep:
        raise ReplayError("no fault-list row matches the filters")
    return fault_list.select(keep)


def tf32_removes_flip(golden_value: np.ndarray, faulty_value: np.ndarray) -> np.ndarray:
    """Per fault: the faulty weight rounds to the same TF32 value as the golden one."""
    golden = arithmetic.round_tf32(torch.from_numpy(golden_value).float())
    faulty = arithmetic.round_tf32(torch.from_numpy(faulty_value).float())
    return (golden.view(torch.int32) == faulty.view(torch.int32)).numpy()


def replay(args: argparse.Namespace) -> dict:
    """Run the selected rows in the options' arithmetic; the per-fault table and the comparison figures."""
    if args.every < 1 or (args.limit is not None and args.limit < 1):
        raise ReplayError("--every and --limit must be at least 1")
    torch.set_num_threads(args.threads)
    reference = Path(args.reference)
    bench = reference / "dnn-benchmarks" / "cifar10"
    if not (bench / "ResNet20.th").is_file():
        raise ReplayError(f"{bench}/ResNet20.th not found (see ../shared/reference/README.md)")
    fault_list = select_rows(read_fault_list(bench / "ResNet20_FL.csv"), args.layers, args.max_bit, args.every,
                             args.limit)
    images = load_images(reference, args.max_images)
    with arithmetic.applied(arithmetic.from_args(args)) as arith:
        model, _ = models.load_checkpoint(bench / "ResNet20.th", model_name="resnet20", num_classes=10)
        model.eval()
        arithmetic.select_layers(model)
        golden = weight_golden(model, images, FORMATS["fp32"])
        t0 = time.perf_counter()
        report = run_weight_faults(model, fault_list.faults, images, golden, method=args.method)
        seconds = time.perf_counter() - t0
    golden_value, faulty_value = (v.numpy() for v in fault_values(model, fault_list.faults, "weight-bitflip"))
    out = report.outcomes
    theirs = fault_list.counts
    table = pd.DataFrame({
        "Injection": fault_list.injections, "Layer": [f.layer for f in fault_list.faults],
        "Bit": [f.bit for f in fault_list.faults], "n": out.n, "masked": out.masked,
        "non_critical": out.non_critical, "critical": out.critical, "nonfinite": out.nonfinite,
        "ref_n": theirs[:, 0], "ref_masked": theirs[:, 1], "ref_non_critical": theirs[:, 2],
        "ref_critical": theirs[:, 3], "tf32_removes_flip": tf32_removes_flip(golden_value, faulty_value),
    })
    figures = compare(table, len(images))
    figures |= {"arithmetic": arith.describe(), "faults": len(table), "images": len(images),
                "golden_accuracy": golden.accuracy,
                "seconds": round(seconds, 1), "method": args.method, "layer_methods": report.layer_methods}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out) / "faults.csv", index=False)
        (Path(args.out) / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def compare(table: pd.DataFrame, images: int) -> dict:
    """Critical agreement, subset implications, masked share by bit and the all-masked sets."""
    p = table["ref_critical"] / table["ref_n"]
    expected = float((p * images).sum())
    sd = math.sqrt(float((images * p * (1 - p)).sum()))
    subset = ((table["masked"] <= table["ref_masked"]) & (table["non_critical"] <= table["ref_non_critical"])
              & (table["critical"] <= table["ref_critical"]))
    ours_all = table["masked"] == table["n"]
    theirs_all = table["ref_masked"] == table["ref_n"]
    group = np.where(table["Layer"].str.startswith("layer3."), "layer3", "other")
    by_bit = []
    for (part, bit), rows in table.groupby([group, table["Bit"]]):
        by_bit.append({
            "layers": part, "bit": int(bit), "faults": len(rows),
            "masked_share": float(rows["masked"].sum() / rows["n"].sum()),
            "ref_masked_share": float(rows["ref_masked"].sum() / rows["ref_n"].sum()),
            "tf32_removes_flip": int(rows["tf32_removes_flip"].sum()),
        })
    removable = table["tf32_removes_flip"]
    return {
        "critical": int(table["critical"].sum()), "critical_expected": expected,
        "critical_z": (float(table["critical"].sum()) - expected) / sd if sd > 0 else math.nan,
        "critical_subset_ok": float((table["critical"] <= table["ref_critical"]).mean()),
        "subset_ok": float(subset.mean()),
        "critical_where_they_have_none": int(((table["critical"] > 0) & (table["ref_critical"] == 0)).sum()),
        "nonfinite": int(table["nonfinite"].sum()),
        "all_masked_ours": int(ours_all.sum()), "all_masked_theirs": int(theirs_all.sum()),
        "all_masked_differ": int((ours_all != theirs_all).sum()),
        "tf32_removable": int(removable.sum()),
        "tf32_removable_all_masked_ours": int((removable & ours_all).sum()),
        "tf32_removable_all_masked_theirs": int((removable & theirs_all).sum()),
        "masked_by_bit": by_bit,
    }


def print_figures(figures: dict) -> None:
    """The comparison as a few lines and a by-bit table."""
    print(f"{figures['faults']} faults x {figures['images']} images, arithmetic {figures['arithmetic']}, "
          f"{figures['seconds']} s; golden top-1 {100 * figures['golden_accuracy']:.1f}%")
    print(f"critical {figures['critical']} (expected {figures['critical_expected']:.0f} from theirs x "
          f"images/10,000, z = {figures['critical_z']:+.2f}); ours <= theirs: critical {100 * figures['critical_subset_ok']:.1f}% "
          f"of faults, all three classes {100 * figures['subset_ok']:.1f}%; {figures['critical_where_they_have_none']} "
          f"faults critical where they have none; {figures['nonfinite']} non-finite")
    print(f"masked on all images: ours {figures['all_masked_ours']}, theirs {figures['all_masked_theirs']}, "
          f"differ on {figures['all_masked_differ']}; flip removed by TF32 rounding: {figures['tf32_removable']} "
          f"faults, of which all-masked ours {figures['tf32_removable_all_masked_ours']}, theirs "
          f"{figures['tf32_removable_all_masked_theirs']}")
    print("layers  bit  faults  masked(ours)  masked(theirs)  tf32-removable")
    for row in figures["masked_by_bit"]:
        print(f"{row['layers']:>6} {row['bit']:>4} {row['faults']:>7} {row['masked_share']:>13.3f} "
              f"{row['ref_masked_share']:>15.3f} {row['tf32_removes_flip']:>15}")


def main(argv: list[str] | None = None) -> int:
    """Parse, replay, print; bad input is one ``error:`` line and exit code 2."""
    args = get_args_parser().parse_args(argv)
    try:
        print_figures(replay(args))
    except (ReplayError, arithmetic.ArithmeticOptionError, models.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
