"""Class names of a dataset: from the data package, or from a text file (one name per line)."""

from __future__ import annotations

from pathlib import Path

from .errors import TextFeaturesError


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one per line in class-index order (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise TextFeaturesError(f"class-names file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextFeaturesError(f"class-names file {path} is not UTF-8 text (byte {exc.start})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise TextFeaturesError(f"class-names file {path} is empty")
    return names


def class_names_for(dataset: str | None, class_names_file: str | Path | None = None) -> list[str]:
    """The class names to build for: ``class_names_file`` if given, else ``data.get_class_names(dataset)``."""
    if class_names_file:
        return read_class_names(class_names_file)
    if not dataset:
        raise TextFeaturesError("name a dataset (--dataset) or a class-names file (--class-names)")
    try:
        import data
    except ImportError as e:
        raise TextFeaturesError(f"the data package is not importable ({e}); pass --class-names FILE") from e
    known = tuple(getattr(data, "DATASETS", ()))
    if known and dataset not in known:
        raise TextFeaturesError(f"unknown dataset {dataset!r} (known: {', '.join(known)}); or pass --class-names FILE")
    unavailable = getattr(data, "DatasetUnavailable", LookupError)
    try:
        return list(data.get_class_names(dataset))
    except (LookupError, ValueError, unavailable) as e:
        raise TextFeaturesError(f"no class names for {dataset!r}: {e}") from e
