"""``python -m sam_drop_in.distill ...`` (also the entry point for ``torchrun -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
