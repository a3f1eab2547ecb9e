"""Interchangeable injection engines behind :class:`resilience.engines.base.Engine`.

``ENGINES`` maps the ``--engine`` name to its class; an engine registers itself with one line here.
"""

from __future__ import annotations

from resilience.engines.base import Engine, FaultSites, ImageSource, InjectionResult
from resilience.engines.fast import FastEngine
from resilience.engines.reference import EngineError, ReferenceEngine

ENGINES: dict[str, type[Engine]] = {
    ReferenceEngine.name: ReferenceEngine,
    FastEngine.name: FastEngine,
}


def get_engine(name: str) -> type[Engine]:
    """The engine class registered as ``name``."""
    try:
        return ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}") from None


__all__ = ["ENGINES", "Engine", "EngineError", "FaultSites", "ImageSource", "InjectionResult", "get_engine"]
