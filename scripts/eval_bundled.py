"""Thin wrapper: ``python scripts/eval_bundled.py --help`` is ``var-bench bundled --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["bundled", *sys.argv[1:]]))
