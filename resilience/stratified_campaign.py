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

import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from resilience import stratified as st
from resilience.bitflip import get_format
from resilience.campaign import (
    FAULT_SCHEMA,
    CampaignError,
    CampaignFolder,
    LayerPlan,
    RecordedCampaign,
    RunStats,
    campaign_summary,
    chunk_table,
    network_ci_text,
    network_level,
    shard_units,
)
from resilience.engines.base import Engine, FaultSites, ImageSource
from resilience.golden import Golden
from resilience.image_pool import ImagePool, campaign_images, pool_note, pooled_tables, stratified_layer_set
from resilience.improvement_ci import network_interval
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
ROUND_SCHEMA = FAULT_SCHEMA.append(pa.field("stratum", pa.string())).append(pa.field("round", pa.int32()))


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
        self, folder: CampaignFolder, position: int, plan: LayerPlan, strata: Sequence[st.Stratum],
        engine: Engine, golden: Golden, source: ImageSource, chunk_size: int,
        after_chunk: Callable[[int], None] | None = None, key: str = "",
    ) -> None:
        self.folder, self.position, self.plan, self.strata = folder, position, plan, list(strata)
        self.key = key  # the campaign key stamped on (and checked in) every part
        self.engine, self.golden, self.source, self.chunk_size = engine, golden, source, chunk_size
        self.after_chunk = after_chunk  # called with the number of faults of each chunk evaluated or read back
        self._round = 0
        self._offset = 0
        self._pending: pa.Table | None = None
        self.loaded = 0  # faults read back from disk (not evaluated again)

    def path(self, round_index: int, chunk: int | None = None) -> Path:
        """Where round ``round_index`` (or one chunk of it, while it runs) is stored."""
        return self.folder.round(self.position, round_index, chunk)

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
                table = chunk_table(self.plan, self._offset + begin, part, result, self.golden)
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



