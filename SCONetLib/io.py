"""Reading CT volumes and writing images and Slicer segmentations.

Everything here keeps SimpleITK's geometry untouched: origin, spacing and direction are LPS (see
:mod:`SCONetLib.geometry`). Files are written atomically (temporary file in the target folder, then
``os.replace``), so a crash or a cancelled run never leaves a half-written image behind.

Supported inputs of :func:`read_image`: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and a folder holding one DICOM series. :func:`write_image` writes ``.nii.gz``, ``.nii``,
``.nrrd`` and ``.mha`` (single-file formats only, so that the write can be atomic).
:func:`write_segmentation` writes a 3D Slicer ``.seg.nrrd``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from SCONetLib import io_checks
from SCONetLib import labels as organ_table
from SCONetLib.geometry import Grid

logger = logging.getLogger(__name__)

#: File name suffixes of the images :func:`read_image` accepts (besides DICOM series folders).
READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Suffixes :func:`write_image` accepts (single-file formats, so that a write can be atomic).
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Human-readable list of what :func:`read_image` accepts.
READ_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
#: Terminology contexts of the DICOM master list that 3D Slicer ships (used in ``TerminologyEntry`` tags).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
SEG_SUFFIX = ".seg.nrrd"


def image_suffix(name: str, suffixes: Sequence[str] = READ_SUFFIXES + (SEG_SUFFIX,)) -> str | None:
    """The longest of ``suffixes`` that file name ``name`` ends with (case-insensitive, lower-case as listed)
    after a non-empty stem, or ``None``."""
    lower = str(name).lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def image_stem(name: str) -> str:
    """File name ``name`` without its image suffix (``case.nii.gz`` → ``case``); unchanged without one."""
    suffix = image_suffix(name)
    return name[:-len(suffix)] if suffix else name


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D scalar CT volume from a file or a DICOM series folder.

    Parameters
    ----------
    path : file (NIfTI, NRRD, MetaImage) or folder holding exactly one DICOM series.

    Returns
    -------
    sitk.Image
        3D, one component per voxel, pixel type as stored (DICOM: rescaled to HU by the reader). Origin, spacing
        and direction exactly as SimpleITK reads them (LPS mm). A 4D file whose fourth axis has length 1 is
        returned as its 3D volume.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file cannot be read, the folder holds no or several DICOM series, or the image is not a 3D scalar
        volume (2D, a single slice, 4D, or several components per voxel).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image path does not exist: {str(path)!r}")
    with _itk_warnings_silenced():
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            image = _read_file(path)
    image = _as_3d_scalar(image, path)
    io_checks.check_direction(image.GetDirection(), path)
    return image


def _read_file(path: Path) -> sitk.Image:
    """One image file, checked against its header before ITK reads it (see :mod:`SCONetLib.io_checks`)."""
    suffix = image_suffix(path.name)
    non_finite = None
    try:
        if suffix in (".nii", ".nii.gz"):
            non_finite = io_checks.check_nifti(path)
        elif suffix in (".nrrd", ".nhdr", SEG_SUFFIX):
            io_checks.check_nrrd(path)
        elif suffix in (".mha", ".mhd"):
            io_checks.check_metaimage(path)
    except ValueError as error:
        raise ValueError(f"{error}{_dicom_hint(path)}") from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"cannot read image file {str(path)!r}: {_short_itk_message(error)}; expected "
                         f"{READ_FORMATS}{_dicom_hint(path)}") from None
    if non_finite is not None:   # ITK reads them as 0: put them back, so that the NaN checks downstream see them
        array = sitk.GetArrayFromImage(image)
        array.reshape(-1)[non_finite.indices] = non_finite.values
        restored = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
        restored.CopyInformation(image)
        image = restored
    return image


@contextlib.contextmanager
def _itk_warnings_silenced():
    """ITK's own warning lines (e.g. "Non uniform sampling or missing slices detected") go straight to stderr;
    SCONet checks those conditions itself and says so in its own words, so they are switched off meanwhile."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The single DICOM series in ``folder`` as a 3D image (``ValueError`` if there is none or several)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        raise ValueError(f"no DICOM series found in folder {str(folder)!r} ({n_files} files); expected a folder "
                         f"holding one DICOM series, or a file in {READ_FORMATS}")
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    if len(series_ids) > 1:
        listing = ", ".join(f"{sid} ({len(files)} files)" for sid, files in files_per_series.items())
        raise ValueError(f"folder {str(folder)!r} holds {len(series_ids)} DICOM series: {listing}; pass the folder "
                         f"of one series (move each series into its own folder)")
    files = files_per_series[series_ids[0]]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"cannot read DICOM series {series_ids[0]} in {str(folder)!r}: "
                         f"{_short_itk_message(error)}") from None
    if len(files) > 1:
        io_checks.check_slice_positions(_slice_positions(reader, len(files)), folder, series_ids[0])
    logger.info("read DICOM series %s: %d files, size %s", series_ids[0], len(files), image.GetSize())
    return image


