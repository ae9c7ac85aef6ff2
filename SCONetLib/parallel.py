"""Coarse-grained parallelism on the CPU: independent pieces of torch work (slabs, query chunks) on threads.

Torch parallelises each operation over its intra-op threads, with a barrier per operation. For work made of many
small operations (a slab of slices, a chunk of queries) that barrier dominates, and on a machine shared with other
processes a descheduled thread stalls every operation. Instead, :func:`single_threaded_ops` turns torch's intra-op
parallelism off for a block and :func:`ordered_map` gives whole pieces to as many threads (torch operations release
the GIL): no barrier per operation, the same number of cores.

A block run this way also never enters an OpenMP parallel region, so it is safe in a process forked from one that
already used torch's intra-op threads (e.g. a ``ProcessPoolExecutor`` worker on Linux), where GNU OpenMP would hang.
On CUDA both are pass-throughs: pieces run in order in the calling thread.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch


@contextlib.contextmanager
def single_threaded_ops(device: torch.device):
    """On the CPU, set torch's intra-op thread count to 1 for the block and yield the count it had (the number of
    pieces to run at once with :func:`ordered_map`); restore it afterwards. Elsewhere, yield 1 and change nothing.

    Torch's thread count is process-wide: torch work in other threads meanwhile also runs on one thread.
    """
    if torch.device(device).type != "cpu":
        yield 1
        return
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield before
    finally:
        if before != 1:
            torch.set_num_threads(before)


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """Yield ``function(item)`` for every item, in order, computing up to ``workers`` items at once on threads.

    At most ``2 · workers`` items are submitted ahead of the consumer. Thread-local torch state (``inference_mode``,
    ``autocast``) is not inherited by the threads, so ``function`` sets what it needs. Closing the iterator early
    (an exception in the consumer) cancels the items not started and waits for the running ones.
    """
    items = iter(items)
    if workers <= 1:
        for item in items:
            yield function(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="sconet-cpu") as pool:
        pending = deque(pool.submit(function, item) for item in itertools.islice(items, 2 * workers))
        try:
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(items, 1):
                    pending.append(pool.submit(function, item))
                yield result
        finally:
            for future in pending:
                future.cancel()
