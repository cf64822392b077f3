"""Thin wrapper: ``python scripts/bench.py --help`` (same as ``var-bench``)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli())
