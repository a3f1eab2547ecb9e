"""Fault-injection campaigns: single-bit flips in activations (``neurons``) or in weights (``weights``).

    python inject.py neurons --checkpoint runs/fm_resnet20_text/checkpoint.pth --injections 512 --seed 0 --out runs/fi_text
    python inject.py neurons ... --shard 0/4     (one of four shards; or run under torchrun: one shard per rank)
    python inject.py merge DIR [DIR ...] [--out OUT]     (shards run into separate folders)
    python inject.py weights --fault-list FL.csv ...     (weight faults: see docs/weight_faults.md)
    python inject.py neurons ... --sampling stratified --target-ci 0.1    (bits as strata, adaptive: docs/stratified.md)

The older spellings keep working with a one-line note: without a subcommand, ``--fault-model weight-*``
means ``weights`` and anything else ``neurons``.

Rerunning the same command resumes: finished chunks are skipped and the final files are identical to
those of an uninterrupted run. Definitions and outputs: docs/injection.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import data
import models
from cli_shell import MAX_IMAGES_HELP, HelpFormatter, non_negative_int, positive_int, regex, run_cli
from models.device import resolve_device
from resilience import arithmetic
from resilience.bitflip import FORMATS, get_format
from resilience.campaign import (
    CLAMP_MODES,
    CampaignConfig,
    CampaignError,
    CampaignFolder,
    append_run_log,
    parse_shard,
)
from resilience.engines import ENGINES
from resilience.golden import (
    GOLDEN_MODES,
    EvaluatedImages,
    Golden,
    evaluated_ids,
    golden_pass,
    iterate_split,
)
from resilience.image_pool import pool_size_arg
from resilience.layers import discover_layers
from resilience.profile import cached_profile, profile_max_abs
from resilience.runner import Sampling, add_sampling_args, execute, is_complete, merge, sampling_from_args
from resilience.storage import atomic_write
from resilience.weights.cli import RUN_DESCRIPTION as WEIGHT_RUN_DESCRIPTION
from resilience.weights.cli import add_run_arguments as add_weight_run_arguments
from resilience.weights.cli import run as run_weight_faults
from resilience.weights.cli import wants_weight_faults
from resilience.weights.faults import FAULT_MODELS as WEIGHT_FAULT_MODELS

PLAN_BYTES_PER_FAULT = 64  # one layer's sampled sites and their temporaries (resilience.sampling)
IN_MEMORY_LIMIT = 2 << 30  # bytes of evaluated images held in memory; larger splits are read on demand
GOLDEN_BATCH = 256  # fixed, so golden logits do not depend on --batch-size
NEURON_FAULT_MODEL = "neuron-bitflip"
SUBCOMMANDS = ("neurons", "weights", "merge")


class InjectParser(argparse.ArgumentParser):
    """The command line of ``inject.py``: subcommands, and the older spellings without one.

    A command line without a subcommand gets the one it means and ``spelling_note`` (one line for the
    user); with a subcommand, ``spelling_note`` is None.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse ``args`` (default: ``sys.argv[1:]``), naming the subcommand an older spelling means."""
        argv = list(sys.argv[1:] if args is None else args)
        note = None
        if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
            command = "weights" if wants_weight_faults(argv) else "neurons"
            note = f"note: this command is now spelled 'inject.py {command} ...' (the spelling used keeps working)"
            argv.insert(0, command)
        parsed, extra = super().parse_known_args(argv, namespace)
        parsed.spelling_note = note
        return parsed, extra


def get_args_parser(add_help: bool = True) -> InjectParser:
    """The options of ``inject.py neurons``, ``weights`` and ``merge``."""
    parser = InjectParser(
        prog="inject.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Fault-injection campaigns. 'inject.py COMMAND --help' lists a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=argparse.ArgumentParser)
    add_neuron_arguments(commands.add_parser(
        "neurons", formatter_class=HelpFormatter, help="single-bit flips in conv/linear outputs (the paper's campaigns)",
        description="Single-bit-flip campaign on conv/linear outputs: ΔLoss, mismatch and Top2Diff per fault, "
                    "per layer and for the network."))
    add_weight_run_arguments(commands.add_parser(
        "weights", formatter_class=HelpFormatter, help="faults in weights from a dnn-benchmarks fault list",
        description=WEIGHT_RUN_DESCRIPTION))
    merge = commands.add_parser("merge", formatter_class=HelpFormatter, help="gather shards run into separate folders",
                                description="Gather shards and write the final files.")
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="campaign folders of the shards")
    merge.add_argument("--out", default=None, metavar="DIR", help="merged folder (default: the first DIR)")
    return parser


def add_neuron_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a neuron-fault campaign."""
    parser.add_argument("--fault-model", choices=(NEURON_FAULT_MODEL,), default=NEURON_FAULT_MODEL,
                        help="transient flip of one activation bit (weight faults: inject.py weights)")
    parser.add_argument("--out", required=True, metavar="DIR", help="campaign folder (rerun to resume)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="fault sampling seed")

    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="checkpoint (ours, the paper's or dnn-benchmarks')")
    g.add_argument("--model", default=None, help="architecture of foreign checkpoints, e.g. resnet20")
    g.add_argument("--num-classes", type=int, default=None, help="classes of foreign checkpoints")
    g.add_argument("--head", choices=("linear", "text"), default=None, help="head of foreign checkpoints")
    g.add_argument("--embed-dim", type=int, default=None, help="text-embedding width of foreign text checkpoints")
    g.add_argument("--allow-unsafe-checkpoint", "--allow-unsafe", dest="allow_unsafe", action="store_true",
                   help="full unpickling of old checkpoints (only files you trust)")
    g.add_argument("--fuse-text-head", action="store_true",
                   help="inject into the text model with its head fused into one B->C layer (models.fuse_text_head)")

    g = parser.add_argument_group("images")
    g.add_argument("--dataset", default=None, help="dataset (default: the checkpoint's)")
    g.add_argument("--data-path", default=None, help="dataset root (default: data.default_data_root())")
    g.add_argument("--max-images", type=positive_int, default=None, metavar="K",
                   help=MAX_IMAGES_HELP)
    g.add_argument("--golden", choices=GOLDEN_MODES, default="correct",
                   help="images faults may hit: correctly classified with Top2Diff > 0, or all")
    g.add_argument("-j", "--workers", type=non_negative_int, default=2, help="data-loading workers")

    g = parser.add_argument_group("faults")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--injections", type=positive_int, default=None, metavar="N", help="faults per layer (default 512)")
    n.add_argument("--margin", type=float, default=None, metavar="E",
                   help="Leveugle et al. 2009: n per layer for error margin E (with --confidence)")
    g.add_argument("--confidence", type=float, default=0.99, help="confidence of --margin")
    g.add_argument("--image-pool", type=pool_size_arg, default=None, metavar="K",
                   help="draw K golden images once (from --seed) and every fault's image from them: two-stage "
                        "sampling, intervals with the between-image variance (docs/image_pool.md; default: all)")
    g.add_argument("--layers", type=regex, default=None, metavar="REGEX", help="only layers whose name matches")
    g.add_argument("--format", choices=tuple(FORMATS), default="fp32", help="number format the model runs in")
    g.add_argument("--clamp", choices=CLAMP_MODES, default="none",
                   help="profile: GoldenEye's clamp to ±(profiled max |activation|), NaN -> +max")
    g.add_argument("--profile-images", type=positive_int, default=1024, metavar="K", help="training images of the profile")
    g.add_argument("--profile-cache", default=None, metavar="DIR",
                   help="profile cache (default: ~/.cache/text-guided-resilience/profiles)")

    g = parser.add_argument_group("execution")
    g.add_argument("--engine", choices=tuple(sorted(ENGINES)), default="reference")
    g.add_argument("-b", "--batch-size", type=positive_int, default=64, help="faults per forward pass")
    g.add_argument("--chunk-size", type=positive_int, default=256,
                   help="faults per persisted chunk (a multiple of the batch size; a kill loses at most one)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    g.add_argument("--shard", default=None, metavar="i/k",
                   help="run shard i of k (0-based); under torchrun: RANK/WORLD_SIZE")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_sampling_args(parser)
    arithmetic.add_arguments(parser)


