"""Ablation-CAM of a baseline and a text-guided model before and after the same faults (paper, Figure 2).

    python visualize.py --baseline runs/fm_linear/checkpoint.pth --text runs/fm_text/checkpoint.pth \\
        --indices 0 1 2 3 --flips 2000 --seed 0 --out docs/cam_fashion_mnist.png
    python visualize.py ... --weight-fault layer3.0.conv1 "(5, 3, 1, 1)" 30 --out cam_single.png
    python visualize.py ... --images shirt.png --neuron-fault layer2.0.conv2 1234 30 --out cam_neuron.png

Writes the grid PNG, a CSV beside it (per image and model: clean/faulty class and confidence, flip,
CAM cosine), a JSON summary and, for weight faults, each model's faults as a dnn-benchmarks fault
list. How faults are shared between the two models: docs/visualize.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import data
import models
from analysis.cam import CamError, resolve_cam_layer
from analysis.cam_compare import (
    CAM_CLASSES,
    CSV_COLUMNS,
    CamModel,
    InputImage,
    compare_cams,
    csv_rows,
    dataset_images,
    file_images,
    summarize,
)
from analysis.cam_figure import render_grid
from analysis.faults_for_cam import (
    HEAD_RULES,
    FaultSpec,
    ModelFaults,
    NeuronFault,
    RandomFlips,
    SingleWeightFault,
    fault_list_row,
    pair_faults,
)
from cli_shell import HelpFormatter, non_negative_int, positive_int, run_cli
from models.checkpoint import require_head
from resilience import arithmetic
from resilience.storage import atomic_write, write_json
from resilience.weights.fault_list import FaultList, parse_index, write_fault_list
from resilience.weights.faults import WeightFault

KEYS = ("baseline", "text")
HEAD_OF = {"baseline": "linear", "text": "text"}
COLUMN_LABELS = ("baseline", "text-guided")


def parse_bits(text: str) -> tuple[int, ...]:
    """Bit positions such as ``0-22,31`` (ranges inclusive)."""
    bits: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            bits.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must look like 0-22,31, not {text!r}") from None
    if not bits:
        raise argparse.ArgumentTypeError(f"no bit in {text!r}")
    return tuple(sorted(bits))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Options of the CAM comparison."""
    parser = argparse.ArgumentParser(
        prog="visualize.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Ablation-CAM of a baseline and a text-guided model before and after the same faults: "
                    "grid PNG, per-image CSV (CAM cosine, flipped prediction) and JSON summary.",
    )
    parser.add_argument("--out", required=True, metavar="PNG", help="grid image; .csv/.json/fault lists go beside it")

    g = parser.add_argument_group("models")
    g.add_argument("--baseline", required=True, metavar="CKPT", help="baseline checkpoint (linear head)")
    g.add_argument("--text", required=True, metavar="CKPT", help="text-guided checkpoint (text head)")
    g.add_argument("--model", default=None, help="architecture of foreign checkpoints, e.g. resnet20")
    g.add_argument("--allow-unsafe-checkpoint", dest="allow_unsafe", action="store_true",
                   help="full unpickling of old checkpoints (only files you trust)")

    g = parser.add_argument_group("images")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--indices", type=int, nargs="+", metavar="I", help="indices into the dataset split")
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files (fed through the evaluation preset)")
    g.add_argument("--dataset", default=None, help="dataset (default: the checkpoints'); names the classes")
    g.add_argument("--split", choices=("train", "test"), default="test")
    g.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")

    g = parser.add_argument_group("faults (one kind)")
    kind = g.add_mutually_exclusive_group(required=True)
    kind.add_argument("--flips", type=int, metavar="N", help="N random weight bit flips over all conv/linear weights")
    kind.add_argument("--weight-fault", nargs=3, metavar=("LAYER", "INDEX", "BIT"),
                      help='one weight bit flip, e.g. layer3.0.conv1 "(5, 3, 1, 1)" 30')
    kind.add_argument("--neuron-fault", nargs=3, metavar=("LAYER", "INDEX", "BIT"),
                      help="flip of one output element (flat index per image) of a conv/linear layer")
    kind.add_argument("--fault-list", metavar="CSV", help="a dnn-benchmarks fault list; the row is --injection")
    g.add_argument("--injection", type=int, default=None, metavar="ID", help="Injection id of the --fault-list row")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of --flips")
    g.add_argument("--head-rule", choices=HEAD_RULES, default="density",
                   help="flips in the text model's own head: same per-bit density, or the baseline head's count")
    g.add_argument("--bits", type=parse_bits, default=None, metavar="SPEC",
                   help="bit positions --flips may hit, e.g. 0-29 (default: all)")

    g = parser.add_argument_group("CAM")
    g.add_argument("--target-layer", default=None, metavar="NAME",
                   help="CAM layer in the baseline's naming (default: the family's last stage, e.g. layer3)")
    g.add_argument("--cam-class", choices=CAM_CLASSES, default="predicted",
                   help="class the faulty CAM explains: its own top-1, or the clean model's top-1")
    g.add_argument("--cam-batch-size", type=positive_int, default=32, help="ablated copies per forward pass")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    arithmetic.add_arguments(parser)
    return parser


def load_pair(args: argparse.Namespace) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """(model, meta) of the baseline and the text checkpoint, checked to be a matching pair."""
    pair = []
    for key in KEYS:
        model, meta = models.load_checkpoint(getattr(args, key), model_name=args.model, dataset=args.dataset,
                                             allow_unsafe=args.allow_unsafe, map_location=args.device)
        require_head(meta, HEAD_OF[key], f"--{key}", getattr(args, key))
        pair.append((model, dict(meta)))
    if pair[0][1]["num_classes"] != pair[1][1]["num_classes"]:
        raise CamError(f"the checkpoints have {pair[0][1]['num_classes']} and {pair[1][1]['num_classes']} classes")
    return pair


