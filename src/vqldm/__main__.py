"""``python -m vqldm`` is the ``vqldm`` command (also under ``torchrun -m``-style launches)."""

from vqldm.cli import console

if __name__ == "__main__":  # not when a spawned worker process imports this module
    console()
