"""The paper's Table 1 row from two campaigns (baseline vs text-guided) and the per-layer ΔLoss plot.

Improvement = baseline ΔLoss / text-guided ΔLoss (> 1: the text-guided model is more resilient).
Last layer: the baseline's classifier layer against the text head's two layers (B→E and E→C) averaged
with their output-neuron counts as weights, or against the fused B→C layer of a third campaign run
with ``inject.py --fuse-text-head``. Overall: ratio of the network-level ΔLoss (mean of layer ΔLoss).
When both campaigns kept their per-fault records, the layer and network-level ΔLoss get 99%
skewness-corrected (Hall) intervals and both ratios a corrected Fieller interval
(:mod:`resilience.improvement_ci`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_shell import UserError, differences
from resilience.figures import pyplot, save_png
from resilience.improvement_ci import (
    DEFAULT_CONFIDENCE,
    has_fault_records,
    improvement_intervals,
    layer_intervals,
)
from resilience.storage import read_json, write_text

TEXT_PREFIX = "backbone."  # the text model's backbone layers are the baseline's layers under this prefix
COMPARED = ("dataset", "split", "format", "clamp")  # must agree between the campaigns
# config entries that differ between a baseline and a text-guided campaign of the same measurement
MAY_DIFFER = frozenset({"model", "checkpoint_sha256", "fused_text_head", "preset", "seed", "layers", "engine",
                        "batch_size", "chunk_size", "device"})
# what else two campaigns must share to measure the same thing: label -> the settings read from summary.json
MEASURED: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "images": lambda s: {"evaluated images": s.get("golden", {}).get("evaluated_images"),
                         "--max-images": s.get("config", {}).get("max_images"),
                         "--golden": s.get("config", {}).get("golden")},
    "sampling": lambda s: {"sampling": "stratified" if s.get("stratified") else "uniform", **(s.get("stratified") or {})},
    "fault model": lambda s: {"fault model": s.get("fault_model")},
    # every other setting of the run (injections, margin, arithmetic, ...), also ones added later
    "settings": lambda s: {k: v for k, v in s.get("config", {}).items() if k not in MAY_DIFFER},
}


class ReportError(UserError):
    """The campaigns cannot be compared as asked (one-line message)."""


@dataclass
class CampaignResult:
    """A finished campaign: its summary.json and layers.csv rows."""

    path: Path
    summary: dict[str, Any]
    layers: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> CampaignResult:
        """Read a campaign folder written by ``inject.py``."""
        path = Path(path)
        for name in ("summary.json", "layers.csv"):
            if not (path / name).is_file():
                raise ReportError(f"{path} is not a finished campaign (no {name}); run or merge it first")
        with open(path / "layers.csv", newline="", encoding="utf-8") as f:
            layers = [_typed(row) for row in csv.DictReader(f)]
        return cls(path, read_json(path / "summary.json"), layers)

    def layer(self, name: str) -> dict[str, Any]:
        """The layers.csv row of ``name``."""
        for row in self.layers:
            if row["layer"] == name:
                return row
        raise ReportError(f"{self.path}: layer {name!r} was not injected (campaign run with --layers?)")

    def delta_loss(self) -> float:
        """Network-level ΔLoss."""
        return float(self.summary["network"]["delta_loss"])

    def label(self, name: str) -> str:
        """A layer's name as the baseline calls it (the text model's backbone prefix removed)."""
        return name.removeprefix(TEXT_PREFIX)

    def body_layers(self) -> set[str]:
        """Labels of the injected layers before the last layer(s)."""
        last = set(self.summary.get("last_layers", []))
        return {self.label(r["layer"]) for r in self.layers if r["layer"] not in last}

    def restricted(self, pattern: str) -> CampaignResult:
        """This campaign with only the layers whose label matches ``pattern`` (plus its last layers);
        the network-level ΔLoss becomes the mean over those layers."""
        last = set(self.summary.get("last_layers", []))
        rows = [r for r in self.layers if r["layer"] in last or re.search(pattern, self.label(r["layer"]))]
        losses = [r["mean_delta_loss"] for r in rows if not math.isnan(r["mean_delta_loss"])]
        network = {**self.summary["network"], "delta_loss": sum(losses) / len(losses) if losses else math.nan}
        return CampaignResult(self.path, {**self.summary, "network": network}, rows)


def _typed(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("layer", "kind", "out_shape", "stop_reason"):  # stop_reason, rounds: stratified campaigns
            typed[key] = value
        elif key in ("order", "neurons", "n", "non_finite", "mismatches", "rounds"):
            typed[key] = int(value)
        else:
            typed[key] = float(value) if value != "" else math.nan
    return typed


def weighted_delta_loss(rows: Sequence[dict[str, Any]]) -> float:
    """ΔLoss of several layers taken as one: the mean of their ΔLoss weighted by output neurons."""
    total = sum(r["neurons"] for r in rows)
    return sum(r["neurons"] * r["mean_delta_loss"] for r in rows) / total


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _check_comparable(base: CampaignResult, text: CampaignResult, fused: CampaignResult | None) -> None:
    for other in (text, fused):
        if other is None:
            continue
        for key in COMPARED:
            if base.summary.get(key) != other.summary.get(key):
                raise ReportError(
                    f"{base.path} and {other.path} differ in {key}: "
                    f"{base.summary.get(key)!r} vs {other.summary.get(key)!r}"
                )
        for label, settings in MEASURED.items():
            if settings(base.summary) != settings(other.summary):
                raise ReportError(f"{base.path} and {other.path} differ in {label} "
                                  f"({differences(settings(base.summary), settings(other.summary))})")
        only_base, only_other = base.body_layers() - other.body_layers(), other.body_layers() - base.body_layers()
        if only_base or only_other:
            raise ReportError(
                f"{base.path} and {other.path} inject different layers (only in the first: "
                f"{_names(only_base)}; only in the second: {_names(only_other)}); give --layers REGEX to compare "
                "the layers both injected")
    if len(base.summary["last_layers"]) != 1:
        raise ReportError(f"{base.path} is not a baseline campaign (last layers {base.summary['last_layers']})")
    if len(text.summary["last_layers"]) != 2:
        raise ReportError(f"{text.path} is not a text-guided campaign (last layers {text.summary['last_layers']})")
    if fused is not None and not fused.summary.get("fused_text_head"):
        raise ReportError(f"{fused.path} was not run with --fuse-text-head")


def _names(labels: set[str], shown: int = 3) -> str:
    ordered = sorted(labels)
    return ", ".join(ordered[:shown]) + (f" and {len(ordered) - shown} more" if len(ordered) > shown else "") or "none"


def table1_row(base: CampaignResult, text: CampaignResult, fused: CampaignResult | None = None) -> dict[str, Any]:
    """The comparison numbers of one model (the paper's Table 1 row, plus the raw values behind it)."""
    _check_comparable(base, text, fused)
    base_last = base.layer(base.summary["last_layers"][0])["mean_delta_loss"]
    text_last = weighted_delta_loss([text.layer(name) for name in text.summary["last_layers"]])
    fused_last = math.nan
    if fused is not None:
        fused_last = fused.layer(fused.summary["last_layers"][0])["mean_delta_loss"]
    base_top2, text_top2 = base.summary["golden"]["mean_top2diff"], text.summary["golden"]["mean_top2diff"]
    intervals = dict.fromkeys(("last_layer", "overall", "baseline_network", "text_network"), (math.nan, math.nan))
    if has_fault_records(base.path) and has_fault_records(text.path):
        text_last_layers = [(name, text.layer(name)["neurons"]) for name in text.summary["last_layers"]]
        intervals = improvement_intervals(base.path, text.path, base.summary["last_layers"][0], text_last_layers)
    return {
        "model": base.summary["model"],
        "dataset": base.summary["dataset"],
        "format": base.summary["format"],
        "clamp": base.summary["clamp"],
        "injections_per_layer": _injections(base, text),
        "baseline_accuracy": base.summary["golden"]["accuracy"],
        "text_accuracy": text.summary["golden"]["accuracy"],
        "baseline_last_layer_delta_loss": base_last,
        "text_last_layer_delta_loss": text_last,
        "last_layer_improvement": _ratio(base_last, text_last),
        "last_layer_improvement_ci_low": intervals["last_layer"][0],
        "last_layer_improvement_ci_high": intervals["last_layer"][1],
        "fused_last_layer_delta_loss": fused_last,
        "fused_last_layer_improvement": _ratio(base_last, fused_last),
        "baseline_delta_loss": base.delta_loss(),
        "baseline_delta_loss_ci_low": intervals["baseline_network"][0],
        "baseline_delta_loss_ci_high": intervals["baseline_network"][1],
        "text_delta_loss": text.delta_loss(),
        "text_delta_loss_ci_low": intervals["text_network"][0],
        "text_delta_loss_ci_high": intervals["text_network"][1],
        "overall_improvement": _ratio(base.delta_loss(), text.delta_loss()),
        "overall_improvement_ci_low": intervals["overall"][0],
        "overall_improvement_ci_high": intervals["overall"][1],
        "baseline_top2diff": base_top2,
        "text_top2diff": text_top2,
        "top2diff_difference": text_top2 - base_top2,
    }


def _injections(*results: CampaignResult) -> str:
    counts = sorted({n for r in results for n in r.summary["n_per_layer"].values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _cell(x: Any, spec: str) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else format(x, spec)
    return str(x)


TABLE1_HEAD = ("Model", "Dataset", "Acc. baseline", "Acc. text", "Last layer ×", "Last layer (fused) ×", "Overall ×",
               "Top2Diff baseline", "Top2Diff text", "ΔTop2Diff")


def table1_rows_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table 1 rows (accuracy and Top2Diff in %, improvements as ratios) as Markdown table lines."""
    lines = ["| " + " | ".join(TABLE1_HEAD) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(TABLE1_HEAD) - 2)) + "|"]
    for row in rows:
        cells = [
            row["model"], row["dataset"], _cell(100 * row["baseline_accuracy"], ".2f"),
            _cell(100 * row["text_accuracy"], ".2f"), _cell(row["last_layer_improvement"], ".3g"),
            _cell(row["fused_last_layer_improvement"], ".3g"), _cell(row["overall_improvement"], ".3g"),
            _cell(row["baseline_top2diff"], ".2f"), _cell(row["text_top2diff"], ".2f"),
            _cell(row["top2diff_difference"], "+.2f"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def table1_markdown(row: dict[str, Any]) -> str:
    """The row as a Markdown table with a note giving the raw ΔLoss values behind the ratios."""
    return "\n".join([
        *table1_rows_markdown([row]),
        "",
        f"ΔLoss ({row['format']}, clamp {row['clamp']}, {row['injections_per_layer']} injections per layer): "
        f"last layer {_cell(row['baseline_last_layer_delta_loss'], '.4g')} (baseline) vs "
        f"{_cell(row['text_last_layer_delta_loss'], '.4g')} (text head, neuron-weighted) and "
        f"{_cell(row['fused_last_layer_delta_loss'], '.4g')} (fused); network "
        f"{_cell(row['baseline_delta_loss'], '.4g')} vs {_cell(row['text_delta_loss'], '.4g')}. "
        "Improvement = baseline / text-guided. Top2Diff: mean over each golden set.",
        "",
        f"{100 * DEFAULT_CONFIDENCE:g}% intervals (skewness-corrected: Hall for the network ΔLoss, Fieller for the "
        f"improvement): network ΔLoss [{_cell(row['baseline_delta_loss_ci_low'], '.4g')}, "
        f"{_cell(row['baseline_delta_loss_ci_high'], '.4g')}] (baseline) and "
        f"[{_cell(row['text_delta_loss_ci_low'], '.4g')}, {_cell(row['text_delta_loss_ci_high'], '.4g')}] (text); "
        f"improvement last layer [{_cell(row['last_layer_improvement_ci_low'], '.3g')}, "
        f"{_cell(row['last_layer_improvement_ci_high'], '.3g')}], overall "
        f"[{_cell(row['overall_improvement_ci_low'], '.3g')}, {_cell(row['overall_improvement_ci_high'], '.3g')}]"
        + ("" if math.isfinite(row["overall_improvement_ci_low"]) else " (needs both campaigns' faults.parquet)") + ".",
        "",
    ])


def aligned_layers(base: CampaignResult, text: CampaignResult) -> list[tuple[str, dict | None, dict | None]]:
    """(label, baseline row, text row) in forward order; text layers matched by name without ``backbone.``."""
    base_rows = {r["layer"]: r for r in base.layers}
    merged: list[tuple[str, dict | None, dict | None]] = [(name, row, None) for name, row in base_rows.items()]
    position = {name: i for i, (name, _, _) in enumerate(merged)}
    insert_at = 0
    for row in text.layers:
        label = row["layer"].removeprefix(TEXT_PREFIX)
        if label in position:
            i = position[label]
            merged[i] = (label, merged[i][1], row)
            insert_at = i + 1
        else:
            merged.insert(insert_at, (label, None, row))
            position = {name: j for j, (name, _, _) in enumerate(merged)}
            insert_at += 1
    return merged


def layers_comparison_csv(
    aligned: Sequence[tuple[str, dict | None, dict | None]],
    intervals: tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]] = ({}, {}),
) -> str:
    """Per-layer ΔLoss of both models side by side, with their ratio and, where ``intervals`` (baseline, text;
    by layer name) has them, each layer's 99% skewness-corrected interval."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["layer", "baseline_delta_loss", "baseline_ci_low", "baseline_ci_high", "text_delta_loss",
                     "text_ci_low", "text_ci_high", "improvement"])
    for label, b, t in aligned:
        bv = b["mean_delta_loss"] if b else math.nan
        tv = t["mean_delta_loss"] if t else math.nan
        b_ci = intervals[0].get(b["layer"], (math.nan, math.nan)) if b else (math.nan, math.nan)
        t_ci = intervals[1].get(t["layer"], (math.nan, math.nan)) if t else (math.nan, math.nan)
        writer.writerow([label, repr(bv), *map(repr, b_ci), repr(tv), *map(repr, t_ci), repr(_ratio(bv, tv))])
    return buf.getvalue()


def plot_layers(aligned: Sequence[tuple[str, dict | None, dict | None]], path: Path, title: str) -> Path:
    """Per-layer ΔLoss of both models on a log scale (PNG)."""
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.32 * len(aligned) + 2), 4.2))
    for which, label, marker in ((1, "baseline", "o"), (2, "text-guided", "s")):
        xs = [i for i, row in enumerate(aligned) if row[which] and row[which]["mean_delta_loss"] > 0]
        ys = [aligned[i][which]["mean_delta_loss"] for i in xs]
        ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(aligned)))
    ax.set_xticklabels([label for label, _, _ in aligned], rotation=90, fontsize=7)
    ax.set_ylabel("mean ΔLoss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path, dpi=120)


def compare(base_dir: Path, text_dir: Path, out: Path, fused_dir: Path | None = None,
            layers: str | None = None) -> dict[str, Any]:
    """Write table1.csv, table1.md, layers_compared.csv and delta_loss_per_layer.png into ``out``.

    ``layers`` (a regex over the baseline's layer names) restricts the comparison to the layers it
    matches, for campaigns that injected different layer subsets; the last layers are always compared.
    """
    results = [CampaignResult.load(d) if d else None for d in (base_dir, text_dir, fused_dir)]
    if layers is not None:
        results = [r.restricted(layers) if r else None for r in results]
    base, text, fused = results
    assert base is not None and text is not None
    row = table1_row(base, text, fused)
    if layers is not None:  # the overall interval is built from every layer's faults: none for a subset
        row["overall_improvement_ci_low"] = row["overall_improvement_ci_high"] = math.nan
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    write_text(out / "table1.csv", buf.getvalue())
    write_text(out / "table1.md", table1_markdown(row))
    aligned = aligned_layers(base, text)
    intervals = tuple(
        layer_intervals(c.path) if has_fault_records(c.path) else {} for c in (base, text)
    )
    write_text(out / "layers_compared.csv", layers_comparison_csv(aligned, intervals))
    plot_layers(aligned, out / "delta_loss_per_layer.png", f"{row['model']} on {row['dataset']}: ΔLoss per layer")
    return row


TABLE1_TEXT_COLUMNS = ("model", "dataset", "format", "clamp", "injections_per_layer")


def read_table1(path: Path) -> list[dict[str, Any]]:
    """The rows of a table1.csv written by :func:`compare` or :func:`collect`."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} not found (run report.py compare first)")
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v if k in TABLE1_TEXT_COLUMNS else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def collect(tables: Sequence[Path], out: Path) -> list[dict[str, Any]]:
    """Gather several table1.csv files into one table1.csv and table1.md (one row per model)."""
    rows = [row for path in tables for row in read_table1(path)]
    if not rows:
        raise ReportError("no rows to collect")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    out = Path(out)
    write_text(out / "table1.csv", buf.getvalue())
    write_text(out / "table1.md", "\n".join(table1_rows_markdown(rows)) + "\n")
    return rows
