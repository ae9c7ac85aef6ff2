"""Checks of image files that ITK's readers skip, made by :func:`SCONetLib.io.read_image` before and after ITK reads.

ITK is lenient in ways that give silently wrong CTs:

* a truncated uncompressed NIfTI file, or a cut-short ``.nii.gz`` stream, is read with the missing voxels set to 0;
* NaN and infinite voxels of a NIfTI file are read as 0 (NRRD and MetaImage keep them);
* an NRRD file without a usable spacing (``spacings: nan nan nan``, or no spacing at all) is read with 1 mm;
* a DICOM series with a missing slice becomes a regular grid at the average slice step (see
  :func:`check_slice_positions`);
* a direction matrix whose columns are not orthonormal is accepted as is.

The functions here read the file headers (NIfTI-1/2, NRRD, MetaImage) with the standard library and numpy only,
following the formats' public specifications (nifti.nimh.nih.gov, teem.sourceforge.net/nrrd/format.html,
itk.org/Wiki/ITK/MetaIO). Each raises ``ValueError`` with a message naming the file and the problem.
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bytes read per step when a NIfTI file's voxel data is scanned.
_CHUNK = 1 << 24
#: Direction matrices whose ``Dᵀ D`` differs from the identity by more than this are refused.
DIRECTION_TOLERANCE = 1e-4
#: A DICOM slice step may differ from the series' median step by this fraction of it (plus 0.01 mm) at most.
SLICE_STEP_TOLERANCE = 0.01
#: NIfTI datatype codes of floating-point voxels (may hold NaN or infinities): float32, float64.
_NIFTI_FLOAT = {16: "f4", 64: "f8"}
#: Bytes per value of NRRD ``type:`` names (after lower-casing and dropping "signed", "_t" and "int" suffixes).
_NRRD_BYTES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
               "int": 4, "uint": 4, "int32": 4, "uint32": 4, "longlong": 8, "ulonglong": 8, "int64": 8,
               "uint64": 8, "float": 4, "double": 8}
#: Bytes per value of MetaImage ``ElementType`` names.
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


@dataclass(frozen=True)
class NonFinite:
    """Non-finite voxels found in a file's data: flat indices in file (= SimpleITK array) order and values."""

    indices: np.ndarray
    values: np.ndarray


def _refuse(path: Path, problem: str) -> ValueError:
    return ValueError(f"cannot read image file {str(path)!r}: {problem}")


def _no_spacing(path: Path, format_name: str, given: str) -> ValueError:
    return _refuse(path, f"its {format_name} header gives no usable spacing ({given}); the voxel size is unknown, "
                         f"so volumes and distances would be wrong: set the spacing in the file")


def _finite_numbers(texts) -> bool:
    """Whether there is at least one text and every one parses as a finite number."""
    try:
        return bool(texts) and all(np.isfinite(float(text)) for text in texts)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- NIfTI