def _slice_positions(reader: sitk.ImageSeriesReader, count: int) -> np.ndarray:
    """(count,) position (mm) of each file's slice along the slice normal, from Image Position / Orientation
    (Patient), in the reader's order."""
    def numbers(index, tag):
        return np.array([float(v) for v in reader.GetMetaData(index, tag).split("\\")])

    try:
        orientation = numbers(0, "0020|0037")
        normal = np.cross(orientation[:3], orientation[3:])
        return np.array([numbers(i, "0020|0032") @ normal for i in range(count)])
    except (RuntimeError, ValueError, IndexError):
        return np.zeros(0)       # no usable position tags: nothing to check against


def _as_3d_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """``image`` if it is a 3D scalar volume; a 4D image with one time point becomes 3D; ``ValueError`` else."""
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ValueError(f"{str(path)!r} has {components} components per voxel (size {image.GetSize()}); "
                         f"a 3D scalar CT volume is expected")
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        logger.info("%s: 4D image with a single time point, using its 3D volume", path)
        image = sitk.Extract(image, size[:3] + (0,), (0, 0, 0, 0))
        size = image.GetSize()
    if image.GetDimension() != 3:
        raise ValueError(f"{str(path)!r} is a {image.GetDimension()}D image (size {size}); a 3D scalar CT volume "
                         f"is expected{_dicom_hint(path)}")
    if min(size) < 2:
        raise ValueError(f"{str(path)!r} is a single slice (size {size}); a 3D scalar CT volume with at least two "
                         f"voxels along each axis is expected{_dicom_hint(path)}")
    return image


def _dicom_hint(path: Path) -> str:
    """Advice for a single DICOM file passed where its series folder was meant (empty for other paths)."""
    return " (for a DICOM series, pass the folder that holds it)" if path.suffix.lower() == ".dcm" else ""


def _short_itk_message(error: Exception) -> str:
    """The gist of a SimpleITK/ITK exception: the last ``ERROR:`` line without file names and object addresses."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    flagged = [line for line in lines if "ERROR:" in line]
    line = (flagged or lines or [type(error).__name__])[-1]
    line = line.split("ERROR:", 1)[-1].strip()
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` (format from the suffix, compressed), atomically.

    Parameters
    ----------
    image : sitk.Image, any dimension and pixel type the format supports; geometry is written as is (LPS).
    path : destination ending in one of :data:`WRITE_SUFFIXES`. Missing parent folders are created.

    Returns
    -------
    Path of the written file.

    Notes
    -----
    The image goes to a hidden temporary file with the same suffix in the destination folder, which then
    replaces ``path`` in one ``os.replace``; on any error the temporary file is removed and ``path`` is left as
    it was.
    """
    return write_outputs([image_output(image, path)])[0]


