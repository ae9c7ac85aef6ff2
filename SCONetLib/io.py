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
import gzip
import io
import json
import logging
import os
import re
import secrets
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from SCONetLib import labels as organ_table
from SCONetLib.geometry import Grid

logger = logging.getLogger(__name__)

#: Suffixes :func:`write_image` accepts (single-file formats, so that a write can be atomic).
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Human-readable list of what :func:`read_image` accepts.
READ_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
#: Terminology contexts of the DICOM master list that 3D Slicer ships (used in ``TerminologyEntry`` tags).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
SEG_SUFFIX = ".seg.nrrd"


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
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ValueError(f"cannot read image file {str(path)!r}: {_short_itk_message(error)}; expected "
                             f"{READ_FORMATS}{_dicom_hint(path)}") from None
        if path.name.lower().endswith(".gz"):
            _check_gzip_complete(path)
    return _as_3d_scalar(image, path)


def _check_gzip_complete(path: Path) -> None:
    """``ValueError`` if the gzip stream of ``path`` is cut short or corrupt.

    ITK's NIfTI reader fills the missing part of a truncated ``.nii.gz`` with zeros without complaint, so the
    stream is decompressed once more here (about as long as the read itself) to catch that.
    """
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except EOFError:
        problem = "the file is truncated (gzip stream ends early)"
        raise ValueError(f"cannot read image file {str(path)!r}: {problem}") from None
    except (OSError, zlib.error) as error:
        raise ValueError(f"cannot read image file {str(path)!r}: corrupt gzip data ({error})") from None


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
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"cannot read DICOM series {series_ids[0]} in {str(folder)!r}: "
                         f"{_short_itk_message(error)}") from None
    logger.info("read DICOM series %s: %d files, size %s", series_ids[0], len(files), image.GetSize())
    return image


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
    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    path = Path(path)
    _write_suffix(path)
    return _write_atomically(path, image)


def _write_suffix(path: Path) -> str:
    """The suffix of ``path`` among :data:`WRITE_SUFFIXES` (case-insensitive); ``ValueError`` otherwise."""
    name = path.name.lower()
    for suffix in WRITE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[-len(suffix):]
    raise ValueError(f"cannot write {str(path)!r}: unsupported file name suffix; expected one of "
                     f"{list(WRITE_SUFFIXES)}")


def _write_atomically(path: Path, image: sitk.Image) -> Path:
    """Write ``image`` (compressed) through :func:`atomic_output`; ITK's complaints become ``OSError`` naming ``path``."""
    with atomic_output(path, _write_suffix(path)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as error:
            message = _short_itk_message(error).replace(str(tmp), str(path))
            raise OSError(f"cannot write {str(path)!r}: {message}") from None
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """Context manager for writing ``path`` all at once or not at all.

    Yields a hidden temporary path in ``path``'s folder (created if missing) ending in ``suffix`` (writers that
    pick the format from the file name need the real suffix). When the block ends normally the temporary file
    replaces ``path`` in one ``os.replace``; on any exception it is removed and ``path`` is left as it was. With
    ``durable=True`` the file and its folder are also fsync-ed, so the new content survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}{suffix}")
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


def remove_partial_outputs(folder: str | os.PathLike) -> list:
    """Delete the temporary files a killed process left in ``folder`` while inside :func:`atomic_output`.

    Only hidden files named like ``atomic_output``'s temporaries (``.<name>.tmp-<hex>...``) are removed; returns
    their paths. A missing folder is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and re.match(r"^\..+\.tmp-[0-9a-f]{8}", p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write", path)
    return stale


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
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_output`); returns the path."""
    path = Path(path)
    with atomic_output(path, path.suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV to ``path`` atomically; ``columns`` defaults to every key, in order of appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(buffer.getvalue(), path)


def write_json(content, path: str | os.PathLike) -> Path:
    """Write ``content`` as indented JSON to ``path`` atomically; returns the path."""
    return write_text(json.dumps(content, indent=2) + "\n", path)


def write_segmentation(labels: sitk.Image, path: str | os.PathLike,
                       organs: Sequence[organ_table.Organ] = organ_table.ORGANS) -> Path:
    """Write a label map as a 3D Slicer segmentation file (``.seg.nrrd``), atomically.

    Parameters
    ----------
    labels : sitk.Image
        3D integer label map (values 0 = background and the ``label`` of each organ in ``organs``), any
        geometry (LPS). Stored as uint8.
    path : destination ending in ``.seg.nrrd`` (the suffix Slicer loads as a segmentation).
    organs : the segments to write, in order; every organ is written, also when its label does not occur.

    Returns
    -------
    Path of the written file.

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
    return _write_atomically(path, image)


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
