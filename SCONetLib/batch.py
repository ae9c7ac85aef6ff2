"""Batch segmentation: a folder or a list of CTs, one label map each, reading and writing overlapped with compute.

:func:`segment_batch` loads the model once, then for each case reads the CT (in a prefetch thread, ahead of the
compute), prepares and segments it on the device, and writes the label map (in a writer thread, behind it).
SimpleITK releases the GIL while it reads and writes, so on a GPU the device stays busy while the host does I/O.

* Cases whose label map already exists are skipped (outputs are written atomically, so an existing file is
  complete): a killed batch is simply run again.
* A case that fails (unreadable file, not a CT, ...) is reported in the summary and the batch goes on.
* Under ``torchrun --nproc_per_node=N`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set), rank r takes cases r,
  r + N, r + 2N, ... of the sorted list and, on CUDA, the GPU ``LOCAL_RANK``; no process group is needed.
* A JSON summary (per rank) gives throughput in CTs per hour and per-case times; it is rewritten after every
  case, so it is also valid after a kill.

Frames: outputs are label maps in the input's exact physical space (LPS), as :meth:`SCONetLib.infer.Segmenter.segment`
returns them.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import SimpleITK as sitk

from . import __version__
from .infer import Segmenter
from .io import READ_SUFFIXES, SEG_SUFFIX, WRITE_SUFFIXES, image_stem, read_image, write_image, write_json
from .points.cloud import DEFAULT_N_POINTS
from .progress import ProgressCallback, report

logger = logging.getLogger(__name__)

#: Appended to a case's stem to name its label map (``case.nii.gz`` → ``case_sconet.nii.gz``).
OUTPUT_TAG = "_sconet"
#: File name of the summary (one per rank under torchrun: ``sconet_batch.rank{r}of{n}.json``).
SUMMARY_NAME = "sconet_batch.json"
#: Cases read ahead of the one being segmented.
PREFETCH = 2

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def segment_batch(source: Source, output_dir: str | os.PathLike, *, spacing=None, device: str = "auto",
                  weights=None, dense: bool = False, n_points: int = DEFAULT_N_POINTS, suffix: str = ".nii.gz",
                  precision: str = "float32", implementation: str = "auto", rank: Optional[int] = None,
                  world_size: Optional[int] = None, summary_path=None,
                  progress: Optional[ProgressCallback] = None, postprocess: bool = True) -> dict:
    """Segment every CT of ``source`` into ``output_dir``; return the summary (also written as JSON).

    Parameters
    ----------
    source : folder, list file, or sequence of paths
        A folder: every image file in it (suffixes :data:`SCONetLib.io.READ_SUFFIXES`) and every sub-folder (a DICOM series),
        sorted by name. A list file: one CT path per line (relative paths are relative to the list file; blank
        lines and lines starting with ``#`` are ignored). A sequence: those paths, in that order.
    output_dir : folder
        Receives ``<case stem>_sconet<suffix>`` per case (created if missing) and the summary.
    spacing, device, weights, dense, n_points, precision, implementation, postprocess
        As for :class:`SCONetLib.infer.Segmenter` and :meth:`~SCONetLib.infer.Segmenter.segment` (``postprocess``
        on by default, as in :func:`SCONetLib.segment.segment_file`). With several
        ranks and ``device`` ``"auto"`` or ``"cuda"``, rank r uses ``cuda:LOCAL_RANK`` when CUDA is available.
    suffix : str
        Output format, one of :data:`SCONetLib.io.WRITE_SUFFIXES`.
    rank, world_size : int, optional
        This process's shard; default from the ``RANK`` and ``WORLD_SIZE`` environment variables (torchrun), else
        0 of 1.
    summary_path : path, optional
        Default ``output_dir / SUMMARY_NAME`` (per-rank name when ``world_size > 1``).
    progress : callable(fraction, message), optional
        Called after every case; may raise :class:`SCONetLib.progress.Cancelled` (finished outputs stay, the
        summary records what was done).

    Returns
    -------
    dict
        The summary: ``cases`` (one entry per case of this shard: ``input``, ``output``, ``status`` ``"done"`` /
        ``"skipped"`` / ``"failed"``, ``error``, seconds ``read_s``, ``prepare_s``, ``segment_s``, ``write_s``,
        ``total_s``), counts ``done`` / ``skipped`` / ``failed``, ``wall_s``, ``cts_per_hour`` (cases segmented per
        hour of wall time) and ``summary`` (the JSON file's path).

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist, a list file names no case, or the weights are missing.
    ValueError
        Unsupported ``suffix``, bad ``rank`` / ``world_size``, or a bad option of the segmenter.
    """
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"suffix must be one of {list(WRITE_SUFFIXES)}, got {suffix!r}")
    rank, world_size = _shard_of(rank, world_size)
    output_dir = Path(output_dir)
    cases = list_cases(source, exclude=output_dir)[rank::world_size]
    outputs = [output_dir / f"{case_stem(case)}{OUTPUT_TAG}{suffix}" for case in cases]
    summary_path = Path(summary_path) if summary_path is not None else output_dir / (
        SUMMARY_NAME if world_size == 1 else f"{Path(SUMMARY_NAME).stem}.rank{rank}of{world_size}.json")
    segmenter = Segmenter(weights=weights, device=_rank_device(device, world_size), n_points=n_points,
                          precision=precision, implementation=implementation)
    summary = {
        "tool": "sconet-segment (batch)",
        "library_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": str(summary_path),
        "rank": rank, "world_size": world_size, "device": str(segmenter.device),
        "weights": None if segmenter.weights_path is None else str(Path(segmenter.weights_path).resolve()),
        "options": {"spacing": spacing, "dense": dense, "n_points": n_points, "suffix": suffix,
                    "precision": precision, "implementation": implementation},
        "cases": [{"input": str(case), "output": str(out), "status": "pending"} for case, out in zip(cases, outputs)],
    }
    start = time.perf_counter()
    todo = [index for index, out in enumerate(outputs) if not out.exists()]
    for index in set(range(len(cases))) - set(todo):
        summary["cases"][index]["status"] = "skipped"
    logger.info("batch: %d cases in this shard (rank %d of %d), %d already done", len(cases), rank, world_size,
                len(cases) - len(todo))
    with ThreadPoolExecutor(1, thread_name_prefix="sconet-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="sconet-write") as writer:
        reads = {index: reader.submit(_timed, read_image, cases[index]) for index in todo[:PREFETCH]}
        writes = []
        try:
            for position, index in enumerate(todo):
                entry = summary["cases"][index]
                if position + PREFETCH < len(todo):
                    ahead = todo[position + PREFETCH]
                    reads[ahead] = reader.submit(_timed, read_image, cases[ahead])
                try:
                    image, entry["read_s"] = reads.pop(index).result()
                    entry.update(_segment(segmenter, image, spacing, dense, postprocess))
                    labels = entry.pop("labels")
                except Exception as error:              # noqa: BLE001 - a bad case must not stop the batch
                    _fail(entry, error)
                else:
                    writes.append((index, writer.submit(_timed, write_image, labels, outputs[index])))
                    del image, labels
                _collect(summary, writes, wait=False)
                _write_summary(summary, summary_path, start)
                report(progress, (position + 1) / len(todo), f"{position + 1} / {len(todo)} cases")
        finally:                                        # also when stopped: record the label maps written
            for future in reads.values():
                future.cancel()
            _collect(summary, writes, wait=True)
            _write_summary(summary, summary_path, start)
    logger.info("batch: %d done, %d skipped, %d failed, %.1f CTs/hour", summary["done"], summary["skipped"],
                summary["failed"], summary["cts_per_hour"])
    return summary


def list_cases(source: Source, exclude: Optional[Path] = None) -> list:
    """The CT paths of a batch ``source`` (see :func:`segment_batch`), as :class:`pathlib.Path`.

    ``exclude``: a folder left out of a folder's cases (the output folder, when it sits inside the input folder).

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist, or a list file names no case.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"batch input does not exist: {str(source)!r}")
    if source.is_dir():
        skip = exclude.resolve() if exclude is not None else None
        return sorted(p for p in source.iterdir()
                      if (p.is_dir() and p.resolve() != skip) or (p.is_file() and _is_case_file(p)))
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    cases = [source.parent / line for line in lines if line and not line.startswith("#")]
    if not cases:
        raise FileNotFoundError(f"list file {str(source)!r} names no CT (one path per line)")
    return cases


def is_batch_source(path: str | os.PathLike) -> bool:
    """Whether ``sconet-segment`` treats ``path`` as a batch: a list file (an existing file that is not an image),
    or a folder holding image files or sub-folders rather than a DICOM series (files without image suffixes)."""
    path = Path(path)
    if path.is_file():
        return not _is_case_file(path)
    if path.is_dir():
        entries = list(path.iterdir())
        return any(p.is_dir() or _is_case_file(p) for p in entries)
    return False


def case_stem(path: str | os.PathLike) -> str:
    """Name of a case without its image suffix (``case.nii.gz`` → ``case``; a DICOM folder keeps its name)."""
    path = Path(path)
    stem = image_stem(path.name)
    return stem if stem != path.name or path.is_dir() else path.stem


def _is_case_file(path: Path) -> bool:
    lower = path.name.lower()
    return any(lower.endswith(s) for s in READ_SUFFIXES) and not lower.endswith(SEG_SUFFIX)


def _shard_of(rank: Optional[int], world_size: Optional[int]) -> tuple:
    """(rank, world size) from the arguments or torchrun's environment; ``ValueError`` if inconsistent."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
    return rank, world_size


def _rank_device(device: str, world_size: int) -> str:
    """``cuda:LOCAL_RANK`` for ``"auto"`` / ``"cuda"`` when several ranks share a node's GPUs, else ``device``."""
    import torch
    if world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _timed(function, *args):
    """(result, seconds) of ``function(*args)``."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _segment(segmenter: Segmenter, image: sitk.Image, spacing, dense: bool, postprocess: bool) -> dict:
    """Prepare and segment one CT: ``{"labels": image, "prepare_s": s, "segment_s": s}``."""
    start = time.perf_counter()
    segmenter.prepare(image)
    prepared = time.perf_counter()
    labels = segmenter.segment(spacing, dense=dense, postprocess=postprocess)
    return {"labels": labels, "prepare_s": prepared - start, "segment_s": time.perf_counter() - prepared}


def _fail(entry: dict, error: BaseException) -> None:
    entry["status"] = "failed"
    entry["error"] = f"{type(error).__name__}: {error}"
    logger.error("batch: %s failed: %s", entry["input"], entry["error"])


def _collect(summary: dict, writes: list, wait: bool) -> None:
    """Record the finished writes (all of them with ``wait``) and drop them from ``writes``."""
    for item in list(writes):
        index, future = item
        if not (wait or future.done()):
            continue
        writes.remove(item)
        entry = summary["cases"][index]
        try:
            _, entry["write_s"] = future.result()
        except Exception as error:                      # noqa: BLE001
            _fail(entry, error)
            continue
        entry["status"] = "done"
        entry["total_s"] = sum(entry.get(key, 0.0) for key in ("read_s", "prepare_s", "segment_s", "write_s"))


def _write_summary(summary: dict, path: Path, start: float) -> None:
    """Update the counts and throughput, round the times and write the summary atomically."""
    cases = summary["cases"]
    for status in ("done", "skipped", "failed"):
        summary[status] = sum(case["status"] == status for case in cases)
    summary["wall_s"] = round(time.perf_counter() - start, 3)
    summary["cts_per_hour"] = round(3600.0 * summary["done"] / summary["wall_s"], 1) if summary["wall_s"] else 0.0
    for case in cases:
        for key, value in case.items():
            if key.endswith("_s"):
                case[key] = round(value, 3)
    write_json(summary, path)

