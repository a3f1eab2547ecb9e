"""Parameter counts of baseline vs text-guided heads as a Markdown table.

    python -m models.param_table [--num-classes 1000] [--embed-dim 512] [--models resnet18 ...]

The text head replaces Linear(B -> C) by Linear(B -> E) + logit_scale + Linear(E -> C, no bias), so the
difference is B*E + E + 1 + E*C - (B*C + C): negative (up to the biases) when E < B*C / (B + C).
"""

from __future__ import annotations

import argparse

import torch

from .registry import build_model
from .text_head import classifier_name, last_layer_names

DEFAULT_MODELS = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "swin_v2_t")


def _build(name: str, num_classes: int, head: str, embed_dim: int) -> torch.nn.Module:
    # on the meta device nothing is allocated or initialised, so even VGG is built instantly
    with torch.device("meta"):
        return build_model(name, num_classes, head=head, embed_dim=embed_dim)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_row(name: str, num_classes: int, embed_dim: int) -> dict[str, int]:
    """B, total and classifier-head parameter counts of the baseline and the text-guided model."""
    base = _build(name, num_classes, "linear", embed_dim)
    text = _build(name, num_classes, "text", embed_dim)
    base_last = base.get_submodule(classifier_name(base))
    text_head = sum(_numel(text.get_submodule(n)) for n in last_layer_names(text)) + text.logit_scale.numel()
    return {
        "B": base_last.in_features,
        "base_total": _numel(base),
        "text_total": _numel(text),
        "base_head": _numel(base_last),
        "text_head": text_head,
    }


def param_table(names: tuple[str, ...] | list[str], num_classes: int, embed_dim: int) -> str:
    lines = [
        "| model | B | baseline params | text-guided params | difference | difference % "
        "| baseline head (B→C) | text head (B→E, E→C, scale) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = param_row(name, num_classes, embed_dim)
        diff = r["text_total"] - r["base_total"]
        lines.append(
            f"| {name} | {r['B']} | {r['base_total']:,} | {r['text_total']:,} | {diff:+,} "
            f"| {100 * diff / r['base_total']:+.2f}% | {r['base_head']:,} | {r['text_head']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=1000, help="C (default: 1000, ImageNet)")
    parser.add_argument("--embed-dim", type=int, default=512, help="E (default: 512, CLIP ViT-B/32)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="registered model names")
    args = parser.parse_args(argv)
    print(f"C = {args.num_classes}, E = {args.embed_dim}\n")
    print(param_table(args.models, args.num_classes, args.embed_dim))


if __name__ == "__main__":
    main()
