"""Outputs of a weight-fault run: the filled fault list, per-fault details, summaries and the bit plot.

Files written into the output folder (all atomically):

* ``fault_list.csv`` — dnn-benchmarks' exact eight columns with the counts of this run, so their tools
  read it unchanged;
* ``faults.csv`` — one row per fault with everything else (fault model, golden/faulty weight value,
  ΔLoss, non-finite images, the transient image, and the counts the input list carried as ``ref_*``);
* ``summary_by_layer.csv``, ``summary_by_bit.csv``, ``summary.md``, ``critical_by_bit.png``,
  ``summary.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resilience.figures import pyplot, save_png
from resilience.storage import atomic_write, write_text
from resilience.weights.fault_list import COUNT_COLUMNS, FaultList, format_index, write_fault_list
from resilience.weights.runner import Outcomes

_RATE_SOURCES = {"masked_rate": "masked", "non_critical_rate": "non_critical", "critical_rate": "critical"}


def fault_table(
    fault_list: FaultList,
    outcomes: Outcomes,
    *,
    fault_model: str,
    golden_value: np.ndarray,
    faulty_value: np.ndarray,
    images: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per fault: site, values, this run's counts and ΔLoss, and the input list's counts."""
    table = pd.DataFrame({
        "Injection": fault_list.injections,
        "Layer": [f.layer for f in fault_list.faults],
        "TensorIndex": [format_index(f.index) for f in fault_list.faults],
        "Bit": [f.bit for f in fault_list.faults],
        "fault_model": fault_model,
        "golden_value": golden_value,
        "faulty_value": faulty_value,
        "n_injections": outcomes.n,
        "masked": outcomes.masked,
        "non_critical": outcomes.non_critical,
        "critical": outcomes.critical,
        "nonfinite": outcomes.nonfinite,
        "delta_loss": outcomes.delta_loss(),
    })
    if images is not None:
        table["image"] = images
    if fault_list.counts is not None:
        for k, name in enumerate(COUNT_COLUMNS):
            table[f"ref_{name}"] = fault_list.counts[:, k]
    return table


