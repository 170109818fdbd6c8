"""Progress bars with rate and ETA; sparse updates when output is not a terminal (logs, CI)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(
    iterable=None,
    *,
    total: int | None = None,
    desc: str,
    unit: str,
    enabled: bool = True,
    initial: int = 0,
    position: int | None = None,
    unit_scale: bool = False,
) -> tqdm:
    """A tqdm bar that redraws at most every 0.5 s on a terminal and every 10 s in a log file.

    `position` gives each process of a multi-process build its own line.

    Example:
        >>> for _ in progress(range(3), desc="extract", unit="doc", enabled=False):
        ...     pass
    """
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 10.0,
        initial=initial,
        position=position,
        unit_scale=unit_scale,
        unit_divisor=1024 if unit_scale else 1000,
    )


def close_open_bars() -> None:
    """Close every bar still open (an error left it mid-line), so what is printed next starts on its own line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
