"""Localisation tables: CSV (``x [nm],y [nm],z [nm]``) and HDF5 point arrays in, CSV out.

A table is an ``(N, 3)`` float64 array of x, y, z in nanometres. The CSV layout is the one
ThunderSTORM, SMAP and the upstream project write: a header row naming ``x [nm]``, ``y [nm]`` and
``z [nm]`` (other columns such as ``frame`` or ``uncertainty [nm]`` are allowed and ignored; quotes
around header names are fine). HDF5 files hold an ``(N, 3)`` numeric dataset, or a structured one
with ``x``, ``y``, ``z`` fields; a ``unit`` attribute of ``um``/``micron`` is converted to nm.

Every problem (missing columns, NaN or infinite coordinates, an empty table, a file that is
neither CSV nor HDF5, a dataset key that does not exist) raises one :class:`VqldmError` naming
the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vqldm.errors import VqldmError
from vqldm.files import atomic_write_bytes

CSV_HEADER = ("x [nm]", "y [nm]", "z [nm]")
CSV_SUFFIXES = (".csv",)
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_MICRON_UNITS = {"um", "µm", "micron", "microns", "micrometer", "micrometre"}


def is_table_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(CSV_SUFFIXES + HDF5_SUFFIXES) and not name.startswith(".")


def list_tables(source: str | Path) -> list[Path]:
    """The localisation tables at ``source``: the file itself, or the tables directly inside a folder."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise VqldmError(f"{source}: no such file or folder")
    tables = sorted(p for p in source.iterdir() if is_table_file(p))
    if not tables:
        raise VqldmError(f"{source}: holds no localisation tables (*.csv, *.h5, *.hdf5)")
    return tables


def read_table(path: str | Path, key: str | None = None, allow_empty: bool = False) -> np.ndarray:
    """Read one localisation table as ``(N, 3)`` float64 nm; ``key`` names the HDF5 dataset.

    An empty table is refused unless ``allow_empty`` (a generated volume may hold no localisations)."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise VqldmError(f"{path}: no such file")
    if name.endswith(CSV_SUFFIXES):
        points = _read_csv(path, allow_empty)
    elif name.endswith(HDF5_SUFFIXES):
        points = _read_hdf5(path, key)
    else:
        raise VqldmError(f"{path}: not a localisation table; expected .csv (x [nm],y [nm],z [nm]) or .h5/.hdf5")
    return check_points(points, path, allow_empty)


def check_points(points: np.ndarray, path, allow_empty: bool = False) -> np.ndarray:
    """Refuse empty tables and NaN or infinite coordinates, naming the first bad row."""
    if points.shape[0] == 0 and not allow_empty:
        raise VqldmError(f"{path}: the table holds no localisations")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise VqldmError(f"{path}: {int(bad.sum())} localisations have NaN or infinite coordinates "
                         f"(first at data row {row + 1}: {points[row].tolist()})")
    return points


def _read_csv(path: Path, allow_empty: bool = False) -> np.ndarray:
    try:
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline()
            body = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise VqldmError(f"{path}: cannot read as a CSV text file ({e})") from None
    names = [h.strip().strip('"').strip("'").strip() for h in header.rstrip("\r\n").split(",")]
    missing = [c for c in CSV_HEADER if c not in names]
    if missing:
        raise VqldmError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; the header must "
                         f"name x [nm], y [nm] and z [nm] (found {names[:8]})")
    cols = [names.index(c) for c in CSV_HEADER]
    if not body.strip():
        if allow_empty:
            return np.zeros((0, 3), np.float64)
        raise VqldmError(f"{path}: the table holds no localisations")
    unquote = (lambda s: float(s.strip().strip('"'))) if '"' in body else None
    try:
        data = np.loadtxt(io.StringIO(body), delimiter=",", usecols=cols, ndmin=2, dtype=np.float64,
                          converters=unquote)
    except ValueError as e:
        raise VqldmError(f"{path}: not a numeric localisation table ({str(e).splitlines()[0]})") from None
    return data


def _read_hdf5(path: Path, key: str | None) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = _dataset(f, path, key)
            data = ds[()]
            unit = str(ds.attrs.get("unit", "nm")).strip().lower()
    except OSError as e:
        raise VqldmError(f"{path}: not a readable HDF5 file ({e})") from None
    points = _as_xyz(data, path, key)
    if unit in _MICRON_UNITS:
        points = points * 1000.0
    elif unit not in ("nm", "nanometer", "nanometre"):
        raise VqldmError(f"{path}: dataset unit {unit!r} is not nm or um")
    return points


def _dataset(f, path: Path, key: str | None):
    import h5py

    names: list[str] = []
    f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    if key is None:
        if len(names) != 1:
            raise VqldmError(f"{path}: holds {len(names)} datasets {names[:10]}; choose one with --key")
        key = names[0]
    if key not in names:
        raise VqldmError(f"{path}: no dataset {key!r} (it holds {names[:10]})")
    return f[key]


def _as_xyz(data: np.ndarray, path: Path, key) -> np.ndarray:
    if data.dtype.names:
        fields = {n.lower(): n for n in data.dtype.names}
        if not all(c in fields for c in "xyz"):
            raise VqldmError(f"{path}: dataset {key!r} has fields {list(data.dtype.names)}; need x, y, z")
        return np.stack([np.asarray(data[fields[c]], np.float64) for c in "xyz"], axis=1)
    if data.ndim != 2 or data.shape[1] != 3 or not np.issubdtype(data.dtype, np.number):
        raise VqldmError(f"{path}: dataset {key!r} has shape {data.shape} and dtype {data.dtype}; "
                         f"expected (N, 3) numbers (x, y, z in nm)")
    return np.asarray(data, np.float64)


def table_bytes(points: np.ndarray) -> bytes:
    """The CSV text of an ``(N, 3)`` nm table, with the ``x [nm],y [nm],z [nm]`` header (0.001 nm)."""
    buf = io.StringIO()
    buf.write(",".join(CSV_HEADER) + "\n")
    np.savetxt(buf, np.asarray(points, np.float64).reshape(-1, 3), fmt="%.3f", delimiter=",")
    return buf.getvalue().encode("utf-8")


def write_table(path: str | Path, points: np.ndarray) -> Path:
    """Write a localisation table as CSV, atomically."""
    path = Path(path)
    atomic_write_bytes(path, table_bytes(points))
    return path
