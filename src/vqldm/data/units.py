"""Physical units of the voxel grid: the names vqldm records and how each file format spells them.

vqldm names a length unit as NIfTI does: ``"micron"``, ``"mm"``, ``"meter"`` or ``"unknown"``, and
every spacing is in that unit. A :class:`VoxelGrid` (spacing, unit, and the voxel-to-world affine
where the input had one) is read from the training data, scaled by ``data.voxel_resize``, recorded
in every checkpoint's ``data`` entry and written into every output file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNITS = ("unknown", "meter", "mm", "micron")
METERS = {"meter": 1.0, "mm": 1e-3, "micron": 1e-6}

_MICRON = ("micron", "microns", "um", "\u00b5m", "\u03bcm", "\\u00b5m", "micrometer", "micrometre",
           "micrometers", "micrometres")
_SPELLINGS = {
    **{s: ("micron", 1.0) for s in _MICRON},
    **{s: ("micron", 1e-3) for s in ("nm", "nanometer", "nanometre", "nanometers", "nanometres")},
    **{s: ("mm", 1.0) for s in ("mm", "millimeter", "millimetre", "millimeters", "millimetres")},
    **{s: ("mm", 10.0) for s in ("cm", "centimeter", "centimetre", "centimeters", "centimetres")},
    **{s: ("mm", 25.4) for s in ("in", "inch", "inches")},
    **{s: ("meter", 1.0) for s in ("m", "meter", "metre", "meters", "metres")},
}
IMAGEJ_UNIT = {"micron": "micron", "mm": "mm", "meter": "m"}  # Fiji shows "micron" as µm
OME_UNIT = {"micron": "\u00b5m", "mm": "mm", "meter": "m", "unknown": "pixel"}


def parse_unit(spelling) -> tuple[str, float]:
    """``(unit, factor)``: a file's unit spelling as a vqldm unit, and the factor that converts a length
    in the spelled unit to it (``"nm"`` -> ``("micron", 1e-3)``). Anything unrecognised is unknown."""
    if spelling is None:
        return "unknown", 1.0
    return _SPELLINGS.get(str(spelling).strip().lower(), ("unknown", 1.0))


def unit_name(spelling) -> str:
    """The vqldm unit of ``spelling`` (``"µm"`` -> ``"micron"``; unrecognised: ``"unknown"``); raises
    ValueError for one that needs a conversion of the spacing (``"nm"``)."""
    unit, factor = parse_unit(spelling)
    if factor != 1.0:
        raise ValueError(f"unit {spelling!r}: convert the spacing to one of {', '.join(UNITS)}")
    return unit


@dataclass(frozen=True)
class VoxelGrid:
    """Voxel size in ``unit`` and, where the input had one, the voxel-to-world affine (in ``unit``)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str = "unknown"
    affine: tuple | None = None  # 4 x 4, nested tuples of floats

    def describe(self) -> str:
        return f"[{', '.join(f'{s:.6g}' for s in self.spacing)}] {self.unit}"

    def same_spacing(self, other: VoxelGrid, rtol: float = 1e-4) -> bool:
        """Same unit and spacing (TIFF stores spacing as rationals, so within ``rtol``)."""
        return self.unit == other.unit and bool(np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0))

    def resized(self, shape, new_shape) -> VoxelGrid:
        """The grid after resizing a volume of ``shape`` to ``new_shape`` voxels (``data.voxel_resize``):
        the same field of view, so the spacing scales by ``shape / new_shape``; the affine maps the new
        voxel centres (MONAI ``Resize`` without aligned corners) to the same world points."""
        scale = np.asarray(shape, float) / np.asarray(new_shape, float)
        spacing = tuple(float(s) for s in np.asarray(self.spacing) * scale)
        affine = None
        if self.affine is not None:
            step = np.eye(4)
            step[:3, :3] = np.diag(scale)
            step[:3, 3] = 0.5 * scale - 0.5
            affine = _as_tuple(np.asarray(self.affine) @ step)
        return VoxelGrid(spacing, self.unit, affine)

    def affine_array(self) -> np.ndarray:
        """The 4 x 4 affine, its columns scaled to ``spacing`` (a diagonal one where none was read)."""
        if self.affine is None:
            return np.diag(list(self.spacing) + [1.0])
        a = np.array(self.affine, dtype=float)
        norms = np.linalg.norm(a[:3, :3], axis=0)
        norms[norms == 0] = 1.0
        a[:3, :3] = a[:3, :3] / norms * np.asarray(self.spacing, float)
        return a

    def to_meta(self) -> dict:
        """The checkpoint's ``data`` entries: plain lists and strings (``weights_only`` loads them)."""
        return {"spacing": [float(s) for s in self.spacing], "spacing_unit": self.unit,
                "affine": None if self.affine is None else [list(r) for r in self.affine]}

    @classmethod
    def from_meta(cls, *records: dict) -> VoxelGrid:
        """The grid of the first ``data`` record that has a spacing; a checkpoint written before units
        were recorded reads as unit ``"unknown"``."""
        for rec in records:
            if rec and rec.get("spacing"):
                affine = rec.get("affine")
                return cls(tuple(float(s) for s in rec["spacing"]), rec.get("spacing_unit") or "unknown",
                           None if affine is None else _as_tuple(np.asarray(affine, float)))
        return cls()


def _as_tuple(a: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(a, float))


def grid_of(spacing, unit: str = "unknown", affine=None) -> VoxelGrid:
    """A :class:`VoxelGrid` from loose values (lists, arrays)."""
    return VoxelGrid(tuple(float(s) for s in spacing), unit,
                     None if affine is None else _as_tuple(np.asarray(affine, float)))
