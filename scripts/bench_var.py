"""Thin wrapper: ``python scripts/bench_var.py --help``."""
import sys

from var.cli.bench_var import cli

if __name__ == "__main__":
    sys.exit(cli())
