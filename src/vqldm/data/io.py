"""Reading and writing volumes: NIfTI (.nii, .nii.gz) and TIFF stacks (.tif, .tiff).

Every failure raises :class:`~vqldm.errors.VqldmError` naming the file, so a corrupt volume in a
folder of thousands is found from one line.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES) and not name.startswith(".")


def list_volumes(directory: str | Path) -> list[Path]:
    """The volume files directly inside ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if is_volume_file(p))


@dataclass
class Volume:
    array: np.ndarray  # float32, (X, Y, Z)
    spacing: tuple[float, float, float]  # voxel size in the file's units
    path: Path


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
    name = path.name.lower()
    try:
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asarray(img.dataobj)
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        elif name.endswith(TIFF_SUFFIXES):
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                arr = tf.asarray()
                zooms = _tiff_spacing(tf)
            # TIFF stacks are stored (Z, Y, X); vqldm works in (X, Y, Z) like NIfTI
            arr = arr.transpose(2, 1, 0) if arr.ndim == 3 else arr
        else:
            raise VqldmError(f"{path}: not a NIfTI or TIFF file")
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
    return Volume(array=np.ascontiguousarray(arr), spacing=zooms[:3], path=path)


def _tiff_spacing(tf) -> tuple[float, float, float]:
    """Voxel size from ImageJ metadata where present, else 1."""
    sx = sy = sz = 1.0
    try:
        ij = tf.imagej_metadata or {}
        sz = float(ij.get("spacing", 1.0))
        page = tf.pages[0]
        xr = page.tags.get("XResolution")
        yr = page.tags.get("YResolution")
        if xr is not None:
            num, den = xr.value
            sx = den / num if num else 1.0
        if yr is not None:
            num, den = yr.value
            sy = den / num if num else 1.0
    except Exception:  # missing or odd metadata: fall back to unit spacing
        pass
    return (sx, sy, sz)


def nifti_bytes(array: np.ndarray, spacing, gz: bool = True, units: str | None = None) -> bytes:
    """A NIfTI-1 image as bytes; gzipped with a zero timestamp and no name so equal data gives equal bytes."""
    import io

    import nibabel as nib

    spacing = [float(s) for s in spacing]
    img = nib.Nifti1Image(np.asarray(array, np.float32), np.diag(spacing + [1.0]))
    img.header.set_zooms(spacing)
    if units is not None:
        img.header.set_xyzt_units(units)
    raw = img.to_bytes()
    if not gz:
        return raw
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="", compresslevel=6) as f:
        f.write(raw)
    return buf.getvalue()


def write_volume(path: str | Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write a (X, Y, Z) volume as NIfTI (.nii/.nii.gz) or TIFF (.tif/.tiff), atomically.

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
        atomic_write_bytes(path, nifti_bytes(arr, spacing, gz=name.endswith(".gz")))
    elif name.endswith(TIFF_SUFFIXES):
        import io

        import tifffile

        buf = io.BytesIO()
        # ImageJ hyperstack: (Z, Y, X) with the z spacing in the metadata, as Fiji expects
        tifffile.imwrite(buf, np.ascontiguousarray(arr.transpose(2, 1, 0)), imagej=True,
                         resolution=(1.0 / spacing[0], 1.0 / spacing[1]),
                         metadata={"spacing": float(spacing[2]), "axes": "ZYX"})
        atomic_write_bytes(path, buf.getvalue())
    else:
        raise ValueError(f"{path}: output must end in .nii, .nii.gz, .tif or .tiff")
    return path


def check_data_dirs(data) -> None:
    """Both data folders of a ``DataConfig`` exist and hold volumes; else one line naming the key."""
    for key in ("train_data_dir", "val_data_dir"):
        path = Path(getattr(data, key))
        if not path.is_dir():
            raise VqldmError(f"data.{key}: directory not found: {path}")
        if not list_volumes(path):
            raise VqldmError(f"data.{key}: no volumes (.nii, .nii.gz, .tif, .tiff) in {path}")
