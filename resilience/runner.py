"""One runner for neuron-fault campaigns, whatever the sampling.

A *sampling* decides how faults are drawn and estimated: :class:`UniformSampling` (the paper's fixed n
per layer, chunked) or :class:`StratifiedSampling` (bits as strata, adaptive rounds; docs/stratified.md).
Each has a folder-backed *campaign* type (``resilience.campaign.UniformCampaign``,
``resilience.stratified_campaign.StratifiedCampaign``) with the same small protocol: ``run`` this
shard's work, list what is ``missing``, ``adopt`` another shard's finished work, ``assemble`` the final
files. The runner plans, claims the folder and runs; ``open_campaign`` reopens any folder from its
``campaign.json``, so resuming, merging and assembling never ask which sampling it was.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from resilience import stratified as st
from resilience.bitflip import get_format
from resilience.campaign import (
    CAMPAIGN_FORMAT,
    CampaignConfig,
    CampaignError,
    CampaignFolder,
    RunStats,
    UniformCampaign,
    build_record,
    claim_folder,
    prepare_engine,
    read_record,
    record_difference,
)
from resilience.engines.base import Engine, ImageSource
from resilience.golden import Golden
from resilience.image_pool import pool_entries, pool_matches
from resilience.layers import LayerInfo
from resilience.metrics import CONFIDENCE
from resilience.stratified_campaign import STRATIFIED_FORMAT, StratifiedCampaign

SAMPLINGS = ("uniform", "stratified")
# inject.py options that only mean something with --sampling stratified (argparse dest names)
STRATIFIED_OPTIONS = ("strata", "target_ci", "target_ci_abs", "max_injections", "pilot", "defensive")


class Campaign(Protocol):
    """An opened campaign folder of either sampling."""

    unit_name: str  # what ``missing()`` counts: chunks or layers
    out: Path
    record: dict[str, Any]

    def run(self, engine: Engine, golden: Golden, source: ImageSource, *, shard: tuple[int, int] = (0, 1),
            progress: bool = True, after_chunk: Callable[[int], None] | None = None) -> RunStats:
        """Run (or resume) this shard's unfinished work."""

    def missing(self) -> list[Any]:
        """Work not finished yet, in any shard."""

    def adopt(self, shard: Any) -> None:
        """Copy the work another shard's folder of the same campaign finished."""

    def assemble(self) -> dict[str, Any]:
        """Write the final files; returns the summary."""


class Sampling(Protocol):
    """How a campaign draws its faults: what it records and which campaign type runs it."""

    name: ClassVar[str]

    def campaign_config(self, config: CampaignConfig) -> CampaignConfig:
        """``config`` as this sampling records it."""

    def entries(self) -> dict[str, Any]:
        """What campaign.json holds beyond the shared record (its format, the sampling's options)."""

    def planned_faults(self, injections: int | None, fmt_name: str) -> int:
        """The most faults one layer's plan holds (the memory check before any work)."""

    def campaign(self, out: Path, record: dict[str, Any]) -> Campaign:
        """The campaign type of this sampling over ``out``."""


@dataclass(frozen=True)
class UniformSampling:
    """The paper's sampling: a fixed n per layer (or Leveugle's n), site uniform over image, element and bit."""

    name: ClassVar[str] = "uniform"

    def campaign_config(self, config: CampaignConfig) -> CampaignConfig:
        """Unchanged."""
        return config

    def entries(self) -> dict[str, Any]:
        """The uniform format."""
        return {"format": CAMPAIGN_FORMAT}

    def planned_faults(self, injections: int | None, fmt_name: str) -> int:
        """``injections`` (a --margin plan is bounded by the Leveugle formula)."""
        return injections or 0

    def campaign(self, out: Path, record: dict[str, Any]) -> UniformCampaign:
        """A uniform campaign."""
        return UniformCampaign(out, record)


@dataclass(frozen=True)
class StratifiedSampling:
    """Bits (or bit fields) as strata, Neyman-allocated rounds, adaptive stopping (docs/stratified.md)."""

    adaptive: st.AdaptiveConfig
    grouping: str = "bit"
    name: ClassVar[str] = "stratified"

    def __post_init__(self) -> None:
        if self.grouping not in st.GROUPINGS:
            raise CampaignError(f"unknown stratum grouping {self.grouping!r}; choose one of {', '.join(st.GROUPINGS)}")

    def campaign_config(self, config: CampaignConfig) -> CampaignConfig:
        """The plan's n is the cap; no Leveugle margin."""
        return replace(config, injections=self.adaptive.max_injections, margin=None, confidence=None)

    def entries(self) -> dict[str, Any]:
        """The stratified format and options."""
        return {"format": STRATIFIED_FORMAT, "stratified": {"grouping": self.grouping, **asdict(self.adaptive)}}

    def planned_faults(self, injections: int | None, fmt_name: str) -> int:
        """The cap, or the pilot round when that is larger."""
        strata = st.make_strata(get_format(fmt_name), self.grouping)
        return max(self.adaptive.max_injections, self.adaptive.pilot * len(strata))

    def campaign(self, out: Path, record: dict[str, Any]) -> StratifiedCampaign:
        """A stratified campaign."""
        return StratifiedCampaign(out, record)


