"""The neuron-fault campaign runner: plan, chunked resumable execution, sharding, final assembly.

A campaign folder holds ``campaign.json`` (the configuration, the per-layer plan and the golden-set
facts: everything the final files are computed from), ``parts/`` (one Parquet file per finished chunk
of faults, written atomically, so a SIGKILL loses at most the chunk in flight) and, once every chunk
exists, the final ``faults.parquet``, ``layers.csv``, ``layers.md`` and ``summary.json``. Assembly reads
the parts in (layer order, chunk) order, so a resumed, sharded or merged campaign gives the same bytes
as an uninterrupted one. Wall times go to ``runs.jsonl`` only, to keep the other files reproducible.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from cli_shell import UserError
from resilience.arithmetic import STRICT_FP32, ArithmeticOptionError, from_record
from resilience.bitflip import NumberFormat, get_format
from resilience.engines import get_engine
from resilience.engines.base import Engine, FaultSites, ImageSource, InjectionResult
from resilience.golden import Golden
from resilience.image_pool import (
    ImagePool,
    campaign_images,
    pool_note,
    pool_summary,
    pooled_tables,
    uniform_layer_set,
)
from resilience.improvement_ci import network_interval
from resilience.intervals import uniform_layer_interval
from resilience.layers import LayerInfo, select_layers
from resilience.metrics import CONFIDENCE, LayerStats, score_faults, summarize
from resilience.sampling import leveugle_n, sample_sites
from resilience.storage import (
    read_json,
    read_part,
    record_key,
    remove_stale_temporaries,
    write_json,
    write_parquet,
    write_part,
    write_text,
)

CAMPAIGN_FORMAT = "tgr-neuron-campaign/1"
FAULT_MODEL = "neuron-bitflip-transient"
CLAMP_MODES = ("none", "profile")
T = TypeVar("T")

FAULT_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("fault", pa.int64()),  # position in the layer's fault list
        ("image", pa.int64()),  # index into the evaluated split
        ("index", pa.int64()),  # flat element index within that image's layer output
        ("bit", pa.int16()),
        ("golden_value", pa.float64()),
        ("faulty_value", pa.float64()),  # what the network saw (after the clamp, if any)
        ("label", pa.int64()),
        ("golden_pred", pa.int64()),
        ("faulty_pred", pa.int64()),  # -1: the faulty output holds a NaN or Inf
        ("golden_loss", pa.float64()),
        ("faulty_loss", pa.float64()),
        ("delta_loss", pa.float64()),
        ("finite", pa.bool_()),
        ("mismatch", pa.bool_()),
        ("faulty_top2diff", pa.float64()),
    ]
)


class CampaignError(UserError):
    """A campaign cannot run or be assembled as asked (one-line message)."""


@dataclass(frozen=True)
class CampaignConfig:
    """Everything that determines a campaign's results; a rerun must give an equal config to resume."""

    model: str
    dataset: str
    split: str = "test"
    checkpoint_sha256: str | None = None
    fused_text_head: bool = False
    preset: dict[str, Any] | None = None
    seed: int = 0
    injections: int | None = 512  # per layer; None: Leveugle n from margin/confidence
    margin: float | None = None
    confidence: float | None = None
    golden: str = "correct"
    max_images: int | None = None
    layers: str | None = None
    format: str = "fp32"
    clamp: str = "none"
    profile_images: int | None = None
    engine: str = "reference"
    batch_size: int = 64
    chunk_size: int = 256
    device: str = "cpu"  # device type: the floating-point results of CPU and CUDA differ in the last bits
    # arithmetic.Arithmetic.describe(); campaigns recorded before it existed ran in strict fp32
    arithmetic: dict[str, Any] = field(default_factory=STRICT_FP32.describe)

    def __post_init__(self) -> None:
        if (self.injections is None) == (self.margin is None):
            raise CampaignError("give either --injections N or --margin E (with --confidence C)")
        if self.injections is not None and self.injections < 1:
            raise CampaignError("--injections must be at least 1")
        if self.margin is not None and (self.confidence is None or not 0 < self.margin < 1 or not 0 < self.confidence < 1):
            raise CampaignError("--margin and --confidence must both lie in (0, 1)")
        if self.clamp not in CLAMP_MODES:
            raise CampaignError(f"unknown --clamp {self.clamp!r}; choose one of {', '.join(CLAMP_MODES)}")
        if self.clamp == "profile" and not self.profile_images:
            raise CampaignError("--clamp profile needs --profile-images K >= 1")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise CampaignError("--batch-size and --chunk-size must be at least 1")
        if self.chunk_size % self.batch_size:
            # chunk boundaries then never split a batch, so batches are the same whatever was resumed
            raise CampaignError("--chunk-size must be a multiple of --batch-size")
        get_format(self.format)
        try:
            amp = from_record(self.arithmetic).amp
        except (TypeError, ArithmeticOptionError) as exc:
            raise CampaignError(f"bad arithmetic {self.arithmetic!r}: {exc}") from None
        if amp and self.format != "fp32":
            raise CampaignError("--amp runs an fp32 model under autocast: it needs --format fp32")

    @property
    def fault_format(self) -> NumberFormat:
        """The format of the layer outputs faults hit: the autocast dtype under --amp, else the model's."""
        return get_format(from_record(self.arithmetic).amp or self.format)


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the campaign and its number of injections."""

    name: str
    kind: str
    out_shape: tuple[int, ...]
    order: int
    n: int

    @property
    def neurons(self) -> int:
        """Output elements per image."""
        return math.prod(self.out_shape)

    def info(self) -> LayerInfo:
        """The layer as the engines know it."""
        return LayerInfo(self.name, self.kind, self.out_shape, self.order)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        """Inverse of ``asdict``."""
        return cls(d["name"], d["kind"], tuple(d["out_shape"]), int(d["order"]), int(d["n"]))


@dataclass(frozen=True)
class Unit:
    """A chunk of one layer's fault list: the unit of work, persistence and sharding."""

    layer: int  # position in the plan
    chunk: int
    start: int
    stop: int


