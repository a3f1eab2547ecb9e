"""Train a baseline (linear head) or text-guided classifier; one script for both heads.

Single process:   python train.py -c configs/fashion_mnist/resnet20.yaml --head text \
                      --text-features text_features/assets/fashion-mnist_minilm.pth
Several GPUs:     torchrun --nproc_per_node 4 train.py -c configs/imagenet/resnet.yaml --model resnet50 ...
SLURM (srun):     one task per GPU; the process group is read from the SLURM variables.

Options follow torchvision's classification references; a ``-c config.yaml`` recipe sets the defaults
and the command line overrides them. See docs/training.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils.data
import yaml
from torch import nn

from cli_shell import MAX_IMAGES_HELP, HelpFormatter, UserError, differences, non_negative_int, run_cli
from models.device import default_workers, resolve_device
from models.registry import HEADS, TEXT_HEADS
from resilience.golden import evaluated_subset
from resilience.storage import write_json
from training import config as cfg
from training.distributed import barrier, destroy_distributed, init_distributed_mode, is_main_process
from training.ema import ModelEMA, ema_decay
from training.engine import TrainOptions, evaluate, train_one_epoch
from training.mixup import build_mix_collate
from training.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    WARMUP_METHODS,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
)
from training.run_log import CSVLog, TensorBoardLog
from training.samplers import RepeatedAugmentSampler, ShardSampler
from training.seeding import make_generator, seed_everything, seed_worker


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a baseline or text-guided image classifier",
        add_help=add_help,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-c", "--config", action="append", default=[], metavar="FILE",
        help="YAML recipe whose keys set option defaults (repeatable; later files and the command line win)",
    )

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagenet", help="dataset name (see data.DATASETS)")
    g.add_argument("--data-path", "--data_path", "--data-root", dest="data_path", default=None,
                   help="dataset root (default: $TGR_DATA_ROOT or ~/.cache/text-guided-resilience/data)")
    g.add_argument("--download", action="store_true", help="download the dataset when it is missing")
    g.add_argument("--train-subset", type=int, default=None, metavar="K",
                   help="train on K randomly chosen training images (quick runs)")
    g.add_argument("--max-images", "--test-subset", dest="test_subset", type=int, default=None, metavar="K",
                   help=MAX_IMAGES_HELP)
    g.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="data-loading processes per GPU/process (default: up to 4, at most the CPU cores)")
    g.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's preset)")
    g.add_argument("--train-crop-size", type=int, default=None, help="random crop size for training")
    g.add_argument("--val-resize-size", type=int, default=None, help="resize size for evaluation")
    g.add_argument("--val-crop-size", type=int, default=None, help="centre crop size for evaluation")
    g.add_argument("--auto-augment", default=None, help="auto augment policy: ra, ta_wide, augmix, imagenet, ...")
    g.add_argument("--ra-magnitude", "--policy-magnitude", dest="ra_magnitude", type=int, default=9,
                   help="magnitude of the auto augment policy")
    g.add_argument("--augmix-severity", type=int, default=3, help="severity of the augmix policy")
    g.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--ra-sampler", action="store_true", help="repeated augmentation sampler (distributed runs)")
    g.add_argument("--ra-reps", type=int, default=3, help="repetitions of the repeated augmentation sampler")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="backbone name (see models.list_models())")
    g.add_argument("--head", choices=HEADS, default=None,
                   help="classifier head (default: text when --text-features is given, else linear)")
    g.add_argument("--text-features", "--CLIP_text_path", dest="text_features", default=None, metavar="FILE",
                   help="class text features [C, E] initialising the text head")
    g.add_argument("--embed-dim", "--embed_size", dest="embed_dim", type=int, default=None,
                   help="text embedding width E (default: the features file's width, else 512)")
    g.add_argument("--freeze-head", action="store_true", help="keep the text projection fixed")
    g.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=False,
                   help="adapt a torchvision backbone's stem to 32x32 images")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: the dataset preset's)")
    g.add_argument("--weights", "--pretrained", dest="weights", default=None,
                   help="pretrained backbone weights to start from (name understood by models.build_model)")
    g.add_argument("--sync-bn", action="store_true", help="synchronised batch norm (distributed CUDA runs)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, metavar="N")
    g.add_argument("-b", "--batch-size", type=int, default=32, help="images per process; total = processes x this")
    g.add_argument("--opt", default="sgd", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=0.1, help="learning rate (for --lr-base-batch images when --scale-lr)")
    g.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=False,
                   help="linear scaling rule: lr x total batch / --lr-base-batch")
    g.add_argument("--lr-base-batch", type=int, default=None,
                   help="total batch size the recipe's --lr was tuned for (used by --scale-lr)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    g.add_argument("--norm-weight-decay", type=float, default=None, help="weight decay of norm layers (default: --wd)")
    g.add_argument("--bias-weight-decay", type=float, default=None, help="weight decay of biases (default: --wd)")
    g.add_argument("--transformer-embedding-decay", type=float, default=None,
                   help="weight decay of position/relative-position tables (default: --wd)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--mixup-alpha", type=float, default=0.0)
    g.add_argument("--cutmix-alpha", type=float, default=0.0)
    g.add_argument("--lr-scheduler", default="steplr", choices=SCHEDULERS)
    g.add_argument("--lr-warmup-epochs", type=int, default=0)
    g.add_argument("--lr-warmup-method", default="constant", choices=WARMUP_METHODS)
    g.add_argument("--lr-warmup-decay", type=float, default=0.01, help="lr factor at the start of the warmup")
    g.add_argument("--lr-step-size", type=int, default=30)
    g.add_argument("--lr-gamma", type=float, default=0.1)
    g.add_argument("--lr-min", type=float, default=0.0, help="final lr of the cosine schedule")
    g.add_argument("--lr-per-iteration", action=argparse.BooleanOptionalAction, default=False,
                   help="step the lr schedule (warmup included) after every iteration, not every epoch: "
                        "a cosine schedule then reaches --lr-min when the last epoch ends")
    g.add_argument("--clip-grad-norm", type=float, default=None, help="maximum gradient norm")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-steps", type=int, default=32, help="iterations between EMA updates")
    g.add_argument("--model-ema-decay", type=float, default=0.99998, help="EMA decay (before batch-size adjustment)")

    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<dataset>_<model>_<head>)")
    g.add_argument("--resume", default="", help="checkpoint to resume from; 'auto' = <output-dir>/checkpoint.pth if present")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (without it, such a folder is refused)")
    g.add_argument("--start-epoch", type=int, default=0, metavar="N")
    g.add_argument("--test-only", action="store_true", help="only evaluate (the --resume checkpoint, or the initial weights)")
    g.add_argument("--save-every", type=int, default=1, help="also keep model_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--use-deterministic-algorithms", action="store_true", help="deterministic kernels only")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--print-freq", type=int, default=100, help="iterations between log lines")
    g.add_argument("--tensorboard", action="store_true", help="also log scalars to <output-dir>/tensorboard")
    g.add_argument("--dist-url", default="env://", help="process-group rendezvous")
    g.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"))
    g.add_argument("--world-size", type=int, default=1, help="set by the launcher; kept for script compatibility")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) with ``-c`` recipes applied, and resolve derived options."""
    parser = get_args_parser()
    args = cfg.parse_with_config(parser, argv)
    if args.head is None:
        args.head = "text" if args.text_features else "linear"
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.dataset}_{args.model}_{args.head}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name, option in (("train_subset", "--train-subset"), ("test_subset", "--max-images")):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"{option} must be at least 1")
    if args.scale_lr and not args.lr_base_batch:
        parser.error("--scale-lr needs --lr-base-batch (the total batch size the recipe's lr was tuned for)")
    return args