def check_nifti(path: Path) -> NonFinite | None:
    """Check a ``.nii`` / ``.nii.gz`` file's voxel data against its header; return its non-finite voxels.

    Raises ``ValueError`` when the data is shorter than the header's dimensions and datatype require (a
    truncated file) or the gzip stream is cut short or corrupt. Returns the NaN / infinite voxels of a float
    file (``None`` when there are none, or for integer data), which ITK would read as 0. A file that does not
    start like a NIfTI file is left to ITK's reader to refuse (``None``).
    """
    compressed = path.name.lower().endswith(".gz")
    found, scanned, available, pending = [], 0, 0, b""
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            try:
                header = stream.read(544)
            except (OSError, EOFError, zlib.error):
                return None
            layout = _nifti_layout(path, header)
            if layout is None:
                return None
            shape, dtype, offset = layout
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            block = b""
            if not compressed:
                stream.seek(offset)
            elif offset <= len(header):
                block = header[offset:]
            else:
                stream.read(offset - len(header))
            while True:
                if dtype.kind == "f" and available < expected and block:
                    data = pending + block[:expected - available]
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    bad = np.flatnonzero(~np.isfinite(values))
                    if bad.size:
                        found.append((bad + scanned, values[bad].astype(dtype.newbyteorder("="))))
                    scanned += values.size
                    pending = data[usable:]
                available += len(block)
                block = stream.read(_CHUNK)
                if not block:
                    break
    except EOFError:
        raise _refuse(path, "the file is truncated (gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise _refuse(path, f"corrupt gzip data ({error})") from None
    if available < expected:
        raise _refuse(path, f"the file is truncated: its header describes {expected:,} bytes of voxel data "
                            f"({' × '.join(map(str, shape))} voxels of {dtype.itemsize} bytes), it holds "
                            f"{available:,}")
    if not found:
        return None
    return NonFinite(np.concatenate([i for i, _ in found]), np.concatenate([v for _, v in found]))


def _nifti_layout(path: Path, header: bytes) -> tuple | None:
    """(dimensions, numpy dtype, byte offset of the data) from a NIfTI-1 or NIfTI-2 header; ``None`` if
    ``header`` does not start like one."""
    for order in "<>":
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] in (348, 540):
            break
    else:
        return None
    if struct.unpack(order + "i", header[:4])[0] == 348:
        if len(header) < 348:
            raise _refuse(path, "the file is truncated (NIfTI-1 header incomplete)")
        dims = struct.unpack(order + "8h", header[40:56])
        datatype, bitpix = struct.unpack(order + "2h", header[70:74])
        offset = max(352, int(struct.unpack(order + "f", header[108:112])[0]))
    else:
        if len(header) < 540:
            raise _refuse(path, "the file is truncated (NIfTI-2 header incomplete)")
        datatype, bitpix = struct.unpack(order + "2h", header[12:16])
        dims = struct.unpack(order + "8q", header[16:80])
        offset = max(544, struct.unpack(order + "q", header[168:176])[0])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]) or bitpix <= 0 or bitpix % 8:
        raise _refuse(path, f"its NIfTI header is damaged (dim {list(dims)}, bitpix {bitpix})")
    kind = _NIFTI_FLOAT.get(datatype, f"V{bitpix // 8}")
    return tuple(dims[1:ndim + 1]), np.dtype(order + kind), offset


# ---------------------------------------------------------------------------------------------- NRRD


def check_nrrd(path: Path) -> None:
    """Check an ``.nrrd`` / ``.nhdr`` header: a finite spacing for every axis, and (raw encoding) enough data.

    Raises ``ValueError`` when the header gives no spacing or a NaN one (ITK would use 1 mm), or when raw voxel
    data is shorter than ``sizes`` × the type's size.
    """
    header, data_start = _nrrd_header(path)
    if not header.startswith("NRRD"):
        return                           # not an NRRD file: ITK's reader refuses it
    fields = {}
    for line in header.splitlines()[1:]:
        if ":=" not in line and ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
    sizes = [int(v) for v in fields.get("sizes", "").split()]
    directions = fields.get("space directions")
    if directions is not None:
        vectors = re.findall(r"\(([^)]*)\)", directions)
        if not _finite_numbers([x for v in vectors for x in v.split(",")]):
            raise _no_spacing(path, "NRRD", f"'space directions: {directions}'")
    else:
        spacings = fields.get("spacings", "").split()
        if not _finite_numbers(spacings):
            raise _no_spacing(path, "NRRD", f"'spacings: {fields['spacings']}'" if spacings
                              else "no 'spacings' or 'space directions' field")
    kind = re.sub(r"\b(signed|int)\b|_t\b| ", "", fields.get("type", "").lower().replace("unsigned ", "u"))
    size = _NRRD_BYTES.get(kind) or _NRRD_BYTES.get(fields.get("type", "").lower().replace(" ", ""))
    if fields.get("encoding") != "raw" or size is None or not sizes or int(fields.get("byte skip", "0")) < 0:
        return
    expected = int(np.prod(sizes, dtype=np.int64)) * size
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file is None:
        available = path.stat().st_size - data_start
    else:
        target = path.parent / data_file
        if not target.is_file():
            return                      # a list or a pattern of files: ITK reports missing ones itself
        available = target.stat().st_size - int(fields.get("byte skip", "0"))
    if available < expected:
        raise _refuse(path, f"the file is truncated: its header describes {expected:,} bytes of voxel data, "
                            f"{available:,} are there")


def _nrrd_header(path: Path) -> tuple:
    """(header text, byte offset of attached data) of an NRRD file (a detached header is read whole)."""
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    end = head.find(b"\n\n")
    if end < 0:
        return head.decode("latin-1"), len(head)
    return head[:end].decode("latin-1"), end + 2


# ---------------------------------------------------------------------------------------------- MetaImage