def summarize(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per ``by`` ("Layer" or "Bit"): faults, image counts, outcome rates, mean ΔLoss (and ref rates)."""
    sums = ["n_injections", "masked", "non_critical", "critical", "nonfinite"]
    refs = [c for c in ("ref_n_injections", "ref_masked", "ref_non_critical", "ref_critical") if c in table]
    grouped = table.groupby(by, sort=by == "Bit")
    summary = grouped[sums + refs].sum()
    summary.insert(0, "faults", grouped.size())
    for rate, col in _RATE_SOURCES.items():
        summary[rate] = summary[col] / summary["n_injections"].where(summary["n_injections"] > 0)
    if refs:
        summary["ref_critical_rate"] = summary["ref_critical"] / summary["ref_n_injections"].where(
            summary["ref_n_injections"] > 0)
    summary["delta_loss_mean"] = grouped["delta_loss"].mean()
    if by == "Layer":  # keep the fault-list (network) order
        summary = summary.loc[table["Layer"].drop_duplicates()]
    return summary.reset_index()


def plot_critical_by_bit(by_bit: pd.DataFrame, path: str | os.PathLike, *, bits: int = 32, title: str = "") -> None:
    """Bar chart of the critical (SDC-1) rate per bit position, with the input list's rate if known."""
    rate = by_bit.set_index("Bit")["critical_rate"].reindex(range(bits)) * 100
    fig, ax = pyplot().subplots(figsize=(10, 3.6))
    ax.bar(rate.index, rate.fillna(0).to_numpy(), color="#c0392b", label="this run")
    if "ref_critical_rate" in by_bit:
        ref = by_bit.set_index("Bit")["ref_critical_rate"].reindex(range(bits)) * 100
        ax.plot(ref.index, ref.to_numpy(), "k_", markersize=12, mew=2, label="fault list's counts")
        ax.legend(loc="upper left", frameon=False)
    if bits == 32:  # IEEE-754 fp32 fields
        for lo, hi, name in ((0, 22, "mantissa"), (23, 30, "exponent"), (31, 31, "sign")):
            ax.axvspan(lo - 0.5, hi + 0.5, color="0.5", alpha=0.08 if name == "exponent" else 0.0)
            ax.text((lo + hi) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    ax.set_xlim(-0.7, bits - 0.3)
    ax.set_xticks(range(bits))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("bit position (0 = LSB)")
    ax.set_ylabel("critical images (%)")
    if title:
        ax.set_title(title, fontsize=10, pad=14)
    fig.tight_layout()
    save_png(fig, Path(path))


def markdown_table(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    """A GitHub-flavoured Markdown table of ``frame``."""
    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "" if np.isnan(value) else floats.format(value)
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def critical_rate_by_bit(by_bit: pd.DataFrame) -> dict[int, float]:
    """{bit: critical rate} from a per-bit summary."""
    return {int(b): float(r) for b, r in zip(by_bit["Bit"], by_bit["critical_rate"], strict=True)}


def reference_comparison(table: pd.DataFrame) -> dict[str, Any] | None:
    """This run's counts against the counts the input list carried (None when it carried none).

    Counts are comparable only when both cover the same number of images per fault.
    """
    if "ref_critical" not in table:
        return None
    comparable = bool((table["n_injections"] == table["ref_n_injections"]).all())
    result: dict[str, Any] = {
        "comparable": comparable,
        "critical_rate": float(table["critical"].sum() / max(table["n_injections"].sum(), 1)),
        "ref_critical_rate": float(table["ref_critical"].sum() / max(table["ref_n_injections"].sum(), 1)),
    }
    if comparable:
        same = np.ones(len(table), dtype=bool)
        for col in ("masked", "non_critical", "critical"):
            diff = (table[col] - table[f"ref_{col}"]).abs()
            same &= diff.to_numpy() == 0
            result[f"{col}_mean_abs_difference"] = float(diff.mean())
        result["faults_with_identical_counts"] = int(same.sum())
        result["faults_critical_agree"] = int(((table["critical"] > 0) == (table["ref_critical"] > 0)).sum())
    return result


def write_outputs(
    out_dir: str | os.PathLike, fault_list: FaultList, table: pd.DataFrame, summary: Mapping[str, Any], *, bits: int = 32
) -> dict[str, Any]:
    """Write every output file; returns ``summary`` plus the critical rate by bit, as in summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_fault_list(out / "fault_list.csv", fault_list, table[list(COUNT_COLUMNS)].to_numpy())
    _write_csv(out / "faults.csv", table)
    by_layer, by_bit = summarize(table, "Layer"), summarize(table, "Bit")
    _write_csv(out / "summary_by_layer.csv", by_layer)
    _write_csv(out / "summary_by_bit.csv", by_bit)
    title = f"{summary.get('model', '')} {summary.get('fault_model', '')}: {len(table)} faults x {summary.get('images', '?')} images"
    plot_critical_by_bit(by_bit, out / "critical_by_bit.png", bits=bits, title=title.strip())
    columns = ["faults", "n_injections", "masked_rate", "non_critical_rate", "critical_rate", "delta_loss_mean"]
    extra = ["ref_critical_rate"] if "ref_critical_rate" in by_bit else []
    write_text(out / "summary.md", "\n\n".join([
        f"# Weight faults: {title}",
        f"Fault list `{summary.get('fault_list', '')}`, checkpoint `{summary.get('checkpoint', '')}`, "
        f"dataset {summary.get('dataset', '')}, method {summary.get('method', '')}.",
        "## By bit", markdown_table(by_bit[["Bit", *columns, *extra]]),
        "## By layer", markdown_table(by_layer[["Layer", *columns, *extra]]),
    ]) + "\n")
    summary = {**summary, "critical_rate_by_bit": critical_rate_by_bit(by_bit)}
    comparison = reference_comparison(table)
    if comparison is not None:
        summary["reference_comparison"] = comparison
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
