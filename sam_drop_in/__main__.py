"""``python -m sam_drop_in``: the same as the ``sam-drop-in`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
