"""Evaluate a checkpoint: top-1, top-5, mean loss, mean Top2Diff and per-class accuracy.

    python test.py --checkpoint runs/fm_resnet20_text/checkpoint.pth --dataset fashion-mnist --out r.json

Reads this project's self-describing checkpoints, the paper repository's training checkpoints and
dnn-benchmarks' CIFAR-10 files (name the architecture with --model when the file does not). The paper's
flag spellings are accepted: --data_path, --checkpoint_path, --CLIP_model, --CLIP_text_path, --embed_size.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

import data
import models
import text_features
from cli_shell import MAX_IMAGES_HELP, HelpFormatter, OldSpelling, UserError, positive_int, run_cli
from models.device import default_workers, resolve_device
from resilience import arithmetic
from resilience.golden import evaluated_subset
from resilience.storage import atomic_write, write_json
from training.distributed import destroy_distributed, init_distributed_mode, is_main_process
from training.engine import evaluate
from training.samplers import ShardSampler


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a classifier checkpoint", add_help=add_help,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint", required=True, help="checkpoint file")
    parser.add_argument("--dataset", default=None,
                        help="dataset to evaluate on (default: the checkpoint's, else imagenet as the paper)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--data-path", "--data_path", "--data-root", dest="data_path", default=None, help="dataset root")
    parser.add_argument("--out", default=None, metavar="R.json", help="write the metrics as JSON here")
    parser.add_argument("--csv", default=None, metavar="R.csv",
                        help="per-class accuracy CSV (default: next to --out with the .csv suffix)")

    g = parser.add_argument_group("model (only for checkpoints that do not describe themselves)")
    g.add_argument("--model", default=None, help="architecture name, e.g. resnet50 or resnet20")
    g.add_argument("--head", choices=("linear", "text"), default=None, help="classifier head")
    g.add_argument("--CLIP_model", dest="head", action="store_const", const="text", help="same as --head text")
    g.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint (default: the dataset's)")
    g.add_argument("--embed-dim", "--embed_size", dest="embed_dim", type=int, default=None, help="text embedding width")
    g.add_argument("--text-features", "--CLIP_text_path", dest="text_features", default=None,
                   help="features file used in training (checked against the checkpoint's head)")
    g.add_argument("--allow-unsafe", "--allow-unsafe-checkpoint", dest="allow_unsafe", action="store_true",
                   help="allow full unpickling of old checkpoints (only for files you trust)")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=256)
    g.add_argument("-j", "--workers", "--num_workers", dest="workers", type=int, default=default_workers(),
                   help="data-loading processes (default: up to 4, at most the CPU cores)")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--amp", action="store_true", help="mixed precision inference")
    g.add_argument("--max-images", type=positive_int, default=None, metavar="K", help=MAX_IMAGES_HELP)
    g.add_argument("--subset", dest="max_images", type=positive_int, action=OldSpelling, help=argparse.SUPPRESS,
                   note="--subset is now spelled --max-images (the spelling used keeps working)")
    g.add_argument("--seed", type=int, action=OldSpelling, help=argparse.SUPPRESS,
                   note="--seed no longer applies: --max-images is one fixed subset; ignored")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="small-input stem (default: the checkpoint's)")
    g.add_argument("--val-resize-size", type=int, default=None, help="override the preset's resize size")
    g.add_argument("--val-crop-size", type=int, default=None, help="override the preset's crop size")
    g.add_argument("--interpolation", default=None, help="override the preset's interpolation")
    g.add_argument("--print-freq", type=int, default=50)
    g.add_argument("--dist-url", default="env://")
    g.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"))
    arithmetic.add_arguments(parser, amp=False)  # --amp above: autocast in the device's usual dtype
    return parser


def check_features(args: argparse.Namespace, meta: dict[str, Any], model: torch.nn.Module) -> None:
    """A features file given on the command line must match the trained head's shape."""
    if not args.text_features:
        return
    path = Path(args.text_features)
    if not path.is_file():
        raise UserError(f"text features file not found: {path}")
    feats, _ = text_features.load_text_features(path)
    head = getattr(model, "head", None)
    weight = getattr(head, "weight", None)
    if meta.get("head") == "text" and weight is not None and tuple(weight.shape) != tuple(feats.shape):
        raise UserError(
            f"{path} holds features of shape {tuple(feats.shape)} but the checkpoint's head is {tuple(weight.shape)}"
        )


