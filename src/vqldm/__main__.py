"""``python -m vqldm`` is the ``vqldm`` command (also under ``torchrun -m``-style launches)."""

import sys

from vqldm.cli.main import main

sys.exit(main())
