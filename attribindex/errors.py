"""The one exception type users catch: every message states the cause and the fix."""

from __future__ import annotations


class AttribIndexError(Exception):
    """A problem the user can fix (bad input, bad config, mismatched index).

    The CLI prints these as one clean message without a traceback.

    Example:
        >>> raise AttribIndexError("k must be >= 1, got 0. Pass -k 10 or another positive number.")
        Traceback (most recent call last):
        ...
        attribindex.errors.AttribIndexError: k must be >= 1, got 0. ...
    """


class IndexMismatchError(AttribIndexError):
    """A query or shard was produced with a different model, projection or preconditioner."""
