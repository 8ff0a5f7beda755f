"""The one error type for bad input: the library raises it, and only the scripts turn it into an exit message."""

from __future__ import annotations


class PoemDPOError(ValueError):
    """A bad file, field or value, named in one sentence that says what to do instead."""
