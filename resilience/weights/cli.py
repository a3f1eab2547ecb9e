"""Command line for weight faults: run a fault list on a checkpoint, or generate a fault list.

    python inject.py weights --fault-model weight-bitflip --fault-list ResNet20_FL.csv --checkpoint ResNet20.th \\
        --model resnet20 --dataset cifar10 --limit-faults 500 --max-images 1000 --out runs/wf
    python -m resilience.weights run ...            (same options)
    python -m resilience.weights generate --model resnet20 --num-classes 10 --out FL.csv

``inject.py weights`` takes the options of :func:`add_run_arguments`; :func:`wants_weight_faults` tells
the older spelling (``inject.py --fault-model weight-...``) apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import data
import models
from cli_shell import (
    MAX_IMAGES_HELP,
    HelpFormatter,
    UserError,
    differences,
    non_negative_int,
    positive_int,
    run_cli,
)
from models.checkpoint import sha256_file
from models.device import resolve_device
from resilience import arithmetic
from resilience.bitflip import format_of
from resilience.golden import EvaluatedImages, evaluated_ids
from resilience.storage import write_json
from resilience.weights.fault_list import (
    FaultList,
    generate_fault_list,
    layer_allocation,
    read_fault_list,
    validate_fault_list,
    write_fault_list,
)
from resilience.weights.faults import (
    FAULT_MODELS,
    TRANSIENT_FAULT_MODELS,
    fault_targets,
    fault_values,
)
from resilience.weights.report import fault_table, write_outputs
from resilience.weights.runner import METHODS, run_weight_faults, transient_images, weight_golden


def wants_weight_faults(argv: Sequence[str]) -> bool:
    """True when ``argv`` selects a weight fault model with ``--fault-model``."""
    for i, arg in enumerate(argv):
        if arg == "--fault-model" and i + 1 < len(argv):
            return argv[i + 1] in FAULT_MODELS
        if arg.startswith("--fault-model="):
            return arg.split("=", 1)[1] in FAULT_MODELS
    return False


def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoint_required: bool) -> None:
    """Options that name the model: a checkpoint, or an architecture for foreign/absent checkpoints."""
    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=checkpoint_required, help="checkpoint (ours, the paper's or dnn-benchmarks')")
    g.add_argument("--model", default=None, help="architecture, e.g. resnet20 (needed for dnn-benchmarks files)")
    g.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint (default: the dataset's)")
    g.add_argument("--head", choices=("linear", "text"), default=None, help="classifier head of foreign checkpoints")
    g.add_argument("--embed-dim", type=int, default=None, help="text-embedding width of foreign text-head checkpoints")
    g.add_argument("--allow-unsafe", "--allow-unsafe-checkpoint", dest="allow_unsafe", action="store_true",
                   help="full unpickling of old checkpoints you trust")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Which parameters beyond conv/linear weights may hold faults."""
    g = parser.add_argument_group("fault targets (conv/linear weights always)")
    g.add_argument("--include-bias", action="store_true", help="also conv/linear biases (Layer 'name.bias')")
    g.add_argument("--include-bn", action="store_true",
                   help="also normalisation-layer weight/bias (BatchNorm, LayerNorm, GroupNorm; Layer 'bn1.weight')")


RUN_DESCRIPTION = ("Run a dnn-benchmarks weight fault list on a checkpoint: per fault, masked / non-critical / "
                   "critical images and ΔLoss; writes the filled list, summaries and the critical-rate-by-bit plot.")


