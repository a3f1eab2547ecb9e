"""Speed of the delta weight-fault runner against the SFI loop, on the same faults and images.

    .venv/bin/python scripts/bench_weight_faults.py \\
        --fault-list ../shared/reference/dnn-benchmarks/cifar10/ResNet20_FL.csv \\
        --checkpoint ../shared/reference/dnn-benchmarks/cifar10/ResNet20.th --model resnet20 \\
        --dataset fashion-mnist --preset-from cifar10 --limit-faults 500 --max-images 1000 --out runs/bench_wf

Golden logits are computed once and shared. Both wall-clock and CPU time are reported: on a machine
shared with other jobs the CPU-time ratio is the fairer one. The SFI loop (``--method forward``) writes each faulty
weight, runs the network over all images in batches, and restores it; the delta runner recomputes
only the faulty channel and the rest of the network. Prints faults/s of both, the speed ratio, whether
the per-fault counts agree, and the critical rate by bit; writes the delta run's outputs and
``bench.json`` into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli_shell import UserError, run_cli  # noqa: E402
from models.device import resolve_device  # noqa: E402
from resilience.bitflip import format_of  # noqa: E402
from resilience.golden import EvaluatedImages, evaluated_ids  # noqa: E402
from resilience.weights.cli import (  # noqa: E402
    add_model_arguments,
    evaluation_preset,
    format_bit_rates,
    load_model,
)
from resilience.weights.fault_list import read_fault_list, validate_fault_list  # noqa: E402
from resilience.weights.faults import FAULT_MODELS, fault_values  # noqa: E402
from resilience.weights.report import fault_table, write_outputs  # noqa: E402
from resilience.weights.runner import run_weight_faults, weight_golden  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fault-list", required=True)
    parser.add_argument("--fault-model", choices=[m for m in FAULT_MODELS if "transient" not in m],
                        default="weight-bitflip")
    parser.add_argument("--limit-faults", type=int, default=500, metavar="K")
    parser.add_argument("--select", choices=("first", "spread"), default="first",
                        help="first: the first K rows; spread: K rows evenly spaced over the whole list")
    parser.add_argument("--out", required=True, metavar="DIR")
    add_model_arguments(parser, checkpoint_required=True)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--max-images", type=int, default=1000, metavar="K",
                        help="K test images: the fixed random subset of every command's --max-images")
    parser.add_argument("--preset-from", default=None, metavar="DATASET")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--chunk-images", type=int, default=256, help="delta runner's activation cache chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-j", "--workers", type=int, default=2)
    return parser


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(args: argparse.Namespace) -> dict:
    import data

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, meta = load_model(args, args.dataset)
    dataset = args.dataset or meta.get("dataset")
    if dataset not in data.DATASETS:
        raise UserError(f"give --dataset (one of {', '.join(data.DATASETS)})")
    full = read_fault_list(args.fault_list)
    validate_fault_list(model, full)
    k = min(args.limit_faults, len(full))
    rows = range(k) if args.select == "first" else np.linspace(0, len(full) - 1, k).round().astype(int).tolist()
    fault_list = full.select(rows)
    preset = evaluation_preset(args, meta, dataset)
    split = data.build_dataset(dataset, "test", args.data_path, preset=preset)
    images = EvaluatedImages(split, evaluated_ids(len(split), args.max_images), workers=args.workers)
    model.to(device)
    faults = fault_list.faults
    print(f"{len(faults)} faults ({args.select}) of {args.fault_list}, {args.fault_model}, on {meta.get('model')}; "
          f"{len(images)} {dataset} test images as {preset['channels']}x{preset['crop_size']}x{preset['crop_size']} "
          f"(preset {args.preset_from or dataset}); {torch.get_num_threads()} threads, {device}", flush=True)
    golden, t_golden, _ = timed(lambda: weight_golden(model, images, format_of(next(model.parameters()).dtype),
                                                      batch_size=args.batch_size, device=device))
    print(f"golden pass: {t_golden:.1f} s ({len(images) / t_golden:.0f} images/s)", flush=True)
    delta, t_delta, c_delta = timed(lambda: run_weight_faults(
        model, faults, images, golden, fault_model=args.fault_model, method="delta",
        chunk_images=args.chunk_images, batch_size=args.batch_size, show_progress=sys.stderr.isatty()))
    print(f"delta runner: {t_delta:.1f} s, {len(faults) / t_delta:.2f} faults/s", flush=True)
    sfi, t_sfi, c_sfi = timed(lambda: run_weight_faults(
        model, faults, images, golden, fault_model=args.fault_model, method="forward",
        chunk_images=len(images), batch_size=args.batch_size, show_progress=sys.stderr.isatty()))
    print(f"SFI loop: {t_sfi:.1f} s, {len(faults) / t_sfi:.2f} faults/s", flush=True)

    same = (delta.outcomes.counts() == sfi.outcomes.counts()).all(1)
    same_loss = np.array_equal(delta.outcomes.delta_loss(), sfi.outcomes.delta_loss(), equal_nan=True)
    golden_value, faulty_value = fault_values(model, faults, args.fault_model)
    table = fault_table(fault_list, delta.outcomes, fault_model=args.fault_model,
                        golden_value=golden_value.numpy(), faulty_value=faulty_value.numpy())
    bench = {
        "faults": len(faults), "select": args.select, "images": len(images), "threads": torch.get_num_threads(),
        "device": str(device), "golden_seconds": t_golden,
        "delta": {"seconds": t_delta, "cpu_seconds": c_delta, "faults_per_second": len(faults) / t_delta},
        "sfi_loop": {"seconds": t_sfi, "cpu_seconds": c_sfi, "faults_per_second": len(faults) / t_sfi},
        "speedup": t_sfi / t_delta,
        "cpu_time_speedup": c_sfi / c_delta,
        "faults_with_identical_counts": int(same.sum()),
        "max_count_difference": int(np.abs(delta.outcomes.counts() - sfi.outcomes.counts()).max()),
        "identical_delta_loss": bool(same_loss),
        "layer_methods": delta.layer_methods,
    }
    summary = write_outputs(args.out, fault_list, table, {
        "model": meta.get("model"), "fault_model": args.fault_model, "fault_list": args.fault_list,
        "checkpoint": args.checkpoint, "dataset": dataset, "preset": preset, "method": "delta", "images": len(images),
        "faults": len(faults), "bench": bench,
    })
    Path(args.out, "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    counts = delta.outcomes.counts().sum(0)
    print(f"\nours (delta): {bench['delta']['faults_per_second']:.2f} faults/s   SFI loop: "
          f"{bench['sfi_loop']['faults_per_second']:.2f} faults/s   speed ratio {bench['speedup']:.2f}x "
          f"(CPU time {c_delta:.0f} s vs {c_sfi:.0f} s: {bench['cpu_time_speedup']:.2f}x)", flush=True)
    print(f"agreement: {int(same.sum())}/{len(faults)} faults with identical masked/non-critical/critical counts, "
          f"ΔLoss identical: {same_loss}", flush=True)
    print(f"outcomes over {counts[0]} fault x image pairs: masked {counts[1] / counts[0]:.2%}, "
          f"non-critical {counts[2] / counts[0]:.2%}, critical {counts[3] / counts[0]:.2%}", flush=True)
    print("critical rate by bit:\n" + format_bit_rates(summary["critical_rate_by_bit"]), flush=True)
    print(f"outputs in {args.out}", flush=True)
    return bench


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    sys.exit(run_cli(lambda: main(args)))
