"""Atomic, deterministic file outputs of campaigns (temp file in the same folder, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp would leave 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it over ``path``.

    A killed process leaves either the old file or the new one, never a torn one; the temporary name is
    unique so concurrent shards never collide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (key order kept, so equal objects give equal bytes)."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """The JSON object stored at ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: Path, table: pa.Table) -> Path:
    """Write ``table`` atomically as one contiguous Parquet file.

    Chunks are combined first so that the bytes depend on the data alone, not on how the table was
    assembled (resumed and uninterrupted campaigns must give identical files).
    """
    table = table.combine_chunks()
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", write_statistics=True))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by killed writers (call only when no writer is active)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
