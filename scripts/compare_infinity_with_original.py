"""Thin wrapper: ``python scripts/compare_infinity_with_original.py --help`` is ``var-bench original-infinity --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["original-infinity", *sys.argv[1:]]))
