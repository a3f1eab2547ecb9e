"""Build per-class text features and save them as a ``.pth`` file.

    python -m text_features.build --dataset fashion-mnist --variant descriptions --encoder minilm --out fm.pth
    python -m text_features.build --dataset imagenet --variant descriptions \\
        --descriptions CuPL_image_prompts.json --match-by order --encoder openclip:ViT-B-32:openai --out in.pth

Variants: ``classname`` ("a photo of a {}"), ``descriptions`` (a descriptions JSON: ours or CuPL's;
default: the one shipped for the dataset), ``random`` (seeded unit-norm rows). Encoders: ``minilm``
(offline), ``st:/path/to/folder``, ``openclip:MODEL:PRETRAINED`` or ``openclip:MODEL:/path/to/weights.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from cli_shell import positive_int, run_cli

from .classes import class_names_for
from .encoders import DEFAULT_ENCODER, encoder_embed_dim
from .features import VARIANTS, build_text_features, save_text_features


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="dataset whose classes to build for (see data.DATASETS)")
    p.add_argument("--class-names", metavar="FILE", help="text file with one class name per line (instead of --dataset)")
    p.add_argument("--variant", choices=VARIANTS, default="descriptions", help="what to encode (default %(default)s)")
    p.add_argument("--encoder", default=None, metavar="SPEC",
                   help=f"minilm | st:/path | openclip:MODEL:PRETRAINED (default {DEFAULT_ENCODER})")
    p.add_argument("--out", required=True, metavar="FILE.pth", help="output features file")
    p.add_argument("--descriptions", metavar="FILE.json",
                   help="descriptions JSON (ours or CuPL's {class: [..]}; default: the shipped one for --dataset)")
    p.add_argument("--match-by", choices=("name", "order"), default="name",
                   help="pair file entries with classes by name (default) or by position")
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help='classname variant: template(s) with {} (default "a photo of a {}"; repeatable)')
    p.add_argument("--seed", type=int, default=0, help="random variant: seed (default %(default)s)")
    p.add_argument("--embed-dim", type=positive_int, default=None,
                   help="random variant: width (default: the encoder's, else 512)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per encoder batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def format_meta(meta: dict[str, Any], max_names: int = 12) -> str:
    """One ``key: value`` line per metadata entry (long class-name lists shortened)."""
    lines = []
    for key, value in meta.items():
        if key == "class_names" and isinstance(value, list) and len(value) > max_names:
            value = [*value[:max_names], f"... ({len(value)} in all)"]
        lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: build(args))


def build(args: argparse.Namespace) -> None:
    """Build and save the features file the parsed options ask for."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    names = class_names_for(args.dataset, args.class_names)
    if args.variant == "random":
        # No encoder is loaded: the width comes from --embed-dim, else the encoder's, else 512.
        encoder = args.encoder
        embed_dim = args.embed_dim or (encoder_embed_dim(args.encoder) if args.encoder else None) or 512
    else:
        encoder, embed_dim = args.encoder or DEFAULT_ENCODER, args.embed_dim
    feats, meta = build_text_features(
        names, args.variant, encoder=encoder, device=device, descriptions=args.descriptions,
        templates=args.templates, match_by=args.match_by, embed_dim=embed_dim, seed=args.seed,
        dataset=args.dataset, batch_size=args.batch_size, progress=not args.no_progress,
    )
    save_text_features(args.out, feats, meta)
    norms = feats.norm(dim=1)
    print(format_meta(meta))
    print(f"wrote {args.out}: features {list(feats.shape)}, row norms {norms.min():.4f}..{norms.max():.4f} "
          f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
