"""Atomic, deterministic file outputs of campaigns (temp file in the same folder, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cli_shell import UserError

PART_KEY = b"tgr.campaign_key"  # schema metadata of a part: the campaign it belongs to ...
PART_SHA256 = b"tgr.sha256"  # ... and a checksum of its rows


class PartError(UserError):
    """A persisted part belongs to another campaign or is damaged (the message names the file)."""


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


def record_key(record: dict[str, Any]) -> str:
    """A short hash of a JSON-able campaign record (equal records, equal keys)."""
    text = json.dumps(record, sort_keys=True, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def table_sha256(table: pa.Table) -> str:
    """SHA-256 of a table's rows and schema (Arrow IPC bytes, independent of how it is chunked)."""
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def write_part(path: Path, table: pa.Table, key: str) -> Path:
    """Write a campaign part atomically, stamped with the campaign ``key`` and a checksum of its rows."""
    metadata = {PART_KEY: key.encode("ascii"), PART_SHA256: table_sha256(table).encode("ascii")}
    return write_parquet(path, table.replace_schema_metadata(metadata))


def read_part(path: Path, key: str, schema: pa.Schema) -> pa.Table:
    """A part written by :func:`write_part` for campaign ``key``, checked; PartError names a foreign or damaged file."""
    redo = "delete it and rerun the same command to redo it"
    if not Path(path).is_file():
        raise PartError(f"{path} is missing; rerun the campaign's command to redo it")
    try:
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        table = table.replace_schema_metadata(None).cast(schema)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PartError(f"{path} is damaged (corrupt or truncated: {str(exc).splitlines()[0]}); {redo}") from None
    found = metadata.get(PART_KEY, b"").decode("ascii", "replace")
    if found != key:
        raise PartError(f"{path} belongs to another campaign (key {found or 'missing'}, this campaign {key}); "
                        "remove it, or run that campaign in its own folder")
    if metadata.get(PART_SHA256, b"").decode("ascii", "replace") != table_sha256(table):
        raise PartError(f"{path} is damaged (its rows do not match its checksum); {redo}")
    return table


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by killed writers (call only when no writer is active)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
