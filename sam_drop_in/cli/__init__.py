"""The ``sam-drop-in`` command (also ``python -m sam_drop_in``): segment, everything, convert,
info, export-onnx, distill, serve, quantize (``sam-drop-in --help`` lists them; docs/cli.md describes them).

A command module has ``register(subparsers)`` (adds its sub-parser) and ``run(args) -> int``;
it raises ``CliError(message, code)`` from ``_common`` for anything the user must fix. A new
command is one module plus its name in ``COMMANDS``.

Exit status: 0 success; 1 some image failed (the others are still processed) or the work
itself failed; 2 bad input. Every error is one line on stderr (SAM_DROP_IN_DEBUG=1: the
traceback instead). A command's model code is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .._errors import CheckpointError, InputError
from .._version import __version__
from ._common import EXIT_FAILED, EXIT_USAGE, PROG, CliError, env_debug, one_line

__all__ = ["main", "build_parser", "CliError", "COMMANDS"]

COMMANDS = ("segment", "everything", "convert", "info", "export_onnx", "distill", "serve", "quantize")


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-drop-in`` argument parser: every module in ``COMMANDS`` registers its command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment Anything from the command line: prompted masks, everything mode, checkpoints, "
                    "ONNX export and distillation. vit_t (MobileSAM/TinySAM) by default.",
        epilog="Run 'sam-drop-in COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        before = set(sub.choices)
        module.register(sub)
        for command in set(sub.choices) - before:
            sub.choices[command].set_defaults(_run=module.run)
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``sam-drop-in`` command.

    Arguments:
      argv (sequence of str or None): arguments without the program name; default sys.argv[1:].

    Returns:
      (int): exit status: 0 success, 1 some image or the work failed, 2 bad input.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        try:
            return int(args._run(args) or 0)
        except (FileNotFoundError, ImportError, CheckpointError, InputError) as exc:
            # Bad input that a library call found: the same one line and status as CliError.
            raise CliError(str(exc)) from exc
    except CliError as exc:
        if env_debug():
            raise
        _error(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # one line for the user; SAM_DROP_IN_DEBUG=1 shows the traceback
        if env_debug():
            raise
        _error(f"{type(exc).__name__}: {exc} (set SAM_DROP_IN_DEBUG=1 for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