def resolve_inputs(args: argparse.Namespace, metas: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The dataset (for class names and indices) and the evaluation preset both models share."""
    dataset = args.dataset or metas[0].get("dataset") or metas[1].get("dataset")
    if dataset not in data.DATASETS:
        raise CamError(f"give --dataset (one of {', '.join(data.DATASETS)}); the checkpoints name none")
    presets = [data.check_eval_preset(data.preset_for(meta, dataset)) for meta in metas]
    if presets[0] != presets[1]:
        raise CamError(f"the checkpoints expect different inputs ({presets[0]} vs {presets[1]}); "
                       f"a CAM comparison needs the same images for both")
    return dataset, presets[0]


def load_images(args: argparse.Namespace, dataset: str, preset: dict[str, Any]) -> list[InputImage]:
    """The requested dataset items or image files, as model inputs."""
    if args.indices is not None:
        split = data.build_dataset(dataset, args.split, args.data_path, preset=preset)
        return dataset_images(split, args.indices, preset, f"{dataset} {args.split}")
    return file_images(args.images, data.ClassificationPresetEval(**preset), preset)


def fault_spec(args: argparse.Namespace) -> FaultSpec:
    """The fault specification the options describe."""
    if args.fault_list is None and args.injection is not None:
        raise CamError("--injection selects a row of --fault-list")
    if args.flips is not None:
        return RandomFlips(args.flips, args.seed, args.head_rule, args.bits)
    if args.fault_list is not None:
        if args.injection is None:
            raise CamError("--fault-list needs --injection ID (the Injection id of the row)")
        return fault_list_row(args.fault_list, args.injection)
    layer, index, bit = args.weight_fault or args.neuron_fault
    try:
        if args.neuron_fault:
            return NeuronFault(layer, int(index), int(bit))
        text = index.strip()
        return SingleWeightFault(WeightFault(layer, parse_index(text if text.startswith("(") else f"({text})"), int(bit)))
    except ValueError as exc:
        option = "--neuron-fault" if args.neuron_fault else "--weight-fault"
        raise CamError(f"{option} {layer} {index} {bit}: {exc}") from None


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _fault_counts(faults: ModelFaults) -> dict[str, int]:
    return {"total": faults.count, "shared": faults.shared, "own": faults.own}


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the CAMs, write PNG, CSV, JSON (and fault lists); return the per-model summary."""
    start = time.perf_counter()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CamError(f"--out must name a .png file, not {out}")
    if args.cam_batch_size < 1:
        raise CamError("--cam-batch-size must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = fault_spec(args)
    pair = load_pair(args)
    for model, _ in pair:
        arithmetic.select_layers(model)
    dataset, preset = resolve_inputs(args, [meta for _, meta in pair])
    class_names = data.get_class_names(dataset)
    images = load_images(args, dataset, preset)
    example = images[0].tensor.unsqueeze(0).to(args.device)
    (baseline, base_meta), (text, text_meta) = pair
    faults = pair_faults(baseline, text, spec, example)
    cam_models = [
        CamModel(key, model, resolve_cam_layer(model, meta["model"], example, args.target_layer), model_faults)
        for key, (model, meta), model_faults in zip(KEYS, pair, faults, strict=True)
    ]
    cam_start = time.perf_counter()
    results = compare_cams(cam_models, images, cam_class=args.cam_class, batch_size=args.cam_batch_size,
                           progress=not args.no_progress)
    cam_seconds = time.perf_counter() - cam_start

    render_grid(results, KEYS, COLUMN_LABELS, class_names, out)
    _write_csv(out.with_suffix(".csv"), csv_rows(results, KEYS, class_names))
    if not isinstance(spec, NeuronFault):
        for key, model_faults in zip(KEYS, faults, strict=True):
            weights = list(model_faults.weights)
            write_fault_list(out.with_name(f"{out.stem}_faults_{key}.csv"), FaultList(weights, list(range(len(weights)))))
    summary = summarize(results, KEYS)
    write_json(out.with_suffix(".json"), {
        "args": vars(args),
        "dataset": dataset, "images": [r.image.source for r in results], "faults": repr(spec),
        "models": {
            key: {"checkpoint": str(getattr(args, key)), "checkpoint_sha256": meta.get("checkpoint_sha256"),
                  "model": meta["model"], "cam_layer": m.layer.name, "faults": _fault_counts(m.faults),
                  **summary[key]}
            for key, meta, m in zip(KEYS, (base_meta, text_meta), cam_models, strict=True)
        },
        "seconds": {"cam": round(cam_seconds, 3), "total": round(time.perf_counter() - start, 3)},
    })
    for key, label, m in zip(KEYS, COLUMN_LABELS, cam_models, strict=True):
        s = summary[key]
        print(f"{label}: {m.faults.count} faults ({m.faults.shared} shared, {m.faults.own} own); "
              f"mean CAM cosine {s['mean_cam_cosine']:.6f} over {s['images'] - s['non_finite']} finite of "
              f"{s['images']} images; {s['flipped']} predictions flipped", flush=True)
    print(f"wrote {out} and {out.with_suffix('.csv').name}; Ablation-CAM {cam_seconds:.1f} s, "
          f"total {time.perf_counter() - start:.1f} s", flush=True)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run, and turn bad input into one ``error:`` line and exit code 2."""
    args = get_args_parser().parse_args(argv)

    def run_in_arithmetic() -> Any:
        with arithmetic.applied(arithmetic.from_args(args)):
            return main(args)

    return run_cli(run_in_arithmetic)


if __name__ == "__main__":
    sys.exit(cli())
