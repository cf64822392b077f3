"""Thin wrapper: ``python scripts/bench_samplers.py --help`` is ``var-bench ar --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["ar", *sys.argv[1:]]))
