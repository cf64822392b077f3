"""Thin wrapper: ``python scripts/compare_with_original.py --help`` is ``var-bench original --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["original", *sys.argv[1:]]))