def get_run_parser(add_help: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    """Options of a weight-fault run."""
    parser = argparse.ArgumentParser(prog=prog, add_help=add_help, formatter_class=HelpFormatter,
                                     description=RUN_DESCRIPTION)
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a weight-fault run (``inject.py weights``, ``python -m resilience.weights run``)."""
    parser.add_argument("--fault-model", choices=FAULT_MODELS, default="weight-bitflip",
                        help="bit-flip or true stuck-at on a weight bit, permanent for the evaluation set; "
                             "weight-bitflip-transient: the flip lasts one inference (one image per fault)")
    parser.add_argument("--fault-list", required=True, help="fault list CSV in dnn-benchmarks' format")
    parser.add_argument("--limit-faults", type=positive_int, default=None, metavar="K", help="run the first K faults only")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: runs/weights_<model>_<fault list name>_<fault model>)")
    add_model_arguments(parser, checkpoint_required=True)
    add_target_arguments(parser)
    g = parser.add_argument_group("images")
    g.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    g.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")
    g.add_argument("--split", default="test", choices=("test", "val", "train"))
    g.add_argument("--max-images", type=positive_int, default=None, metavar="K", help=MAX_IMAGES_HELP)
    g.add_argument("--preset-from", default=None, metavar="DATASET",
                   help="feed the images as DATASET's inputs (its size, channels and mean/std), e.g. Fashion-MNIST "
                        "as CIFAR-10: --dataset fashion-mnist --preset-from cifar10")
    g.add_argument("-j", "--workers", type=non_negative_int, default=2, help="data-loading workers")
    g = parser.add_argument_group("execution")
    g.add_argument("--method", choices=METHODS, default="delta",
                   help="delta: recompute the faulty channel from cached layer inputs and run the rest of the network; "
                        "forward: one full forward pass per fault (the SFI loop)")
    g.add_argument("--chunk-images", type=positive_int, default=256, help="images whose golden activations are cached at once")
    g.add_argument("-b", "--batch-size", type=positive_int, default=128, help="rows per forward pass")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is faster on a machine busy with other jobs)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the transient model's image choice")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    arithmetic.add_arguments(parser)


def get_generate_parser(add_help: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    """Options of fault-list generation."""
    parser = argparse.ArgumentParser(
        prog=prog, add_help=add_help, formatter_class=HelpFormatter,
        description="Generate a statistical weight fault list (Leveugle et al., DATE 2009) in dnn-benchmarks' format: "
                    "every conv/linear weight, faults in proportion to parameter count, no duplicate sites.",
    )
    parser.add_argument("--out", required=True, metavar="FILE.csv", help="fault list to write")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--e", type=float, default=0.01, help="error margin")
    parser.add_argument("--t", type=float, default=2.58, help="confidence cut-off (2.58 = 99%%)")
    parser.add_argument("--p", type=float, default=0.5, help="estimated failure probability (0.5 = worst case)")
    add_model_arguments(parser, checkpoint_required=False)
    add_target_arguments(parser)
    return parser


def load_model(args: argparse.Namespace, dataset: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``--checkpoint`` (eval mode), or a randomly initialised ``--model``."""
    num_classes = args.num_classes or (data.num_classes(dataset) if dataset in data.DATASETS else None)
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise UserError(f"checkpoint not found: {args.checkpoint}")
        model, meta = models.load_checkpoint(args.checkpoint, model_name=args.model, num_classes=num_classes,
                                             head=args.head, embed_dim=args.embed_dim, dataset=dataset,
                                             allow_unsafe=args.allow_unsafe)
        return model.eval(), dict(meta or {})
    if not args.model or not num_classes:
        raise UserError("give --checkpoint, or --model and --num-classes")
    if args.model not in models.list_models():
        raise UserError(f"unknown model {args.model!r} (see models.list_models())")
    model = models.build_model(args.model, num_classes, head=args.head or "linear", embed_dim=args.embed_dim or 512)
    return model.eval(), {"model": args.model, "num_classes": num_classes}


def evaluation_preset(args: argparse.Namespace, meta: dict[str, Any], dataset: str) -> dict[str, Any]:
    """``--preset-from``'s inputs (images resized to its size), else the checkpoint's or the dataset's preset."""
    model_name, small, chans = meta.get("model"), bool(meta.get("small_input")), meta.get("in_chans")
    if args.preset_from:
        if args.preset_from not in data.DATASETS:
            raise UserError(f"unknown --preset-from {args.preset_from!r} (choose from {', '.join(data.DATASETS)})")
        preset = dict(data.eval_preset(args.preset_from, model_name, small_input=small, in_chans=chans))
        if preset["resize_size"] is None and preset["crop_size"]:
            # another dataset's images: scale them to the size the model saw instead of padding by the crop
            preset["resize_size"] = [preset["crop_size"], preset["crop_size"]]
        return preset
    return data.preset_for(meta, dataset)


def format_bit_rates(rates: dict[int, float]) -> str:
    """Critical rate by bit as a few aligned lines of ``bit:rate%``."""
    cells = [f"{b:>2}:{100 * r:6.2f}%" for b, r in sorted(rates.items())]
    return "\n".join("  " + "  ".join(cells[i : i + 8]) for i in range(0, len(cells), 8))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run a fault list (options of :func:`get_run_parser`); returns the summary written to summary.json."""
    with arithmetic.applied(arithmetic.from_args(args)) as arith:
        return _run(args, arith)


def _run(args: argparse.Namespace, arith: arithmetic.Arithmetic) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, meta = load_model(args, args.dataset)
    dataset = args.dataset or meta.get("dataset")
    if dataset not in data.DATASETS:
        raise UserError(f"give --dataset (one of {', '.join(data.DATASETS)}); the checkpoint names none")
    fault_list = read_fault_list(args.fault_list, limit=args.limit_faults)
    validate_fault_list(model, fault_list, include_bias=args.include_bias, include_bn=args.include_bn)
    preset = evaluation_preset(args, meta, dataset)
    split = "test" if args.split == "val" else args.split
    config = {
        "fault_model": args.fault_model, "fault_list": str(args.fault_list), "fault_list_sha256": sha256_file(args.fault_list),
        "faults": len(fault_list), "checkpoint": str(args.checkpoint), "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "model": meta.get("model"), "dataset": dataset, "split": split, "preset": preset,
        "include_bias": args.include_bias, "include_bn": args.include_bn, "method": args.method,
        "seed": args.seed if args.fault_model in TRANSIENT_FAULT_MODELS else None, "max_images": args.max_images,
        "arithmetic": arith.describe(),
    }
    if args.max_images is not None:
        # runs written when --max-images meant "the first K images" lack this key, so they are not taken as done
        config["image_subset"] = "evaluated_ids"
    out = Path(args.out or f"runs/weights_{meta.get('model')}_{Path(args.fault_list).stem}_{args.fault_model}")
    previous = _finished_run(out)
    if previous is not None and previous.get("config") == config:
        print(f"{out}: this run is already complete (summary.json); nothing to do", flush=True)
        return previous
    claim_out(out, config)
    dataset_obj = data.build_dataset(dataset, split, args.data_path, preset=preset)
    images = EvaluatedImages(dataset_obj, evaluated_ids(len(dataset_obj), args.max_images), workers=args.workers)
    model.to(device)
    arithmetic.select_layers(model)
    dtype = next(model.parameters()).dtype
    faults = fault_list.faults
    print(f"{len(faults)} {args.fault_model} faults from {args.fault_list} on {meta.get('model')} "
          f"({args.checkpoint}); {len(images)} images of {dataset}/{split}; method {args.method}; arithmetic {arith.label}", flush=True)
    t0 = time.perf_counter()
    golden = weight_golden(model, images, format_of(dtype), batch_size=args.batch_size,
                           chunk_images=args.chunk_images, device=device)
    t_golden = time.perf_counter() - t0
    hit = None
    if args.fault_model in TRANSIENT_FAULT_MODELS:
        hit = transient_images(len(faults), len(images), args.seed, fault_list.injections)
    t1 = time.perf_counter()
    report = run_weight_faults(model, faults, images, golden, fault_model=args.fault_model, method=args.method,
                               fault_images=hit, chunk_images=args.chunk_images, batch_size=args.batch_size,
                               show_progress=not args.no_progress)
    elapsed = time.perf_counter() - t1
    golden_value, faulty_value = fault_values(model, faults, args.fault_model)
    table = fault_table(fault_list, report.outcomes, fault_model=args.fault_model, golden_value=golden_value.numpy(),
                        faulty_value=faulty_value.numpy(), images=None if hit is None else images.ids[hit].numpy())
    counts = report.outcomes.counts().sum(0)
    summary = {
        "config": config,
        **{k: config[k] for k in ("model", "fault_model", "fault_list", "checkpoint", "dataset", "method", "arithmetic")},
        "images": len(images),
        "faults": len(faults),
        "golden_seconds": round(t_golden, 3),
        "seconds": round(elapsed, 3),
        "faults_per_second": len(faults) / elapsed if elapsed > 0 else None,
        "golden_accuracy": golden.accuracy,
        "outcomes": {"images": int(counts[0]), "masked": int(counts[1]), "non_critical": int(counts[2]),
                     "critical": int(counts[3]), "nonfinite": int(report.outcomes.nonfinite.sum()),
                     "critical_rate": float(counts[3] / max(counts[0], 1))},
        "layer_methods": report.layer_methods,
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    summary = write_outputs(out, fault_list, table, summary, bits=format_of(dtype).bits)
    print(f"{len(faults)} faults x {len(images)} images in {elapsed:.1f} s: {summary['faults_per_second']:.2f} faults/s "
          f"(golden pass {t_golden:.1f} s); critical {100 * summary['outcomes']['critical_rate']:.2f}% of fault x image pairs",
          flush=True)
    print("critical rate by bit:\n" + format_bit_rates(summary["critical_rate_by_bit"]), flush=True)
    print(f"outputs in {out}", flush=True)
    return summary


def claim_out(out: Path, config: dict[str, Any]) -> None:
    """Record ``config`` as the owner of ``out`` (run.json); refuse a folder owned by another configuration."""
    for name in ("run.json", "summary.json"):
        path = out / name
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8")).get("config")
            except (ValueError, AttributeError):
                raise UserError(f"{path} is unreadable; remove {out} or choose another --out") from None
            if stored != config:
                raise UserError(f"{out} holds a weight-fault run with other arguments "
                                f"({differences(stored or {}, config)}); choose another --out")
            return
    write_json(out / "run.json", {"config": config})


def _finished_run(out: Path) -> dict[str, Any] | None:
    files = ("summary.json", "fault_list.csv", "faults.csv", "critical_by_bit.png")
    if not all((out / name).is_file() for name in files):
        return None
    with contextlib.suppress(ValueError):
        return json.loads((out / "summary.json").read_text())
    return None


def generate(args: argparse.Namespace) -> FaultList:
    """Write a generated fault list (options of :func:`get_generate_parser`)."""
    model, meta = load_model(args)
    fault_list = generate_fault_list(model, seed=args.seed, e=args.e, t=args.t, p=args.p,
                                     include_bias=args.include_bias, include_bn=args.include_bn)
    write_fault_list(args.out, fault_list)
    targets = fault_targets(model, include_bias=args.include_bias, include_bn=args.include_bn)
    n, _ = layer_allocation(targets, args.e, args.t, args.p)
    print(f"{args.out}: {len(fault_list)} faults over {len(targets)} parameters of {meta.get('model')} "
          f"(Leveugle n = {n:.1f} for e={args.e}, t={args.t}, p={args.p}; per layer rounded up)", flush=True)
    return fault_list


def cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m resilience.weights run``: parse ``argv``, run, print errors as one line."""
    args = get_run_parser(prog=prog).parse_args(argv)
    return run_cli(lambda: run(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m resilience.weights {run,generate} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m resilience.weights"
    if argv and argv[0] == "generate":
        args = get_generate_parser(prog=f"{prog} generate").parse_args(argv[1:])
        return run_cli(lambda: generate(args))
    if argv and argv[0] == "run":
        argv = argv[1:]
    elif not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{run,generate}} ...  (see '{prog} run --help', '{prog} generate --help')",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return cli(argv, prog=f"{prog} run")
