"""dnn-benchmarks fault lists: read, validate against a model, write (optionally with counts), generate.

Format (one row per fault)::

    Injection,Layer,TensorIndex,Bit,n_injections,masked,non_critical,critical
    0,conv1,"(3, 0, 2, 1)",15,10000,14,9985,1

``Layer`` is a module name (its ``weight``) or a qualified parameter name; ``TensorIndex`` a quoted
index tuple in PyTorch order; ``Bit`` 0 = least significant. The four count columns are optional:
lists that were never run carry only the first four columns (as dnn-benchmarks' generator writes them).
"""

from __future__ import annotations

import csv
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from resilience.bitflip import format_of
from resilience.storage import atomic_write
from resilience.weights.faults import (
    FaultTarget,
    ParameterResolver,
    WeightFault,
    WeightFaultError,
    fault_targets,
    parameter_kind,
    sites_to_faults,
)

BASE_COLUMNS: tuple[str, ...] = ("Injection", "Layer", "TensorIndex", "Bit")
COUNT_COLUMNS: tuple[str, ...] = ("n_injections", "masked", "non_critical", "critical")
REQUIRED_COLUMNS: tuple[str, ...] = ("Layer", "TensorIndex", "Bit")

_INDEX_RE = re.compile(r"^\(\s*(\d+(?:\s*,\s*\d+)*)?\s*,?\s*\)$")


class FaultListError(WeightFaultError):
    """A fault-list file or row that cannot be used (the message names the file and row)."""


@dataclass
class FaultList:
    """Faults in file order, their Injection ids, and the counts the file carried (if any)."""

    faults: list[WeightFault]
    injections: list[int]
    counts: np.ndarray | None = None  # [F, 4] int64: n_injections, masked, non_critical, critical
    lines: list[int] = field(default_factory=list)  # 1-based file line of each row, for error messages
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.faults)

    def head(self, k: int | None) -> FaultList:
        """The first ``k`` faults (all when None)."""
        return self if k is None else self.select(range(min(k, len(self))))

    def select(self, rows: Sequence[int]) -> FaultList:
        """The faults at positions ``rows``, in that order."""
        rows = list(rows)
        return FaultList([self.faults[r] for r in rows], [self.injections[r] for r in rows],
                         None if self.counts is None else self.counts[rows],
                         [self.lines[r] for r in rows] if self.lines else [], self.source)

    def where(self, row: int) -> str:
        """``file line N (Injection I)`` for error messages."""
        line = f" line {self.lines[row]}" if self.lines else f" row {row}"
        return f"{self.source}{line} (Injection {self.injections[row]})"


def parse_index(text: str) -> tuple[int, ...]:
    """Parse a TensorIndex such as ``(3, 0, 2, 1)`` or ``(5,)``; ValueError when malformed."""
    match = _INDEX_RE.match(text.strip())
    if not match or match.group(1) is None:
        raise ValueError(f"TensorIndex {text!r} is not a tuple of non-negative integers such as '(3, 0, 2, 1)'")
    return tuple(int(part) for part in match.group(1).split(","))


def format_index(index: Sequence[int]) -> str:
    """Python's tuple repr, as dnn-benchmarks writes it: ``(3, 0, 2, 1)``, ``(5,)``."""
    return repr(tuple(int(i) for i in index))


def read_fault_list(path: str | os.PathLike, limit: int | None = None) -> FaultList:
    """Read a fault-list CSV (its first ``limit`` faults when given); FaultListError naming the line for any
    malformed row among those read."""
    path = Path(path)
    if not path.is_file():
        raise FaultListError(f"fault list not found: {path}")
    try:
        fault_list = _read_rows(path, limit)
    except UnicodeDecodeError as exc:
        raise FaultListError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start})") from None
    if not fault_list.faults:
        raise FaultListError(f"{path}: no fault rows (only a header)")
    _check_unique(fault_list)
    return fault_list


def _read_rows(path: Path, limit: int | None) -> FaultList:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise FaultListError(f"{path}: empty file")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise FaultListError(f"{path}: header lacks {', '.join(missing)} (expected {','.join(BASE_COLUMNS + COUNT_COLUMNS)})")
        col = {name: header.index(name) for name in header}
        has_counts = all(c in col for c in COUNT_COLUMNS)
        faults, injections, counts, lines = [], [], [], []
        for row in reader:
            if limit is not None and len(faults) == limit:
                break
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise FaultListError(f"{path} line {line}: {len(row)} fields, header has {len(header)}")
            try:
                injection = int(row[col["Injection"]]) if "Injection" in col else len(faults)
                if injection < 0:
                    raise ValueError(f"Injection {injection} is negative")
                layer = row[col["Layer"]].strip()
                if not layer:
                    raise ValueError("empty Layer")
                index = parse_index(row[col["TensorIndex"]])
                bit = int(row[col["Bit"]])
                if has_counts and any(row[col[c]].strip() for c in COUNT_COLUMNS):
                    values = [int(row[col[c]]) for c in COUNT_COLUMNS]
                    if min(values) < 0 or sum(values[1:]) != values[0]:
                        raise ValueError(f"counts {values[1:]} must be non-negative and sum to n_injections {values[0]}")
                    counts.append(values)
            except ValueError as exc:
                raise FaultListError(f"{path} line {line}: {exc}") from None
            faults.append(WeightFault(layer, index, bit))
            injections.append(injection)
            lines.append(line)
    if counts and len(counts) != len(faults):
        raise FaultListError(f"{path}: count columns are filled on some rows only")
    return FaultList(faults, injections, np.asarray(counts, dtype=np.int64) if counts else None, lines, str(path))