def image_output(image: sitk.Image, path: str | os.PathLike) -> "Output":
    """:class:`Output` writing ``image`` (compressed) to ``path``, which must end in one of :data:`WRITE_SUFFIXES`;
    checked now. ITK's complaints at write time become ``OSError`` naming ``path``."""
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    path = Path(path)
    suffix = image_suffix(path.name, WRITE_SUFFIXES)
    if suffix is None:
        raise ValueError(f"cannot write {str(path)!r}: unsupported file name suffix; expected one of "
                         f"{list(WRITE_SUFFIXES)}")

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as error:
            message = _short_itk_message(error).replace(str(tmp), str(path))
            raise OSError(f"cannot write {str(path)!r}: {message}") from None

    return Output(path, write, path.name[-len(suffix):])


@dataclasses.dataclass(frozen=True)
class Output:
    """One file of a set written by :func:`write_outputs`.

    Attributes
    ----------
    path : Path, destination.
    write : callable(temporary_path), writes the whole content to the temporary path it is given.
    suffix : str, ending of the temporary file's name (writers that pick the format from the name need it).
    """

    path: Path
    write: Callable[[Path], None]
    suffix: str = ".tmp"


def text_output(text, path: str | os.PathLike) -> Output:
    """:class:`Output` writing ``text`` as UTF-8; ``text`` may be a callable returning it, called at write time
    (after the files listed before it in the set are written)."""
    path = Path(path)
    return Output(path, lambda tmp: tmp.write_text(text() if callable(text) else text, encoding="utf-8"),
                  path.suffix)


def json_output(content, path: str | os.PathLike) -> Output:
    """:class:`Output` writing :func:`jsonable` of ``content`` as indented JSON; ``content`` may be a callable
    returning it, called at write time."""
    def text():
        value = content() if callable(content) else content
        return json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n"
    return text_output(text, path)


