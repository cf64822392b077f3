"""Thin wrapper: ``python scripts/bench_var.py --help`` is ``var-bench var-speed --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["var-speed", *sys.argv[1:]]))
