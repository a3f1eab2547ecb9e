"""Stratified campaigns on real models: :mod:`resilience.stratified` run through the campaign runner's parts.

Faults are scored and recorded exactly as in a uniform campaign (``campaign.chunk_table``, the golden
pass, the engines, atomic Parquet parts); only the choice of sites and the estimator differ. A folder
holds:

* ``campaign.json`` — the uniform runner's record (config, plan with n = the cap, golden facts, clamp,
  provenance) plus the stratified options, under format ``tgr-stratified-campaign/1``;
* ``parts/LLLL-rRRRR.parquet`` — one file per finished round of a layer (the uniform runner's fault
  columns plus ``stratum`` and ``round``); while a round runs, its chunks of ``chunk_size`` faults are
  kept as ``parts/LLLL-rRRRR-cCCCCC.parquet``, so a kill loses at most one chunk. All writes are atomic;
  a rerun loads what is there and continues;
* ``layers/LLLL.json`` — the estimate of a finished layer;
* once every layer is done: ``faults.parquet`` (plus a ``weight`` column: λ_r·W_b·n/n_rb, so the weighted
  mean over finite faults is the stratified estimate), ``layers.csv``, ``layers.md``, ``strata.csv`` and
  ``summary.json``. Wall times go to ``runs.jsonl`` only.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from resilience import stratified as st
from resilience.bitflip import get_format
from resilience.campaign import (
    FAULT_MODEL,
    FAULT_SCHEMA,
    CampaignConfig,
    CampaignError,
    LayerPlan,
    RunStats,
    Unit,
    build_record,
    campaign_key,
    chunk_table,
    network_level,
    prepare_engine,
    shard_units,
)
from resilience.engines.base import Engine, FaultSites, ImageSource
from resilience.golden import Golden
from resilience.layers import LayerInfo
from resilience.metrics import CONFIDENCE
from resilience.storage import (
    read_json,
    read_part,
    remove_stale_temporaries,
    write_json,
    write_parquet,
    write_part,
    write_text,
)

STRATIFIED_FORMAT = "tgr-stratified-campaign/1"
SAMPLINGS = ("uniform", "stratified")
ROUND_SCHEMA = FAULT_SCHEMA.append(pa.field("stratum", pa.string())).append(pa.field("round", pa.int32()))
# inject.py options that only mean something with --sampling stratified (argparse dest names)
STRATIFIED_OPTIONS = ("strata", "target_ci", "target_ci_abs", "max_injections", "pilot", "defensive")


def add_stratified_args(parser: argparse.ArgumentParser) -> None:
    """``--sampling`` and the options of ``--sampling stratified`` (``inject.py``).

    The stratified options are absent from the namespace unless given (argparse.SUPPRESS), so that giving
    one with uniform sampling can be refused; ``sampling_from_args`` fills in the defaults shown in the help.
    """
    default = st.AdaptiveConfig()
    group = parser.add_argument_group("sampling (stratified: see docs/stratified.md)")
    group.add_argument("--sampling", choices=SAMPLINGS, default="uniform",
                       help="uniform: the paper's fixed n per layer; stratified: strata of bits, Neyman rounds, "
                            "adaptive stopping at --target-ci")
    group.add_argument("--strata", choices=st.GROUPINGS, default=argparse.SUPPRESS,
                       help="one stratum per bit, or sign/exponent/high/low mantissa (default: bit)")
    group.add_argument("--target-ci", type=float, default=argparse.SUPPRESS, metavar="REL",
                       help="stop a layer once the 99%% CI half-width of its mean ΔLoss is at most REL x the mean "
                            f"(default {default.target_rel} unless only --target-ci-abs is given)")
    group.add_argument("--target-ci-abs", type=float, default=argparse.SUPPRESS, metavar="ABS",
                       help="stop a layer once that half-width is at most ABS (with --target-ci: either suffices)")
    group.add_argument("--max-injections", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"cap per layer (default {default.max_injections}, the paper's budget)")
    group.add_argument("--pilot", type=int, default=argparse.SUPPRESS, metavar="N",
                       help=f"draws per stratum in the first round, the minimum of every stratum (default {default.pilot})")
    group.add_argument("--defensive", type=float, default=argparse.SUPPRESS, metavar="A",
                       help=f"share of each round spread proportionally over all strata (default {default.defensive})")


def sampling_from_args(args: argparse.Namespace) -> tuple[st.AdaptiveConfig, str] | None:
    """(adaptive configuration, strata grouping) of ``--sampling stratified``; None for uniform sampling.

    Raises one CampaignError naming the options when they do not fit the sampling chosen.
    """
    options = {name: getattr(args, name) for name in STRATIFIED_OPTIONS if getattr(args, name, None) is not None}
    given = [f"--{name.replace('_', '-')}" for name in options]
    if args.sampling == "uniform":
        if given:
            raise CampaignError(f"{', '.join(given)}: --sampling stratified only (the default is uniform)")
        return None
    uniform_only = [f"--{name}" for name in ("injections", "margin") if getattr(args, name) is not None]
    if uniform_only:
        raise CampaignError(f"{', '.join(uniform_only)}: uniform sampling only; with --sampling stratified give "
                            "--target-ci/--target-ci-abs and the cap --max-injections")
    default = st.AdaptiveConfig()
    # --target-ci-abs alone means the absolute target only; no target at all means the default relative one
    targets = {"target_rel": options.get("target_ci"), "target_abs": options.get("target_ci_abs")}
    if targets == {"target_rel": None, "target_abs": None}:
        targets["target_rel"] = default.target_rel
    grouping = options.get("strata", "bit")
    try:
        adaptive = replace(
            default, **targets, confidence=CONFIDENCE,
            **{name: options[name] for name in ("max_injections", "pilot", "defensive") if name in options},
        )
        adaptive.check_budget(len(st.make_strata(get_format(args.format), grouping)))
    except ValueError as exc:  # name the options, not the fields, in the message
        option = {"target_rel": "--target-ci", "target_abs": "--target-ci-abs", "max_injections": "--max-injections",
                  "pilot": "--pilot", "defensive": "--defensive"}
        message = re.sub(r"\b(" + "|".join(option) + r")\b", lambda m: option[m.group(1)], str(exc))
        raise CampaignError(message) from None
    return adaptive, grouping


def outcomes_of(table: pa.Table) -> st.Outcomes:
    """Per-fault ΔLoss, finite and mismatch flags of fault records."""
    return st.Outcomes(
        table.column("delta_loss").to_numpy(),
        table.column("finite").to_numpy(zero_copy_only=False),
        table.column("mismatch").to_numpy(zero_copy_only=False),
    )


def sites_of(table: pa.Table, layer: str) -> FaultSites:
    """The fault sites of fault records."""
    return FaultSites(layer, *(torch.from_numpy(table.column(c).to_numpy().astype(np.int64)) for c in ("image", "index", "bit")))


class LayerRounds:
    """The engine-backed evaluator and the round store of one layer of a stratified campaign.

    ``run_adaptive`` asks ``load(r)`` for round r and, when it is not stored, calls ``evaluate`` with
    its sites and then ``save``. ``evaluate`` scores the sites chunk by chunk into the uniform runner's
    fault records, keeping every finished chunk on disk (and reusing the chunks of an interrupted run);
    ``save`` writes the round, with its strata, as one file. Faults are numbered consecutively over the
    layer's rounds, which are always visited in order.
    """

    def __init__(
        self, out: Path, position: int, plan: LayerPlan, strata: Sequence[st.Stratum],
        engine: Engine, golden: Golden, source: ImageSource, chunk_size: int,
        after_chunk: Callable[[int], None] | None = None, key: str = "",
    ) -> None:
        self.out, self.position, self.plan, self.strata = Path(out), position, plan, list(strata)
        self.key = key  # the campaign key stamped on (and checked in) every part
        self.engine, self.golden, self.source, self.chunk_size = engine, golden, source, chunk_size
        self.after_chunk = after_chunk  # called with the number of faults of each chunk evaluated or read back
        self._round = 0
        self._offset = 0
        self._pending: pa.Table | None = None
        self.loaded = 0  # faults read back from disk (not evaluated again)

    def path(self, round_index: int, chunk: int | None = None) -> Path:
        """Where round ``round_index`` (or one chunk of it, while it runs) is stored."""
        suffix = "" if chunk is None else f"-c{chunk:05d}"
        return self.out / "parts" / f"{self.position:04d}-r{round_index:04d}{suffix}.parquet"

    def evaluate(self, sites: FaultSites) -> st.Outcomes:
        """Inject ``sites`` (the round last asked for by ``load``) and score them as the uniform runner does."""
        tables = []
        for chunk, begin in enumerate(range(0, len(sites), self.chunk_size)):
            part, path = sites.slice(begin, begin + self.chunk_size), self.path(self._round, chunk)
            if path.is_file():
                table = read_part(path, self.key, FAULT_SCHEMA)
                if not st.same_sites(sites_of(table, self.plan.name), part):
                    raise CampaignError(f"{path} does not match the arguments of this run; use another --out")
                self.loaded += table.num_rows
            else:
                result = self.engine.run(self.plan.info(), part, self.source)
                start = self._offset + begin
                table = chunk_table(self.plan, Unit(self.position, chunk, start, start + len(part)), part, result,
                                    self.golden)
                write_part(path, table, self.key)
            tables.append(table)
            if self.after_chunk is not None:
                self.after_chunk(table.num_rows)
        self._pending = pa.concat_tables(tables)
        return outcomes_of(self._pending)

    def save(self, record: st.RoundRecord) -> None:
        """Write the evaluated round with its stratum names atomically, then drop its chunk files."""
        if self._pending is None or self._pending.num_rows != len(record.sites) or record.index != self._round:
            raise RuntimeError("save() must follow evaluate() of the same round")
        names = pa.array([self.strata[b].name for b in record.stratum], pa.string())
        rounds = pa.array(np.full(len(record.sites), record.index, dtype=np.int32))
        write_part(self.path(record.index), self._pending.append_column("stratum", names).append_column("round", rounds),
                   self.key)
        for chunk in range(math.ceil(len(record.sites) / self.chunk_size)):
            self.path(record.index, chunk).unlink(missing_ok=True)
        self._pending = None
        self._offset += len(record.sites)

    def load(self, round_index: int) -> st.RoundRecord | None:
        """A finished round read back, or None (then ``evaluate`` runs this round)."""
        self._round = round_index
        path = self.path(round_index)
        if not path.is_file():
            return None
        table = read_part(path, self.key, ROUND_SCHEMA)
        index = {s.name: b for b, s in enumerate(self.strata)}
        labels = np.array([index.get(name, -1) for name in table.column("stratum").to_pylist()], dtype=np.int64)
        self._offset += table.num_rows
        self.loaded += table.num_rows
        return st.RoundRecord(round_index, labels, sites_of(table, self.plan.name), outcomes_of(table))


def layer_row(plan: LayerPlan, result: st.StratifiedResult) -> dict[str, Any]:
    """The per-layer summary of a finished stratified layer (the uniform table's columns and more)."""
    loss, mismatch = result.loss, result.mismatch
    return {
        "layer": plan.name,
        "order": plan.order,
        "kind": plan.kind,
        "out_shape": "x".join(map(str, plan.out_shape)),
        "neurons": plan.neurons,
        "n": result.n,
        "non_finite": result.non_finite,
        "mean_delta_loss": loss.value,
        "ci_low": loss.low,
        "ci_high": loss.high,
        "ci_half_width": loss.half_width,
        "ci_rel_half_width": loss.half_width / abs(loss.value) if loss.value else math.nan,
        "mismatches": result.mismatches,  # observed count; the rate below is the stratified estimate
        "mismatch_rate": mismatch.value,
        "mismatch_ci_low": max(0.0, mismatch.low),
        "mismatch_ci_high": min(1.0, mismatch.high),
        "finite_fraction": result.finite_fraction,
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "uniform_equivalent_n": result.uniform_equivalent_n,
        "saving_factor": result.saving_factor,
    }



def open_folder(out: Path, record: dict[str, Any]) -> None:
    """Write ``campaign.json`` or check that the stored one describes the same campaign."""
    path = Path(out) / "campaign.json"
    if not path.is_file():
        write_json(path, record)
        return
    stored = read_json(path)
    for key in ("format", "config", "stratified", "plan", "golden", "clamp_max"):
        if stored.get(key) != record.get(key):
            raise CampaignError(f"{out} holds a different campaign ({key} differs); use another --out")


def stratified_config(config: CampaignConfig, adaptive: st.AdaptiveConfig) -> CampaignConfig:
    """``config`` as a stratified campaign records it: the plan's n is the cap, no Leveugle margin."""
    return replace(config, injections=adaptive.max_injections, margin=None, confidence=None)


def stratified_record(adaptive: st.AdaptiveConfig, grouping: str) -> dict[str, Any]:
    """The ``stratified`` entry of campaign.json and summary.json."""
    return {"grouping": grouping, **asdict(adaptive)}


@dataclass
class StratifiedCampaign:
    """An opened stratified campaign folder with its layer plan and engine, ready to run layers."""

    out: Path
    config: CampaignConfig
    adaptive: st.AdaptiveConfig
    grouping: str
    plans: list[LayerPlan]
    engine: Engine
    golden: Golden
    source: ImageSource
    key: str  # stamped on every part (campaign.campaign_key)
    results: dict[str, st.StratifiedResult] = field(default_factory=dict)  # layers run by this process

    def run_layer(self, position: int, *, progress: bool = True, desc: str = "") -> tuple[st.StratifiedResult, int]:
        """Run (or resume) layer ``position`` to its target and write ``layers/LLLL.json``.

        Returns the result and the number of faults read back from disk instead of being injected.
        """
        plan = self.plans[position]
        fmt = get_format(self.config.format)
        strata = st.make_strata(fmt, self.grouping)
        draw = st.stratum_drawer(self.config.seed, plan.name, self.golden.golden_set(self.config.golden), plan.neurons)
        with tqdm(total=self.adaptive.max_injections, unit="fault", disable=not progress, desc=desc or plan.name,
                  dynamic_ncols=True, leave=True) as bar:

            def on_round(_round: int, spent: int, estimate: st.Estimate) -> None:
                bar.update(spent - bar.n)
                rel = estimate.half_width / abs(estimate.value) if estimate.value else math.nan
                bar.set_postfix_str(f"ΔLoss {estimate.value:.4g} ±{100 * rel:.1f}%")

            rounds = LayerRounds(self.out, position, plan, strata, self.engine, self.golden, self.source,
                                 self.config.chunk_size, after_chunk=bar.update, key=self.key)
            result = st.run_adaptive(plan.name, strata, st.stratum_weights(strata, fmt), draw, rounds.evaluate,
                                     self.adaptive, rounds, on_round)
        write_json(
            self.out / "layers" / f"{position:04d}.json",
            {"row": layer_row(plan, result), "strata": [asdict(s) for s in result.strata],
             "round_weights": result.round_weights},
        )
        self.results[plan.name] = result
        return result, rounds.loaded

    def run(self, shard: tuple[int, int] = (0, 1), *, progress: bool = True) -> RunStats:
        """Run (or resume) this shard's layers: shards take whole layers, whose rounds are sequential."""
        mine = shard_units([Unit(i, 0, 0, p.n) for i, p in enumerate(self.plans)], shard)
        stats = RunStats()
        t0 = time.perf_counter()
        for k, unit in enumerate(mine, 1):
            name = self.plans[unit.layer].name
            result, loaded = self.run_layer(unit.layer, progress=progress, desc=f"[{k}/{len(mine)}] {name}")
            stats.faults += result.n - loaded
            stats.skipped += loaded
            stats.per_layer[name] = result.seconds
        stats.seconds = time.perf_counter() - t0
        return stats

    def missing(self) -> list[int]:
        """Positions of the planned layers that have not finished yet (in any shard)."""
        return missing_layers(self.out)


def execute_stratified(
    out: Path,
    config: CampaignConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    golden: Golden,
    source: ImageSource,
    *,
    adaptive: st.AdaptiveConfig,
    grouping: str = "bit",
    provenance: dict[str, Any] | None = None,
    clamp_max: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> tuple[StratifiedCampaign, RunStats]:
    """The stratified counterpart of ``campaign.execute``: plan, create (or check) the folder, run this
    shard's layers; the caller assembles (``assemble_stratified``) once ``missing()`` is empty.

    ``config.injections``/``margin`` are replaced by ``adaptive.max_injections`` (the plan's n is the
    cap); everything else (model, data, golden set, format, clamp, engine, batch and chunk size, seed)
    means what it means in a uniform campaign.
    """
    st.make_strata(get_format(config.format), grouping)  # reject an unknown grouping before any work
    config = stratified_config(config, adaptive)
    plans, clamp, engine = prepare_engine(config, model, layers, golden, clamp_max, device)
    record = build_record(config, plans, golden, clamp, {**(provenance or {}), "engine": engine.describe()})
    record |= {"format": STRATIFIED_FORMAT, "stratified": stratified_record(adaptive, grouping)}
    open_folder(out, record)
    campaign = StratifiedCampaign(Path(out), config, adaptive, grouping, plans, engine, golden, source,
                                  campaign_key(record))
    return campaign, campaign.run(shard, progress=progress)


def missing_layers(out: Path) -> list[int]:
    """Positions of the planned layers that have not finished yet."""
    record = read_json(Path(out) / "campaign.json")
    return [i for i in range(len(record["plan"])) if not (Path(out) / "layers" / f"{i:04d}.json").is_file()]


def _read_layer(out: Path, position: int) -> dict[str, Any]:
    path = Path(out) / "layers" / f"{position:04d}.json"
    if not path.is_file():
        raise CampaignError(f"{out}: layer {position} is not finished yet")
    return read_json(path)


def layer_faults(out: Path, position: int, finished: dict[str, Any]) -> pa.Table:
    """The fault records of a finished layer in round order, with their estimation weights λ_r·W_b·n/n_rb
    (0 for the pilot round, which only plans)."""
    key = campaign_key(read_json(Path(out) / "campaign.json"))
    parts = [
        read_part(Path(out) / "parts" / f"{position:04d}-r{r:04d}.parquet", key, ROUND_SCHEMA)
        for r in range(finished["row"]["rounds"])
    ]
    table = pa.concat_tables(parts)
    n = table.num_rows
    stratum_weight = {s["name"]: s["weight"] for s in finished["strata"]}
    cell = list(zip(table.column("round").to_pylist(), table.column("stratum").to_pylist(), strict=True))
    counts = Counter(cell)
    lam = finished["round_weights"]
    weight = [lam[r] * stratum_weight[name] * n / counts[r, name] for r, name in cell]
    return table.append_column("weight", pa.array(weight, pa.float64()))


def stratified_markdown(rows: Sequence[dict[str, Any]], network: dict[str, Any], title: str) -> str:
    """The per-layer table of a stratified campaign as Markdown."""
    pct = int(round(CONFIDENCE * 100))

    def g(x: float | None, spec: str = ".4g") -> str:
        return "n/a" if x is None or math.isnan(x) else format(x, spec)

    lines = [
        f"# {title}",
        "",
        f"| # | layer | kind | neurons | n | rounds | stop | mean ΔLoss | {pct}% CI | ± % | mismatch % | {pct}% CI "
        "| non-finite | uniform n for this CI | saving |",
        "|---:|---|---|---:|---:|---:|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['order']} | `{r['layer']}` | {r['kind']} | {r['neurons']} | {r['n']} | {r['rounds']} | {r['stop_reason']} "
            f"| {g(r['mean_delta_loss'])} | [{g(r['ci_low'])}, {g(r['ci_high'])}] | {g(100 * r['ci_rel_half_width'], '.1f')} "
            f"| {g(100 * r['mismatch_rate'], '.2f')} | [{g(100 * r['mismatch_ci_low'], '.2f')}, "
            f"{g(100 * r['mismatch_ci_high'], '.2f')}] | {r['non_finite']} | {g(r['uniform_equivalent_n'], '.0f')} "
            f"| {g(r['saving_factor'], '.1f')}x |"
        )
    lines += [
        "",
        f"Network level (mean over {network['layers']} layers): ΔLoss {g(network['delta_loss'])}, "
        f"mismatch {g(100 * network['mismatch_rate'], '.2f')}%; {network['faults']} injections where a uniform "
        f"campaign needs {g(network['uniform_equivalent_n'], '.0f')} for the same intervals "
        f"(saving {g(network['saving_factor'], '.1f')}x). Per-stratum figures: strata.csv.",
        "",
    ]
    return "\n".join(lines)


def assemble_stratified(out: Path) -> dict[str, Any]:
    """Write faults.parquet, layers.csv/.md, strata.csv and summary.json of a finished stratified campaign."""
    import pandas as pd

    out = Path(out)
    record = read_json(out / "campaign.json")
    if record.get("format") != STRATIFIED_FORMAT:
        raise CampaignError(f"{out} is not a stratified campaign folder")
    plans = [LayerPlan.from_dict(d) for d in record["plan"]]
    finished = [_read_layer(out, i) for i in range(len(plans))]
    rows = [f["row"] for f in finished]
    strata_rows = [{"layer": f["row"]["layer"], **s} for f in finished for s in f["strata"]]
    network = network_level(rows)
    uniform_n = float(sum(r["uniform_equivalent_n"] for r in rows))
    network |= {"uniform_equivalent_n": uniform_n, "saving_factor": uniform_n / network["faults"]}
    summary = {
        "network": network,
        **record["provenance"],
        "config": record["config"],
        "stratified": record["stratified"],
        "fault_model": FAULT_MODEL,
        "n_per_layer": {r["layer"]: r["n"] for r in rows},
        "golden": record["golden"],
        "confidence": CONFIDENCE,
        "ci": "stratified combined ratio estimator over estimation rounds, delta-method variance, skewness-corrected (Hall) interval (docs/stratified.md)",
    }
    faults = pa.concat_tables([layer_faults(out, i, f) for i, f in enumerate(finished)])
    write_parquet(out / "faults.parquet", faults)
    write_text(out / "layers.csv", pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
    write_text(out / "strata.csv", pd.DataFrame(strata_rows).to_csv(index=False, lineterminator="\n"))
    title = f"ΔLoss per layer (stratified) — {record['config']['model']} on {record['config']['dataset']}"
    write_text(out / "layers.md", stratified_markdown(rows, network, title))
    write_json(out / "summary.json", summary)
    for leftover in (out / "parts").glob("*-c*.parquet"):  # chunks of a round whose file was written before a kill
        leftover.unlink()
    remove_stale_temporaries(out / "parts")
    return summary


def is_stratified(folder: Path) -> bool:
    """Whether ``folder`` holds a stratified campaign (``inject.py merge`` dispatches on it)."""
    path = Path(folder) / "campaign.json"
    return path.is_file() and read_json(path).get("format") == STRATIFIED_FORMAT


def stratified_complete(out: Path, config: CampaignConfig, adaptive: st.AdaptiveConfig, grouping: str) -> bool:
    """Whether ``out`` holds this stratified campaign, finished and assembled (a rerun has nothing to do)."""
    if not ((Path(out) / "summary.json").is_file() and is_stratified(out)):
        return False
    record = read_json(Path(out) / "campaign.json")
    return (
        record["config"] == asdict(stratified_config(config, adaptive))
        and record["stratified"] == stratified_record(adaptive, grouping)
        and not missing_layers(out)
    )


def merge_stratified(sources: Sequence[Path], out: Path) -> dict[str, Any]:
    """Gather the layers of shards run into separate folders into ``out`` and assemble the final files."""
    records = [read_json(Path(src) / "campaign.json") for src in sources]
    for src, record in zip(sources, records, strict=True):
        open_folder(out, record)  # creates out from the first; raises when a shard belongs to another campaign
        for position in range(len(record["plan"])):
            done = Path(src) / "layers" / f"{position:04d}.json"
            if not done.is_file() or (Path(out) / "layers" / done.name).is_file() or Path(src) == Path(out):
                continue
            for r in range(read_json(done)["row"]["rounds"]):
                name = f"{position:04d}-r{r:04d}.parquet"
                read_part(Path(src) / "parts" / name, campaign_key(record), ROUND_SCHEMA)
                (Path(out) / "parts").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(src) / "parts" / name, Path(out) / "parts" / name)
            write_json(Path(out) / "layers" / done.name, read_json(done))
    return assemble_stratified(out)
