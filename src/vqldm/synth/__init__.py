"""Synthetic data sets: 3D SMLM-like microtubule volumes (``vqldm synth``)."""

from vqldm.synth.microtubules import (
    FOREGROUND_THRESHOLD,
    MicrotubuleParams,
    nifti_bytes,
    synth_volume,
    voxel_size_nm,
    write_dataset,
)

__all__ = [
    "FOREGROUND_THRESHOLD",
    "MicrotubuleParams",
    "nifti_bytes",
    "synth_volume",
    "voxel_size_nm",
    "write_dataset",
]
