"""Coarse-grained parallelism on the CPU: independent pieces of torch work (slabs, query chunks) on threads.

Torch parallelises each operation over its intra-op threads, with a barrier per operation. For work made of many
small operations (a slab of slices, a chunk of queries) that barrier dominates, and on a machine shared with other
processes a descheduled thread stalls every operation. :func:`ordered_map` instead gives each thread whole pieces
(torch operations release the GIL) with torch's intra-op parallelism set to one thread meanwhile: no barrier per
operation, the same number of cores. On CUDA the pieces run in order in the calling thread.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch


def ordered_map(function: Callable, items: Iterable, device: torch.device) -> Iterator:
    """Yield ``function(item)`` for every item, in order.

    On the CPU with ``torch.get_num_threads() = n > 1``, items run on n threads (at most 2n submitted ahead of the
    consumer) and torch's intra-op thread count is 1 until the iteration ends; thread-local torch state
    (``inference_mode``, ``autocast``) is not inherited, so ``function`` sets what it needs. Closing the iterator
    early (an exception in the consumer) cancels the items not started and waits for the running ones.
    """
    workers = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    items = iter(items)
    if workers <= 1:
        for item in items:
            yield function(item)
        return
    with _intra_op_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="sconet-cpu") as pool:
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


@contextlib.contextmanager
def _intra_op_threads(count: int):
    """Set torch's intra-op thread count for the block, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