@dataclass
class RunStats:
    """What one invocation did."""

    faults: int = 0
    skipped: int = 0
    seconds: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)  # seconds spent on each layer


def plan_layers(config: CampaignConfig, layers: Sequence[LayerInfo], golden_set_size: int) -> list[LayerPlan]:
    """The selected layers with their injection counts (fixed, or Leveugle's n over the layer's population)."""
    bits = config.fault_format.bits
    try:
        chosen = select_layers(list(layers), config.layers)
    except ValueError as exc:
        raise CampaignError(str(exc)) from None
    plans = []
    for layer in chosen:
        if config.injections is not None:
            n = config.injections
        else:
            n = leveugle_n(golden_set_size * layer.neurons * bits, config.margin, config.confidence)
        plans.append(LayerPlan(layer.name, layer.kind, layer.out_shape, layer.order, n))
    return plans


def layer_sites(config: CampaignConfig, plan: LayerPlan, golden_set: torch.Tensor) -> FaultSites:
    """The fault list of one layer, derived from (seed, layer name) alone."""
    return sample_sites(config.seed, plan.name, plan.neurons, golden_set, plan.n, config.fault_format.bits)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` (0 <= i < k) -> (i, k)."""
    try:
        i, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise CampaignError(f"--shard must look like i/k (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < k:
        raise CampaignError(f"--shard {text}: need 0 <= i < k")
    return i, k


class CampaignFolder:
    """Where every file of a campaign folder lives (the only place these names are spelled)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    @property
    def record(self) -> Path:
        """``campaign.json``: configuration, plan, golden facts and provenance."""
        return self.out / "campaign.json"

    @property
    def parts(self) -> Path:
        """Folder of finished parts (chunks, rounds)."""
        return self.out / "parts"

    def chunk(self, layer: int, chunk: int) -> Path:
        """A finished chunk of a uniform campaign."""
        return self.parts / f"{layer:04d}-{chunk:05d}.parquet"

    def round(self, layer: int, round_index: int, chunk: int | None = None) -> Path:
        """A finished round of a stratified campaign's layer (or one chunk of it, while the round runs)."""
        suffix = "" if chunk is None else f"-c{chunk:05d}"
        return self.parts / f"{layer:04d}-r{round_index:04d}{suffix}.parquet"

    def round_chunks(self) -> list[Path]:
        """Chunk files of rounds (left behind when a kill came after the round's file was written)."""
        return sorted(self.parts.glob("*-c*.parquet"))

    def layer_result(self, layer: int) -> Path:
        """The estimate of a finished stratified layer."""
        return self.out / "layers" / f"{layer:04d}.json"

    def file(self, name: str) -> Path:
        """A file directly in the folder: final outputs, ``golden.pt``, ``runs.jsonl``."""
        return self.out / name


def claim_folder(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``campaign.json`` for ``record``, or check that the stored one describes the same campaign.

    Returns the record in the folder (its provenance is the first shard's).
    """
    path = CampaignFolder(out).record
    if not path.is_file():
        write_json(path, record)
        return record
    stored = read_json(path)
    was = from_record(stored.get("config", {}).get("arithmetic")).describe()
    if was != record["config"]["arithmetic"]:
        raise CampaignError(f"{out} holds a campaign in another arithmetic ({was}, asked for "
                            f"{record['config']['arithmetic']}); use another --out")
    differs = record_difference(stored, record)
    if differs:
        raise CampaignError(f"{out} holds a different campaign ({differs} differs); use another --out")
    return stored


def record_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first entry of two campaign records that differs, provenance aside (which shards may vary)."""
    return next((key for key in {**a, **b} if key != "provenance" and a.get(key) != b.get(key)), None)


def read_record(out: Path) -> dict[str, Any]:
    """The ``campaign.json`` of an existing campaign folder."""
    path = CampaignFolder(out).record
    if not path.is_file():
        raise CampaignError(f"{out} is not a campaign folder (no campaign.json)")
    return read_json(path)


class RecordedCampaign:
    """What a campaign of either sampling reads from its ``campaign.json``."""

    def __init__(self, out: Path, record: dict[str, Any]) -> None:
        self.folder = CampaignFolder(out)
        self.out = self.folder.out
        self.record = record
        self.config = CampaignConfig(**record["config"])
        self.plans = [LayerPlan.from_dict(d) for d in record["plan"]]
        self.key = campaign_key(record)


class UniformCampaign(RecordedCampaign):
    """A uniform campaign's folder: its record, finished chunks and final files."""

    unit_name = "chunks"  # what ``missing()`` counts

    def units(self) -> list[Unit]:
        """All chunks of all layers in plan order."""
        size = self.config.chunk_size
        return [
            Unit(i, c, start, min(start + size, plan.n))
            for i, plan in enumerate(self.plans)
            for c, start in enumerate(range(0, plan.n, size))
        ]

    def part_path(self, unit: Unit) -> Path:
        """Where a finished chunk is stored."""
        return self.folder.chunk(unit.layer, unit.chunk)

    def is_done(self, unit: Unit) -> bool:
        """True when the chunk's file exists (files appear by atomic rename, so they are complete)."""
        return self.part_path(unit).is_file()

    def missing(self) -> list[Unit]:
        """Chunks not finished yet."""
        return [unit for unit in self.units() if not self.is_done(unit)]

    def read_part(self, unit: Unit) -> pa.Table:
        """A finished chunk, checked to belong to this campaign and to be intact."""
        return read_part(self.part_path(unit), self.key, FAULT_SCHEMA)

    def verify_parts(self) -> None:
        """Check every finished chunk before it is trusted (resume, merge); PartError names a bad file."""
        for unit in self.units():
            if self.is_done(unit):
                self.read_part(unit)

    def run(self, engine: Engine, golden: Golden, source: ImageSource, *, shard: tuple[int, int] = (0, 1),
            progress: bool = True, after_chunk: Callable[[int], None] | None = None) -> RunStats:
        """Run this shard's unfinished chunks (round-robin over chunks, so layers of any size balance).

        The chunks already on disk are checked first; ``after_chunk`` gets the size of each chunk run.
        """
        self.verify_parts()
        units = shard_units(self.units(), shard)
        return run_units(self, units, engine, golden, source, progress=progress, after_chunk=after_chunk)

    def adopt(self, shard: UniformCampaign) -> None:
        """Copy the chunks another shard's folder finished (and this one lacks), each checked first."""
        for unit in shard.units():
            if shard.is_done(unit) and not self.is_done(unit):
                read_part(shard.part_path(unit), self.key, FAULT_SCHEMA)
                self.folder.parts.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shard.part_path(unit), self.part_path(unit))

    def assemble(self) -> dict[str, Any]:
        """Write faults.parquet, layers.csv, layers.md and summary.json from the finished chunks."""
        missing = self.missing()
        if missing:
            raise CampaignError(f"{self.out}: {len(missing)} of {len(self.units())} chunks are not finished yet")
        import pandas as pd  # only assembly needs it

        faults = pa.concat_tables([self.read_part(unit) for unit in self.units()])
        rows = layer_rows(self, faults)
        pool = ImagePool.from_record(self.record)
        layers = uniform_layer_set(faults, self.config.fault_format.bits, pool)
        network = network_level(rows) | network_interval(layers)
        if pool is not None:
            pooled_tables(layers, rows, network, CONFIDENCE)
        title = f"ΔLoss per layer — {self.config.model} on {self.config.dataset}"
        summary = campaign_summary(self.record, network, {p.name: p.n for p in self.plans},
                                   "normal: mean ± z·s/√n over finite faults; mismatch: Wilson score")
        write_parquet(self.folder.file("faults.parquet"), faults)
        write_text(self.folder.file("layers.csv"), pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
        write_text(self.folder.file("layers.md"), layers_markdown(rows, network, title) + pool_note(self.record, network))
        write_json(self.folder.file("summary.json"), summary)
        remove_stale_temporaries(self.folder.parts)
        return summary


def campaign_summary(record: dict[str, Any], network: dict[str, Any], n_per_layer: dict[str, int],
                     ci: str) -> dict[str, Any]:
    """The content of summary.json: network figures, provenance, config, golden facts (both samplings)."""
    extra = ({"stratified": record["stratified"]} if "stratified" in record else {}) | pool_summary(record)
    return {
        "network": network,
        **record["provenance"],
        "config": record["config"],
        **extra,
        "fault_model": FAULT_MODEL,
        "n_per_layer": n_per_layer,
        "golden": record["golden"],
        "confidence": CONFIDENCE,
        "ci": ci,
    }


def campaign_key(record: dict[str, Any]) -> str:
    """The key stamped on a campaign's parts: its record without the provenance (which shards may vary)."""
    return record_key({k: v for k, v in record.items() if k != "provenance"})


def shard_units(units: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """Round-robin share of shard ``i`` of ``k`` of the units of work (chunks or whole layers)."""
    i, k = shard
    return [unit for j, unit in enumerate(units) if j % k == i]


def chunk_table(plan: LayerPlan, first: int, sites: FaultSites, result: InjectionResult, golden: Golden) -> pa.Table:
    """The fault records of one chunk whose first fault has number ``first`` in its layer's fault list."""
    rows = golden.rows(sites.image)
    labels, golden_pred, golden_loss = golden.labels[rows], golden.pred[rows], golden.loss[rows]
    outcome = score_faults(result.faulty_logits, labels, golden_pred, golden_loss)
    n = len(sites)
    columns = {
        "layer": pa.array([plan.name] * n, pa.string()),
        "fault": np.arange(first, first + n, dtype=np.int64),
        "image": sites.image.numpy(),
        "index": sites.index.numpy(),
        "bit": sites.bit.numpy().astype(np.int16),
        "golden_value": result.golden_value.double().numpy(),
        "faulty_value": result.faulty_value.double().numpy(),
        "label": labels.numpy(),
        "golden_pred": golden_pred.numpy(),
        "faulty_pred": outcome.faulty_pred.numpy(),
        "golden_loss": golden_loss.numpy(),
        "faulty_loss": outcome.faulty_loss.numpy(),
        "delta_loss": outcome.delta_loss.numpy(),
        "finite": outcome.finite.numpy(),
        "mismatch": outcome.mismatch.numpy(),
        "faulty_top2diff": outcome.faulty_top2diff.numpy(),
    }
    return pa.table(columns, schema=FAULT_SCHEMA)


def run_units(
    cdir: UniformCampaign,
    units: Sequence[Unit],
    engine: Engine,
    golden: Golden,
    source: ImageSource,
    *,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> RunStats:
    """Run the unfinished ``units`` layer by layer (a progress bar each) and persist every chunk."""
    stats = RunStats()
    golden_set = campaign_images(cdir.record, golden.golden_set(cdir.config.golden))
    by_layer: dict[int, list[Unit]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    t0 = time.perf_counter()
    for position, (layer_pos, layer_units) in enumerate(by_layer.items(), 1):
        plan = cdir.plans[layer_pos]
        todo = [u for u in layer_units if not cdir.is_done(u)]
        done = sum(u.stop - u.start for u in layer_units) - sum(u.stop - u.start for u in todo)
        stats.skipped += done
        if not todo:
            continue
        sites = layer_sites(cdir.config, plan, golden_set)
        t_layer = time.perf_counter()
        with tqdm(
            total=sum(u.stop - u.start for u in layer_units), initial=done, unit="fault", disable=not progress,
            desc=f"[{position}/{len(by_layer)}] {plan.name}", dynamic_ncols=True, leave=True,
        ) as bar:
            for unit in todo:
                chunk = sites.slice(unit.start, unit.stop)
                result = engine.run(plan.info(), chunk, source)
                write_part(cdir.part_path(unit), chunk_table(plan, unit.start, chunk, result, golden), cdir.key)
                stats.faults += len(chunk)
                bar.update(len(chunk))
                if after_chunk is not None:
                    after_chunk(len(chunk))
        stats.per_layer[plan.name] = time.perf_counter() - t_layer
    stats.seconds = time.perf_counter() - t0
    return stats


def layer_rows(cdir: UniformCampaign, faults: pa.Table) -> list[dict[str, Any]]:
    """One summary row per layer (plan order)."""
    layer_col = faults.column("layer").to_numpy(zero_copy_only=False)
    delta, finite, mismatch, bit = (faults.column(c).to_numpy() for c in ("delta_loss", "finite", "mismatch", "bit"))
    bits = cdir.config.fault_format.bits
    clamp = cdir.record.get("clamp_max") or {}
    rows = []
    for plan in cdir.plans:
        mask = layer_col == plan.name
        stats: LayerStats = summarize(delta[mask], finite[mask], mismatch[mask], CONFIDENCE)
        # the normal interval undercovers heavy-tailed ΔLoss: report the bit-post-stratified Hall interval
        low, high = uniform_layer_interval(delta[mask], finite[mask], bit[mask], bits, CONFIDENCE)
        stats = replace(stats, ci_low=low, ci_high=high)
        row = {
            "layer": plan.name,
            "order": plan.order,
            "kind": plan.kind,
            "out_shape": "x".join(map(str, plan.out_shape)),
            "neurons": plan.neurons,
            **stats.as_dict(),
        }
        if clamp:
            row["clamp_max_abs"] = clamp[plan.name]
        rows.append(row)
    return rows


def network_level(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Network-level numbers: the mean over layers of the layer ΔLoss (and of the mismatch rate)."""
    losses = [r["mean_delta_loss"] for r in rows if not math.isnan(r["mean_delta_loss"])]
    return {
        "delta_loss": float(np.mean(losses)) if losses else math.nan,
        "mismatch_rate": float(np.mean([r["mismatch_rate"] for r in rows])),
        "layers": len(rows),
        "layers_without_finite_faults": len(rows) - len(losses),
        "faults": int(sum(r["n"] for r in rows)),
        "non_finite": int(sum(r["non_finite"] for r in rows)),
        "mismatches": int(sum(r["mismatches"] for r in rows)),
    }


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def network_ci_text(network: dict[str, Any]) -> str:
    """The network line's interval: Hall's interval of the mean over layers, whose moments add up."""
    pct = int(round(CONFIDENCE * 100))
    return (f"({pct}% CI [{_fmt(network.get('ci_low', math.nan), '.4g')}, {_fmt(network.get('ci_high', math.nan), '.4g')}], "
            "the layers' variances and third cumulants added up)")


def layers_markdown(rows: Sequence[dict[str, Any]], network: dict[str, Any], title: str) -> str:
    """The per-layer table as Markdown, with the network-level line below."""
    pct = int(round(CONFIDENCE * 100))
    lines = [
        f"# {title}",
        "",
        f"| # | layer | kind | neurons | n | mean ΔLoss | {pct}% CI | std | mismatch % | {pct}% CI (Wilson) | non-finite |",
        "|---:|---|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['order']} | `{r['layer']}` | {r['kind']} | {r['neurons']} | {r['n']} | {_fmt(r['mean_delta_loss'], '.4g')} "
            f"| [{_fmt(r['ci_low'], '.4g')}, {_fmt(r['ci_high'], '.4g')}] | {_fmt(r['std_delta_loss'], '.4g')} "
            f"| {_fmt(100 * r['mismatch_rate'], '.2f')} | [{_fmt(100 * r['mismatch_ci_low'], '.2f')}, "
            f"{_fmt(100 * r['mismatch_ci_high'], '.2f')}] | {r['non_finite']} |"
        )
    lines += [
        "",
        f"Network level (mean over {network['layers']} layers): ΔLoss {_fmt(network['delta_loss'], '.4g')} "
        f"{network_ci_text(network)}, mismatch {_fmt(100 * network['mismatch_rate'], '.2f')}%, {network['faults']} faults, "
        f"{network['non_finite']} non-finite (left out of the ΔLoss means).",
        "",
    ]
    return "\n".join(lines)


def append_run_log(out: Path, entry: dict[str, Any]) -> None:
    """Append one line about an invocation (timings) to runs.jsonl; small O_APPEND writes do not interleave."""
    with open(CampaignFolder(out).file("runs.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def golden_facts(golden: Golden, mode: str) -> dict[str, Any]:
    """Golden-set numbers recorded in campaign.json and summary.json."""
    ids = golden.golden_set(mode)
    rows = golden.rows(ids)
    return {
        "mode": mode,
        "evaluated_images": len(golden.ids),
        "golden_set_size": len(ids),
        "accuracy": golden.accuracy,
        "mean_top2diff": float(golden.top2diff[rows].mean()) if len(ids) else math.nan,
        "mean_top2diff_all": float(golden.top2diff.mean()),
    }


def build_record(
    config: CampaignConfig,
    plans: Sequence[LayerPlan],
    golden: Golden,
    clamp_max: dict[str, float] | None,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The content of campaign.json."""
    return {
        "format": CAMPAIGN_FORMAT,
        "config": asdict(config),
        "plan": [{**asdict(p), "out_shape": list(p.out_shape)} for p in plans],
        "golden": golden_facts(golden, config.golden),
        "clamp_max": clamp_max,
        "provenance": provenance,
    }


def prepare_engine(
    config: CampaignConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    golden: Golden,
    clamp_max: dict[str, float] | None,
    device: torch.device | str,
) -> tuple[list[LayerPlan], dict[str, float] | None, Engine]:
    """Check the inputs of a campaign, plan its layers and build its engine: (plans, clamp, engine).

    Shared by both samplings (``resilience.runner``).
    """
    fmt: NumberFormat = get_format(config.format)
    golden_set = golden.golden_set(config.golden)
    if len(golden_set) == 0:
        raise CampaignError("the golden set is empty (no correctly classified image with Top2Diff > 0)")
    if config.clamp == "profile" and clamp_max is None:
        raise CampaignError("--clamp profile needs the layer profile")
    if torch.device(device).type != config.device:
        raise CampaignError(f"the config says device {config.device} but the model runs on {device}")
    plans = plan_layers(config, layers, len(golden_set))
    clamp = {p.name: clamp_max[p.name] for p in plans} if config.clamp == "profile" and clamp_max else None
    engine = get_engine(config.engine)(
        model, [p.info() for p in plans], fmt, clamp=clamp, device=device, batch_size=config.batch_size
    )
    return plans, clamp, engine
