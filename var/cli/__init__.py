"""Command-line entry points. Each module has ``main(argv=None) -> int``, which raises on bad input (for callers
and tests), and ``cli``, the installed console script, which reports bad input in one line instead."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from var.errors import VarError


def command_line(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap ``main``: a :class:`~var.errors.VarError` (bad input: unknown class id, wrong image size, mismatched
    checkpoint, out-of-range budget ...) prints ``<prog>: error: <message>`` and exits with status 2 instead of
    a traceback. ``VAR_TRACEBACK=1`` re-raises it."""

    @functools.wraps(main)
    def cli(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except VarError as e:
            if os.environ.get("VAR_TRACEBACK"):
                raise
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
            return 2

    return cli
