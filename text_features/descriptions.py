"""Descriptions files: per-class lists of sentences, in this project's format or CuPL's plain one.

This project's format (written by ``python -m text_features.describe``)::

    {"format": "tgr-descriptions/1",
     "meta": {"source": "...", "dataset": "...", ...},
     "descriptions": {"<class name>": ["<sentence>", ...], ...}}

A plain CuPL-style JSON ``{"<class name>": ["<sentence>", ...], ...}`` is read as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DescriptionsError
from .fileio import atomic_write_text

FORMAT = "tgr-descriptions/1"


@dataclass
class DescriptionSet:
    """Descriptions per class name (in file order) and the file's metadata."""

    descriptions: dict[str, list[str]]
    meta: dict[str, Any] = field(default_factory=dict)


def _clean_list(name: str, values: Any, path: Path) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DescriptionsError(f"{path}: the descriptions of class {name!r} are not a list of strings")
    return [v.strip() for v in values if v.strip()]


def parse_descriptions(obj: Any, path: str | Path = "<descriptions>") -> DescriptionSet:
    """Interpret a decoded JSON object as a :class:`DescriptionSet` (either accepted layout)."""
    path = Path(path)
    if not isinstance(obj, dict):
        raise DescriptionsError(f"{path}: expected a JSON object mapping class names to lists of descriptions")
    if isinstance(obj.get("descriptions"), dict) and ("format" in obj or "meta" in obj):
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise DescriptionsError(f"{path}: 'meta' must be a JSON object")
        raw = obj["descriptions"]
    else:
        meta = {"source": "plain {class: [descriptions]} file"}
        raw = obj
    descriptions = {str(name): _clean_list(name, values, path) for name, values in raw.items()}
    return DescriptionSet(descriptions, dict(meta))


def load_descriptions(path: str | Path) -> DescriptionSet:
    """Read a descriptions JSON file (this project's format or CuPL's plain mapping)."""
    path = Path(path)
    if not path.is_file():
        raise DescriptionsError(f"descriptions file not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DescriptionsError(f"{path} is not valid JSON: {e}") from e
    return parse_descriptions(obj, path)


def save_descriptions(path: str | Path, descriptions: dict[str, list[str]], meta: dict[str, Any]) -> None:
    """Write a descriptions file in this project's format (atomically, readable by humans)."""
    obj = {"format": FORMAT, "meta": meta, "descriptions": descriptions}
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def normalize_name(name: str) -> str:
    """Loose key for matching class names: case, underscores, hyphens and spacing ignored."""
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


def match_classes(
    descriptions: dict[str, list[str]], class_names: Sequence[str], by: str = "name", source: str = "descriptions"
) -> list[list[str]]:
    """The descriptions of each class in ``class_names`` order.

    ``by="name"`` matches keys to class names exactly, then ignoring case/underscores/hyphens;
    ``by="order"`` takes the file's entries in order (for files whose keys are spelt differently,
    e.g. CuPL's ImageNet file).
    """
    if by == "order":
        if len(descriptions) != len(class_names):
            raise DescriptionsError(
                f"{source} has {len(descriptions)} classes but the dataset has {len(class_names)}; "
                "--match-by order needs the same number in the same order"
            )
        lists = list(descriptions.values())
    elif by == "name":
        loose = {}
        for key, values in descriptions.items():
            loose.setdefault(normalize_name(key), values)
        lists, missing = [], []
        for name in class_names:
            values = descriptions.get(name)
            if values is None:
                values = loose.get(normalize_name(name))
            if values is None:
                missing.append(name)
            lists.append(values or [])
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            hint = (" (same number of entries: try --match-by order)"
                    if len(descriptions) == len(class_names) else "")
            raise DescriptionsError(f"{source} lacks {len(missing)} of {len(class_names)} classes: {shown}{hint}")
    else:
        raise ValueError(f"unknown match mode {by!r} (use 'name' or 'order')")
    for name, values in zip(class_names, lists, strict=True):
        if not values:
            raise DescriptionsError(f"{source} has no descriptions for class {name!r}")
    return lists
