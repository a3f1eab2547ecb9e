"""Training throughput of train.py's loop against a bare PyTorch loop (same model, batch size, data).

    .venv/bin/python scripts/bench_train.py -c configs/fashion_mnist/resnet20.yaml --train-subset 20000

Each round runs one epoch of the bare loop (DataLoader -> forward -> cross-entropy -> backward -> SGD
step) and one epoch of ``training.engine.train_one_epoch`` with the optimizer train.py builds, on freshly
built models; it prints images/s of both and their ratio. Options are train.py's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from training.engine import TrainOptions, train_one_epoch  # noqa: E402
from training.optim import build_optimizer, build_param_groups  # noqa: E402


def build(args, num_classes: int, features):
    import models

    torch.manual_seed(args.seed)
    return models.build_model(
        args.model, num_classes, head=args.head, embed_dim=args.embed_dim, text_features=features,
        in_chans=args.in_chans, small_input=args.small_input,
    )


def bare_epoch(model: torch.nn.Module, loader, lr: float, momentum: float, weight_decay: float) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    seen = 0
    start = time.perf_counter()
    for images, target in loader:
        loss = F.cross_entropy(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def engine_epoch(model: torch.nn.Module, loader, args) -> float:
    optimizer = build_optimizer(build_param_groups(model, args), args)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    options = TrainOptions(print_freq=args.print_freq, show_progress=True)
    stats = train_one_epoch(model, criterion, optimizer, loader, torch.device("cpu"), 0, options)
    return stats["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = train.get_args_parser()
    parser.add_argument("--rounds", type=int, default=2, help="bare/engine epoch pairs to time")
    from training.config import parse_with_config

    args = parse_with_config(parser, argv)
    if args.head is None:
        args.head = "text" if args.text_features else "linear"
    args.device, args.rank, args.world_size, args.distributed = "cpu", 0, 1, False
    args.test_only = False
    import data

    num_classes = data.num_classes(args.dataset)
    features, _ = train.load_features(args, num_classes)
    preset = train.eval_preset_for(args)
    if args.in_chans is None:
        args.in_chans = int(preset.get("channels", data.dataset_channels(args.dataset)))
    loader, _, _ = train.build_loaders(args, preset, num_classes)
    print(f"{args.model} ({args.head}) on {args.dataset}: {len(loader.dataset)} images/epoch, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} threads", flush=True)
    bare, engine = [], []
    for r in range(args.rounds):
        bare.append(bare_epoch(build(args, num_classes, features), loader, args.lr, args.momentum, args.weight_decay))
        engine.append(engine_epoch(build(args, num_classes, features), loader, args))
        print(f"round {r}: bare {bare[-1]:.1f} img/s   train.py loop {engine[-1]:.1f} img/s", flush=True)
    b, e = max(bare), max(engine)
    print(f"best: bare {b:.1f} img/s   train.py loop {e:.1f} img/s   ratio {e / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