def check_metaimage(path: Path) -> None:
    """Check a ``.mha`` / ``.mhd`` header: a finite spacing, and (uncompressed) enough voxel data.

    Raises ``ValueError`` when ``ElementSpacing`` is missing or not finite, or when the uncompressed data is
    shorter than ``DimSize`` × ``ElementNumberOfChannels`` × the element size.
    """
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    fields, data_start = {}, None
    position = 0
    for raw in head.split(b"\n"):
        position += len(raw) + 1
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            data_start = position
            break
    if "NDims" not in fields:
        return                                   # not a MetaImage header: ITK will say so
    spacing = fields.get("ElementSpacing", fields.get("ElementSize", "")).split()
    if not _finite_numbers(spacing) or min(float(v) for v in spacing) <= 0:
        raise _no_spacing(path, "MetaImage", f"'ElementSpacing = {' '.join(spacing)}'" if spacing
                          else "no 'ElementSpacing' field")
    size = _MET_BYTES.get(fields.get("ElementType", ""))
    if fields.get("CompressedData", "False").lower() == "true" or size is None or data_start is None:
        return
    expected = (int(np.prod([int(v) for v in fields.get("DimSize", "0").split()], dtype=np.int64)) * size *
                int(fields.get("ElementNumberOfChannels", "1")))
    data_file = fields["ElementDataFile"]
    header_size = int(fields.get("HeaderSize", "0"))
    if data_file == "LOCAL":
        available = path.stat().st_size - data_start
    elif data_file != "LIST" and "%" not in data_file and (path.parent / data_file).is_file() and header_size >= 0:
        available = (path.parent / data_file).stat().st_size - header_size
    else:
        return
    if available < expected:
        raise _refuse(path, f"the file is truncated: its header describes {expected:,} bytes of voxel data, "
                            f"{available:,} are there")


# ---------------------------------------------------------------------------------------------- geometry


def check_direction(direction, path) -> None:
    """``ValueError`` if the (9,) row-major direction matrix of ``path``'s image is not orthonormal: a CT's axes
    are perpendicular unit vectors, and the model's frame and the output grids assume it."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    error = np.abs(matrix.T @ matrix - np.eye(3)).max()
    if not np.isfinite(error) or error > DIRECTION_TOLERANCE:
        columns = "; ".join(" ".join(f"{v:.4g}" for v in column) for column in matrix.T)
        raise ValueError(f"cannot use image {str(path)!r}: its direction matrix is not orthonormal (axes {columns}; "
                         f"|DᵀD − I| up to {error:.3g}); the image axes of a CT must be perpendicular unit "
                         f"vectors: fix the file's orientation (e.g. TransformMatrix of a MetaImage)")


def check_slice_positions(positions: np.ndarray, path, series: str) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along their normal (a missing or extra slice).

    ``positions`` are the (S,) positions (mm) of the slices along the slice normal, in the reader's order. Any
    step that differs from the median step by more than :data:`SLICE_STEP_TOLERANCE` of it (+ 0.01 mm) is
    refused: ITK would place every slice on a regular grid at the mean step, moving the slices beside a gap by up
    to half a slice and changing every volume in mL.
    """
    steps = np.diff(np.asarray(positions, dtype=np.float64))
    if steps.size < 1:
        return
    median = float(np.median(steps))
    wrong = np.flatnonzero(np.abs(steps - median) > SLICE_STEP_TOLERANCE * abs(median) + 0.01)
    if not wrong.size:
        return
    worst = int(wrong[np.argmax(np.abs(steps[wrong] - median))])
    missing = abs(steps[worst] / median) - 1 if median else float("nan")
    hint = (f", about {missing:.0f} missing slice(s) there" if median and missing >= 0.5 else
            ", slices closer than the others (a duplicate or an extra slice?)")
    raise ValueError(
        f"DICOM series {series} in {str(path)!r} is not evenly spaced: {len(positions)} slices with a median step "
        f"of {abs(median):.3g} mm, but {wrong.size} step(s) differ, the largest {abs(steps[worst]):.3g} mm between "
        f"slices {worst + 1} and {worst + 2} (at {positions[worst]:.2f} and {positions[worst + 1]:.2f} mm along the "
        f"slice normal){hint}. SCONet refuses such a series rather than placing the slices on a wrong regular grid; "
        f"add the missing files, or resample the series onto a regular grid first (e.g. 3D Slicer's DICOM import "
        f"with acquisition geometry regularization) and segment that volume")