UNIFORM = UniformSampling()
CAMPAIGN_TYPES: dict[str, Callable[[Path, dict[str, Any]], Campaign]] = {
    CAMPAIGN_FORMAT: UniformCampaign, STRATIFIED_FORMAT: StratifiedCampaign,
}


def open_campaign(out: Path) -> Campaign:
    """An existing campaign folder of either sampling, as its ``campaign.json`` describes it."""
    record = read_record(out)
    kind = CAMPAIGN_TYPES.get(record.get("format"))
    if kind is None:
        raise CampaignError(f"{CampaignFolder(out).record}: unknown format {record.get('format')!r}")
    return kind(out, record)


def execute(
    out: Path,
    config: CampaignConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    golden: Golden,
    source: ImageSource,
    *,
    sampling: Sampling = UNIFORM,
    provenance: dict[str, Any] | None = None,
    clamp_max: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    log: Callable[[str], None] = print,
    after_chunk: Callable[[int], None] | None = None,
    image_pool: int | None = None,
) -> tuple[Campaign, RunStats]:
    """Plan the campaign, claim its folder, run this shard's unfinished work; the caller assembles once
    ``missing()`` is empty.

    ``model`` must already be in evaluation mode, in the config's number format and on its device;
    ``layers`` are all its discovered layers; ``golden`` holds its fault-free outputs; ``clamp_max`` is
    the layer profile (``clamp=profile`` only). ``after_chunk`` is called with the size of every chunk
    of faults finished. ``image_pool`` K draws the faults' images from a pool of K golden images
    (docs/image_pool.md; None or K >= the golden set: all of them).
    """
    config = sampling.campaign_config(config)
    plans, clamp, engine = prepare_engine(config, model, layers, golden, clamp_max, device)
    record = build_record(config, plans, golden, clamp, {**(provenance or {}), "engine": engine.describe()})
    try:
        pool = pool_entries(config.seed, golden.golden_set(config.golden), image_pool)
    except ValueError as exc:
        raise CampaignError(str(exc)) from None
    campaign = sampling.campaign(out, claim_folder(out, record | sampling.entries() | pool))
    if config.injections is None:
        counts = [p.n for p in plans]
        log(f"Leveugle n per layer (margin {config.margin}, confidence {config.confidence}): "
            f"{min(counts)}..{max(counts)}, {sum(counts)} in all")
    stats = campaign.run(engine, golden, source, shard=shard, progress=progress, after_chunk=after_chunk)
    return campaign, stats


def is_complete(out: Path, config: CampaignConfig, sampling: Sampling, image_pool: int | None = None) -> bool:
    """Whether ``out`` holds this campaign (with this ``image_pool``), finished and assembled (a rerun has
    nothing to do)."""
    if not CampaignFolder(out).file("summary.json").is_file():
        return False
    with contextlib.suppress(CampaignError, TypeError, ValueError, KeyError):
        campaign = open_campaign(out)
        stored = {key: campaign.record.get(key) for key in sampling.entries()}
        return (stored == sampling.entries() and campaign.config == sampling.campaign_config(config)
                and pool_matches(campaign.record, image_pool) and not campaign.missing())
    return False


def merge(sources: Sequence[Path], out: Path) -> dict[str, Any]:
    """Gather the work of shards run into separate folders into ``out`` and assemble the final files."""
    shards = [open_campaign(Path(s)) for s in sources]
    target = CAMPAIGN_TYPES[shards[0].record["format"]](Path(out), claim_folder(Path(out), shards[0].record))
    for shard in shards:
        differs = record_difference(target.record, shard.record)
        if differs:
            raise CampaignError(f"{shard.out} holds a different campaign than {target.out} ({differs} differs)")
        target.adopt(shard)
    return target.assemble()


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
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


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The sampling ``--sampling`` and its options ask for.

    Raises one CampaignError naming the options when they do not fit the sampling chosen.
    """
    options = {name: getattr(args, name) for name in STRATIFIED_OPTIONS if getattr(args, name, None) is not None}
    given = [f"--{name.replace('_', '-')}" for name in options]
    if args.sampling == "uniform":
        if given:
            raise CampaignError(f"{', '.join(given)}: --sampling stratified only (the default is uniform)")
        return UniformSampling()
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
    return StratifiedSampling(adaptive, grouping)
