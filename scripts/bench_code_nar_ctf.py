"""Thin wrapper: ``python scripts/bench_code_nar_ctf.py --help`` is ``var-bench code-nar-ctf --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["code-nar-ctf", *sys.argv[1:]]))
