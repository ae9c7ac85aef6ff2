"""Stand-in for PythonQt's ``qt`` module: only ``QTimer.singleShot``, driven by ``slicer.app.processEvents()``."""
from __future__ import annotations

import time

#: Queued single-shot timers: (due time in seconds of time.monotonic(), callback), in insertion order.
_pending: list = []


class QTimer:
    """``QTimer.singleShot(msec, callable)`` as PythonQt exposes it; the callback runs from the event loop."""

    @staticmethod
    def singleShot(msec, callback) -> None:
        _pending.append((time.monotonic() + max(0, int(msec)) / 1000.0, callback))


def _process_due_timers() -> int:
    """Run every queued callback that is due (as one pass of Qt's event loop would); return how many ran."""
    now = time.monotonic()
    due = [entry for entry in _pending if entry[0] <= now]
    for entry in due:
        _pending.remove(entry)
    for _, callback in due:
        callback()
    return len(due)