def _check_unique(fault_list: FaultList) -> None:
    first_injection: dict[int, int] = {}
    first_site: dict[WeightFault, int] = {}
    for row, (injection, fault) in enumerate(zip(fault_list.injections, fault_list.faults, strict=True)):
        if injection in first_injection:
            raise FaultListError(f"{fault_list.where(row)}: Injection id repeats {fault_list.where(first_injection[injection])}")
        if fault in first_site:
            raise FaultListError(f"{fault_list.where(row)}: same site as {fault_list.where(first_site[fault])}")
        first_injection[injection] = row
        first_site[fault] = row


def validate_fault_list(
    model: nn.Module, fault_list: FaultList, *, include_bias: bool = False, include_bn: bool = False
) -> None:
    """Check every row against ``model``: layer, index range, bit width and parameter kind.

    Raises FaultListError naming the first bad row. Biases and normalisation parameters are refused
    unless enabled, so that a list cannot silently widen the fault population.
    """
    resolver = ParameterResolver(model)
    allowed = {"weight"} | ({"bias"} if include_bias else set()) | ({"norm"} if include_bn else set())
    cache: dict[str, tuple[tuple[int, ...], int]] = {}
    for row, fault in enumerate(fault_list.faults):
        if fault.layer not in cache:
            try:
                _, module, attr = resolver.resolve(fault.layer)
            except WeightFaultError as exc:
                raise FaultListError(f"{fault_list.where(row)}: {exc}") from None
            kind = parameter_kind(module, attr)
            if kind not in allowed:
                hint = {"bias": " (pass --include-bias)", "norm": " (pass --include-bn)"}.get(kind or "", "")
                what = {"bias": "a bias", "norm": "a normalisation parameter"}.get(kind or "", "not a conv/linear weight")
                raise FaultListError(f"{fault_list.where(row)}: {fault.layer} is {what}{hint}")
            param = module._parameters[attr]
            cache[fault.layer] = (tuple(param.shape), format_of(param.dtype).bits)
        shape, bits = cache[fault.layer]
        if len(fault.index) != len(shape) or any(i >= s for i, s in zip(fault.index, shape, strict=False)):
            raise FaultListError(
                f"{fault_list.where(row)}: TensorIndex {format_index(fault.index)} is out of range for "
                f"{fault.layer} of shape {shape}"
            )
        if not 0 <= fault.bit < bits:
            raise FaultListError(f"{fault_list.where(row)}: Bit {fault.bit} is outside [0, {bits - 1}]")


def write_fault_list(path: str | os.PathLike, fault_list: FaultList, counts: np.ndarray | None = None) -> None:
    """Write ``fault_list`` in dnn-benchmarks' format, atomically.

    ``counts`` ([F, 4]: n_injections, masked, non_critical, critical) fills the count columns; without
    it, the list's own counts are written, or only the four fault columns when it has none.
    """
    counts = fault_list.counts if counts is None else np.asarray(counts)
    if counts is not None and counts.shape != (len(fault_list), 4):
        raise ValueError(f"counts must have shape ({len(fault_list)}, 4), not {counts.shape}")

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(BASE_COLUMNS + (COUNT_COLUMNS if counts is not None else ()))
            for row, (injection, fault) in enumerate(zip(fault_list.injections, fault_list.faults, strict=True)):
                cells = [injection, fault.layer, format_index(fault.index), fault.bit]
                if counts is not None:
                    cells += [int(c) for c in counts[row]]
                writer.writerow(cells)

    atomic_write(Path(path), write)


def leveugle_sample_size(population: int, e: float = 0.01, t: float = 2.58, p: float = 0.5) -> float:
    """Leveugle et al. (DATE 2009): faults to inject for margin ``e`` at confidence ``t`` (2.58 = 99%)."""
    if population < 1 or not 0 < e < 1 or t <= 0 or not 0 < p < 1:
        raise WeightFaultError("need population >= 1, 0 < e < 1, t > 0 and 0 < p < 1")
    return population / (1 + e**2 * (population - 1) / (t**2 * p * (1 - p)))


def layer_allocation(targets: Sequence[FaultTarget], e: float, t: float, p: float) -> tuple[float, list[int]]:
    """Leveugle's n over all (element, bit) sites, and faults per target in proportion to its size.

    Each target gets ``ceil(n * numel / total numel)`` (capped at its own site count), as dnn-benchmarks'
    generator does, so no layer falls below its proportional share.
    """
    population = sum(t_.numel * t_.bits for t_ in targets)
    n = leveugle_sample_size(population, e, t, p)
    total = sum(t_.numel for t_ in targets)
    return n, [min(math.ceil(n * t_.numel / total), t_.numel * t_.bits) for t_ in targets]


def generate_fault_list(
    model: nn.Module,
    *,
    seed: int = 0,
    e: float = 0.01,
    t: float = 2.58,
    p: float = 0.5,
    include_bias: bool = False,
    include_bn: bool = False,
) -> FaultList:
    """A statistical fault list over every conv/linear weight (plus biases/norms when enabled).

    Sites are drawn without replacement within each target, from a generator seeded by (seed, layer
    name) alone, so a layer's faults do not depend on the other layers.
    """
    targets = fault_targets(model, include_bias=include_bias, include_bn=include_bn)
    if not targets:
        raise WeightFaultError("the model has no parameters eligible for weight faults")
    _, per_target = layer_allocation(targets, e, t, p)
    faults: list[WeightFault] = []
    for tid, (target, k) in enumerate(zip(targets, per_target, strict=True)):
        rng = np.random.default_rng([seed, zlib.crc32(target.layer.encode())])
        sites = rng.choice(target.numel * target.bits, size=k, replace=False)
        faults += sites_to_faults(targets, np.full(k, tid), sites)
    return FaultList(faults, list(range(len(faults))), source="<generated>")
