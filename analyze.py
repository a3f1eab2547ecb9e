"""Analyses behind the paper's figures and its ablation table.

    python analyze.py value-ranges   --baseline A.pth --text B.pth --out DIR   (Figure 3)
    python analyze.py top2diff-sweep --baseline A.pth --text B.pth --out DIR   (Figure 4)
    python analyze.py ablation -c configs/fashion_mnist/resnet20.yaml --dataset fashion-mnist --out DIR (Table 3)
    python analyze.py heads --out DIR --seeds 3       (head variants over seeds, against range restriction)
    python analyze.py restrict-ranges --checkpoint A.pth --out B.pth   (Ranger-style range restriction)

The first two evaluate both checkpoints on the test split; ``ablation`` and ``heads`` train and inject
(each step resumes). Details: docs/analysis.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import data
import models
from analysis import heads as head_variants
from analysis.ablation import VARIANTS, AblationPlan, ablation_steps, ablation_table, write_ablation
from analysis.pipeline import REPO, run_steps
from analysis.ranger import restrict_checkpoint
from analysis.top2diff_sweep import DEFAULT_DELTAS, accuracy_above, crossing_point, plot_sweep
from analysis.value_ranges import plot_ranges, range_rows, write_range_csv
from cli_shell import MAX_IMAGES_HELP, HelpFormatter, UserError, non_negative_int, positive_int, run_cli
from models.checkpoint import require_head
from models.device import resolve_device
from resilience import arithmetic
from resilience.bitflip import get_format
from resilience.golden import EvaluatedImages, evaluated_ids, golden_pass
from resilience.layers import discover_layers
from resilience.profile import activation_ranges
from resilience.storage import write_json, write_text

MODELS = ("baseline", "text-guided")
HEAD_OF = {"baseline": "linear", "text-guided": "text"}
OPTION_OF = {"baseline": "baseline", "text-guided": "text"}
HEADS_CONFIG = "configs/fashion_mnist/resnet20.yaml"  # defaults of ``heads``, relative to the repository
HEADS_FEATURES = "text_features/assets/fashion-mnist_minilm.pth"


class AnalysisError(UserError):
    """Bad input for an analysis (one-line message)."""


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the analyses that compare a baseline and a text-guided checkpoint."""
    parser.add_argument("--baseline", required=True, metavar="CKPT", help="baseline checkpoint")
    parser.add_argument("--text", required=True, metavar="CKPT", help="text-guided checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--dataset", default=None, help="dataset (default: the checkpoints')")
    parser.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="K", help=MAX_IMAGES_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--allow-unsafe-checkpoint", dest="allow_unsafe", action="store_true",
                        help="full unpickling of old checkpoints (only files you trust)")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``analyze.py`` command line with its three subcommands."""
    parser = argparse.ArgumentParser(prog="analyze.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ranges = sub.add_parser("value-ranges", help="max and mean |activation| per layer (Figure 3)",
                            formatter_class=HelpFormatter)
    add_pair_arguments(ranges)
    arithmetic.add_arguments(ranges)
    sweep = sub.add_parser("top2diff-sweep", help="accuracy against a Top2Diff threshold (Figure 4)",
                           formatter_class=HelpFormatter)
    add_pair_arguments(sweep)
    arithmetic.add_arguments(sweep)
    sweep.add_argument("--deltas", type=float, nargs="+", default=list(DEFAULT_DELTAS), metavar="δ",
                       help="thresholds in percentage points (default 1 2 ... 40)")

    abl = sub.add_parser("ablation", help="random / class-name / description inits (Table 3)",
                         formatter_class=HelpFormatter)
    abl.add_argument("-c", "--config", required=True, help="train.py recipe")
    abl.add_argument("--dataset", required=True)
    abl.add_argument("--out", required=True, metavar="DIR")
    abl.add_argument("--encoder", default="minilm", help="text encoder spec of text_features.build")
    abl.add_argument("--descriptions", default=None, help="descriptions JSON (default: the shipped one)")
    abl.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    abl.add_argument("--baseline-campaign", default=None, metavar="DIR",
                     help="finished baseline campaign to compare with (else a baseline is trained and injected)")
    abl.add_argument("--seed", type=non_negative_int, default=0)
    abl.add_argument("--train-args", default="", help="extra train.py options, one quoted string")
    abl.add_argument("--inject-args", default="--injections 1024 --engine fast",
                     help="extra inject.py options, one quoted string")
    abl.add_argument("--dry-run", action="store_true", help="print the commands without running them")

    hv = sub.add_parser("heads", help="head variants over training seeds, against range restriction",
                        formatter_class=HelpFormatter)
    hv.add_argument("-c", "--config", default=HEADS_CONFIG, help="train.py recipe")
    hv.add_argument("--dataset", default="fashion-mnist")
    hv.add_argument("--features", default=HEADS_FEATURES,
                    help="text features of the text and projection heads")
    hv.add_argument("--out", required=True, metavar="DIR")
    hv.add_argument("--seeds", type=positive_int, default=3, metavar="N", help="training seeds 0 … N-1")
    hv.add_argument("--epochs", type=positive_int, default=1, help="training epochs (per-iteration cosine schedule; one takes about 6 min per model on 2 CPU cores)")
    hv.add_argument("--variants", nargs="+", choices=head_variants.VARIANTS, default=list(head_variants.VARIANTS),
                    help="variants to run (the baseline and the models a restriction needs are added)")
    hv.add_argument("--train-args", default="", help="extra train.py options, one quoted string")
    hv.add_argument("--inject-args", default="--injections 4096 --engine fast --clamp profile",
                    help="inject.py options of every campaign, one quoted string")
    hv.add_argument("--campaign-seed", type=non_negative_int, default=0, help="fault sampling seed of every campaign")
    hv.add_argument("--profile-images", type=positive_int, default=1024, metavar="K",
                    help="training images of the range profiles (restriction and --clamp profile)")
    hv.add_argument("--range-images", type=positive_int, default=2000, metavar="K",
                    help="test images of the last layer's value range")
    hv.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")
    hv.add_argument("--dry-run", action="store_true", help="print the steps without running them")

    rr = sub.add_parser("restrict-ranges", help="Ranger-style range restriction of a checkpoint",
                        formatter_class=HelpFormatter)
    rr.add_argument("--checkpoint", required=True, help="checkpoint to restrict (ours: it names its dataset)")
    rr.add_argument("--out", required=True, metavar="FILE", help="the restricted model's checkpoint")
    rr.add_argument("--images", type=positive_int, default=1024, metavar="K",
                    help="training images of the profile (as inject.py --profile-images)")
    rr.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")
    rr.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return parser


def load_pair(args: argparse.Namespace) -> tuple[list[tuple[str, torch.nn.Module, dict[str, Any]]], str]:
    """Both models (evaluation mode, on the device) with their meta, and the dataset they are evaluated on."""
    loaded = []
    for label, path in zip(MODELS, (args.baseline, args.text), strict=True):
        if not Path(path).is_file():
            raise AnalysisError(f"{label} checkpoint not found: {path}")
        model, meta = models.load_checkpoint(path, dataset=args.dataset, allow_unsafe=args.allow_unsafe)
        require_head(meta, HEAD_OF[label], f"--{OPTION_OF[label]}", path)
        arithmetic.select_layers(model)
        loaded.append((label, model.eval(), dict(meta)))
    dataset = args.dataset or loaded[0][2].get("dataset")
    if not dataset:
        raise AnalysisError("give --dataset: the checkpoints name none")
    for label, _, meta in loaded:
        if meta.get("dataset") not in (None, dataset):
            raise AnalysisError(f"the {label} checkpoint was trained on {meta['dataset']}, not {dataset}")
    return loaded, dataset


def evaluation_images(meta: dict[str, Any], dataset: str, args: argparse.Namespace) -> EvaluatedImages:
    """The test images in the model's own evaluation preset."""
    split = data.build_dataset(dataset, "test", args.data_path, preset=data.preset_for(meta, dataset))
    return EvaluatedImages(split, evaluated_ids(len(split), args.max_images))


