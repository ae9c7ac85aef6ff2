"""Progress reporting and cancellation shared by every long-running stage.

A long function takes ``progress: ProgressCallback | None = None`` and calls ``report(progress, fraction,
message)`` at natural steps. The caller (CLI progress bar, Slicer progress bar) shows it; to cancel, the callback
raises :class:`Cancelled`, which the stage lets propagate after cleaning up (nothing half-written).
"""
from __future__ import annotations

from typing import Callable, Optional

#: ``callback(fraction in [0, 1], message)``.
ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop the work in progress."""


def report(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    """Call ``progress(fraction, message)`` if a callback was given (fraction clipped to [0, 1])."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback mapping a sub-task's [0, 1] onto [start, stop] of ``progress`` (``None`` stays ``None``)."""
    if progress is None:
        return None
    return lambda fraction, message: report(progress, start + (stop - start) * fraction, message)