class StratifiedCampaign(RecordedCampaign):
    """A stratified campaign's folder: its record, finished rounds and layers, and final files."""

    unit_name = "layers"  # what ``missing()`` counts

    def __init__(self, out: Path, record: dict[str, Any]) -> None:
        if record.get("format") != STRATIFIED_FORMAT:
            raise CampaignError(f"{out} is not a stratified campaign folder")
        super().__init__(out, record)
        self.grouping: str = record["stratified"]["grouping"]
        self.adaptive = st.AdaptiveConfig(**{f.name: record["stratified"][f.name] for f in fields(st.AdaptiveConfig)})
        self.results: dict[str, st.StratifiedResult] = {}  # layers run by this process

    def run_layer(self, position: int, engine: Engine, golden: Golden, source: ImageSource, *,
                  progress: bool = True, desc: str = "",
                  after_chunk: Callable[[int], None] | None = None) -> tuple[st.StratifiedResult, int]:
        """Run (or resume) layer ``position`` to its target and write its result file.

        Returns the result and the number of faults read back from disk instead of being injected.
        """
        plan = self.plans[position]
        fmt = get_format(self.config.format)
        strata = st.make_strata(fmt, self.grouping)
        images = campaign_images(self.record, golden.golden_set(self.config.golden))
        draw = st.stratum_drawer(self.config.seed, plan.name, images, plan.neurons)
        with tqdm(total=self.adaptive.max_injections, unit="fault", disable=not progress, desc=desc or plan.name,
                  dynamic_ncols=True, leave=True) as bar:

            def on_round(_round: int, spent: int, estimate: st.Estimate) -> None:
                bar.update(spent - bar.n)
                rel = estimate.half_width / abs(estimate.value) if estimate.value else math.nan
                bar.set_postfix_str(f"ΔLoss {estimate.value:.4g} ±{100 * rel:.1f}%")

            def chunk_done(rows: int) -> None:
                bar.update(rows)
                if after_chunk is not None:
                    after_chunk(rows)

            rounds = LayerRounds(self.folder, position, plan, strata, engine, golden, source,
                                 self.config.chunk_size, after_chunk=chunk_done, key=self.key)
            result = st.run_adaptive(plan.name, strata, st.stratum_weights(strata, fmt), draw, rounds.evaluate,
                                     self.adaptive, rounds, on_round)
        write_json(
            self.folder.layer_result(position),
            {"row": layer_row(plan, result), "strata": [asdict(s) for s in result.strata],
             "round_weights": result.round_weights},
        )
        self.results[plan.name] = result
        return result, rounds.loaded

    def run(self, engine: Engine, golden: Golden, source: ImageSource, *, shard: tuple[int, int] = (0, 1),
            progress: bool = True, after_chunk: Callable[[int], None] | None = None) -> RunStats:
        """Run (or resume) this shard's layers: shards take whole layers, whose rounds are sequential.

        ``after_chunk`` gets the size of each chunk of faults evaluated or read back.
        """
        mine = shard_units(range(len(self.plans)), shard)
        stats = RunStats()
        t0 = time.perf_counter()
        for k, position in enumerate(mine, 1):
            name = self.plans[position].name
            result, loaded = self.run_layer(position, engine, golden, source, progress=progress,
                                            desc=f"[{k}/{len(mine)}] {name}", after_chunk=after_chunk)
            stats.faults += result.n - loaded
            stats.skipped += loaded
            stats.per_layer[name] = result.seconds
        stats.seconds = time.perf_counter() - t0
        return stats

    def missing(self) -> list[int]:
        """Positions of the planned layers that have not finished yet (in any shard)."""
        return [i for i in range(len(self.plans)) if not self.folder.layer_result(i).is_file()]

    def finished_layer(self, position: int) -> dict[str, Any]:
        """The result file of a finished layer."""
        path = self.folder.layer_result(position)
        if not path.is_file():
            raise CampaignError(f"{self.out}: layer {position} is not finished yet")
        return read_json(path)

    def adopt(self, shard: StratifiedCampaign) -> None:
        """Copy the layers another shard's folder finished (and this one lacks), each round checked first."""
        if shard.out == self.out:
            return
        missing = set(self.missing())
        for position in range(len(shard.plans)):
            if position not in missing or position in shard.missing():
                continue
            finished = shard.finished_layer(position)
            for r in range(finished["row"]["rounds"]):
                source, target = shard.folder.round(position, r), self.folder.round(position, r)
                read_part(source, self.key, ROUND_SCHEMA)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            write_json(self.folder.layer_result(position), finished)

    def layer_faults(self, position: int, finished: dict[str, Any]) -> pa.Table:
        """The fault records of a finished layer in round order, with their estimation weights λ_r·W_b·n/n_rb
        (0 for the pilot round, which only plans)."""
        parts = [read_part(self.folder.round(position, r), self.key, ROUND_SCHEMA)
                 for r in range(finished["row"]["rounds"])]
        table = pa.concat_tables(parts)
        n = table.num_rows
        stratum_weight = {s["name"]: s["weight"] for s in finished["strata"]}
        cell = list(zip(table.column("round").to_pylist(), table.column("stratum").to_pylist(), strict=True))
        counts = Counter(cell)
        lam = finished["round_weights"]
        weight = [lam[r] * stratum_weight[name] * n / counts[r, name] for r, name in cell]
        return table.append_column("weight", pa.array(weight, pa.float64()))

    def assemble(self) -> dict[str, Any]:
        """Write faults.parquet, layers.csv/.md, strata.csv and summary.json of the finished campaign."""
        import pandas as pd  # only assembly needs it

        finished = [self.finished_layer(i) for i in range(len(self.plans))]
        rows = [f["row"] for f in finished]
        strata_rows = [{"layer": f["row"]["layer"], **s} for f in finished for s in f["strata"]]
        tables = [self.layer_faults(i, f) for i, f in enumerate(finished)]
        faults = pa.concat_tables(tables)
        pool = ImagePool.from_record(self.record)
        strata = [s.name for s in st.make_strata(get_format(self.config.format), self.grouping)]
        layers = stratified_layer_set(pool, {row["layer"]: t for row, t in zip(rows, tables, strict=True)}, strata)
        network = network_level(rows) | network_interval(layers)
        uniform_n = float(sum(r["uniform_equivalent_n"] for r in rows))
        network |= {"uniform_equivalent_n": uniform_n, "saving_factor": uniform_n / network["faults"]}
        if pool is not None:
            pooled_tables(layers, rows, network, CONFIDENCE)
        summary = campaign_summary(
            self.record, network, {r["layer"]: r["n"] for r in rows},
            "stratified combined ratio estimator over estimation rounds, delta-method variance, skewness-corrected "
            "(Hall) interval (docs/stratified.md)")
        write_parquet(self.folder.file("faults.parquet"), faults)
        write_text(self.folder.file("layers.csv"), pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
        write_text(self.folder.file("strata.csv"), pd.DataFrame(strata_rows).to_csv(index=False, lineterminator="\n"))
        title = f"ΔLoss per layer (stratified) — {self.config.model} on {self.config.dataset}"
        write_text(self.folder.file("layers.md"), stratified_markdown(rows, network, title) + pool_note(self.record, network))
        write_json(self.folder.file("summary.json"), summary)
        for leftover in self.folder.round_chunks():  # chunks of a round whose file was written before a kill
            leftover.unlink()
        remove_stale_temporaries(self.folder.parts)
        return summary


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
        f"Network level (mean over {network['layers']} layers): ΔLoss {g(network['delta_loss'])} "
        f"{network_ci_text(network)}, "
        f"mismatch {g(100 * network['mismatch_rate'], '.2f')}%; {network['faults']} injections where a uniform "
        f"campaign needs {g(network['uniform_equivalent_n'], '.0f')} for the same intervals "
        f"(saving {g(network['saving_factor'], '.1f')}x). Per-stratum figures: strata.csv.",
        "",
    ]
    return "\n".join(lines)