def value_ranges(args: argparse.Namespace) -> dict[str, Any]:
    """value_ranges.csv and value_ranges.png for both models."""
    device, fmt = resolve_device(args.device), get_format("fp32")
    loaded, dataset = load_pair(args)
    rows: list[dict[str, Any]] = []
    for label, model, meta in loaded:
        images = evaluation_images(meta, dataset, args)
        model.to(device)
        layers = discover_layers(model, images.images(images.ids[:1]).to(device))
        batches = (x for x, _ in images.batches(args.batch_size))
        rows += range_rows(label, layers, activation_ranges(model, layers, batches, fmt, device))
    out = Path(args.out)
    write_range_csv(rows, out / "value_ranges.csv")
    plot_ranges(rows, out / "value_ranges.png", f"{loaded[0][2].get('model')} on {dataset}: activation magnitudes")
    summary = {label: {"max_abs": max(r["max_abs"] for r in rows if r["model"] == label),
                       "last_layer_max_abs": [r["max_abs"] for r in rows if r["model"] == label][-1]}
               for label in MODELS}
    for label, facts in summary.items():
        print(f"{label:12s} largest |activation| {facts['max_abs']:.4g}; last layer {facts['last_layer_max_abs']:.4g}")
    print(f"wrote {out / 'value_ranges.csv'} and {out / 'value_ranges.png'}", flush=True)
    return summary


