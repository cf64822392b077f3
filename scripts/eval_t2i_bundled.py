"""Thin wrapper: ``python scripts/eval_t2i_bundled.py --help`` is ``var-bench t2i-bundled --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["t2i-bundled", *sys.argv[1:]]))