def log(*values: Any) -> None:
    if is_main_process():
        print(*values, flush=True)


# ----------------------------------------------------------------------------------------------- data


def random_subset(dataset: torch.utils.data.Dataset, k: int | None, seed: int) -> torch.utils.data.Dataset:
    """K images drawn without replacement (same on every process), or the dataset when K is None/too big."""
    if k is None or k >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=g)[:k].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)


def eval_preset_for(args: argparse.Namespace) -> dict[str, Any]:
    """The model's evaluation preset, with the command line's size/interpolation overrides."""
    import data

    model = {"model": args.model, "small_input": args.small_input, "in_chans": args.in_chans}
    overrides = {"resize_size": args.val_resize_size, "crop_size": args.val_crop_size, "interpolation": args.interpolation}
    return data.preset_for(model, args.dataset, overrides)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Augmentation options handed to ``data.build_dataset(..., train_transforms=True)``."""
    options = {
        "crop_size": args.train_crop_size,
        "interpolation": args.interpolation,
        "auto_augment": args.auto_augment,
        "ra_magnitude": args.ra_magnitude,
        "augmix_severity": args.augmix_severity,
        "random_erase": args.random_erase,
    }
    return {k: v for k, v in options.items() if v is not None}


def build_loaders(args: argparse.Namespace, preset: dict[str, Any], num_classes: int):
    import data

    root = args.data_path
    common = {"model_name": args.model, "small_input": args.small_input}
    if args.download:
        common["download"] = True
    test_set = data.build_dataset(args.dataset, "test", root, preset=preset, **common)
    test_set = evaluated_subset(test_set, args.test_subset)
    train_set = None
    if not args.test_only:
        # the evaluation preset is the training base, so both normalise and size inputs alike
        train_set = data.build_dataset(
            args.dataset, "train", root, train_transforms=True, preset=preset, **common, **train_options(args)
        )
        train_set = random_subset(train_set, args.train_subset, args.seed)

    pin = str(args.device).startswith("cuda")
    test_loader = torch.utils.data.DataLoader(
        test_set,
        batch_size=args.batch_size,
        sampler=ShardSampler(len(test_set), args.rank, args.world_size),
        num_workers=args.workers,
        pin_memory=pin,
        worker_init_fn=seed_worker,
        persistent_workers=args.workers > 0 and not args.test_only,
    )
    if train_set is None:
        return None, test_loader, None
    if args.distributed:
        if args.ra_sampler:
            sampler = RepeatedAugmentSampler(len(train_set), args.rank, args.world_size, args.ra_reps, seed=args.seed)
        else:
            sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=False)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=make_generator(args.seed, args.rank))
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        collate_fn=build_mix_collate(num_classes, args.mixup_alpha, args.cutmix_alpha),
        worker_init_fn=seed_worker,
        generator=make_generator(args.seed, args.rank),
        persistent_workers=args.workers > 0,
        drop_last=False,
    )
    return train_loader, test_loader, sampler


# ---------------------------------------------------------------------------------------------- model


def load_features(args: argparse.Namespace, num_classes: int) -> tuple[torch.Tensor | None, dict | None]:
    """Text features (and their metadata) for a text-initialised head; fixes ``args.embed_dim`` to their width."""
    if args.head not in TEXT_HEADS or not args.text_features:
        if args.head in TEXT_HEADS:
            log(f"note: --head {args.head} without --text-features: the class directions start as random unit vectors")
        if args.embed_dim is None:
            args.embed_dim = 512
        return None, None
    import text_features

    path = Path(args.text_features)
    if not path.is_file():
        raise UserError(f"text features file not found: {path}")
    feats, meta = text_features.load_text_features(path)
    rows, width = feats.shape
    if args.embed_dim is not None and args.embed_dim != width:
        raise UserError(f"--embed-dim {args.embed_dim} does not match the width {width} of the features in {path}")
    if rows != num_classes:
        raise UserError(f"{path} has {rows} class rows but {args.dataset} has {num_classes} classes")
    args.embed_dim = width
    meta = dict(meta or {})
    meta.setdefault("path", str(path))
    return feats, meta


def checkpoint_meta(args: argparse.Namespace, num_classes: int, preset: dict, features_meta: dict | None) -> dict:
    return {
        "model": args.model,
        "num_classes": num_classes,
        "head": args.head,
        "embed_dim": args.embed_dim if args.head in TEXT_HEADS else None,
        "in_chans": args.in_chans,
        "small_input": args.small_input,
        "dataset": args.dataset,
        "preset": preset,
        "text_features": features_meta,
    }


def save_effective_config(args: argparse.Namespace, path: Path) -> None:
    """``args.yaml``: every option's value for this run, reusable as ``-c args.yaml`` (lr unscaled)."""
    total = args.batch_size * args.world_size
    lines = [f"effective options of this run ({' '.join(args.config) or 'no recipe'} + command line);",
             f"reuse with: train.py -c {path.name}"]
    if args.scale_lr:
        lr = cfg.scaled_lr(args.lr, total, args.lr_base_batch)
        lines.append(f"--scale-lr: lr used = {args.lr:g} x {total} / {args.lr_base_batch} = {lr:g}")
    keys = [k for k in cfg.option_names(get_args_parser()) if k not in ("overwrite", "resume")]
    cfg.save_config(args, path, keys=keys, header="\n".join(lines))