def top2diff_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """top2diff_sweep.csv/.png/.json: accuracy against δ for both models and the crossing point."""
    if not all(0 <= d <= 100 for d in args.deltas) or list(args.deltas) != sorted(args.deltas):
        raise AnalysisError("--deltas must be increasing percentages between 0 and 100")
    device, fmt = resolve_device(args.device), get_format("fp32")
    loaded, dataset = load_pair(args)
    curves, accuracy = {}, {}
    for label, model, meta in loaded:
        images = evaluation_images(meta, dataset, args)
        golden = golden_pass(model.to(device), images.ids, images.batches(args.batch_size), fmt, device)
        curves[label] = accuracy_above(golden.correct.numpy(), golden.top2diff.numpy(), args.deltas)
        accuracy[label] = golden.accuracy
    base, text = curves[MODELS[0]], curves[MODELS[1]]
    crossing = crossing_point(args.deltas, base, text)
    out = Path(args.out)
    lines = ["delta,baseline_accuracy,text_accuracy"]
    lines += [f"{d!r},{b!r},{t!r}" for d, b, t in zip(args.deltas, base.tolist(), text.tolist(), strict=True)]
    write_text(out / "top2diff_sweep.csv", "\n".join(lines) + "\n")
    model_name = loaded[0][2].get("model")
    plot_sweep(args.deltas, dict(curves), crossing, out / "top2diff_sweep.png",
               f"{model_name} on {dataset}: accuracy vs Top2Diff threshold")
    summary = {"dataset": dataset, "model": model_name, "images": int(len(golden.ids)),
               "accuracy": accuracy, "crossing_delta": None if np.isnan(crossing) else crossing,
               "baseline_above_40": float(base[-1]), "text_above_40": float(text[-1])}
    write_json(out / "top2diff_sweep.json", summary)
    span = f"δ = {args.deltas[0]:g}…{args.deltas[-1]:g}"
    if np.isnan(crossing):
        where = f"stays below the baseline's over {span}"
    elif crossing == args.deltas[0]:
        where = f"is at or above the baseline's from δ = {crossing:g} (no crossing to report)"
    else:
        where = f"reaches the baseline's at δ = {crossing:.2f}"
    print(f"top-1: baseline {100 * accuracy['baseline']:.2f}%, text-guided {100 * accuracy['text-guided']:.2f}%; "
          f"the text-guided curve {where}", flush=True)
    print(f"wrote {out / 'top2diff_sweep.csv'} and {out / 'top2diff_sweep.png'}", flush=True)
    return summary


