"""Per-run metrics log: one CSV row per epoch (and optionally TensorBoard scalars)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


class CSVLog:
    """Append one row per epoch to ``path``; new columns extend the header (the file is rewritten).

    ``truncate_from_epoch`` drops rows of epochs that a resumed run is about to redo, so the log of a
    resumed run reads like one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, truncate_from_epoch: int | None = None) -> None:
        self.path = Path(path)
        self.fields: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)
            if truncate_from_epoch is not None:
                self.rows = [r for r in self.rows if int(r.get("epoch", -1)) < truncate_from_epoch]
                self._rewrite()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.exists():
            self.fields += new
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)


class TensorBoardLog:
    """Scalars to TensorBoard (needs the optional ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is optional
            raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