# options that change where and how a run executes, not what it computes
RUN_ONLY_OPTIONS = frozenset({"output_dir", "resume", "start_epoch", "test_only", "overwrite", "workers", "device",
                              "print_freq", "tensorboard", "dist_url", "dist_backend", "world_size"})
RUN_FILES = ("args.yaml", "checkpoint.pth", "metrics.csv", "final_metrics.json")


def claim_output_dir(args: argparse.Namespace, output_dir: Path) -> None:
    """Refuse a folder that already holds a run unless ``--resume`` continues it or ``--overwrite`` replaces it."""
    if args.resume or args.test_only or not any((output_dir / name).is_file() for name in RUN_FILES):
        return
    if args.overwrite:
        for path in [*(output_dir / name for name in RUN_FILES), *output_dir.glob("model_*.pth")]:
            path.unlink(missing_ok=True)
        return
    stored_path = output_dir / "args.yaml"
    stored = (yaml.safe_load(stored_path.read_text(encoding="utf-8")) if stored_path.is_file() else None) or {}
    current = cfg.args_to_dict(args)
    differs = differences(stored, {k: current.get(k) for k in stored}, skip=RUN_ONLY_OPTIONS)
    held = f"a run with other options ({differs})" if differs else "a run"
    raise UserError(f"{output_dir} already holds {held}; continue it with --resume auto, replace it with "
                    f"--overwrite, or choose another --output-dir")


