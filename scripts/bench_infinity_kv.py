"""Thin wrapper: ``python scripts/bench_infinity_kv.py --help`` is ``var-bench infinity-kv --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["infinity-kv", *sys.argv[1:]]))
