"""Exceptions of the text-features package; CLIs print them as one ``error: ...`` line."""

from __future__ import annotations

from cli_shell import UserError


class TextFeaturesError(UserError):
    """Base class: a problem the user can fix, described in one line."""


class DescriptionsError(TextFeaturesError):
    """A descriptions file is missing, malformed or does not cover the dataset's classes."""


class LLMError(TextFeaturesError):
    """The chat-completions endpoint cannot be reached or refuses the requests."""


class EncoderError(TextFeaturesError):
    """A text encoder cannot be built (bad spec, missing weights, no network)."""
