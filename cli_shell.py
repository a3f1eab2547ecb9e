"""The shell every command line runs in: bad input becomes one ``error: ...`` line and exit code 2.

Entry points call ``sys.exit(run_cli(lambda: main(argv)))``. Errors that describe bad input derive from
:class:`UserError`; file-system failures (``OSError``) and undecodable text (``UnicodeDecodeError``) are
reported the same way, naming the file where Python knows it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input or an impossible request; the message is the one line the user sees."""


def describe(exc: BaseException) -> str:
    """The one line that reports ``exc``."""
    if isinstance(exc, UnicodeDecodeError):
        return (f"cannot read text: byte 0x{exc.object[exc.start]:02x} at position {exc.start} is not "
                f"{exc.encoding} ({exc.reason}); save the file as UTF-8")
    if isinstance(exc, OSError) and exc.strerror:
        names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
        return f"{names}: {exc.strerror}" if names else exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_cli(main: Callable[[], Any]) -> int:
    """Call ``main()`` and turn user errors into one ``error:`` line on stderr (exit code 2).

    The exit code is ``main()``'s result when that is an int, else 0.
    """
    try:
        code = main()
    except (UserError, OSError, UnicodeDecodeError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


MAX_IMAGES_HELP = ("evaluate K images of the split: the same fixed random subset (resilience.golden.evaluated_ids) "
                   "in every command that takes it; default: all")


class OldSpelling(argparse.Action):
    """An option kept for older command lines: stores its value under ``dest`` and prints ``note`` once."""

    def __init__(self, option_strings: list[str], dest: str, note: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.note = note

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"note: {self.note}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, worker counts)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least} (got {value})")
    return value


def regex(text: str) -> str:
    """argparse type: a valid regular expression (kept as text, so it can be stored and compared)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") from None
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not when the help already states it, and never ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def differences(old: Mapping[str, Any], new: Mapping[str, Any], *, skip: Collection[str] = (), limit: int = 3) -> str:
    """``key: old -> new`` for the first ``limit`` keys whose values differ ('' when none do)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in skip and old.get(k) != new.get(k)]
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
