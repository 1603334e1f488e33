"""Reading and writing volumes: NIfTI (.nii, .nii.gz), ImageJ TIFF stacks (.tif, .tiff) and OME-TIFF
(.ome.tif, .ome.tiff), each with its voxel spacing and physical unit (:mod:`vqldm.data.units`).

Every failure raises :class:`~vqldm.errors.VqldmError` naming the file, so a corrupt volume in a
folder of thousands is found from one line.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqldm.data.units import IMAGEJ_UNIT, METERS, OME_UNIT, VoxelGrid, grid_of, parse_unit, unit_name
from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
OME_SUFFIXES = (".ome.tif", ".ome.tiff")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + OME_SUFFIXES


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES) and not name.startswith(".")


def list_volumes(directory: str | Path, nested: bool = False) -> list[Path]:
    """The volume files directly inside ``directory``, sorted by name; ``nested``: those inside its
    subfolders instead (``data.class_folders``: one subfolder per class), sorted by folder, then name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    if nested:
        return [f for d in sorted(p for p in directory.iterdir() if p.is_dir()) for f in list_volumes(d)]
    return sorted(p for p in directory.iterdir() if is_volume_file(p))


@dataclass
class Volume:
    array: np.ndarray  # float32, (X, Y, Z)
    spacing: tuple[float, float, float]  # voxel size in ``unit``
    path: Path
    unit: str = "unknown"  # "micron", "mm", "meter" or "unknown" (vqldm.data.units)
    affine: np.ndarray | None = None  # 4 x 4 voxel-to-world (NIfTI inputs); None: axis-aligned at 0

    @property
    def grid(self) -> VoxelGrid:
        return grid_of(self.spacing, self.unit, self.affine)


def _squeeze_to_3d(arr: np.ndarray, path: Path) -> np.ndarray:
    """Accept (X,Y,Z) and singleton channel/time axes; refuse real multi-channel or 2D data."""
    if arr.ndim > 3:
        squeezed = np.squeeze(arr)
        if squeezed.ndim == 3:
            return squeezed
        raise VqldmError(
            f"{path}: has shape {arr.shape}; vqldm reads single-channel 3D volumes (X, Y, Z). "
            f"Split multi-channel or time-series files into one file per channel"
        )
    if arr.ndim != 3:
        raise VqldmError(f"{path}: has shape {arr.shape}; expected a 3D volume (X, Y, Z)")
    return arr