def ablation(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and inject what is missing, then write ablation.csv and ablation.md."""
    try:
        train_args, inject_args = shlex.split(args.train_args), shlex.split(args.inject_args)
    except ValueError as exc:
        raise AnalysisError(f"--train-args/--inject-args: {exc}") from None
    plan = AblationPlan(out=Path(args.out), config=args.config, dataset=args.dataset, encoder=args.encoder,
                        descriptions=args.descriptions, variants=args.variants, train_args=train_args,
                        inject_args=inject_args, seed=args.seed,
                        baseline_campaign=Path(args.baseline_campaign) if args.baseline_campaign else None)
    if not Path(args.config).is_file():
        raise AnalysisError(f"recipe not found: {args.config}")
    run_steps(ablation_steps(plan), dry_run=args.dry_run)
    if args.dry_run:
        return []
    rows = ablation_table(plan)
    csv_path, md_path = write_ablation(rows, plan.out)
    print(md_path.read_text(encoding="utf-8"), flush=True)
    print(f"wrote {csv_path} and {md_path}", flush=True)
    return rows


def heads(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train, restrict and inject what is missing, then write the heads report."""
    import text_features

    try:
        train_args, inject_args = shlex.split(args.train_args), shlex.split(args.inject_args)
    except ValueError as exc:
        raise AnalysisError(f"--train-args/--inject-args: {exc}") from None
    # the steps run at the repository root: paths given here are made absolute, the defaults live there
    config, features_path = (str(REPO / path) if path == default else str(Path(path).resolve())
                             for path, default in ((args.config, HEADS_CONFIG), (args.features, HEADS_FEATURES)))
    for label, path in (("recipe", config), ("text features file", features_path)):
        if not Path(path).is_file():
            raise AnalysisError(f"{label} not found: {path}")
    features, _ = text_features.load_text_features(Path(features_path))
    plan = head_variants.HeadsPlan(
        out=Path(args.out).resolve(), config=config, dataset=args.dataset, features=features_path,
        embed_dim=int(features.shape[1]), seeds=list(range(args.seeds)), epochs=args.epochs, variants=args.variants,
        train_args=train_args, inject_args=inject_args, campaign_seed=args.campaign_seed,
        profile_images=args.profile_images, data_path=args.data_path and str(Path(args.data_path).resolve()),
        range_images=args.range_images)
    steps = head_variants.heads_steps(plan)
    seconds = run_steps(steps, dry_run=args.dry_run)
    if args.dry_run:
        print(f"[report] heads_seeds.csv, heads.csv, heads.md and heads.png in {plan.out}", flush=True)
        return []
    head_variants.record_step_seconds(plan, steps, seconds)
    summaries = head_variants.write_heads_report(plan)
    print((plan.out / "heads.md").read_text(encoding="utf-8"), flush=True)
    print(f"wrote heads_seeds.csv, heads.csv, heads.md and heads.png in {plan.out}", flush=True)
    return summaries


def restrict_ranges(args: argparse.Namespace) -> dict[str, float]:
    """Profile a checkpoint on training images and save its range-restricted version."""
    bounds = restrict_checkpoint(Path(args.checkpoint), Path(args.out), images=args.images, data_path=args.data_path,
                                 device=resolve_device(args.device))
    print(f"restricted {len(bounds)} conv/linear layers (largest bound {max(bounds.values()):.4g}); wrote {args.out}",
          flush=True)
    return bounds


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, report bad input as one ``error:`` line (exit code 2)."""
    args = get_args_parser().parse_args(argv)
    run = {"value-ranges": value_ranges, "top2diff-sweep": top2diff_sweep, "ablation": ablation, "heads": heads,
           "restrict-ranges": restrict_ranges}[args.command]
    # the ablation's and heads' training and campaigns take their arithmetic from --train-args / --inject-args
    chosen = arithmetic.from_args(args) if hasattr(args, "math") else arithmetic.STRICT_FP32

    def run_in_arithmetic() -> Any:
        with arithmetic.applied(chosen):
            return run(args)

    return run_cli(run_in_arithmetic)


if __name__ == "__main__":
    sys.exit(main())
