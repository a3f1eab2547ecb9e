"""Progress display: a tqdm bar on an interactive terminal, periodic log lines otherwise (batch jobs,
nohup), nothing on non-zero ranks."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Iterate ``iterable`` while showing progress; ``set_postfix`` updates the displayed numbers."""

    def __init__(
        self,
        iterable: Iterable,
        *,
        desc: str,
        enabled: bool = True,
        print_freq: int = 100,
        stream: TextIO | None = None,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.print_freq = print_freq
        self.postfix: dict[str, Any] = {}
        self.bar: tqdm | None = None
        try:
            self.total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self.total = None

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)

    def _line(self, i: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        where = f"{i}/{self.total}" if self.total else str(i)
        stats = "  ".join(f"{k} {_fmt(v)}" for k, v in self.postfix.items())
        print(f"{self.desc} [{where}] {elapsed:.0f}s  {stats}".rstrip(), file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        if self.tty:
            self.bar = tqdm(self.iterable, desc=self.desc, total=self.total, dynamic_ncols=True, file=self.stream)
            try:
                yield from self.bar
            finally:
                self.bar.close()
                self.bar = None
            return
        start = time.perf_counter()
        i = 0
        for i, item in enumerate(self.iterable, start=1):
            yield item
            if self.enabled and self.print_freq > 0 and i % self.print_freq == 0:
                self._line(i, start)
        if self.enabled and self.print_freq > 0 and i % self.print_freq != 0:
            self._line(i, start)
