"""vqldm: 3D VQ-latent diffusion on MONAI (VQ-VAE stage 1, latent diffusion stage 2).

The Python API (docs/api.md) is importable from here: ``from vqldm import load_model, train``. Its
names load on first use (PEP 562), so ``import vqldm`` (and with it the CLI) imports no torch.
"""

__version__ = "0.1.0"

_API = ("Autoencoder", "Config", "Model", "Samples", "VqldmError", "load_autoencoder", "load_config", "load_model",
        "synthesize", "train")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from vqldm import api  # the one import of a higher layer: the facade (docs/architecture.md)

        return getattr(api, name)
    raise AttributeError(f"module 'vqldm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