def read_volume(path: str | Path) -> Volume:
    """Read one volume as float32 (X, Y, Z) with its voxel spacing. Raises VqldmError naming the file."""
    path = Path(path)
    try:
        arr, zooms, unit, affine = _read_any(path)
    except VqldmError:
        raise
    except FileNotFoundError:
        raise VqldmError(f"{path}: file not found") from None
    except Exception as e:  # nibabel/tifffile/gzip/zlib raise many types for a corrupt file
        # one line (readers put newlines in messages); the cause stays attached for --debug
        detail = " ".join(str(e).split())[:200]
        raise VqldmError(f"{path}: cannot read volume ({e.__class__.__name__}: {detail})") from e
    if arr.size == 0:
        raise VqldmError(f"{path}: cannot read volume (no voxels: a corrupt or empty file)")
    arr = _squeeze_to_3d(arr, path)
    if arr.dtype.kind not in "biuf":
        raise VqldmError(f"{path}: unsupported voxel type {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise VqldmError(f"{path}: holds {bad} NaN or infinite voxels; fix or remove the file")
    if len(zooms) < 3:
        zooms = tuple(zooms) + (1.0,) * (3 - len(zooms))
    return Volume(array=np.ascontiguousarray(arr), spacing=tuple(zooms[:3]), path=path, unit=unit, affine=affine)


def _read_any(path: Path):
    """``(array, spacing, unit, affine)`` of a NIfTI or TIFF file; TIFF arrays come back as (X, Y, Z)."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        unit = unit_name(img.header.get_xyzt_units()[0])
        return arr, zooms, unit, np.asarray(img.affine, dtype=float)
    if name.endswith(TIFF_SUFFIXES):
        import tifffile

        with tifffile.TiffFile(str(path)) as tf:
            arr = tf.asarray()
            zooms, unit = _tiff_grid(tf)
        # TIFF stacks are stored (Z, Y, X); vqldm works in (X, Y, Z) like NIfTI
        return (arr.transpose(2, 1, 0) if arr.ndim == 3 else arr), zooms, unit, None
    raise VqldmError(f"{path}: not a NIfTI or TIFF file")


def _tiff_grid(tf) -> tuple[tuple[float, float, float], str]:
    """Voxel size and unit: OME ``PhysicalSize*`` where present, else ImageJ's ``unit``, ``spacing`` and
    the X/Y resolution (pixels per unit); a TIFF without either has spacing 1 in unknown units."""
    try:
        if tf.is_ome:
            found = _ome_grid(tf.ome_metadata)
            if found is not None:
                return found
        ij = tf.imagej_metadata or {}
        page = tf.pages[0]
        sx, sy = (_pixel_size(page.tags.get(t)) for t in ("XResolution", "YResolution"))
        sz = float(ij.get("spacing", 1.0))
        spelled = ij.get("unit")
        if spelled is None and int(getattr(page.tags.get("ResolutionUnit"), "value", 1)) == 3:
            spelled = "cm"  # TIFF's own resolution unit, used only where ImageJ names none
        unit, factor = parse_unit(spelled)
        return (sx * factor, sy * factor, sz * factor), unit
    except Exception:  # odd metadata: unit spacing, as a TIFF without any
        return (1.0, 1.0, 1.0), "unknown"


def _pixel_size(tag) -> float:
    """1 / resolution (a TIFF stores pixels per unit as a rational); 1 where absent."""
    if tag is None:
        return 1.0
    num, den = tag.value
    return den / num if num else 1.0


def _ome_grid(xml: str | None):
    """``PhysicalSizeX/Y/Z`` of the first OME ``Pixels`` in one unit (the OME default is µm); None where
    the file records no physical size."""
    import xml.etree.ElementTree as ET

    pixels = next((e for e in ET.fromstring(xml or "<x/>").iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or not any(f"PhysicalSize{a}" in pixels.attrib for a in "XYZ"):
        return None
    axes = [(float(pixels.get(f"PhysicalSize{a}", 1.0)), *parse_unit(pixels.get(f"PhysicalSize{a}Unit", "µm")))
            for a in "XYZ"]
    units = {u for _, u, _ in axes}
    if len(units) > 1 and "unknown" in units:
        return tuple(v for v, _, _ in axes), "unknown"
    unit = min(units, key=lambda u: METERS.get(u, 1.0))  # mixed units: all in the finest
    return tuple(v * f * METERS.get(u, 1.0) / METERS.get(unit, 1.0) for v, u, f in axes), unit


def nifti_bytes(array: np.ndarray, spacing, gz: bool = True, unit: str = "unknown", affine=None) -> bytes:
    """A NIfTI-1 image as bytes (``xyzt_units`` from ``unit``; ``affine``: the voxel-to-world map, its
    columns rescaled to ``spacing``); gzipped with a zero timestamp and no name so equal data gives
    equal bytes."""
    import io

    import nibabel as nib

    grid = grid_of(spacing, unit_name(unit), affine)
    img = nib.Nifti1Image(np.asarray(array, np.float32), grid.affine_array())
    img.header.set_zooms(grid.spacing)
    img.header.set_xyzt_units(grid.unit)
    if affine is not None:  # readers that prefer the qform (ITK) see the same map as the sform
        img.set_qform(grid.affine_array(), code=int(img.header["sform_code"]) or 1)
    raw = img.to_bytes()
    if not gz:
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="", compresslevel=6) as f:
        f.write(raw)
    return buf.getvalue()


def tiff_bytes(array: np.ndarray, spacing, unit: str = "unknown", ome: bool = False) -> bytes:
    """A (X, Y, Z) volume as a TIFF stack of (Z, Y, X) pages with its physical size.

    ImageJ (``ome=False``): ``unit`` and z ``spacing`` in the ImageJ description, X/Y resolution in
    pixels per that unit, as Fiji writes and reads them. OME-TIFF: ``PhysicalSizeX/Y/Z`` with their
    units, and the X/Y resolution in pixels per centimetre (TIFF's own unit); its UUID is derived from the data, so equal data gives equal
    bytes.
    """
    import hashlib
    import io
    import uuid

    import tifffile

    unit = unit_name(unit)
    sx, sy, sz = (float(s) for s in spacing)
    zyx = np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0))
    buf = io.BytesIO()
    if ome:
        digest = hashlib.sha256(zyx.tobytes() + repr((sx, sy, sz, unit)).encode()).digest()
        meta = {"axes": "ZYX", "UUID": str(uuid.UUID(bytes=digest[:16], version=4))}
        for axis, size in zip("XYZ", (sx, sy, sz)):
            meta[f"PhysicalSize{axis}"], meta[f"PhysicalSize{axis}Unit"] = size, OME_UNIT[unit]
        tifffile.imwrite(buf, zyx, ome=True, metadata=meta, **_resolution_cm(sx, sy, unit))
    else:
        meta = {"spacing": sz, "axes": "ZYX"}
        if unit in IMAGEJ_UNIT:
            meta["unit"] = IMAGEJ_UNIT[unit]
        tifffile.imwrite(buf, zyx, imagej=True, resolution=(1.0 / sx, 1.0 / sy), metadata=meta)
    return buf.getvalue()


def _resolution_cm(sx: float, sy: float, unit: str) -> dict:
    """X/Y resolution in pixels per centimetre (TIFF's own unit, which ITK reads) where the unit is
    known; else pixels per voxel with no unit."""
    if unit not in METERS:
        return {"resolution": (1.0 / sx, 1.0 / sy), "resolutionunit": "NONE"}
    cm = METERS[unit] / 1e-2
    return {"resolution": (1.0 / (sx * cm), 1.0 / (sy * cm)), "resolutionunit": "CENTIMETER"}


def write_volume(path: str | Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), unit: str = "unknown",
                 affine=None) -> Path:
    """Write a (X, Y, Z) volume, atomically, in the format its suffix names: NIfTI (.nii, .nii.gz),
    OME-TIFF (.ome.tif, .ome.tiff) or ImageJ TIFF (.tif, .tiff), with ``spacing`` in ``unit`` (a
    :mod:`vqldm.data.units` name). ``affine`` (NIfTI only; TIFF has no origin or orientation) keeps
    the input's voxel-to-world map.

    Output bytes depend only on the data: .nii.gz is written with a zero gzip timestamp so the
    same seed gives the same file.
    """
    path = Path(path)
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"write_volume expects a 3D array, got shape {arr.shape}")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        data = nifti_bytes(arr, spacing, gz=name.endswith(".gz"), unit=unit, affine=affine)
    elif name.endswith(TIFF_SUFFIXES):
        data = tiff_bytes(arr, spacing, unit, ome=name.endswith(OME_SUFFIXES))
    else:
        raise ValueError(f"{path}: output must end in .nii, .nii.gz, .tif, .tiff, .ome.tif or .ome.tiff")
    atomic_write_bytes(path, data)
    return path


def check_data_dirs(data) -> None:
    """Both data folders of a ``DataConfig`` exist and hold volumes; else one line naming the key."""
    for key in ("train_data_dir", "val_data_dir"):
        path = Path(getattr(data, key))
        if not path.is_dir():
            raise VqldmError(f"data.{key}: directory not found: {path}")
        if not list_volumes(path, data.class_folders):
            where = "the class subfolders of " if data.class_folders else ""
            raise VqldmError(f"data.{key}: no volumes (.nii, .nii.gz, .tif, .tiff) in {where}{path}")