def load_resume_state(path: str) -> dict[str, Any]:
    """A training checkpoint written by this script (plain tensors and dicts only)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        # the paper's training checkpoints keep their arguments in an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many classes
        raise UserError(f"cannot read {p} as a training checkpoint: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{p} is not a training checkpoint (no 'model' entry)")
    return state


# ----------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or only evaluate) as ``args`` say; returns the last evaluation's metrics."""
    import data
    import models

    device = resolve_device(args.device)
    args.device = str(device)
    init_distributed_mode(args)
    device = torch.device(args.device)
    seed_everything(args.seed, args.rank, args.use_deterministic_algorithms)

    if args.dataset not in data.DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r} (choose from {', '.join(data.DATASETS)})")
    if args.model not in models.list_models():
        raise UserError(f"unknown model {args.model!r} (see models.list_models())")
    num_classes = data.num_classes(args.dataset)
    features, features_meta = load_features(args, num_classes)
    preset = eval_preset_for(args)
    if args.in_chans is None:
        args.in_chans = int(preset.get("channels", data.dataset_channels(args.dataset)))

    output_dir = Path(args.output_dir)
    if is_main_process():
        claim_output_dir(args, output_dir)
    if args.resume == "auto":
        candidate = output_dir / "checkpoint.pth"
        args.resume = str(candidate) if candidate.is_file() else ""
    resume_state = load_resume_state(args.resume) if args.resume else None

    if is_main_process() and not args.test_only:
        save_effective_config(args, output_dir / "args.yaml")
    total_batch = args.batch_size * args.world_size
    if args.scale_lr:
        args.lr_unscaled = args.lr
        args.lr = cfg.scaled_lr(args.lr, total_batch, args.lr_base_batch)
        log(f"linear lr scaling: {args.lr_unscaled:g} x {total_batch} / {args.lr_base_batch} = {args.lr:g}")
    log(f"{args.model} ({args.head} head) on {args.dataset}; {args.world_size} process(es) on {device}; "
        f"batch {args.batch_size}/process = {total_batch}; output {output_dir}")

    try:
        train_loader, test_loader, train_sampler = build_loaders(args, preset, num_classes)
        model = models.build_model(
            args.model,
            num_classes,
            head=args.head,
            embed_dim=args.embed_dim,
            text_features=features,
            in_chans=args.in_chans,
            small_input=args.small_input,
            freeze_head=args.freeze_head,
            pretrained=args.weights,
        )
    except ValueError as exc:  # bad option values (augment policy, small-input support, ...) as one line
        raise UserError(str(exc).splitlines()[0]) from exc
    model.to(device)
    if args.distributed and args.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: --sync-bn needs CUDA; plain batch norm is used on CPU")

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(build_param_groups(model, args), args)
    steps_per_epoch = len(train_loader) if args.lr_per_iteration and train_loader is not None else 1
    lr_scheduler = build_lr_scheduler(optimizer, args, steps_per_epoch)
    if steps_per_epoch > 1:
        # after every optimizer step (a step the AMP scaler skips leaves the schedule where it is)
        optimizer.register_step_post_hook(lambda *_: lr_scheduler.step())
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model_without_ddp = model.module

    model_ema = None
    if args.model_ema:
        decay = ema_decay(args.model_ema_decay, args.world_size, args.batch_size, args.model_ema_steps, args.epochs)
        model_ema = ModelEMA(model_without_ddp, decay, device=device)

    if resume_state is not None:
        try:
            model_without_ddp.load_state_dict(resume_state["model"])
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(f"{args.resume} does not fit {args.model} with a {args.head} head: {reason}") from exc
        if model_ema is not None and "model_ema" in resume_state:
            model_ema.load_state_dict(resume_state["model_ema"])
        if not args.test_only:
            for name, obj in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler), ("scaler", scaler)):
                if obj is not None and name in resume_state:
                    obj.load_state_dict(resume_state[name])
            args.start_epoch = int(resume_state["epoch"]) + 1
            saved_args = resume_state.get("args")
            saved_epochs = (vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args or {}).get("epochs")
            if saved_epochs not in (None, args.epochs):
                log(f"note: the checkpoint was trained for --epochs {saved_epochs}; its lr schedule state is kept")
        log(f"resumed from {args.resume} (epoch {resume_state.get('epoch')})")

    meta = checkpoint_meta(args, num_classes, preset, features_meta)
    show = is_main_process()
    eval_kw = {"amp": args.amp, "show_progress": show, "print_freq": args.print_freq}

    if args.test_only:
        torch.backends.cudnn.benchmark = False
        result = evaluate(model, test_loader, device, num_classes, desc="Test", **eval_kw).result()
        log(format_eval(result))
        if model_ema is not None:
            ema_result = evaluate(model_ema, test_loader, device, num_classes, desc="Test (EMA)", **eval_kw).result()
            log(format_eval(ema_result, "EMA "))
            result = {**result, **{f"ema_{k}": v for k, v in ema_result.items()}}
        return result

    metrics_log = CSVLog(output_dir / "metrics.csv", truncate_from_epoch=args.start_epoch) if show else None
    tb_log = TensorBoardLog(output_dir / "tensorboard") if show and args.tensorboard else None
    options = TrainOptions(
        clip_grad_norm=args.clip_grad_norm,
        amp=args.amp,
        ema_steps=args.model_ema_steps,
        ema_warmup_epochs=args.lr_warmup_epochs,
        print_freq=args.print_freq,
        show_progress=show,
    )
    run_args = cfg.args_to_dict(args)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(train_sampler, "set_epoch"):
            train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(
            model, criterion, optimizer, train_loader, device, epoch, options, model_ema=model_ema, scaler=scaler
        )
        if steps_per_epoch == 1:
            lr_scheduler.step()
        result = evaluate(model, test_loader, device, num_classes, desc=f"Test {epoch}", **eval_kw).result()
        row = {"epoch": epoch, "lr": lr, **train_stats}
        row.update({f"test_{k}": v for k, v in result.items()})
        log(f"epoch {epoch}: train loss {train_stats['train_loss']:.4f} acc {train_stats['train_acc1']:.2f}  "
            f"{train_stats['images_per_s']:.0f} img/s  | {format_eval(result)}")
        if model_ema is not None:
            ema_result = evaluate(model_ema, test_loader, device, num_classes, desc=f"Test EMA {epoch}", **eval_kw).result()
            row.update({f"ema_{k}": v for k, v in ema_result.items() if k != "n"})
            log(f"epoch {epoch}: {format_eval(ema_result, 'EMA ')}")
        row["elapsed_s"] = time.perf_counter() - start
        if show:
            metrics_log.log(row)
            if tb_log is not None:
                tb_log.log(row, epoch)
            extra = {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "args": run_args,
                "metrics": {k: v for k, v in row.items() if isinstance(v, int | float)},
            }
            if model_ema is not None:
                extra["model_ema"] = model_ema.state_dict()
            if scaler is not None:
                extra["scaler"] = scaler.state_dict()
            if args.save_every and (epoch + 1) % args.save_every == 0:
                models.save_checkpoint(output_dir / f"model_{epoch}.pth", model_without_ddp, meta, **extra)
            models.save_checkpoint(output_dir / "checkpoint.pth", model_without_ddp, meta, **extra)
        barrier()
    if tb_log is not None:
        tb_log.close()
    total = time.perf_counter() - start
    log(f"training time {datetime.timedelta(seconds=int(total))}")
    if show and result:
        summary = {"train_time_s": total, **{f"test_{k}": v for k, v in result.items()}}
        write_json(output_dir / "final_metrics.json", summary)
    return result


def format_eval(result: dict[str, Any], prefix: str = "") -> str:
    return (f"{prefix}test top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  loss {result['loss']:.4f}  "
            f"top2diff {result['top2diff']:.2f}  ({result['n']} images)")


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_cli(lambda: main(args))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(cli())
