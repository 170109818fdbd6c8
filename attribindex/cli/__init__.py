"""The `attribindex` command line."""

from attribindex.cli._main import main

__all__ = ["main"]