def launcher_shard(args: argparse.Namespace) -> tuple[tuple[int, int], int]:
    """(shard, local rank): ``--shard``, else torchrun's RANK/WORLD_SIZE, else the whole campaign."""
    if args.shard:
        return parse_shard(args.shard), 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])), int(os.environ.get("LOCAL_RANK", "0"))
    return (0, 1), 0


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's model (evaluation mode, CPU) and its meta, fused if asked."""
    num_classes = args.num_classes
    if num_classes is None and args.dataset in data.DATASETS:
        num_classes = data.num_classes(args.dataset)
    model, meta = models.load_checkpoint(
        args.checkpoint, model_name=args.model, num_classes=num_classes, head=args.head,
        embed_dim=args.embed_dim, dataset=args.dataset, allow_unsafe=args.allow_unsafe,
    )
    if args.fuse_text_head:
        if not isinstance(model, models.TextGuidedClassifier):
            raise CampaignError("--fuse-text-head needs a text-guided checkpoint")
        model = models.fuse_text_head(model).eval()
    return model, dict(meta)


def resolve_dataset(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The dataset name and its evaluation preset (the checkpoint's, when it was trained on it)."""
    dataset = args.dataset or meta.get("dataset")
    if dataset not in data.DATASETS:
        raise CampaignError(f"give --dataset (one of {', '.join(data.DATASETS)}); the checkpoint names none")
    return dataset, data.preset_for(meta, dataset)


def versions() -> dict[str, str | None]:
    """Versions of what produced the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "pytorchfi", "numpy", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    found["text-guided-resilience"] = _package_version()
    found["git_commit"] = _git_commit()
    return found


def _package_version() -> str | None:
    with contextlib.suppress(ImportError, OSError, KeyError):
        import tomllib

        return tomllib.loads((Path(__file__).with_name("pyproject.toml")).read_text())["project"]["version"]
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    return None


def rerun_command(argv: Sequence[str]) -> str:
    """The command line that reruns (resumes) the whole campaign: ``argv`` without the shard option."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--shard":
            skip = True
            continue
        if not arg.startswith("--shard="):
            kept.append(arg)
    return "python inject.py " + shlex.join(kept)


def progress_bar(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], images: int, desc: str,
                 disable: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` passed through, with a progress bar counting images."""
    with tqdm(total=images, unit="img", desc=desc, disable=disable, dynamic_ncols=True, leave=False) as bar:
        for x, y in batches:
            yield x, y
            bar.update(len(x))


def cached_golden(path: Path, key: str, compute: Callable[[], Golden]) -> Golden:
    """Golden outputs cached in DIR/golden.pt (a resumed run reuses them; another key recomputes)."""
    if path.is_file():
        with contextlib.suppress(Exception):  # an unreadable or foreign cache is simply recomputed
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached["key"] == key:
                return Golden(cached["ids"], cached["logits"], cached["labels"])
    golden = compute()
    atomic_write(path, lambda tmp: torch.save(
        {"key": key, "ids": golden.ids, "logits": golden.logits, "labels": golden.labels}, tmp))
    return golden


def campaign(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run (or resume) this process's share of the campaign; assemble the final files when all is done."""
    with arithmetic.applied(arithmetic.from_args(args)) as arith:
        return _campaign(args, argv, arith)


def _campaign(args: argparse.Namespace, argv: Sequence[str], arith: arithmetic.Arithmetic) -> int:
    sampling = sampling_from_args(args)  # before the uniform default below: it refuses --injections
    if sampling.name != "uniform" and arith.amp:
        raise CampaignError("--amp campaigns use uniform sampling (no --sampling stratified)")
    if args.injections is None and args.margin is None:
        args.injections = 512
    check_plan_memory(args, sampling)
    if args.threads:
        torch.set_num_threads(args.threads)
    shard, local_rank = launcher_shard(args)
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        # before any model or PyTorchFI work: PyTorchFI builds its probe input on the current device
        torch.cuda.set_device(device)
    out = Path(args.out)
    t_start = time.perf_counter()

    model, meta = load_model(args)
    dataset_name, preset = resolve_dataset(args, meta)
    config = CampaignConfig(
        model=meta["model"], dataset=dataset_name, split="test", checkpoint_sha256=meta.get("checkpoint_sha256"),
        fused_text_head=args.fuse_text_head, preset=preset, seed=args.seed, injections=args.injections,
        margin=args.margin, confidence=args.confidence if args.margin is not None else None, golden=args.golden,
        max_images=args.max_images, layers=args.layers, format=args.format, clamp=args.clamp,
        profile_images=args.profile_images if args.clamp == "profile" else None, engine=args.engine,
        batch_size=args.batch_size, chunk_size=args.chunk_size, device=device.type, arithmetic=arith.describe(),
    )
    if is_complete(out, config, sampling, args.image_pool):
        print(f"{out}: campaign already complete; nothing to do", flush=True)
        return 0

    fmt = get_format(args.format)
    model.to(device=device, dtype=fmt.dtype).eval()
    arithmetic.select_layers(model)
    dataset = data.build_dataset(dataset_name, "test", args.data_path, preset=preset)
    ids = evaluated_ids(len(dataset), args.max_images)
    evaluated = EvaluatedImages(dataset, ids, workers=args.workers, memory_limit=IN_MEMORY_LIMIT)
    # what the golden outputs depend on: not the sampling, the layers or the engine
    golden_key = repr({k: v for k, v in vars(config).items() if k in (
        "model", "dataset", "split", "checkpoint_sha256", "fused_text_head", "preset", "max_images", "format",
        "device", "arithmetic")})
    out.mkdir(parents=True, exist_ok=True)
    golden = cached_golden(CampaignFolder(out).file("golden.pt"), golden_key, lambda: golden_pass(
        model, ids, progress_bar(evaluated.batches(GOLDEN_BATCH), len(ids), "golden pass", args.no_progress), fmt, device))
    t_setup = time.perf_counter() - t_start  # model, images and golden pass

    example = evaluated.images(ids[:1]).to(device, fmt.dtype)
    try:
        layers = discover_layers(model, example)
    except ValueError as exc:
        raise CampaignError(str(exc)) from None

    clamp_max = None
    if args.clamp == "profile":
        train = data.build_dataset(dataset_name, "train", args.data_path, preset=preset)
        train_ids = evaluated_ids(len(train), args.profile_images)
        key = {"arithmetic": arith.describe(), "checkpoint_sha256": config.checkpoint_sha256, "fused_text_head": config.fused_text_head,
               "dataset": dataset_name, "preset": preset, "format": args.format, "images": len(train_ids),
               "device": device.type}
        cache = Path(args.profile_cache) if args.profile_cache else Path.home() / ".cache/text-guided-resilience/profiles"
        batches = iterate_split(train, train_ids, GOLDEN_BATCH, args.workers)
        clamp_max = cached_profile(cache, key, lambda: profile_max_abs(
            model, layers, (x for x, _ in progress_bar(batches, len(train_ids), "profile", args.no_progress)), fmt,
            device))

    provenance = {
        "model": meta["model"], "head": meta.get("head"), "checkpoint": str(Path(args.checkpoint).resolve()),
        "checkpoint_sha256": meta.get("checkpoint_sha256"), "text_features": meta.get("text_features"),
        "fused_text_head": args.fuse_text_head, "dataset": dataset_name, "split": "test", "seed": args.seed,
        "format": args.format, "arithmetic": arith.describe(), "clamp": args.clamp, "last_layers": models.last_layer_names(model),
        "versions": versions(), "command": rerun_command(argv),
    }
    print(f"{meta['model']} ({meta.get('head')} head{', fused' if args.fuse_text_head else ''}) on {dataset_name}: "
          f"{len(ids)} images, accuracy {100 * golden.accuracy:.2f}%, golden set "
          f"{len(golden.golden_set(args.golden))}; {len(layers)} conv/linear layers; device {device}, "
          f"format {args.format}, arithmetic {arith.label}, engine {args.engine}, shard {shard[0]}/{shard[1]}", flush=True)
    opened, stats = execute(
        out, config, model, layers, golden, evaluated, sampling=sampling, provenance=provenance, clamp_max=clamp_max,
        device=device, shard=shard, progress=not args.no_progress, image_pool=args.image_pool,
    )
    wall = time.perf_counter() - t_start
    rate = stats.faults / stats.seconds if stats.seconds > 0 else float("nan")
    append_run_log(out, {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shard": f"{shard[0]}/{shard[1]}",
        "faults": stats.faults, "skipped": stats.skipped, "injection_seconds": round(stats.seconds, 3),
        "setup_seconds": round(t_setup, 3), "wall_seconds": round(wall, 3), "faults_per_second": rate,
        "device": str(device), "threads": torch.get_num_threads(),
        "layer_seconds": {name: round(seconds, 3) for name, seconds in stats.per_layer.items()},
    })
    print(f"ran {stats.faults} faults ({stats.skipped} already done) in {stats.seconds:.1f} s: {rate:.1f} faults/s; "
          f"wall {wall:.1f} s", flush=True)
    missing = opened.missing()
    if missing:
        print(f"{len(missing)} {opened.unit_name} left to other shards; the last shard to "
              f"finish writes the final files (shards run into separate folders: python inject.py merge {out} "
              f"OTHER_SHARD_DIR ...)", flush=True)
        return 0
    summary = opened.assemble()
    net = summary["network"]
    print(f"network ΔLoss {net['delta_loss']:.4g}, mismatch {100 * net['mismatch_rate']:.2f}%, "
          f"{net['non_finite']} non-finite of {net['faults']} faults; outputs in {out}", flush=True)
    return 0


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None when unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def check_plan_memory(args: argparse.Namespace, sampling: Sampling) -> None:
    """Refuse, before any file is written, a per-layer fault plan that cannot fit in memory."""
    faults = sampling.planned_faults(args.injections, args.format)
    need, available = faults * PLAN_BYTES_PER_FAULT, available_memory()
    if available is not None and need > available:
        raise CampaignError(f"{faults:,} faults per layer need about {need / 2**30:.1f} GiB to plan, more than the "
                            f"{available / 2**30:.1f} GiB available; ask for fewer (or shard the layers with --layers)")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run its subcommand: a neuron-fault campaign, weight faults or ``merge``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    if argv[:1] != ["weights"] and not wants_weight_faults(argv) and any(
            arg == "--fault-list" or arg.startswith("--fault-list=") for arg in argv):
        parser.error(f"--fault-list needs a weight fault model: inject.py weights (or --fault-model "
                     f"{{{','.join(WEIGHT_FAULT_MODELS)}}})")
    args = parser.parse_args(argv)
    if args.spelling_note:
        print(args.spelling_note, file=sys.stderr, flush=True)
    if args.command == "weights":
        return run_cli(lambda: run_weight_faults(args))
    if args.command == "merge":
        return run_cli(lambda: merge_dirs(args.dirs, args.out))
    return run_cli(lambda: campaign(args, argv))


def merge_dirs(dirs: Sequence[str], out: str | None) -> None:
    """``inject.py merge``: gather the shards' folders into ``out`` (default: the first) and assemble."""
    summary = merge([Path(d) for d in dirs], Path(out or dirs[0]))
    print(f"merged {len(dirs)} folder(s): network ΔLoss {summary['network']['delta_loss']:.4g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