def evaluation_preset(args: argparse.Namespace, meta: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The checkpoint's preset on ``dataset`` (``data.preset_for``) with the command line's overrides."""
    overrides = {"resize_size": args.val_resize_size, "crop_size": args.val_crop_size, "interpolation": args.interpolation}
    return data.preset_for(meta, dataset, overrides)


def write_outputs(result: dict[str, Any], per_class: list[dict], out: str | None, csv_path: str | None) -> None:
    if out:
        write_json(Path(out), {**result, "per_class": per_class})
    csv_path = output_paths(out, csv_path)[1]
    if csv_path:
        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["class_index", "class_name", "n", "correct", "accuracy"])
                writer.writeheader()
                for row in per_class:
                    writer.writerow({**row, "accuracy": f"{row['accuracy']:.4f}"})

        atomic_write(Path(csv_path), write_csv)


def output_paths(out: str | None, csv_path: str | None) -> tuple[str | None, str | None]:
    """(--out, --csv) with the CSV defaulting to --out's name with .csv; refuses folders up front."""
    if out and csv_path is None:
        csv_path = str(Path(out).with_suffix(".csv"))
    for path in (out, csv_path):
        if path and Path(path).is_dir():
            raise UserError(f"{path} is a folder; give a file name (e.g. {Path(path) / 'metrics.json'})")
    return out, csv_path


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``args.checkpoint``; returns the summary metrics (also written to --out/--csv)."""
    with arithmetic.applied(arithmetic.from_args(args)) as arith:
        return _evaluate(args, arith)


def _evaluate(args: argparse.Namespace, arith: arithmetic.Arithmetic) -> dict[str, Any]:
    if args.amp and arith.math == "tf32":
        raise UserError("--amp and --math tf32 exclude each other: autocast layers do not compute in fp32")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {'is a folder' if path.is_dir() else 'not found'}: {path}")
    output_paths(args.out, args.csv)
    device = resolve_device(args.device)
    args.device = str(device)
    init_distributed_mode(args)
    device = torch.device(args.device)

    dataset = args.dataset
    model, meta = models.load_checkpoint(
        path,
        model_name=args.model,
        num_classes=args.num_classes or (data.num_classes(dataset) if dataset in data.DATASETS else None),
        head=args.head,
        embed_dim=args.embed_dim,
        dataset=dataset,
        use_ema=args.ema,
        allow_unsafe=args.allow_unsafe,
    )
    meta = dict(meta or {})
    if args.small_input is not None:
        meta["small_input"] = args.small_input
    if dataset is None:
        dataset = meta.get("dataset") or "imagenet"
    if dataset not in data.DATASETS:
        raise UserError(f"unknown dataset {dataset!r} (choose from {', '.join(data.DATASETS)})")
    num_classes = data.num_classes(dataset)
    if meta.get("num_classes") not in (None, num_classes):
        raise UserError(f"the checkpoint predicts {meta['num_classes']} classes but {dataset} has {num_classes}")
    check_features(args, meta, model)

    preset = evaluation_preset(args, meta, dataset)
    split = "test" if args.split == "val" else args.split
    test_set = data.build_dataset(dataset, split, args.data_path, preset=preset, model_name=meta.get("model"),
                                  small_input=bool(meta.get("small_input")))
    test_set = evaluated_subset(test_set, args.max_images)
    loader = torch.utils.data.DataLoader(
        test_set,
        batch_size=args.batch_size,
        sampler=ShardSampler(len(test_set), args.rank, args.world_size),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    model.to(device)
    arithmetic.select_layers(model)
    if is_main_process():
        print(f"evaluating {path} ({meta.get('model')}, {meta.get('head')} head{', EMA' if args.ema else ''}) "
              f"on {dataset}/{split}: {len(test_set)} images", flush=True)
    acc = evaluate(model, loader, device, num_classes, amp=args.amp, desc="Test",
                   show_progress=is_main_process(), print_freq=args.print_freq)
    metrics = acc.result()
    names = data.get_class_names(dataset)
    per_class = [{**row, "class_name": names[row["class_index"]]} for row in acc.per_class()]
    result = {
        **metrics,
        "checkpoint": str(path),
        "model": meta.get("model"),
        "head": meta.get("head"),
        "dataset": dataset,
        "split": split,
        "ema": bool(args.ema),
        "preset": preset,
        "arithmetic": {**arith.describe(), "amp": ("fp16" if device.type == "cuda" else "bf16") if args.amp else None},
    }
    if is_main_process():
        print(f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
              f"top2diff {metrics['top2diff']:.2f}  ({metrics['n']} images)", flush=True)
        write_outputs(result, per_class, args.out, args.csv)
    return result


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return run_cli(lambda: main(args))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(cli())