def write_outputs(outputs: Sequence[Output], durable: bool = False) -> list:
    """Write a set of files all at once or not at all; returns their paths.

    Every file is first written to a hidden temporary file in its destination folder (created if missing), in
    the order given. Only when all are complete do they replace their destinations (``os.replace``), with SIGINT
    and SIGTERM held back meanwhile; so a failure, a cancellation or Ctrl-C while writing leaves every earlier
    file at these paths as it was and no temporary behind. Before a set of several files is committed, a small
    journal listing the renames is written beside the first file: if the process is killed (SIGKILL, power cut)
    during the renames, :func:`remove_partial_outputs` completes them at the next start, so the set never stays
    mixed. ``durable=True`` also fsyncs the files and folders.

    Raises
    ------
    ValueError
        Two outputs share a path.
    IsADirectoryError
        A destination is an existing folder (checked before anything is written).
    KeyboardInterrupt
        A SIGINT (or SIGTERM turned into one) that arrived during the renames is raised once the set is
        complete, as :class:`InterruptedAfterWriting` naming the files.
    """
    outputs = list(outputs)
    paths = [Path(os.path.abspath(output.path)) for output in outputs]
    if len(set(paths)) != len(paths):
        raise ValueError(f"an output set names a file twice: {[str(p) for p in paths]}")
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {str(path)!r}: it is an existing folder")
    temporaries = []
    try:
        for output, path in zip(outputs, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries.append(_temporary_path(path, output.suffix))
            output.write(temporaries[-1])
            if durable:
                _fsync(temporaries[-1])
        with _signals_held() as held:
            journal = _write_journal(paths[0], list(zip(temporaries, paths))) if len(paths) > 1 else None
            for tmp, path in zip(temporaries, paths):
                os.replace(tmp, path)
            if journal is not None:
                journal.unlink()
        if durable:
            for folder in dict.fromkeys(path.parent for path in paths):
                _fsync(folder)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    if held:
        raise InterruptedAfterWriting(paths, held[0])
    return paths


class InterruptedAfterWriting(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while :func:`write_outputs` renamed its files: the set was completed first.

    Attributes: ``paths`` (the files written), ``signal_number``.
    """

    def __init__(self, paths: list, signal_number: int):
        super().__init__(f"interrupted by signal {signal_number} after writing {len(paths)} file(s)")
        self.paths, self.signal_number = paths, signal_number


#: Signals held back while a set of outputs is renamed into place.
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_held() -> Iterator[list]:
    """Record SIGINT/SIGTERM instead of acting on them inside the block (main thread only; elsewhere Python
    delivers signals to the main thread anyway). Yields the list of signal numbers received.

    After the block the handlers are restored; a held signal whose handler raises ``KeyboardInterrupt`` (Python's
    default for SIGINT, and the command lines' handler for SIGTERM) is left to the caller, any other handler is
    called with the signal.
    """
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {number: signal.getsignal(number) for number in _HELD_SIGNALS}
    for number in _HELD_SIGNALS:
        signal.signal(number, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    raising = {signal.default_int_handler, raise_keyboard_interrupt}
    for number in list(received):
        if previous[number] not in raising:
            received.remove(number)
            if previous[number] == signal.SIG_DFL:
                signal.raise_signal(number)
            elif callable(previous[number]):
                previous[number](number, None)


def raise_keyboard_interrupt(signal_number, frame) -> None:
    """Signal handler turning SIGTERM into ``KeyboardInterrupt``, so that it cleans up like Ctrl-C (the command
    lines install it)."""
    raise KeyboardInterrupt(f"signal {signal_number}")


def _temporary_path(path: Path, suffix: str) -> Path:
    """Hidden temporary name beside ``path``: ``.<name>.tmp-<pid>-<8 hex><suffix>`` (the process id lets
    :func:`remove_partial_outputs` leave alone the temporaries of a run still in progress)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _write_journal(first: Path, renames: list) -> Path:
    """Write the list of pending renames (temporary → destination) beside ``first``, atomically."""
    journal = first.with_name(f".{first.name}.commit-{os.getpid()}-{secrets.token_hex(4)}.json")
    tmp = _temporary_path(journal, ".json")
    tmp.write_text(json.dumps([[str(a), str(b)] for a, b in renames]), encoding="utf-8")
    os.replace(tmp, journal)
    return journal


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """Context manager for writing one file ``path`` all at once or not at all.

    Yields a hidden temporary path in ``path``'s folder (created if missing) ending in ``suffix`` (writers that
    pick the format from the file name need the real suffix). When the block ends normally the temporary file
    replaces ``path`` in one ``os.replace``; on any exception it is removed and ``path`` is left as it was. With
    ``durable=True`` the file and its folder are also fsync-ed, so the new content survives a power cut. For
    several files that belong together use :func:`write_outputs`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path, suffix)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


#: Names of our temporaries (with the writer's process id, or without it as older versions wrote them) and journals.
_TEMPORARY = re.compile(r"^\..+\.tmp-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")
_JOURNAL = re.compile(r"^\..+\.commit-(?P<pid>\d+)-[0-9a-f]{8}\.json$")
#: On systems where a process cannot be probed (Windows), temporaries older than this (s) count as abandoned.
_ABANDONED_AFTER_S = 3600.0


def remove_partial_outputs(folder: str | os.PathLike) -> list:
    """Clean up after a process killed while writing into ``folder``; returns the temporaries removed.

    A journal of :func:`write_outputs` left by a dead process means its set was complete but not all renamed:
    the remaining renames are done, so that set is whole again. Then hidden temporaries of dead processes
    (named like :func:`atomic_output`'s, ``.<name>.tmp-<pid>-<hex>...``) are deleted; those of running processes
    are left alone. A missing folder is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for journal in sorted(p for p in folder.iterdir() if _JOURNAL.match(p.name)):
        if _abandoned(journal, int(_JOURNAL.match(journal.name)["pid"])):
            _complete_journal(journal)
    stale = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and (match["pid"] is None or _abandoned(path, int(match["pid"]))):
            path.unlink(missing_ok=True)
            stale.append(path)
            logger.info("removed %s, left by an interrupted write", path)
    return stale


def _complete_journal(journal: Path) -> None:
    """Finish the renames a killed :func:`write_outputs` listed in ``journal``, then delete it."""
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        renames = []
    for tmp, path in renames:
        if Path(tmp).is_file():
            os.replace(tmp, path)
            logger.warning("completed the output set of an interrupted run: %s", path)
    journal.unlink(missing_ok=True)


def _abandoned(path: Path, pid: int) -> bool:
    """Whether the process ``pid`` that wrote ``path`` has ended (by its age where processes cannot be probed)."""
    if pid == os.getpid():
        return False
    if os.name == "nt":
        return time.time() - path.stat().st_mtime > _ABANDONED_AFTER_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def check_writable_folder(folder: str | os.PathLike) -> None:
    """``OSError`` naming ``folder`` if files cannot be created in it (or, while it does not exist yet, in its
    nearest existing parent, where it would be created): meant to fail before a long computation, not after.

    Probes by creating and deleting a hidden temporary file, which also catches read-only file systems and
    access rules that permission bits do not show. Creates nothing that stays.
    """
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write into {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    probe = _temporary_path(existing / ".sconet-write-check", "")
    try:
        probe.touch(exist_ok=False)
    except OSError as error:
        raise OSError(f"cannot write into {str(folder)!r}: {error.strerror or error}") from None
    probe.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's content to disk (folders only where the OS allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; returns the path."""
    return write_outputs([text_output(text, path)])[0]


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Dict rows as CSV text; ``columns`` defaults to every key, in order of appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV to ``path`` atomically (see :func:`csv_text`)."""
    return write_text(csv_text(rows, columns), path)


def write_json(content, path: str | os.PathLike) -> Path:
    """Write :func:`jsonable` of ``content`` as indented JSON to ``path`` atomically; returns the path."""
    return write_outputs([json_output(content, path)])[0]


def jsonable(value):
    """``value`` as plain JSON data: mappings become dicts with string keys; lists, tuples and numpy arrays become
    lists; numpy scalars Python numbers; NaN and infinities ``None`` (JSON has neither); any other object
    (a path, a device …) its ``str``."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_segmentation(labels: sitk.Image, path: str | os.PathLike,
                       organs: Sequence[organ_table.Organ] = organ_table.ORGANS) -> Path:
    """Write a label map as a 3D Slicer segmentation file (``.seg.nrrd``), atomically; see
    :func:`segmentation_output`."""
    return write_outputs([segmentation_output(labels, path, organs)])[0]


def segmentation_output(labels: sitk.Image, path: str | os.PathLike,
                        organs: Sequence[organ_table.Organ] = organ_table.ORGANS) -> Output:
    """:class:`Output` writing a label map as a 3D Slicer segmentation file (``.seg.nrrd``); checked now.

    Parameters
    ----------
    labels : sitk.Image
        3D integer label map (values 0 = background and the ``label`` of each organ in ``organs``), any
        geometry (LPS). Stored as uint8.
    path : destination ending in ``.seg.nrrd`` (the suffix Slicer loads as a segmentation).
    organs : the segments to write, in order; every organ is written, also when its label does not occur.

    Returns
    -------
    Output

    Notes
    -----
    The file is one uint8 labelmap layer (layer 0) on the grid of ``labels`` (``space: left-posterior-superior``,
    ``space directions``, ``space origin`` from its geometry), with Slicer's segmentation fields as NRRD
    ``key:=value`` lines: for segment ``N``, ``SegmentN_ID`` (organ name), ``_Name``, ``_Color`` (RGB 0–1),
    ``_LabelValue``, ``_Layer`` (0), ``_Extent``, ``_Tags`` (``TerminologyEntry`` from the SNOMED-CT codes of
    :mod:`SCONetLib.labels`), ``_NameAutoGenerated`` and ``_ColorAutoGenerated`` (0); and
    ``Segmentation_MasterRepresentation``, ``Segmentation_ContainedRepresentationNames``,
    ``Segmentation_ReferenceImageExtentOffset`` (``0 0 0``) and ``Segmentation_ConversionParameters`` holding the
    reference image geometry, so Slicer's Segment Editor uses the grid of ``labels``.

    Every segment's extent is the whole image, also for organs absent from this volume. Segments sharing a layer
    share one image in Slicer, and Slicer's reader crops that image to the extent of the *first* segment of the
    layer; an empty extent (``0 -1 0 -1 0 -1``) on an absent first organ would empty the whole layer. Slicer
    itself writes the layer's extent for every segment of a shared layer.
    """
    if not isinstance(labels, sitk.Image):
        raise TypeError(f"labels must be a SimpleITK.Image, got {type(labels).__name__}")
    path = Path(path)
    if not path.name.lower().endswith(SEG_SUFFIX):
        raise ValueError(f"cannot write segmentation {str(path)!r}: the file name must end in {SEG_SUFFIX!r} "
                         f"(use write_image for a plain label volume)")
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"labels must be a 3D scalar label map, got a {labels.GetDimension()}D image with "
                         f"{labels.GetNumberOfComponentsPerPixel()} components")
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must have an integer pixel type, got {labels.GetPixelIDTypeAsString()}")
    organs = tuple(organs)
    known = {0} | {organ.label for organ in organs}
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"labels must lie in 0..255 (uint8), got values from {lo} to {hi}")
    array = array.astype(np.uint8)
    present = set(np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist())
    if present - known:
        raise ValueError(f"labels holds values {sorted(present - known)} that are not 0 or the label of an organ "
                         f"in organs ({sorted(known - {0})})")
    image = Grid.of(labels).apply_to(sitk.GetImageFromArray(array))
    for key, value in _segmentation_fields(Grid.of(labels), organs).items():
        image.SetMetaData(key, value)
    return image_output(image, path)


def _segmentation_fields(grid: Grid, organs: Sequence[organ_table.Organ]) -> dict:
    """Slicer ``.seg.nrrd`` header fields (key → string value) for one shared layer on ``grid``."""
    extent = " ".join(f"0 {n - 1}" for n in grid.size)
    fields = {}
    for index, organ in enumerate(organs):
        prefix = f"Segment{index}_"
        fields.update({
            prefix + "ID": organ.name,
            prefix + "Name": organ.display_name,
            prefix + "Color": " ".join(f"{c / 255.0:.6g}" for c in organ.color),
            prefix + "ColorAutoGenerated": "0",
            prefix + "NameAutoGenerated": "0",
            prefix + "LabelValue": str(organ.label),
            prefix + "Layer": "0",
            prefix + "Extent": extent,
            prefix + "Tags": f"TerminologyEntry:{terminology_entry(organ)}|",
        })
    geometry = ";".join(f"{v:.17g}" for v in grid.ijk_to_ras.ravel()) + ";" + extent.replace(" ", ";") + ";"
    fields.update({
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": f"Reference image geometry|{geometry}|Geometry (IJK to RAS matrix and "
                                             f"extent) of the image the segmentation was made on.&",
    })
    return fields


def terminology_entry(organ: organ_table.Organ) -> str:
    """Slicer terminology string of ``organ``: 7 ``~``-separated parts, each code as ``scheme^code^meaning``.

    Order: context, category, type, type modifier, anatomic context, anatomic region, region modifier; e.g.
    ``Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~
    Anatomic codes - DICOM master list~^^~^^``.
    """
    def code(triplet):
        return "^".join(triplet) if triplet else "^^"

    return "~".join([TERMINOLOGY_CONTEXT, code(organ_table.CATEGORY), code(organ.snomed_type),
                     code(organ.snomed_modifier), ANATOMIC_CONTEXT, code(None), code(None)])
