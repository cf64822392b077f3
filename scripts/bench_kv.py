"""Thin wrapper: ``python scripts/bench_kv.py --help`` is ``var-bench kv --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["kv", *sys.argv[1:]]))
