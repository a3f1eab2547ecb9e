"""Stratified campaigns on real models: :mod:`resilience.stratified` run through the campaign runner's parts.

Faults are scored and recorded exactly as in a uniform campaign (``campaign.chunk_table``, the golden
pass, the engines, atomic Parquet parts); only the choice of sites and the estimator differ. A folder
holds:

* ``campaign.json`` — the uniform runner's record (config, plan with n = the cap, golden facts, clamp,
  provenance) plus the stratified options, under format ``tgr-stratified-campaign/1``;
* ``parts/LLLL-rRRRR.parquet`` — one file per finished round of a layer (the uniform runner's fault
  columns plus ``stratum`` and ``round``), written atomically: a rerun loads them and continues;
* ``layers/LLLL.json`` — the estimate of a finished layer;
* once every layer is done: ``faults.parquet`` (plus a ``weight`` column: W_b·n/n_b, so the weighted
  mean over finite faults is the stratified estimate), ``layers.csv``, ``layers.md``, ``strata.csv`` and
  ``summary.json``. Wall times go to ``runs.jsonl`` only.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from resilience import stratified as st
from resilience.bitflip import get_format
from resilience.campaign import (
    FAULT_SCHEMA,
    CampaignConfig,
    CampaignError,
    LayerPlan,
    RunStats,
    Unit,
    build_record,
    chunk_table,
    layer_sites,
    network_level,
    plan_layers,
    shard_units,
)
from resilience.engines import get_engine
from resilience.engines.base import Engine, FaultSites, ImageSource
from resilience.golden import Golden
from resilience.layers import LayerInfo
from resilience.metrics import CONFIDENCE, LayerStats, summarize
from resilience.sampling import z_value
from resilience.storage import read_json, remove_stale_temporaries, write_json, write_parquet, write_text

STRATIFIED_FORMAT = "tgr-stratified-campaign/1"
ROUND_SCHEMA = FAULT_SCHEMA.append(pa.field("stratum", pa.string())).append(pa.field("round", pa.int32()))


def add_stratified_args(parser: argparse.ArgumentParser) -> None:
    """The ``--sampling stratified`` options of ``inject.py``."""
    group = parser.add_argument_group("stratified sampling (--sampling stratified; see docs/stratified.md)")
    default = st.AdaptiveConfig()
    group.add_argument("--strata", choices=st.GROUPINGS, default="bit",
                       help="one stratum per bit, or sign/exponent/high/low mantissa (default: bit)")
    group.add_argument("--target-ci", type=float, default=default.target_rel, metavar="REL",
                       help="stop a layer once the 99%% CI half-width of its mean ΔLoss is at most REL x the mean "
                            f"(default {default.target_rel})")
    group.add_argument("--target-ci-abs", type=float, default=None, metavar="ABS",
                       help="... or at most ABS (either target suffices)")
    group.add_argument("--max-injections", type=int, default=default.max_injections, metavar="N",
                       help=f"cap per layer (default {default.max_injections}, the paper's budget)")
    group.add_argument("--pilot", type=int, default=default.pilot, metavar="N",
                       help=f"draws per stratum in the first round, the minimum of every stratum (default {default.pilot})")
    group.add_argument("--defensive", type=float, default=default.defensive, metavar="A",
                       help=f"share of each round spread proportionally over all strata (default {default.defensive})")


def adaptive_from_args(args: argparse.Namespace) -> st.AdaptiveConfig:
    """The adaptive configuration the ``add_stratified_args`` options describe."""
    try:
        return st.AdaptiveConfig(
            target_rel=args.target_ci, target_abs=args.target_ci_abs, max_injections=args.max_injections,
            pilot=args.pilot, defensive=args.defensive, confidence=CONFIDENCE,
        )
    except ValueError as exc:
        raise CampaignError(str(exc)) from None


def outcomes_of(table: pa.Table) -> st.Outcomes:
    """Per-fault ΔLoss, finite and mismatch flags of fault records."""
    return st.Outcomes(
        table.column("delta_loss").to_numpy(),
        table.column("finite").to_numpy(zero_copy_only=False),
        table.column("mismatch").to_numpy(zero_copy_only=False),
    )


class LayerRounds:
    """The engine-backed evaluator and the round store of one layer of a stratified campaign.

    ``evaluate`` scores a round's sites with the engine into the uniform runner's fault records and
    keeps them until ``save`` writes them, with their strata, as the round's Parquet part. Faults are
    numbered consecutively over the layer's rounds, which are always visited in order.
    """

    def __init__(
        self, out: Path, position: int, plan: LayerPlan, strata: Sequence[st.Stratum],
        engine: Engine, golden: Golden, source: ImageSource,
    ) -> None:
        self.out, self.position, self.plan, self.strata = Path(out), position, plan, list(strata)
        self.engine, self.golden, self.source = engine, golden, source
        self._offset = 0
        self._pending: pa.Table | None = None
        self.loaded = 0  # faults read back from finished rounds (not evaluated again)

    def path(self, round_index: int) -> Path:
        """Where round ``round_index`` is stored."""
        return self.out / "parts" / f"{self.position:04d}-r{round_index:04d}.parquet"

    def evaluate(self, sites: FaultSites) -> st.Outcomes:
        """Inject ``sites`` and score them as the uniform runner does."""
        result = self.engine.run(self.plan.info(), sites, self.source)
        unit = Unit(self.position, 0, self._offset, self._offset + len(sites))
        self._pending = chunk_table(self.plan, unit, sites, result, self.golden)
        return outcomes_of(self._pending)

    def save(self, record: st.RoundRecord) -> None:
        """Write the evaluated round with its stratum names atomically."""
        if self._pending is None or self._pending.num_rows != len(record.sites):
            raise RuntimeError("save() must follow evaluate() of the same round")
        names = pa.array([self.strata[b].name for b in record.stratum], pa.string())
        rounds = pa.array(np.full(len(record.sites), record.index, dtype=np.int32))
        table = self._pending.append_column("stratum", names).append_column("round", rounds)
        write_parquet(self.path(record.index), table)
        self._pending = None
        self._offset += table.num_rows

    def load(self, round_index: int) -> st.RoundRecord | None:
        """A finished round read back, or None."""
        path = self.path(round_index)
        if not path.is_file():
            return None
        table = pq.read_table(path, schema=ROUND_SCHEMA)
        index = {s.name: b for b, s in enumerate(self.strata)}
        labels = np.array([index.get(name, -1) for name in table.column("stratum").to_pylist()], dtype=np.int64)
        sites = FaultSites(
            self.plan.name,
            *(torch.from_numpy(table.column(c).to_numpy().astype(np.int64)) for c in ("image", "index", "bit")),
        )
        self._offset += table.num_rows
        self.loaded += table.num_rows
        return st.RoundRecord(round_index, labels, sites, outcomes_of(table))


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


def run_stratified_layer(
    rounds: LayerRounds,
    seed: int,
    golden_set: torch.Tensor,
    fmt_name: str,
    grouping: str,
    adaptive: st.AdaptiveConfig,
    *,
    progress: bool = True,
    desc: str = "",
) -> st.StratifiedResult:
    """Run (or resume) one layer to its target and write ``layers/LLLL.json``."""
    fmt = get_format(fmt_name)
    plan = rounds.plan
    draw = st.stratum_drawer(seed, plan.name, golden_set, plan.neurons)
    with tqdm(total=adaptive.max_injections, unit="fault", disable=not progress, desc=desc or plan.name,
              dynamic_ncols=True, leave=True) as bar:

        def on_round(_round: int, spent: int, estimate: st.Estimate) -> None:
            bar.update(spent - bar.n)
            rel = estimate.half_width / abs(estimate.value) if estimate.value else math.nan
            bar.set_postfix_str(f"ΔLoss {estimate.value:.4g} ±{100 * rel:.1f}%")

        result = st.run_adaptive(
            plan.name, rounds.strata, st.stratum_weights(rounds.strata, fmt), draw, rounds.evaluate, adaptive,
            rounds, on_round,
        )
    write_json(
        rounds.out / "layers" / f"{rounds.position:04d}.json",
        {"row": layer_row(plan, result), "strata": [asdict(s) for s in result.strata]},
    )
    return result


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

    def run_layer(self, position: int, *, progress: bool = True, desc: str = "") -> tuple[st.StratifiedResult, int]:
        """Run (or resume) layer ``position``; returns its result and the faults read back from disk."""
        plan = self.plans[position]
        strata = st.make_strata(get_format(self.config.format), self.grouping)
        rounds = LayerRounds(self.out, position, plan, strata, self.engine, self.golden, self.source)
        result = run_stratified_layer(
            rounds, self.config.seed, self.golden.golden_set(self.config.golden), self.config.format,
            self.grouping, self.adaptive, progress=progress, desc=desc,
        )
        return result, rounds.loaded


def open_stratified_campaign(
    out: Path,
    config: CampaignConfig,
    adaptive: st.AdaptiveConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    golden: Golden,
    source: ImageSource,
    *,
    grouping: str = "bit",
    provenance: dict[str, Any] | None = None,
    clamp_max: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
) -> StratifiedCampaign:
    """Plan a stratified campaign and create (or check) its folder, as ``campaign.execute`` does.

    ``config.injections``/``margin`` are replaced by ``adaptive.max_injections`` (the plan's n is the
    cap); everything else (model, data, golden set, format, clamp, engine, batch size, seed) means what
    it means in a uniform campaign.
    """
    fmt = get_format(config.format)
    st.make_strata(fmt, grouping)  # reject an unknown grouping before any work
    golden_set = golden.golden_set(config.golden)
    if len(golden_set) == 0:
        raise CampaignError("the golden set is empty (no correctly classified image with Top2Diff > 0)")
    if config.clamp == "profile" and clamp_max is None:
        raise CampaignError("--clamp profile needs the layer profile")
    if torch.device(device).type != config.device:
        raise CampaignError(f"the config says device {config.device} but the model runs on {device}")
    config = replace(config, injections=adaptive.max_injections, margin=None, confidence=None)
    plans = plan_layers(config, layers, len(golden_set))
    clamp = {p.name: clamp_max[p.name] for p in plans} if config.clamp == "profile" and clamp_max else None
    engine = get_engine(config.engine)(
        model, [p.info() for p in plans], fmt, clamp=clamp, device=device, batch_size=config.batch_size
    )
    record = build_record(config, plans, golden, clamp, {**(provenance or {}), "engine": engine.describe()})
    record |= {"format": STRATIFIED_FORMAT, "stratified": {"grouping": grouping, **asdict(adaptive)}}
    open_folder(out, record)
    return StratifiedCampaign(Path(out), config, adaptive, grouping, plans, engine, golden, source)


def run_stratified_campaign(
    out: Path,
    config: CampaignConfig,
    adaptive: st.AdaptiveConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    golden: Golden,
    source: ImageSource,
    *,
    grouping: str = "bit",
    provenance: dict[str, Any] | None = None,
    clamp_max: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> tuple[dict[str, st.StratifiedResult], RunStats]:
    """The stratified counterpart of ``campaign.execute``: run (or resume) this shard's layers.

    Shards take whole layers (a layer's rounds are sequential); run ``assemble_stratified`` once
    ``missing_layers`` is empty.
    """
    campaign = open_stratified_campaign(
        out, config, adaptive, model, layers, golden, source,
        grouping=grouping, provenance=provenance, clamp_max=clamp_max, device=device,
    )
    mine = shard_units([Unit(i, 0, 0, p.n) for i, p in enumerate(campaign.plans)], shard)
    results: dict[str, st.StratifiedResult] = {}
    stats = RunStats()
    t0 = time.perf_counter()
    for k, unit in enumerate(mine, 1):
        name = campaign.plans[unit.layer].name
        result, loaded = campaign.run_layer(unit.layer, progress=progress, desc=f"[{k}/{len(mine)}] {name}")
        results[name] = result
        stats.faults += result.n - loaded
        stats.skipped += loaded
        stats.per_layer[name] = result.seconds
    stats.seconds = time.perf_counter() - t0
    return results, stats


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
    """The fault records of a finished layer in round order, with their design weights W_b·n/n_b."""
    parts = [
        pq.read_table(Path(out) / "parts" / f"{position:04d}-r{r:04d}.parquet", schema=ROUND_SCHEMA)
        for r in range(finished["row"]["rounds"])
    ]
    table = pa.concat_tables(parts)
    n = table.num_rows
    weight = {s["name"]: s["weight"] * n / s["n"] for s in finished["strata"]}
    return table.append_column("weight", pa.array([weight[name] for name in table.column("stratum").to_pylist()]))


def stratified_markdown(rows: Sequence[dict[str, Any]], network: dict[str, Any], title: str) -> str:
    """The per-layer table of a stratified campaign as Markdown."""
    pct = int(round(CONFIDENCE * 100))

    def g(x: float | None, spec: str = ".4g") -> str:
        return "n/a" if x is None or math.isnan(x) else format(x, spec)

    lines = [
        f"# {title}",
        "",
        f"| # | layer | kind | neurons | n | rounds | mean ΔLoss | {pct}% CI | ± % | mismatch % | {pct}% CI "
        "| non-finite | uniform n for this CI | saving |",
        "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['order']} | `{r['layer']}` | {r['kind']} | {r['neurons']} | {r['n']} | {r['rounds']} "
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
        f"(saving {g(network['saving_factor'], '.1f')}x).",
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
        "fault_model": "neuron-bitflip-transient",
        "n_per_layer": {r["layer"]: r["n"] for r in rows},
        "golden": record["golden"],
        "confidence": CONFIDENCE,
        "ci": "stratified combined ratio estimator, delta-method variance, normal interval (docs/stratified.md)",
    }
    faults = pa.concat_tables([layer_faults(out, i, f) for i, f in enumerate(finished)])
    write_parquet(out / "faults.parquet", faults)
    write_text(out / "layers.csv", pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
    write_text(out / "strata.csv", pd.DataFrame(strata_rows).to_csv(index=False, lineterminator="\n"))
    title = f"ΔLoss per layer (stratified) — {record['config']['model']} on {record['config']['dataset']}"
    write_text(out / "layers.md", stratified_markdown(rows, network, title))
    write_json(out / "summary.json", summary)
    remove_stale_temporaries(out / "parts")
    return summary


def is_stratified(folder: Path) -> bool:
    """Whether ``folder`` holds a stratified campaign (``inject.py merge`` dispatches on it)."""
    path = Path(folder) / "campaign.json"
    return path.is_file() and read_json(path).get("format") == STRATIFIED_FORMAT


def merge_stratified(sources: Sequence[Path], out: Path) -> dict[str, Any]:
    """Gather the layers of shards run into separate folders into ``out`` and assemble the final files."""
    records = [read_json(Path(src) / "campaign.json") for src in sources]
    open_folder(out, records[0])
    for src, record in zip(sources, records, strict=True):
        open_folder(out, record)  # raises when a shard belongs to another campaign
        for position in range(len(record["plan"])):
            done = Path(src) / "layers" / f"{position:04d}.json"
            if not done.is_file() or (Path(out) / "layers" / done.name).is_file() or Path(src) == Path(out):
                continue
            rounds = read_json(done)["row"]["rounds"]
            for r in range(rounds):
                name = f"{position:04d}-r{r:04d}.parquet"
                (Path(out) / "parts").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(src) / "parts" / name, Path(out) / "parts" / name)
            write_json(Path(out) / "layers" / done.name, read_json(done))
    return assemble_stratified(out)


@dataclass(frozen=True)
class UniformToTarget:
    """A uniform campaign of one layer run in chunks until its CI reaches the target or the cap."""

    layer: str
    n: int
    stats: LayerStats
    reached: bool
    needed_n: float  # n when reached, else extrapolated from the observed variance: (z s / h)² · n / finite
    seconds: float

    @property
    def half_width(self) -> float:
        return (self.stats.ci_high - self.stats.ci_low) / 2


def run_uniform_to_target(
    engine: Engine,
    config: CampaignConfig,
    plan: LayerPlan,
    golden: Golden,
    source: ImageSource,
    target_rel: float,
    cap: int,
) -> UniformToTarget:
    """The uniform campaign's faults of ``plan`` (its first ``cap``), chunk by chunk, until the relative
    half-width of the CI of the mean ΔLoss is at most ``target_rel``."""
    start = time.perf_counter()
    plan = LayerPlan(plan.name, plan.kind, plan.out_shape, plan.order, cap)
    sites = layer_sites(config, plan, golden.golden_set(config.golden))
    tables: list[pa.Table] = []
    for begin in range(0, cap, config.chunk_size):
        chunk = sites.slice(begin, begin + config.chunk_size)
        result = engine.run(plan.info(), chunk, source)
        tables.append(chunk_table(plan, Unit(plan.order, 0, begin, begin + len(chunk)), chunk, result, golden))
        outcomes = outcomes_of(pa.concat_tables(tables))
        stats = summarize(outcomes.delta_loss, outcomes.finite, outcomes.mismatch, CONFIDENCE)
        half = (stats.ci_high - stats.ci_low) / 2
        if half <= target_rel * abs(stats.mean_delta_loss):
            break
    n, finite = stats.n, stats.n - stats.non_finite
    reached = half <= target_rel * abs(stats.mean_delta_loss)
    needed = n if reached else (z_value(CONFIDENCE) * stats.std_delta_loss / (target_rel * stats.mean_delta_loss)) ** 2 * n / finite
    return UniformToTarget(plan.name, n, stats, reached, float(needed), time.perf_counter() - start)
