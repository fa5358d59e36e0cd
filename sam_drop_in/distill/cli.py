"""Entry point of ``python -m sam_drop_in.distill`` (and ``torchrun -m sam_drop_in.distill``):
the ``sam-drop-in distill`` command, registered and run by ``sam_drop_in.cli`` like every
other command (``sam_drop_in/cli/distill.py``)."""

from __future__ import annotations

import sys
from typing import List, Optional

from ..cli import main as cli_main


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``sam-drop-in distill ARGV``.

    Arguments:
      argv (list[str] or None): arguments after ``distill``; default sys.argv[1:].

    Returns:
      int: exit status (0 on success, 2 on bad input).
    """
    return cli_main(["distill", *(sys.argv[1:] if argv is None else argv)])
